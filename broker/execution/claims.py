"""One claim protocol for every mode: an execution is delivered to one live lease at a time.

A claim is a KV entry at ``execution-claims/<tenant>/<id>``:

1. its data is written with check-and-set 0 by the execution's lease (the runner policy grants
   ``create`` only, so an existing claim is never overwritten): whoever writes it holds the
   execution;
2. the holder then records itself in the claim's *custom metadata* — pod, mode, lease accessor,
   when, and the context's expiry — with ``delete_version_after`` set past that expiry. A reaper
   reads metadata only (never a value) and can revoke the lease of a holder that died.

A write whose answer was lost is retried; if the retry finds a claim naming its own lease, the
first write got through and the claim is ours (runners may read claims: they hold no secret).

A loser is told who holds the execution, since when, and whether that holder's lease is still
alive. A claim whose lease is provably dead (its accessor no longer resolves) is freed by the
reaper; the same pod may take its own dead claim over at once (a restarted sidecar resumes),
any other claimant waits for the reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from broker import logs
from broker.config import Layout
from broker.errors import ClaimConflict, Conflict, NotFound, PermissionDenied, VaultError
from broker.vault import KV, VaultClient, lookup_accessor

GRACE = 60  # seconds a claim outlives its context in KV before KV deletes it itself


@dataclass(frozen=True)
class Claimant:
    pod: str
    mode: str  # "run" or "sidecar"
    lease_accessor: str


@dataclass(frozen=True)
class Holder:
    pod: str
    mode: str
    since: str
    lease_alive: bool | None  # None: not known (no accessor recorded yet)

    def describe(self) -> str:
        alive = {True: "alive", False: "dead", None: "unknown"}[self.lease_alive]
        holder = f"pod {self.pod or '?'} ({self.mode or '?'})"
        return f"claimed by {holder} since {self.since or '?'}; its lease is {alive}"


async def holder(kv: KV, path: str, lookup: VaultClient) -> Holder | None:
    """Who holds the claim at ``path`` (from its metadata), or None when there is no claim."""
    try:
        metadata = await kv.read_metadata(path)
    except NotFound:
        return None
    custom = metadata.custom
    accessor = custom.get("lease_accessor", "")
    alive = None if not accessor else await lookup_accessor(lookup, accessor) is not None
    return Holder(
        custom.get("pod", ""), custom.get("mode", ""), custom.get("claimed_at", ""), alive
    )


async def claim(
    lease: VaultClient,
    layout: Layout,
    tenant: str,
    execution_id: str,
    claimant: Claimant,
    expires_at: datetime | None,
) -> None:
    """Take the execution for ``claimant``, or raise ClaimConflict naming its holder."""
    kv, path = KV(lease, layout.kv_mount), layout.claim_path(tenant, execution_id)
    now = datetime.now(UTC)
    record = {"pod": claimant.pod, "mode": claimant.mode,
              "lease_accessor": claimant.lease_accessor, "claimed_at": now.isoformat()}  # fmt: skip
    for attempt in range(2):
        try:
            await kv.write(path, record, cas=0)
            break
        except (Conflict, PermissionDenied) as exc:  # the runner policy may only create
            if await _ours(kv, path, claimant):
                # A retry after a lost answer: the first write got through. It is ours.
                logs.event("claim written by an earlier attempt", execution_id=execution_id)
                break
            current = await holder(kv, path, lease)
            if current is None and isinstance(exc, PermissionDenied):
                raise  # no claim there: a real permission problem
            if attempt == 0 and current is not None and _own_dead(current, claimant):
                logs.event("taking over this pod's own dead claim", execution_id=execution_id)
                await kv.destroy(path)
                continue
            _refused(execution_id, claimant, current)
    remaining = (expires_at - now).total_seconds() if expires_at else 3600.0
    custom = {**record, "expires_at": expires_at.isoformat() if expires_at else ""}
    try:
        after = f"{math.ceil(remaining) + GRACE}s"
        await kv.write_metadata(path, max_versions=1, custom=custom, delete_version_after=after)
    except BaseException:  # a claim nobody can attribute would block the execution for ever
        with contextlib.suppress(VaultError):
            await asyncio.shield(kv.destroy(path))
        raise


async def _ours(kv: KV, path: str, claimant: Claimant) -> bool:
    """Does the claim at ``path`` name ``claimant``'s lease (no secret in it: pod, accessor)?"""
    try:
        document = await kv.read(path)
    except (NotFound, PermissionDenied):
        return False
    return bool(claimant.lease_accessor) and (
        document.data.get("lease_accessor") == claimant.lease_accessor
    )


def _own_dead(current: Holder, claimant: Claimant) -> bool:
    return bool(claimant.pod) and current.pod == claimant.pod and current.lease_alive is False


def _refused(execution_id: str, claimant: Claimant, current: Holder | None) -> None:
    reason = current.describe() if current is not None else "claimed by another holder"
    logs.security(
        "security: execution claim refused", "claim-refused",
        execution_id=execution_id, pod=claimant.pod, holder=reason,
    )  # fmt: skip
    raise ClaimConflict(execution_id, reason)


async def release(lease: VaultClient, layout: Layout, tenant: str, execution_id: str) -> None:
    await KV(lease, layout.kv_mount).destroy(layout.claim_path(tenant, execution_id))


async def describe(client: VaultClient, layout: Layout, tenant: str, execution_id: str) -> str:
    """For operators: who holds an execution, or '' (needs read on the claims' metadata)."""
    try:
        current = await holder(
            KV(client, layout.kv_mount), layout.claim_path(tenant, execution_id), client
        )
    except VaultError:
        return ""
    return current.describe() if current else ""
