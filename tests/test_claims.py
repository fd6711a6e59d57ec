"""The claim protocol against the server: one login writes the claims of many preparations, so
a claim is "ours" only for the preparation (attempt) that wrote it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from broker.errors import ClaimConflict
from broker.execution import claims
from broker.vault import KV, VaultClient, lookup_self
from tests.conftest import Vault
from tests.faultproxy import FaultProxy, Rule


async def _claim_data(admin: VaultClient, tenant: str, execution_id: str) -> dict[str, object]:
    return (await KV(admin, "stigmer").read(f"execution-claims/{tenant}/{execution_id}")).data


async def _accessor(admin: VaultClient) -> str:
    return str((await lookup_self(admin))["accessor"])


async def test_a_claim_is_ours_only_for_the_attempt_that_wrote_it(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    login = await _accessor(admin)
    first = claims.Claimant("pod-a", "sidecar", login)
    later = claims.Claimant("pod-a", "sidecar", login)
    assert first.attempt != later.attempt
    now = datetime.now(UTC)
    await claims.take(admin, vault.layout, tenant, "c-1", first, now)
    # The same claimant again (a retry whose first answer was lost): the claim is its own.
    await claims.take(admin, vault.layout, tenant, "c-1", first, now)
    # Another preparation by the same login is refused: one execution, one holder.
    with pytest.raises(ClaimConflict):
        await claims.take(admin, vault.layout, tenant, "c-1", later, now)
    # A late give-back of another attempt leaves the claim alone ...
    await claims.release_if_ours(admin, vault.layout, tenant, "c-1", later)
    assert (await _claim_data(admin, tenant, "c-1"))["attempt"] == first.attempt
    # ... its own attempt's releases it.
    await claims.release_if_ours(admin, vault.layout, tenant, "c-1", first)
    assert await KV(admin, "stigmer").list(f"execution-claims/{tenant}") == []


async def test_a_claim_this_process_gave_up_is_taken_over_by_its_next_attempt(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    """A give-back that could not release its claim leaves the writer in ``abandoned``; the next
    preparation takes the claim over, and the late give-back then leaves the new one alone."""
    login = await _accessor(admin)
    given_up = claims.Claimant("pod-a", "sidecar", login)
    await claims.take(admin, vault.layout, tenant, "c-2", given_up, datetime.now(UTC))
    retry = claims.Claimant("pod-a", "sidecar", login, abandoned=frozenset({login}))
    await claims.take(admin, vault.layout, tenant, "c-2", retry, datetime.now(UTC))
    assert (await _claim_data(admin, tenant, "c-2"))["attempt"] == retry.attempt
    await claims.release_if_ours(admin, vault.layout, tenant, "c-2", given_up)
    assert (await _claim_data(admin, tenant, "c-2"))["attempt"] == retry.attempt
    await claims.release_if_ours(admin, vault.layout, tenant, "c-2", retry)


async def test_the_holder_is_the_lease_in_the_metadata_not_the_login_in_the_data(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    """A reader (a losing claimant, the reaper) sees the lease once the metadata names it."""
    login = await _accessor(admin)
    lease = await admin.post("auth/token/create", {"ttl": "60s", "policies": ["default"]})
    lease_accessor = lease["auth"]["accessor"]
    writer = claims.Claimant("pod-a", "sidecar", login)
    now = datetime.now(UTC)
    await claims.take(admin, vault.layout, tenant, "c-3", writer, now)
    kv, path = KV(admin, "stigmer"), vault.layout.claim_path(tenant, "c-3")
    before = await claims.holder(kv, path, admin)
    assert before is not None and before.lease_accessor == login  # only the data so far
    holder = claims.Claimant("pod-a", "sidecar", lease_accessor, attempt=writer.attempt)
    # A context without an expiry: no empty value in the metadata (KV refuses those).
    await claims.attribute(admin, vault.layout, tenant, "c-3", holder, now, None)
    after = await claims.holder(kv, path, admin)
    assert after is not None and after.lease_accessor == lease_accessor and after.lease_alive
    await admin.post("auth/token/revoke-accessor", {"accessor": lease_accessor})
    dead = await claims.holder(kv, path, admin)
    assert dead is not None and dead.lease_alive is False
    await claims.release_if_ours(admin, vault.layout, tenant, "c-3", writer)
    assert await claims.holder(kv, path, admin) is None


async def test_a_claim_released_after_refusing_a_write_is_written_again(
    vault: Vault, admin: VaultClient, proxied_admin: VaultClient, proxy: FaultProxy, tenant: str
) -> None:
    """The write is refused because a claim stands; by the time the claimant reads who holds it
    (held back 1 s), its holder has released it (the reaper, a give-back). The claimant writes
    again and holds the execution: no conflict with a holder that is no longer there."""
    login = await _accessor(admin)
    other = claims.Claimant("pod-b", "sidecar", login)
    await claims.take(admin, vault.layout, tenant, "c-4", other, datetime.now(UTC))
    path = f"/metadata/execution-claims/{tenant}/c-4"
    held_back = proxy.add(Rule("delay", match=path, method="GET", times=1, seconds=1.0))
    claimant = claims.Claimant("pod-a", "sidecar", login)
    taking = asyncio.create_task(
        claims.take(proxied_admin, vault.layout, tenant, "c-4", claimant, datetime.now(UTC))
    )
    while held_back.times and not taking.done():
        await asyncio.sleep(0.01)
    await claims.release_if_ours(admin, vault.layout, tenant, "c-4", other)
    await taking
    assert (await _claim_data(admin, tenant, "c-4"))["attempt"] == claimant.attempt
    await claims.release_if_ours(admin, vault.layout, tenant, "c-4", claimant)
