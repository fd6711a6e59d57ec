"""AppRole credentials for runners outside Kubernetes: the role_id, and secret_ids that leave
Vault only response-wrapped (the caller sees a single-use wrapping token, never the secret_id)."""

from __future__ import annotations

from broker import names
from broker.config import Layout
from broker.vault import Safety, VaultClient


async def role_id(client: VaultClient, layout: Layout, tenant: str) -> str:
    role = layout.approle_role(names.tenant(tenant))
    answer = await client.get(f"auth/{layout.approle_mount}/role/{role}/role-id")
    return str(answer["data"]["role_id"])


async def wrapped_secret_id(
    client: VaultClient, layout: Layout, tenant: str, wrap_ttl_seconds: int
) -> str:
    """A new secret_id for the tenant's runner role, as a response-wrapping token."""
    role = layout.approle_role(names.tenant(tenant))
    answer = await client.request(
        "POST",
        f"auth/{layout.approle_mount}/role/{role}/secret-id",
        {},
        operation="secret-id",
        safety=Safety.MINTS_TOKEN,
        headers=[("X-Vault-Wrap-TTL", f"{wrap_ttl_seconds}s")],
    )
    return str(answer["wrap_info"]["token"])
