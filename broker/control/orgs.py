"""Orgs and tenants: a resource or reference that names another org is refused, never resolved
against the local tenant's resource of the same slug.

A tenant is an org unless ``STIGMER_ORG_TENANTS`` maps orgs to tenants (``org=tenant,…``; for
Stigmer orgs whose ids are not DNS labels, or several orgs served by one tenant).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from broker import names
from broker.errors import ConfigError

ENV = "STIGMER_ORG_TENANTS"


def org_map(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``STIGMER_ORG_TENANTS`` parsed: org → tenant."""
    mapping: dict[str, str] = {}
    for item in environ.get(ENV, "").split(","):
        if not item.strip():
            continue
        org, sep, tenant = item.strip().partition("=")
        if not sep or not org or not names.matches(names.TENANT, tenant):
            raise ConfigError(f"{ENV}: {item.strip()!r} is not org=tenant")
        mapping[org] = tenant
    return mapping


def org_problems(
    tenant: str, found: Iterable[tuple[str, str]], mapping: Mapping[str, str] | None = None
) -> list[str]:
    """A problem line for each (where, org) whose org is not ``tenant``'s."""
    mapping = org_map() if mapping is None else mapping
    return [
        f"{where}: org {org!r} is not tenant {tenant} (map orgs to tenants with {ENV})"
        for where, org in found
        if org and mapping.get(org, org) != tenant
    ]
