"""The dev identity: a local RSA key that stands in for a Kubernetes service-account issuer.

``dev token`` signs tokens shaped like a projected service-account token (audience ``vault``),
and ``setup`` gives Vault's JWT auth the public half, so the real JWT login protocol runs
locally without an API server.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.dev import DEFAULT_AUDIENCE, DEFAULT_ISSUER, SERVICE_ACCOUNT
from broker.errors import ConfigError

__all__ = ["DEFAULT_AUDIENCE", "DEFAULT_ISSUER", "SERVICE_ACCOUNT", "create_key", "mint_token"]


def create_key(path: Path) -> None:
    """Write a new 2048-bit RSA private key (PEM, mode 0600) unless one is there."""
    if path.exists():
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def _private_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"dev identity key {path}: cannot load ({type(exc).__name__})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"dev identity key {path}: not an RSA key")
    return key


def public_pem(path: Path) -> str:
    key = _private_key(path)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def mint_token(
    path: Path,
    tenant: str,
    pod: str = "stigmer-runner-0",
    ttl_seconds: int = 600,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    service_account: str = SERVICE_ACCOUNT,
) -> str:
    """A service-account JWT like the kubelet projects: namespace = tenant."""
    now = int(time.time())
    claims = {
        "iss": issuer,
        "sub": f"system:serviceaccount:{tenant}:{service_account}",
        "aud": [audience],
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "kubernetes.io": {
            "namespace": tenant,
            "pod": {"name": pod, "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
        },
    }
    return jwt.encode(claims, _private_key(path), algorithm="RS256")
