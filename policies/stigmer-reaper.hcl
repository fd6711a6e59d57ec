# stigmer-reaper: cleans up after runner pods that died without ending their executions.
#
# It finds expired contexts and claims by their metadata, revokes the lease token a claim
# recorded (by accessor: the reaper never holds the token itself) and destroys both.
# It can NOT read values: no data path of contexts, claims or Environments is granted, and no
# Transit path at all.

# Revoke (and look up) leases by accessor.
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}
path "auth/token/lookup-accessor" {
  capabilities = ["update"]
}

# Find and destroy expired contexts and claims: metadata only (created time, expiry,
# custom_metadata with the lease accessor), never the data.
path "${kv_mount}/metadata/execution-contexts/*" {
  capabilities = ["list", "read", "delete"]
}
path "${kv_mount}/metadata/execution-claims/*" {
  capabilities = ["list", "read", "delete"]
}
