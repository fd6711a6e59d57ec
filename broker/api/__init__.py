"""The control plane over HTTP for Stigmer's backend: Environments and executions.

``problems`` (errors → RFC 9457 problem documents) → ``bodies`` (request bodies in, the same
models and rules as the CLI) → ``routes`` (handlers; each acts with the caller's own Vault
token) → ``openapi`` (the document, built from the same models) → ``server`` (the aiohttp
application, health, metrics). The server holds no Vault token of its own.
"""
