"""Transit key rotation and rewrap, without ever losing a concurrent edit.

Rewrap re-encrypts stored ciphertext to the newest key version inside Vault (``transit/rewrap``:
no plaintext leaves Vault). Each document is written back with check-and-set on the version
that was read; if someone edited it in between, the write fails, the document is read again
and the rewrap is redone on the new version, so the other writer's edit is kept.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from broker.config import Layout
from broker.errors import Conflict, NotFound, ValidationError
from broker.records import record
from broker.vault import KV, Transit, VaultClient

_VERSION = re.compile(r"^vault:v(\d+):")
MAX_ATTEMPTS = 20


def key_version(ciphertext: str) -> int:
    match = _VERSION.match(ciphertext)
    return int(match.group(1)) if match else 0


@record
class RewrapReport:
    tenant: str
    latest_version: int
    documents: int = 0
    rewrapped: int = 0
    retries: int = 0
    min_decryption_version: int | None = None

    def as_json(self) -> dict[str, object]:
        return dict(vars(self))


class KeyManager:
    def __init__(self, client: VaultClient, layout: Layout) -> None:
        self._client = client
        self._layout = layout
        self._kv = KV(client, layout.kv_mount)
        self._transit = Transit(client, layout.transit_mount)

    def _key_path(self, tenant: str) -> str:
        return f"{self._layout.transit_mount}/keys/{self._layout.transit_key(tenant)}"

    async def latest_version(self, tenant: str) -> int:
        try:
            data = (await self._client.get(self._key_path(tenant)))["data"]
        except NotFound:
            raise ValidationError(
                f"tenant {tenant}",
                [f"Transit key {self._layout.transit_key(tenant)} does not exist"],
            ) from None
        return int(data["latest_version"])

    async def rotate(self, tenant: str) -> int:
        """Add a new key version; new encryptions use it, old ciphertext still decrypts."""
        await self.latest_version(tenant)
        await self._client.post(f"{self._key_path(tenant)}/rotate", operation="rotate")
        return await self.latest_version(tenant)

    async def _rewrap_document(
        self,
        path: str,
        tenant: str,
        latest: int,
        report: RewrapReport,
        before_write: Callable[[str], Awaitable[None]] | None,
    ) -> None:
        for _ in range(MAX_ATTEMPTS):
            try:
                document, version = await self._kv.read_resource(path)
            except NotFound:
                return  # deleted meanwhile: nothing to rewrap
            entries = _secret_entries(document)
            stale = [e for e in entries if e["value"] and key_version(e["value"]) < latest]
            if not stale:
                return
            rewrapped = await self._transit.rewrap(
                self._layout.transit_key(tenant), [e["value"] for e in stale]
            )
            for entry, ciphertext in zip(stale, rewrapped, strict=True):
                entry["value"] = ciphertext
            if before_write is not None:
                await before_write(path)
            try:
                await self._kv.write_resource(path, document, cas=version)
            except Conflict:
                report.retries += 1
                continue
            report.documents += 1
            report.rewrapped += len(stale)
            return
        raise ValidationError(path, [f"kept changing; gave up after {MAX_ATTEMPTS} attempts"])

    async def rewrap(
        self,
        tenant: str,
        raise_min_decryption_version: bool = False,
        before_write: Callable[[str], Awaitable[None]] | None = None,
    ) -> RewrapReport:
        """Rewrap every Environment of the tenant (and, before raising the minimum decryption
        version, every live ExecutionContext) to the newest key version."""
        latest = await self.latest_version(tenant)
        report = RewrapReport(tenant=tenant, latest_version=latest)
        folders = [self._layout.environments_dir(tenant)]
        if raise_min_decryption_version:
            folders.append(self._layout.contexts_dir(tenant))
        for folder in folders:
            for name in await self._kv.list(folder):
                if not name.endswith("/"):
                    await self._rewrap_document(
                        f"{folder}/{name}", tenant, latest, report, before_write
                    )
        if raise_min_decryption_version:
            await self._client.post(
                f"{self._key_path(tenant)}/config",
                {"min_decryption_version": latest},
                operation="configure-key",
            )
            report.min_decryption_version = latest
        return report


def _secret_entries(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``{value, is_secret}`` entries of an Environment or ExecutionContext document."""
    data = (document.get("spec") or {}).get("data") or {}
    return [e for e in data.values() if isinstance(e, dict) and e.get("is_secret")]
