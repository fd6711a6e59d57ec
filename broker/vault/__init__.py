"""Everything that talks to Vault/OpenBao. Nothing outside this package sends HTTP to Vault.

``transport`` (HTTP/1.1 on asyncio) → ``client`` (classification, retry policy, addresses) →
``kv``, ``transit``, ``auth`` (what the broker does with Vault). The package knows nothing of the
CLI or of executions.
"""

from broker.vault.auth import (
    Login,
    approle_login,
    create_child_token,
    jwt_login,
    lookup_accessor,
    lookup_self,
    renew_self,
    revoke_accessor,
    revoke_self,
    unwrap_secret_id,
)
from broker.vault.client import VaultClient
from broker.vault.kv import KV, Document, Metadata
from broker.vault.retry import RetryPolicy, Safety, deadline
from broker.vault.transit import Transit

__all__ = [
    "KV",
    "Document",
    "Login",
    "Metadata",
    "RetryPolicy",
    "Safety",
    "Transit",
    "VaultClient",
    "approle_login",
    "create_child_token",
    "deadline",
    "jwt_login",
    "lookup_accessor",
    "lookup_self",
    "renew_self",
    "revoke_accessor",
    "revoke_self",
    "unwrap_secret_id",
]
