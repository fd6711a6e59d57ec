"""KV v2 operations on the broker's mount: versioned documents with check-and-set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.errors import NotFound
from broker.vault.client import VaultClient


@dataclass(frozen=True)
class Document:
    data: dict[str, Any]
    version: int


class KV:
    def __init__(self, client: VaultClient, mount: str) -> None:
        self._client = client
        self.mount = mount

    def read(self, path: str) -> Document:
        """The current version; NotFound if it never existed, was deleted or destroyed."""
        answer = self._client.get(f"{self.mount}/data/{path}")
        body = answer.get("data") or {}
        data = body.get("data")
        if data is None:  # soft-deleted or expired by delete_version_after
            raise NotFound("read", f"{self.mount}/data/{path}", "not found (deleted or expired)")
        version = int((body.get("metadata") or {}).get("version", 0))
        return Document(data=dict(data), version=version)

    def write(self, path: str, data: Mapping[str, Any], cas: int | None = None) -> int:
        """Write a new version; with ``cas`` the write only succeeds at that version (0: create)."""
        body: dict[str, Any] = {"data": dict(data)}
        if cas is not None:
            body["options"] = {"cas": cas}
        answer = self._client.post(f"{self.mount}/data/{path}", body)
        return int((answer.get("data") or {}).get("version", 0))

    def write_metadata(self, path: str, **settings: Any) -> None:
        self._client.post(f"{self.mount}/metadata/{path}", settings, operation="write-metadata")

    def destroy(self, path: str) -> None:
        """Delete every version and the metadata: afterwards a read is a 404."""
        self._client.delete(f"{self.mount}/metadata/{path}", operation="destroy")

    def list(self, path: str) -> list[str]:
        return self._client.list(f"{self.mount}/metadata/{path}")
