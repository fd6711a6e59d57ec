"""Settings read once at start: where Vault is and how to reach it, and the Vault layout.

``VaultSettings.from_env`` reads what the Vault CLI reads, in both spellings (``VAULT_*`` wins
over ``BAO_*``): address, token, TLS material, server name and namespace. ``VAULT_ADDR`` may list
several servers separated by commas (an HA cluster without a load balancer).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from broker import names
from broker.errors import ConfigError
from broker.records import field, record


@record(frozen=True)
class Layout:
    """Mount points and names in Vault; every one can be changed (STIGMER_* variables)."""

    kv_mount: str = "stigmer"
    transit_mount: str = "stigmer-transit"
    jwt_mount: str = "jwt"
    kubernetes_mount: str = "kubernetes"
    approle_mount: str = "approle"
    runner_role: str = "stigmer-runner"
    reaper_role: str = "stigmer-reaper"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Layout:
        return cls(
            kv_mount=environ.get("STIGMER_KV_MOUNT", cls.kv_mount),
            transit_mount=environ.get("STIGMER_TRANSIT_MOUNT", cls.transit_mount),
            jwt_mount=environ.get("STIGMER_JWT_MOUNT", cls.jwt_mount),
            kubernetes_mount=environ.get("STIGMER_KUBERNETES_MOUNT", cls.kubernetes_mount),
            approle_mount=environ.get("STIGMER_APPROLE_MOUNT", cls.approle_mount),
            runner_role=environ.get("STIGMER_RUNNER_ROLE", cls.runner_role),
            reaper_role=environ.get("STIGMER_REAPER_ROLE", cls.reaper_role),
        )

    def environment_path(self, tenant: str, name: str) -> str:
        return f"environments/{names.tenant(tenant)}/{names.environment_name(name)}"

    def environments_dir(self, tenant: str) -> str:
        return f"environments/{names.tenant(tenant)}"

    def contexts_dir(self, tenant: str) -> str:
        return f"execution-contexts/{names.tenant(tenant)}"

    def context_path(self, tenant: str, execution_id: str) -> str:
        return f"{self.contexts_dir(tenant)}/{names.execution_id(execution_id)}"

    def claims_dir(self, tenant: str) -> str:
        return f"execution-claims/{names.tenant(tenant)}"

    def claim_path(self, tenant: str, execution_id: str) -> str:
        return f"{self.claims_dir(tenant)}/{names.execution_id(execution_id)}"

    def approle_role(self, tenant: str) -> str:
        return f"{self.runner_role}-{names.tenant(tenant)}"

    def transit_key(self, tenant: str) -> str:
        return f"env-{names.tenant(tenant)}"


def _setting(environ: Mapping[str, str], name: str) -> str:
    return environ.get(f"VAULT_{name}") or environ.get(f"BAO_{name}") or ""


def _addresses(text: str) -> tuple[str, ...]:
    addresses = tuple(a.strip().rstrip("/") for a in text.split(",") if a.strip())
    for address in addresses:
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"VAULT_ADDR {address!r}: not an http(s) URL",
                hint="use e.g. https://vault.example.com:8200 (or http:// for a dev server)",
            )
    return addresses


def uses_tls(addresses: tuple[str, ...]) -> bool:
    """Does any of these (checked) addresses use https, in any case of the scheme?"""
    return any(urlsplit(address).scheme == "https" for address in addresses)


def plain_http_only(environ: Mapping[str, str] = os.environ) -> bool:
    """Is every configured Vault address plain ``http://`` (so no TLS will ever be needed)?
    False when there is none or one is not understood: the command reports that itself."""
    try:
        addresses = _addresses(_setting(environ, "ADDR"))
    except ConfigError:
        return False
    return bool(addresses) and not uses_tls(addresses)


@record(frozen=True)
class VaultSettings:
    """Where Vault is and how to talk to it. The token never shows in ``repr``."""

    addresses: tuple[str, ...]
    token: str = field(default="", repr=False)
    cacert: str = ""
    capath: str = ""
    client_cert: str = ""
    client_key: str = ""
    tls_server_name: str = ""
    skip_verify: bool = False
    namespace: str = ""

    @property
    def addr(self) -> str:
        """The first configured address (the one a single-server setup has)."""
        return self.addresses[0]

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, need_token: bool = True
    ) -> VaultSettings:
        addr = _setting(environ, "ADDR")
        token = _setting(environ, "TOKEN")
        if not addr:
            raise ConfigError(
                "VAULT_ADDR (or BAO_ADDR) is not set",
                hint="`source .vault-dev/env` after `dev up`, or export the address of your Vault",
            )
        if need_token and not token:
            raise ConfigError("VAULT_TOKEN (or BAO_TOKEN) is not set")
        if not (token.isascii() and token.isprintable()) or " " in token:
            raise ConfigError(  # the value is not shown: it is a credential
                "VAULT_TOKEN (or BAO_TOKEN) holds a space, a line break or another character a "
                "token never has",
                hint="a token read from a file keeps its newline: strip it",
            )
        if bool(_setting(environ, "CLIENT_CERT")) != bool(_setting(environ, "CLIENT_KEY")):
            raise ConfigError("VAULT_CLIENT_CERT and VAULT_CLIENT_KEY must be set together")
        return cls(
            addresses=_addresses(addr),
            token=token,
            cacert=_setting(environ, "CACERT"),
            capath=_setting(environ, "CAPATH"),
            client_cert=_setting(environ, "CLIENT_CERT"),
            client_key=_setting(environ, "CLIENT_KEY"),
            tls_server_name=_setting(environ, "TLS_SERVER_NAME"),
            skip_verify=_setting(environ, "SKIP_VERIFY").lower() in ("1", "true", "yes"),
            namespace=_setting(environ, "NAMESPACE").strip("/"),
        )

    @classmethod
    def local(cls, addr: str, token: str = "") -> VaultSettings:
        """Settings for one plain address (dev servers, tests)."""
        return cls(addresses=_addresses(addr), token=token)
