"""A stand-in for the one Kubernetes API the kubernetes auth method calls: TokenReview.

It speaks the real protocol (POST /apis/authentication.k8s.io/v1/tokenreviews) and validates
service-account JWTs with the dev identity's public key, the way the API server validates the
tokens it issued. Tokens can be marked revoked, as when their pod is deleted.
"""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed_ca() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes-test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class TokenReviewer:
    public_key: str
    revoked: set[str] = field(default_factory=set)
    reviews: int = 0
    url: str = ""

    def review(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.reviews += 1
        token = spec.get("token", "")
        audiences = spec.get("audiences") or []
        if token in self.revoked:
            return {"authenticated": False, "error": "token has been invalidated"}
        try:
            claims = pyjwt.decode(
                token, self.public_key, algorithms=["RS256"], audience=audiences or None,
                options={"verify_aud": bool(audiences)},
            )  # fmt: skip
        except pyjwt.PyJWTError as exc:
            return {"authenticated": False, "error": type(exc).__name__}
        account = claims["kubernetes.io"]["serviceaccount"]
        return {
            "authenticated": True,
            "user": {
                "username": claims["sub"],
                "uid": account["uid"],
                "groups": ["system:serviceaccounts"],
            },
            "audiences": audiences,
        }


@contextmanager
def serve(reviewer: TokenReviewer) -> Iterator[TokenReviewer]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status = reviewer.review(body.get("spec") or {})
            out = json.dumps(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}
            ).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    reviewer.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield reviewer
    finally:
        server.shutdown()
        server.server_close()
