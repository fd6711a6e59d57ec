"""KV v2 operations on the broker's mount: versioned documents with check-and-set.

Resources are stored as one JSON string (``{"format": ..., "resource": "<json>"}``), not as a
JSON tree: OpenBao's listener refuses requests with more than 1000 JSON strings by default
(``max_request_json_strings``), which a tree of a few hundred variables already exceeds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.errors import NotFound, VaultError
from broker.vault.client import VaultClient

FORMAT = "stigmer-broker/v1"


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

    def write_resource(self, path: str, resource: Mapping[str, Any], cas: int | None = None) -> int:
        """Write a resource document as one JSON string (see the module docstring)."""
        text = json.dumps(resource, separators=(",", ":"), sort_keys=True)
        return self.write(path, {"format": FORMAT, "resource": text}, cas=cas)

    def read_resource(self, path: str) -> tuple[dict[str, Any], int]:
        """The resource document stored at ``path`` and its version."""
        document = self.read(path)
        text = document.data.get("resource")
        if document.data.get("format") != FORMAT or not isinstance(text, str):
            raise VaultError("read", f"{self.mount}/data/{path}", f"not a {FORMAT} document")
        try:
            resource = json.loads(text)
        except ValueError:
            raise VaultError("read", f"{self.mount}/data/{path}", "corrupt document") from None
        if not isinstance(resource, dict):
            raise VaultError("read", f"{self.mount}/data/{path}", "corrupt document")
        return resource, document.version
