"""Transit encrypt/decrypt in batches, chunked below the server's request limits.

OpenBao's listener refuses a request with too many JSON strings (a ``batch_input`` of somewhere
between 400 and 500 items with default settings), so batches are split into chunks.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from broker.errors import DecryptError, NotFound, VaultError
from broker.vault.client import VaultClient

DEFAULT_CHUNK = 200


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Transit:
    def __init__(self, client: VaultClient, mount: str, chunk: int = DEFAULT_CHUNK) -> None:
        self._client = client
        self.mount = mount
        self.chunk = chunk

    def create_key(self, key: str) -> None:
        self._client.post(f"{self.mount}/keys/{key}", {"type": "aes256-gcm96"})

    def key_exists(self, key: str) -> bool:
        try:
            self._client.get(f"{self.mount}/keys/{key}")
        except NotFound:
            return False
        return True

    def encrypt(self, key: str, plaintexts: Sequence[str]) -> list[str]:
        """Encrypt many values; one request per chunk. Returns ``vault:vN:…`` ciphertexts."""
        out: list[str] = []
        for chunk in _chunks(plaintexts, self.chunk):
            batch = [{"plaintext": base64.b64encode(p.encode()).decode()} for p in chunk]
            path = f"{self.mount}/encrypt/{key}"
            answer = self._client.post(path, {"batch_input": batch}, operation="encrypt")
            results: list[dict[str, Any]] = answer.get("data", {}).get("batch_results", [])
            if len(results) != len(chunk) or any("ciphertext" not in r for r in results):
                raise VaultError("encrypt", path, "batch result incomplete")
            out.extend(str(r["ciphertext"]) for r in results)
        return out

    def decrypt(self, key: str, ciphertexts: Sequence[str]) -> list[str]:
        """Decrypt many values; any failure is one opaque DecryptError."""
        out: list[str] = []
        for chunk in _chunks(ciphertexts, self.chunk):
            batch = [{"ciphertext": c} for c in chunk]
            try:
                answer = self._client.post(
                    f"{self.mount}/decrypt/{key}", {"batch_input": batch}, operation="decrypt"
                )
            except VaultError as exc:
                if exc.retryable or "permission" in exc.reason:
                    raise
                raise DecryptError() from None
            results: list[dict[str, Any]] = answer.get("data", {}).get("batch_results", [])
            if len(results) != len(chunk) or any("plaintext" not in r for r in results):
                raise DecryptError()
            try:
                out.extend(base64.b64decode(r["plaintext"]).decode() for r in results)
            except (ValueError, UnicodeDecodeError):
                raise DecryptError() from None
        return out
