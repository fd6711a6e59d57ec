"""Settings read once: where Vault is, which token to use, and the Vault layout."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from broker import ids
from broker.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Mount points and names in Vault; every one can be changed (STIGMER_* variables)."""

    kv_mount: str = "stigmer"
    transit_mount: str = "stigmer-transit"
    jwt_mount: str = "jwt"
    kubernetes_mount: str = "kubernetes"
    approle_mount: str = "approle"
    runner_role: str = "stigmer-runner"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Layout:
        return cls(
            kv_mount=environ.get("STIGMER_KV_MOUNT", cls.kv_mount),
            transit_mount=environ.get("STIGMER_TRANSIT_MOUNT", cls.transit_mount),
            jwt_mount=environ.get("STIGMER_JWT_MOUNT", cls.jwt_mount),
            kubernetes_mount=environ.get("STIGMER_KUBERNETES_MOUNT", cls.kubernetes_mount),
            approle_mount=environ.get("STIGMER_APPROLE_MOUNT", cls.approle_mount),
            runner_role=environ.get("STIGMER_RUNNER_ROLE", cls.runner_role),
        )

    def environment_path(self, tenant: str, name: str) -> str:
        return f"environments/{ids.tenant(tenant)}/{ids.environment_name(name)}"

    def environments_dir(self, tenant: str) -> str:
        return f"environments/{ids.tenant(tenant)}"

    def context_path(self, tenant: str, execution_id: str) -> str:
        return f"execution-contexts/{ids.tenant(tenant)}/{ids.execution_id(execution_id)}"

    def claim_path(self, tenant: str, execution_id: str) -> str:
        return f"execution-claims/{ids.tenant(tenant)}/{ids.execution_id(execution_id)}"

    def approle_role(self, tenant: str) -> str:
        return f"{self.runner_role}-{ids.tenant(tenant)}"

    def transit_key(self, tenant: str) -> str:
        return f"env-{ids.tenant(tenant)}"


@dataclass(frozen=True)
class VaultSettings:
    """Address and token; VAULT_* and BAO_* are both honoured (VAULT_* wins)."""

    addr: str
    token: str = field(default="", repr=False)
    cacert: str = ""

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, need_token: bool = True
    ) -> VaultSettings:
        addr = environ.get("VAULT_ADDR") or environ.get("BAO_ADDR") or ""
        token = environ.get("VAULT_TOKEN") or environ.get("BAO_TOKEN") or ""
        if not addr:
            raise ConfigError("VAULT_ADDR (or BAO_ADDR) is not set")
        if need_token and not token:
            raise ConfigError("VAULT_TOKEN (or BAO_TOKEN) is not set")
        return cls(addr=addr, token=token, cacert=environ.get("VAULT_CACERT", ""))
