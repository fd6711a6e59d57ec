"""KV v2 on the broker's mount: versioned documents, check-and-set, metadata.

Resources are stored as one JSON string (``{"format": ..., "resource": "<json>"}``), not as a
JSON tree: OpenBao's listener refuses requests with more than 1000 JSON strings by default
(``max_request_json_strings``), which a tree of a few hundred variables already exceeds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from broker.errors import Fault, NotFound, ValidationError, VaultError
from broker.limits import FILES, Limits, parse_json
from broker.records import field, record
from broker.vault.client import VaultClient

FORMAT = "stigmer-broker/v1"


@record(frozen=True)
class Document:
    data: dict[str, Any]
    version: int


@record(frozen=True)
class Metadata:
    current_version: int
    created_time: str
    custom: dict[str, str] = field(default_factory=dict)
    delete_version_after: str = ""


class KV:
    def __init__(self, client: VaultClient, mount: str) -> None:
        self._client = client
        self.mount = mount

    def _data(self, path: str) -> str:
        return f"{self.mount}/data/{path}"

    def _metadata(self, path: str) -> str:
        return f"{self.mount}/metadata/{path}"

    async def read(self, path: str, version: int | None = None) -> Document:
        """The current version (or ``version``); NotFound if it never existed, was deleted or
        destroyed (or KV no longer keeps that version)."""
        if version is None:
            answer = await self._client.get(self._data(path))
        else:
            answer = await self._client.request(
                "GET", self._data(path), operation="read", query=f"version={int(version)}"
            )
        body = answer.get("data") or {}
        data = body.get("data")
        if data is None:  # soft-deleted or expired by delete_version_after
            raise NotFound("read", self._data(path), Fault.NOT_FOUND, detail="deleted or expired")
        version = int((body.get("metadata") or {}).get("version", 0))
        return Document(data=dict(data), version=version)

    async def write(self, path: str, data: Mapping[str, Any], cas: int | None = None) -> int:
        """Write a new version; with ``cas`` the write only succeeds at that version (0: create)."""
        body: dict[str, Any] = {"data": dict(data)}
        if cas is not None:
            body["options"] = {"cas": cas}
        answer = await self._client.post(self._data(path), body)
        return int((answer.get("data") or {}).get("version", 0))

    async def write_metadata(
        self,
        path: str,
        *,
        max_versions: int | None = None,
        delete_version_after: str | None = None,
        custom: Mapping[str, str] | None = None,
    ) -> None:
        """Create or update a key's metadata (it may exist before any version does)."""
        settings: dict[str, Any] = {}
        if max_versions is not None:
            settings["max_versions"] = max_versions
        if delete_version_after is not None:
            settings["delete_version_after"] = delete_version_after
        if custom is not None:
            settings["custom_metadata"] = dict(custom)
        await self._client.post(self._metadata(path), settings, operation="write-metadata")

    async def read_metadata(self, path: str) -> Metadata:
        answer = await self._client.get(self._metadata(path), operation="read-metadata")
        data = answer.get("data") or {}
        return Metadata(
            current_version=int(data.get("current_version") or 0),
            created_time=str(data.get("created_time") or ""),
            custom={str(k): str(v) for k, v in (data.get("custom_metadata") or {}).items()},
            delete_version_after=str(data.get("delete_version_after") or ""),
        )

    async def destroy(self, path: str) -> None:
        """Delete every version and the metadata: afterwards a read is a 404."""
        await self._client.delete(self._metadata(path), operation="destroy")

    async def list(self, path: str) -> list[str]:
        return await self._client.list(self._metadata(path))

    async def write_resource(
        self, path: str, resource: Mapping[str, Any], cas: int | None = None
    ) -> int:
        """Write a resource document as one JSON string (see the module docstring)."""
        text = json.dumps(resource, separators=(",", ":"), sort_keys=True)
        return await self.write(path, {"format": FORMAT, "resource": text}, cas=cas)

    async def read_resource(
        self, path: str, limits: Limits = FILES, version: int | None = None
    ) -> tuple[dict[str, Any], int]:
        """The resource document stored at ``path`` (its current version, or ``version``) and
        its version; a document beyond ``limits`` is refused (a ValidationError) before use."""
        document = await self.read(path, version)
        text = document.data.get("resource")
        if document.data.get("format") != FORMAT or not isinstance(text, str):
            raise VaultError("read", self._data(path), Fault.BAD_ANSWER, detail=f"not {FORMAT}")
        what = f"{self.mount}/data/{path}"
        resource = parse_json(text, limits, what)
        if not isinstance(resource, dict):
            raise ValidationError(what, ["corrupt document (not a JSON object)"])
        return resource, document.version
