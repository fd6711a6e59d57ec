# stigmer-runner: the broker inside a runner pod (sidecar or `stigmer-broker run`).
#
# Every tenant-scoped path below is templated on the tenant of the identity that logged in:
#   - JWT auth (Kubernetes service-account tokens): the namespace claim, mapped by the role to
#     the alias metadata "tenant";
#   - Kubernetes auth: the alias metadata "service_account_namespace";
#   - AppRole: the entity metadata "tenant" that `stigmer-broker setup --approle-tenant` sets.
# The block between BEGIN and END is rendered once per enabled auth method, with the tenant
# placeholder replaced by that method's template. A runner therefore reads and decrypts only
# its own tenant's contexts; every other tenant is denied by Vault. If the identity lacks the
# claim, the template does not render and the block grants nothing.
#
# Not granted, on purpose: list, encrypt, any write to Environments, another tenant's claims.

# BEGIN per-identity-source
# Read the execution contexts of its own tenant, by id (no listing).
path "${kv_mount}/data/execution-contexts/${tenant}/*" {
  capabilities = ["read"]
}

# Destroy a context when its execution ends.
path "${kv_mount}/metadata/execution-contexts/${tenant}/*" {
  capabilities = ["delete"]
}

# Claim an execution: "create" only, so an existing claim can never be overwritten
# (the broker also writes with check-and-set 0). The holder then records itself (pod, lease
# accessor, expiry) in the claim's metadata for the reaper; a losing claimant reads that
# metadata to say who holds the execution. "read": a claim holds no secret (pod, mode, lease
# accessor), and a claimant whose write answer was lost reads it to see the claim is its own.
# Release it when the execution ends.
path "${kv_mount}/data/execution-claims/${tenant}/*" {
  capabilities = ["create", "read"]
}
path "${kv_mount}/metadata/execution-claims/${tenant}/*" {
  capabilities = ["create", "update", "read", "delete"]
}

# Decrypt with its own tenant's Transit key only.
path "${transit_mount}/decrypt/env-${tenant}" {
  capabilities = ["update"]
}
# END per-identity-source

# Per-execution child tokens (leases) carrying exactly this policy and nothing else: they
# inherit the login's entity, so the templates above keep applying to them.
path "auth/token/create" {
  capabilities = ["update"]
  required_parameters = ["policies", "no_default_policy"]
  allowed_parameters = {
    "policies"          = [["stigmer-runner"]]
    "no_default_policy" = [true]
    "ttl"               = []
    "explicit_max_ttl"  = []
    "display_name"      = []
    "meta"              = []
    "renewable"         = []
    "num_uses"          = []
  }
}

# Whether a claim's holder is still alive: token metadata (never the token) by accessor.
path "auth/token/lookup-accessor" {
  capabilities = ["update"]
}

# Its own token (child tokens have no default policy, so these are spelled out).
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
