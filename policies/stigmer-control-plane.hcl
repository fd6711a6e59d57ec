# stigmer-control-plane: the service that stores Environments and creates executions.
#
# It writes Environments (secret values already Transit ciphertext), issues ExecutionContexts
# and encrypts with the tenants' Transit keys. It can NOT decrypt: no path below grants
# transit decrypt, so a compromised control plane never sees a secret in plaintext.
# It cannot create, change or release execution claims: those belong to runners.

# Environments: create, replace (check-and-set), read ciphertext, delete.
path "${kv_mount}/data/environments/*" {
  capabilities = ["create", "read", "update"]
}
path "${kv_mount}/metadata/environments/*" {
  capabilities = ["read", "list", "delete"]
}

# ExecutionContexts: issue, read masked, set the expiry, list for `execution list`, end.
# "update" too: the metadata (with the expiry) is written first, and KV v2 counts a data write
# to a key whose metadata exists as an update. The broker writes with check-and-set 0, so an
# existing context is never overwritten.
path "${kv_mount}/data/execution-contexts/*" {
  capabilities = ["create", "read", "update"]
}
path "${kv_mount}/metadata/execution-contexts/*" {
  capabilities = ["create", "update", "read", "list", "delete"]
}

# Who holds an execution (`execution list`): the claims' metadata only (pod, mode, since).
path "${kv_mount}/metadata/execution-claims/*" {
  capabilities = ["read", "list"]
}

# Encrypt only, with the existing per-tenant keys ("update", not "create": no new keys).
path "${transit_mount}/encrypt/env-*" {
  capabilities = ["update"]
}
