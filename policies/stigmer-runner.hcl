# stigmer-runner: the broker inside a runner pod (sidecar or `stigmer-broker run`).
#
# Templated on the tenant of the identity that logged in: JWT auth maps the service-account
# token's namespace claim to the alias metadata "tenant". Every path below carries that tenant,
# so a runner reads and decrypts only its own tenant's contexts; other tenants are denied by
# Vault itself. If the claim is missing the template does not render and the path grants
# nothing.
#
# No list, no encrypt, no writes to Environments.

# Read the execution contexts of its own tenant (by id; no listing).
path "${kv_mount}/data/execution-contexts/{{identity.entity.aliases.${jwt_accessor}.metadata.tenant}}/*" {
  capabilities = ["read"]
}

# Destroy a context when its execution ends.
path "${kv_mount}/metadata/execution-contexts/{{identity.entity.aliases.${jwt_accessor}.metadata.tenant}}/*" {
  capabilities = ["delete"]
}

# Claim an execution (check-and-set 0 makes the claim exclusive).
path "${kv_mount}/data/execution-claims/{{identity.entity.aliases.${jwt_accessor}.metadata.tenant}}/*" {
  capabilities = ["create"]
}

# Decrypt with its own tenant's key only.
path "${transit_mount}/decrypt/env-{{identity.entity.aliases.${jwt_accessor}.metadata.tenant}}" {
  capabilities = ["update"]
}
