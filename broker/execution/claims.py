"""One claim protocol for every mode: an execution is delivered to one live lease at a time.

A claim is a KV entry at ``execution-claims/<tenant>/<id>``:

1. its data is written with check-and-set 0 (the runner policy grants ``create`` only, so an
   existing claim is never overwritten): whoever writes it holds the execution. The process's
   login writes it while the context is read, so the data names the login's accessor; a token
   given without its accessor (``run --auth token``) has its lease write it once the context
   is read;
2. the holder then records itself in the claim's *custom metadata* — pod, mode, the
   execution's lease accessor, when, and the context's expiry — with ``delete_version_after``
   set past that expiry. A reaper reads metadata only (never a value) and can revoke the lease
   of a holder that died: the lease, never the login that parents every execution of a pod.

A write whose answer was lost is retried; if the retry finds a claim naming its own writer, the
first write got through and the claim is ours (runners may read claims: they hold no secret).

A loser is told who holds the execution, since when, and whether that holder's lease is still
alive (from the metadata, or from the claim's own record when a failure came between the two
writes). A claim whose lease is provably dead (its accessor no longer resolves) is freed by the
reaper; the same pod may take its own dead claim over at once (a restarted sidecar resumes),
and a process may take over a claim it wrote or held in a preparation it gave up itself
(``Claimant.abandoned``, the accessors of that login or lease: a preparation of the same id
that failed while Vault was losing its leader); any other claimant waits. Within a process, a
take and a give-back's release of the same id never overlap (``ExecutionCore``), so a release
cannot destroy the claim a takeover has just written.
"""

from __future__ import annotations

import contextlib
import math
import os
from datetime import datetime, timedelta

from broker import logs
from broker.config import Layout
from broker.errors import ClaimConflict, Conflict, NotFound, PermissionDenied, VaultError
from broker.records import field, record
from broker.vault import KV, VaultClient, lookup_accessor

GRACE = 60  # seconds a claim outlives its context in KV before KV deletes it itself
UNRECORDED = timedelta(seconds=60)  # a claim this old without a holder in its metadata is dead


@record(frozen=True)
class Claimant:
    pod: str
    mode: str  # "run" or "sidecar"
    lease_accessor: str  # the token that writes the claim (data) or holds it (metadata)
    abandoned: frozenset[str] = frozenset()  # accessors of leases this process gave up
    # One preparation's: a login writes the claims of many, one after another.
    attempt: str = field(default_factory=lambda: os.urandom(8).hex())  # secrets: +4 ms start


@record(frozen=True)
class Holder:
    pod: str
    mode: str
    since: str
    lease_alive: bool | None  # None: not known (no accessor recorded)
    lease_accessor: str = ""

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
    record: dict[str, str] = dict(metadata.custom)
    if not record.get("lease_accessor"):  # the metadata write failed: the claim's own record
        with contextlib.suppress(NotFound, PermissionDenied):
            data = (await kv.read(path)).data
            record = {k: v for k, v in data.items() if isinstance(v, str)}
    accessor = record.get("lease_accessor", "")
    alive = None if not accessor else await lookup_accessor(lookup, accessor) is not None
    return Holder(
        record.get("pod", ""), record.get("mode", ""), record.get("claimed_at", ""), alive,
        accessor,
    )  # fmt: skip


async def take(
    lease: VaultClient,
    layout: Layout,
    tenant: str,
    execution_id: str,
    claimant: Claimant,
    now: datetime,
) -> None:
    """Step 1, write the claim: from here the execution is ``claimant``'s (or ClaimConflict)."""
    kv, path = KV(lease, layout.kv_mount), layout.claim_path(tenant, execution_id)
    record = _record(claimant, now)
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
            if current is None and attempt == 0:
                continue  # released since our write was refused (a give-back, the reaper)
            if current is None and isinstance(exc, PermissionDenied):
                raise  # still no claim there: a real permission problem
            takeover = _own_leftover(current, claimant) if attempt == 0 and current else ""
            if takeover:
                logs.event(takeover, execution_id=execution_id)
                await kv.destroy(path)
                continue
            _refused(execution_id, claimant, current)


async def attribute(
    lease: VaultClient,
    layout: Layout,
    tenant: str,
    execution_id: str,
    claimant: Claimant,
    now: datetime,
    expires_at: datetime | None,
) -> None:
    """Step 2, record the holder in the claim's metadata (for the reaper, and so KV deletes
    the claim itself after the context's expiry). May run alongside the decryption."""
    kv, path = KV(lease, layout.kv_mount), layout.claim_path(tenant, execution_id)
    remaining = (expires_at - now).total_seconds() if expires_at else 3600.0
    custom = {**_record(claimant, now), "expires_at": expires_at.isoformat() if expires_at else ""}
    custom = {key: value for key, value in custom.items() if value}  # KV refuses empty values
    after = f"{math.ceil(remaining) + GRACE}s"
    # If this fails the caller gives the claim back (release_if_ours), retrying as it must.
    await kv.write_metadata(path, max_versions=1, custom=custom, delete_version_after=after)


def _record(claimant: Claimant, now: datetime) -> dict[str, str]:
    return {"pod": claimant.pod, "mode": claimant.mode, "lease_accessor": claimant.lease_accessor,
            "attempt": claimant.attempt, "claimed_at": now.isoformat()}  # fmt: skip


async def _ours(kv: KV, path: str, claimant: Claimant) -> bool:
    """Was the claim at ``path`` written by ``claimant``: its token, in this preparation (no
    secret in it: pod, accessor)?"""
    try:
        data = (await kv.read(path)).data
    except (NotFound, PermissionDenied):
        return False
    return bool(claimant.lease_accessor) and (
        data.get("lease_accessor") == claimant.lease_accessor
        and data.get("attempt") == claimant.attempt
    )


def _own_leftover(current: Holder, claimant: Claimant) -> str:
    """Why ``claimant`` may take this claim over ('' if it may not): this process left it
    behind (a lease it gave up), or its pod's lease is dead."""
    if current.lease_accessor and current.lease_accessor in claimant.abandoned:
        return "taking over a claim this process gave up"
    if claimant.pod and current.pod == claimant.pod and current.lease_alive is False:
        return "taking over this pod's own dead claim"
    return ""


def _refused(execution_id: str, claimant: Claimant, current: Holder | None) -> None:
    reason = current.describe() if current is not None else "claimed by another holder"
    logs.security(
        "security: execution claim refused", "claim-refused",
        execution_id=execution_id, pod=claimant.pod, holder=reason,
    )  # fmt: skip
    raise ClaimConflict(execution_id, reason)


async def release_if_ours(
    client: VaultClient, layout: Layout, tenant: str, execution_id: str, claimant: Claimant
) -> None:
    """Destroy the claim if ``claimant`` wrote it (a preparation that failed after, or perhaps
    during, its claim); someone else's claim, or a later preparation's, is left alone."""
    kv, path = KV(client, layout.kv_mount), layout.claim_path(tenant, execution_id)
    if await _ours(kv, path, claimant):
        await kv.destroy(path)


async def describe(client: VaultClient, layout: Layout, tenant: str, execution_id: str) -> str:
    """For operators: who holds an execution, or '' (needs read on the claims' metadata)."""
    try:
        current = await holder(
            KV(client, layout.kv_mount), layout.claim_path(tenant, execution_id), client
        )
    except VaultError:
        return ""
    return current.describe() if current else ""
