# stigmer-admin: the Vault admin who runs `stigmer-broker setup`, `policy apply|check` and
# `keys rotate|rewrap`.
#
# Mounts, auth methods, roles, policies and Transit key management for the broker. It has no
# decrypt capability either: rewrap re-encrypts inside Vault without exposing plaintext.
# `policy check` mints short-lived tokens carrying the other stigmer-* policies, which needs
# sudo on auth/token/create; drop that block if you run `policy check` as root instead.

path "sys/mounts" {
  capabilities = ["read"]
}
path "sys/mounts/${kv_mount}" {
  capabilities = ["create", "read", "update"]
}
path "sys/mounts/${transit_mount}" {
  capabilities = ["create", "read", "update"]
}
path "sys/auth" {
  capabilities = ["read"]
}
path "sys/auth/*" {
  capabilities = ["create", "read", "update", "sudo"]
}
path "auth/${jwt_mount}/config" {
  capabilities = ["create", "read", "update"]
}
path "auth/${jwt_mount}/role/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
path "auth/${kubernetes_mount}/config" {
  capabilities = ["create", "read", "update"]
}
path "auth/${kubernetes_mount}/role/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
path "auth/${approle_mount}/role/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
path "identity/entity" {
  capabilities = ["create", "update"]
}
path "identity/entity/name/stigmer-*" {
  capabilities = ["create", "read", "update"]
}
path "identity/entity-alias" {
  capabilities = ["create", "update"]
}
path "identity/lookup/entity" {
  capabilities = ["update"]
}
path "sys/policies/acl/stigmer-*" {
  capabilities = ["create", "read", "update", "delete"]
}
path "auth/token/create" {
  capabilities = ["update", "sudo"]
}
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}
path "${transit_mount}/keys/env-*" {
  capabilities = ["create", "read", "update"]
}
path "${transit_mount}/keys/env-*/rotate" {
  capabilities = ["update"]
}
path "${transit_mount}/keys/env-*/config" {
  capabilities = ["update"]
}
path "${transit_mount}/rewrap/env-*" {
  capabilities = ["update"]
}
path "${kv_mount}/data/environments/*" {
  capabilities = ["read", "update"]
}
path "${kv_mount}/metadata/environments/*" {
  capabilities = ["read", "list"]
}

# Rewrap live ExecutionContexts before raising a key's min_decryption_version
# (ciphertext only: there is no decrypt capability here).
path "${kv_mount}/data/execution-contexts/*" {
  capabilities = ["read", "update"]
}
path "${kv_mount}/metadata/execution-contexts/*" {
  capabilities = ["read", "list"]
}
