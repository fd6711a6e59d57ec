"""Everything that talks to Vault/OpenBao. Nothing outside this package sends HTTP to Vault."""

from broker.vault.auth import (
    Login,
    approle_login,
    create_child_token,
    jwt_login,
    lookup_self,
    revoke_self,
    unwrap_secret_id,
)
from broker.vault.client import VaultClient
from broker.vault.kv import KV, Document
from broker.vault.transit import Transit

__all__ = [
    "KV",
    "Document",
    "Login",
    "Transit",
    "VaultClient",
    "approle_login",
    "create_child_token",
    "jwt_login",
    "lookup_self",
    "revoke_self",
    "unwrap_secret_id",
]
