"""Transit encrypt/decrypt in batches, chunked below the server's request limits.

OpenBao's listener refuses a request with more than 1000 JSON strings by default (a
``batch_input`` of 500 items), so batches are sent in chunks of at most 400 items; a server
configured with a lower limit makes a chunk split in half until it fits.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from broker.errors import DecryptError, NotFound, PermissionDenied, RequestTooLarge, VaultError
from broker.vault.client import VaultClient

DEFAULT_CHUNK = 400


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

    def _send(
        self, operation: str, key: str, batch: Sequence[dict[str, str]], field: str
    ) -> list[str]:
        path = f"{self.mount}/{operation}/{key}"
        try:
            answer = self._client.post(path, {"batch_input": list(batch)}, operation=operation)
        except RequestTooLarge:
            if len(batch) == 1:
                raise
            half = len(batch) // 2
            return self._send(operation, key, batch[:half], field) + self._send(
                operation, key, batch[half:], field
            )
        results: list[dict[str, Any]] = answer.get("data", {}).get("batch_results", [])
        if len(results) != len(batch) or any(field not in r for r in results):
            raise VaultError(operation, path, "batch result incomplete")
        return [str(r[field]) for r in results]

    def _batch(
        self, operation: str, key: str, batch: Sequence[dict[str, str]], field: str
    ) -> list[str]:
        out: list[str] = []
        for start in range(0, len(batch), self.chunk):
            out.extend(self._send(operation, key, batch[start : start + self.chunk], field))
        return out

    def encrypt(self, key: str, plaintexts: Sequence[str]) -> list[str]:
        """Encrypt many values in as few requests as the server allows; ``vault:vN:…`` out."""
        batch = [{"plaintext": base64.b64encode(p.encode()).decode()} for p in plaintexts]
        return self._batch("encrypt", key, batch, "ciphertext")

    def rewrap(self, key: str, ciphertexts: Sequence[str]) -> list[str]:
        """Re-encrypt ciphertexts to the key's newest version inside Vault (no plaintext out)."""
        return self._batch("rewrap", key, [{"ciphertext": c} for c in ciphertexts], "ciphertext")

    def decrypt(self, key: str, ciphertexts: Sequence[str]) -> list[str]:
        """Decrypt many values; any failure of the values themselves is one opaque DecryptError."""
        try:
            encoded = self._batch(
                "decrypt", key, [{"ciphertext": c} for c in ciphertexts], "plaintext"
            )
            return [base64.b64decode(p, validate=True).decode() for p in encoded]
        except (PermissionDenied, RequestTooLarge):
            raise
        except VaultError as exc:
            if exc.retryable:
                raise
            raise DecryptError() from None
        except (ValueError, UnicodeDecodeError):
            raise DecryptError() from None
