"""One claim protocol for every mode: an execution is delivered to one lease at a time.

A claim is a KV document at ``execution-claims/<tenant>/<id>`` written with check-and-set 0 by
the execution's lease (the runner policy grants ``create`` only, so an existing claim can never
be overwritten). It records who holds the execution — pod, mode, the lease's accessor and when
— so a reaper can revoke the lease of a claimant that died. Releasing destroys it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from broker import logs
from broker.config import Layout
from broker.errors import ClaimConflict, Conflict, PermissionDenied
from broker.vault import KV, VaultClient


@dataclass(frozen=True)
class Claimant:
    pod: str
    mode: str  # "run" or "sidecar"
    lease_accessor: str


async def claim(
    lease: VaultClient, layout: Layout, tenant: str, execution_id: str, claimant: Claimant
) -> None:
    """Take the execution for ``claimant``, or raise ClaimConflict if someone holds it."""
    record = {
        "pod": claimant.pod,
        "mode": claimant.mode,
        "lease_accessor": claimant.lease_accessor,
        "claimed_at": datetime.now(UTC).isoformat(),
    }
    try:
        await KV(lease, layout.kv_mount).write(
            layout.claim_path(tenant, execution_id), record, cas=0
        )
    except (Conflict, PermissionDenied):  # the runner policy may only create, never update
        logs.security(
            "security: execution claim refused",
            "claim-refused",
            execution_id=execution_id,
            pod=claimant.pod,
        )
        raise ClaimConflict(execution_id, "claimed by another holder") from None


async def release(lease: VaultClient, layout: Layout, tenant: str, execution_id: str) -> None:
    await KV(lease, layout.kv_mount).destroy(layout.claim_path(tenant, execution_id))
