"""Reading stored resources back from KV, with one clear error when they are not there."""

from __future__ import annotations

from typing import TypeVar

from broker.config import Layout
from broker.errors import NotFound, ValidationError
from broker.model import ExecutionContext, _Resource, parse_resource
from broker.vault import KV, VaultClient

T = TypeVar("T", bound=_Resource)


def load_stored(kv: KV, path: str, cls: type[T], label: str, missing: str) -> T:
    """The resource at ``path``; ``ValidationError(label, [missing])`` if there is none."""
    try:
        document, _ = kv.read_resource(path)
    except NotFound:
        raise ValidationError(label, [missing]) from None
    return parse_resource(document, cls)


def read_context(
    client: VaultClient, layout: Layout, tenant: str, execution_id: str
) -> ExecutionContext:
    """An execution's context, read with ``client``'s token."""
    return load_stored(
        KV(client, layout.kv_mount),
        layout.context_path(tenant, execution_id),
        ExecutionContext,
        f"execution {execution_id}",
        f"no context in tenant {tenant} (never issued, ended or expired)",
    )
