"""A JWKS document (what ``kubectl get --raw /openid/v1/jwks`` prints) as PEM public keys, for
Vault's ``jwt_validation_pubkeys``: a cluster whose issuer Vault cannot reach still works."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives import serialization

from broker.errors import ValidationError


def pem_keys(document: str, source: str) -> tuple[str, ...]:
    """Every signing key of the JWKS ``document`` as PEM; ``source`` names it in errors."""
    import jwt
    from jwt.exceptions import InvalidKeyError, PyJWKError, PyJWKSetError

    try:
        parsed = json.loads(document)
    except ValueError:
        raise ValidationError(
            source, ['not JSON: expected a JWKS document {"keys": [...]}']
        ) from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
        raise ValidationError(source, ['expected a JWKS document {"keys": [...]}'])
    signing = [k for k in parsed["keys"] if isinstance(k, dict) and k.get("use", "sig") == "sig"]
    if not signing:
        raise ValidationError(source, ["keys: no signing key (use: sig)"])
    pems = []
    for index, key in enumerate(signing):
        if "d" in key:  # RSA, EC and OKP private keys all carry "d"
            raise ValidationError(source, [f"keys[{index}]: holds a private key: refused"])
        try:
            public = jwt.PyJWK(key).key
        except (PyJWKError, PyJWKSetError, InvalidKeyError, ValueError, TypeError):
            # (their text may quote the key: not repeated)
            raise ValidationError(source, [f"keys[{index}]: not a usable public key"]) from None
        if not hasattr(public, "public_bytes"):
            raise ValidationError(source, [f"keys[{index}]: not a public key"])
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        pems.append(pem.decode())
    return tuple(pems)
