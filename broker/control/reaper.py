"""The reaper: ends what the processes that held an execution could not end themselves.

It reads metadata only, never a value (the ``stigmer-reaper`` policy grants nothing more), and
in each pass:

- destroys every context past its ``expires_at`` (plus a grace), and every leftover whose KV
  version is gone — destroyed, not soft-deleted, so nothing can be undeleted;
- for every claim whose context is gone or expired, whose lease no longer exists, or that
  never recorded its lease: revokes the lease by accessor (if it is alive) and destroys the
  claim, so the execution no longer blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from broker import logs, names
from broker.config import Layout
from broker.errors import NotFound, VaultError
from broker.execution.claims import UNRECORDED as UNRECORDED_CLAIM
from broker.records import field, record
from broker.vault import KV, Metadata, VaultClient, lookup_accessor, revoke_accessor


@record
class ReapReport:
    tenants: int = 0
    contexts_destroyed: int = 0
    claims_released: int = 0
    leases_revoked: int = 0
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return dict(vars(self))

    def add(self, other: ReapReport) -> None:
        for name in ("tenants", "contexts_destroyed", "claims_released", "leases_revoked"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors += other.errors


def parse_time(text: str) -> datetime | None:
    """An RFC 3339 time as Vault writes it (nanoseconds cut to microseconds), or None."""
    if not text:
        return None
    head, _, fraction = text.rstrip("Z").partition(".")
    digits = "".join(c for c in fraction if c.isdigit())[:6]
    try:
        moment = datetime.fromisoformat(head + (f".{digits}" if digits else ""))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Reaper:
    def __init__(self, client: VaultClient, layout: Layout, grace: timedelta) -> None:
        self._client = client
        self._layout = layout
        self._kv = KV(client, layout.kv_mount)
        self._grace = grace

    async def tenants(self, only: Sequence[str] = ()) -> list[str]:
        """``only`` (checked), or every tenant that has contexts or claims."""
        if only:
            return [names.tenant(t) for t in only]
        folders = {
            *await self._kv.list("execution-contexts"),
            *await self._kv.list("execution-claims"),
        }
        found = {f.rstrip("/") for f in folders if f.endswith("/")}
        return sorted(t for t in found if names.matches(names.TENANT, t))

    async def run_pass(self, tenants: Sequence[str]) -> ReapReport:
        report = ReapReport(tenants=len(tenants))
        for tenant in tenants:
            await self._contexts(tenant, report)
            await self._claims(tenant, report)
        logs.event("reaper pass", **report.as_json())
        return report

    def _expired(self, metadata: Metadata, now: datetime) -> bool:
        expires = parse_time(metadata.custom.get("expires_at", ""))
        if expires is not None:
            return now > expires + self._grace
        created = parse_time(metadata.created_time)  # a leftover without an expiry
        return (
            metadata.current_version == 0
            and created is not None
            and (now > created + UNRECORDED_CLAIM + self._grace)
        )

    async def _entries(self, folder: str) -> list[str]:
        return [f"{folder}/{n}" for n in await self._kv.list(folder) if not n.endswith("/")]

    async def _metadata(self, path: str) -> Metadata | None:
        try:
            return await self._kv.read_metadata(path)
        except NotFound:
            return None

    async def _contexts(self, tenant: str, report: ReapReport) -> None:
        now = datetime.now(UTC)
        for path in await self._entries(self._layout.contexts_dir(tenant)):
            try:
                metadata = await self._metadata(path)
                if metadata is not None and self._expired(metadata, now):
                    await self._kv.destroy(path)
                    report.contexts_destroyed += 1
                    logs.event("context destroyed by the reaper", path=path)
            except VaultError as exc:
                report.errors.append(str(exc))

    async def _claims(self, tenant: str, report: ReapReport) -> None:
        for path in await self._entries(self._layout.claims_dir(tenant)):
            try:
                await self._claim(tenant, path, report)
            except VaultError as exc:
                report.errors.append(str(exc))

    async def _claim(self, tenant: str, path: str, report: ReapReport) -> None:
        now = datetime.now(UTC)
        claim = await self._metadata(path)
        if claim is None:
            return
        execution_id = path.rsplit("/", 1)[1]
        context = await self._metadata(self._layout.context_path(tenant, execution_id))
        accessor = claim.custom.get("lease_accessor", "")
        alive = accessor and await lookup_accessor(self._client, accessor) is not None
        created = parse_time(claim.created_time) or now
        stale = (
            context is None
            or self._expired(context, now)
            or (accessor and not alive)
            or (not accessor and now > created + UNRECORDED_CLAIM)
        )
        if not stale:
            return
        if alive and await revoke_accessor(self._client, accessor):  # False: it expired meanwhile
            report.leases_revoked += 1
        await self._kv.destroy(path)
        report.claims_released += 1
        logs.event("claim released by the reaper", path=path, lease_accessor=accessor,
                   lease_was_alive=bool(alive))  # fmt: skip
