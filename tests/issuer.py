"""A local service-account issuer for the setup tests: its own RSA key, and an HTTP endpoint
serving what a Kubernetes API server serves for it — ``/openid/v1/jwks`` and
``/.well-known/openid-configuration`` (issuer = the endpoint's base URL)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from broker.dev import identity


def jwk(key_file: Path, kid: str) -> dict[str, Any]:
    public = serialization.load_pem_public_key(identity.public_pem(key_file).encode())
    key = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    key.update(use="sig", alg="RS256", kid=kid)
    return dict(key)


class Issuer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys: dict[str, Path] = {}
        self.url = "http://127.0.0.1:1"  # until start(): signing tokens needs no server

    def start(self) -> Issuer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_key(self, kid: str) -> Path:
        path = self.directory / f"{kid}.pem"
        identity.create_key(path)
        self.keys[kid] = path
        return path

    def jwks(self) -> dict[str, Any]:
        return {"keys": [jwk(path, kid) for kid, path in self.keys.items()]}

    def token(self, kid: str, tenant: str, **claims: Any) -> str:
        """A service-account JWT for ``tenant`` signed with key ``kid``, issued by this issuer."""
        unsigned = jwt.decode(
            identity.mint_token(self.keys[kid], tenant, issuer=self.url, **claims),
            options={"verify_signature": False},
        )
        private = serialization.load_pem_private_key(self.keys[kid].read_bytes(), None)
        return jwt.encode(unsigned, private, algorithm="RS256", headers={"kid": kid})  # type: ignore[arg-type]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                documents = {
                    "/openid/v1/jwks": issuer.jwks(),
                    "/.well-known/openid-configuration": {
                        "issuer": issuer.url,
                        "jwks_uri": f"{issuer.url}/openid/v1/jwks",
                        "response_types_supported": ["id_token"],
                        "subject_types_supported": ["public"],
                        "id_token_signing_alg_values_supported": ["RS256"],
                    },
                }
                document = documents.get(self.path)
                body = json.dumps(document).encode()
                self.send_response(200 if document is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
