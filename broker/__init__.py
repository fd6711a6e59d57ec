"""stigmer-broker: a Vault/OpenBao-backed secrets broker for Stigmer agent and workflow runners."""

__version__ = "0.2.0"
