# stigmer-admin: the Vault admin who runs `stigmer-broker setup`, rotates keys and rewraps.
#
# Mounts, auth methods, roles and policies for the broker; Transit key management and rewrap.
# It has no decrypt capability either: rewrap re-encrypts without exposing plaintext.

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
path "sys/auth/${jwt_mount}" {
  capabilities = ["create", "read", "update", "sudo"]
}
path "auth/${jwt_mount}/config" {
  capabilities = ["create", "read", "update"]
}
path "auth/${jwt_mount}/role/*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
path "sys/policies/acl/stigmer-*" {
  capabilities = ["create", "read", "update", "delete"]
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
