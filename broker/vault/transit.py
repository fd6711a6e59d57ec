"""Transit encrypt/decrypt/rewrap in batches, chunked below the server's request limits.

OpenBao's default listener refuses a request with more than 1000 JSON strings: a
``batch_input`` of 499 items passes and 500 does not (measured on OpenBao 2.7.2), so batches go
in chunks of at most 499 items and at most 8 MiB; a server configured with lower limits makes a
chunk split in half until it fits.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from typing import Any

from broker.concurrency import together
from broker.errors import DecryptError, Fault, PermissionDenied, RequestTooLarge, VaultError
from broker.vault.client import VaultClient

MAX_ITEMS = 499
MAX_BYTES = 8 * 1024 * 1024
PARALLEL_CHUNKS = 4  # chunks of one batch in flight at once


def chunks(items: Sequence[dict[str, str]], max_items: int) -> Iterator[Sequence[dict[str, str]]]:
    """Consecutive slices of at most ``max_items`` items and about ``MAX_BYTES`` bytes."""
    start, size = 0, 0
    for index, item in enumerate(items):
        length = sum(len(v) for v in item.values()) + 32
        if index > start and (index - start >= max_items or size + length > MAX_BYTES):
            yield items[start:index]
            start, size = index, 0
        size += length
    if start < len(items):
        yield items[start:]


class Transit:
    def __init__(self, client: VaultClient, mount: str, max_items: int = MAX_ITEMS) -> None:
        self._client = client
        self.mount = mount
        self.max_items = max_items

    async def create_key(self, key: str) -> None:
        await self._client.post(f"{self.mount}/keys/{key}", {"type": "aes256-gcm96"})

    async def key_exists(self, key: str) -> bool:
        try:
            await self._client.get(f"{self.mount}/keys/{key}")
        except VaultError as exc:
            if exc.kind is Fault.NOT_FOUND:
                return False
            raise
        return True

    async def _send(
        self, operation: str, key: str, batch: Sequence[dict[str, str]], field: str
    ) -> list[str]:
        path = f"{self.mount}/{operation}/{key}"
        try:
            answer = await self._client.post(path, {"batch_input": list(batch)}, operation)
        except RequestTooLarge:
            if len(batch) == 1:
                raise
            half = len(batch) // 2
            first = await self._send(operation, key, batch[:half], field)
            return first + await self._send(operation, key, batch[half:], field)
        results: list[Any] = (answer.get("data") or {}).get("batch_results") or []
        if len(results) != len(batch) or any(
            not isinstance(r, dict) or not isinstance(r.get(field), str) for r in results
        ):
            raise VaultError(operation, path, Fault.BAD_ANSWER, detail="batch result incomplete")
        return [r[field] for r in results]

    async def _batch(
        self, operation: str, key: str, batch: Sequence[dict[str, str]], field: str
    ) -> list[str]:
        sends = [
            self._send(operation, key, chunk, field) for chunk in chunks(batch, self.max_items)
        ]
        if len(sends) == 1:
            return await sends[0]
        answers = await together(sends, limit=PARALLEL_CHUNKS)  # Vault decrypts on every core
        return [item for answer in answers for item in answer]

    async def encrypt(self, key: str, plaintexts: Sequence[str]) -> list[str]:
        """Encrypt many values in as few requests as the server allows; ``vault:vN:…`` out."""
        batch = [{"plaintext": base64.b64encode(p.encode()).decode()} for p in plaintexts]
        return await self._batch("encrypt", key, batch, "ciphertext")

    async def rewrap(self, key: str, ciphertexts: Sequence[str]) -> list[str]:
        """Re-encrypt ciphertexts to the key's newest version inside Vault (no plaintext out)."""
        batch = [{"ciphertext": c} for c in ciphertexts]
        return await self._batch("rewrap", key, batch, "ciphertext")

    async def decrypt(self, key: str, ciphertexts: Sequence[str]) -> list[str]:
        """Decrypt many values; any failure of the values themselves is one opaque DecryptError."""
        if not ciphertexts:
            return []
        try:
            encoded = await self._batch(
                "decrypt", key, [{"ciphertext": c} for c in ciphertexts], "plaintext"
            )
            return [base64.b64decode(p, validate=True).decode() for p in encoded]
        except (PermissionDenied, RequestTooLarge):
            raise
        except VaultError as exc:
            if exc.retryable or exc.kind is Fault.BAD_ANSWER:
                raise
            raise DecryptError() from None
        except (ValueError, UnicodeDecodeError):
            raise DecryptError() from None
