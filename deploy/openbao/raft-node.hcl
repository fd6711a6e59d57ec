# One node of a 3-node OpenBao (or Vault) cluster with integrated storage (Raft): the HA
# configuration the broker's tests run (tests/cluster.py fills the placeholders with loopback
# ports, a temporary data directory and `tls_disable = true`). In production every node gets
# its own node_id, data directory, addresses and TLS certificate; see deploy/README.md.
storage "raft" {
  path    = "${data_dir}"
  node_id = "${node_id}"

  # Elections in about a second instead of five: HashiCorp's production recommendation, and
  # short enough for the broker's retries (30 s per operation by default) to ride out.
  performance_multiplier = 1
${retry_join}
}

listener "tcp" {
  address         = "${listen_address}"
  cluster_address = "${cluster_listen_address}"
${tls}
}

# Standbys forward requests to the active node over the cluster port, so the broker may be
# given every node's address (VAULT_ADDR=https://a:8200,https://b:8200,https://c:8200) or one
# load-balanced address.
api_addr      = "${api_addr}"
cluster_addr  = "${cluster_addr}"
disable_mlock = true
