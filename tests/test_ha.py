"""High availability against a real OpenBao Raft cluster on loopback (tests/cluster.py): the
broker is given every node's address, follows the active node, and rides out a killed leader
and a restarted server. Also: `setup` will not install the dev identity key into it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from broker.config import Layout, VaultSettings
from broker.dev import server
from broker.errors import BrokerClientError
from broker.vault import VaultClient
from tests.cluster import Cluster, call
from tests.conftest import (
    Sidecar,
    Vault,
    _bootstrap,
    accessor_alive,
    claim_metadata,
    claims,
    cli,
    context_paths,
    start_sidecar,
    wait_until,
)
from tests.factories import issue_secrets

CANARY = "cnry-ha-51f0-do-not-leak"


def as_vault(cluster: Cluster) -> Vault:
    """The cluster as the tests' Vault: VAULT_ADDR lists every node."""
    running = server.DevServer(cluster.addresses, cluster.token, 0, cluster.root)
    return Vault(running, Layout())


@pytest.fixture(scope="module")
def raft3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("raft3"), size=3)
    try:
        cluster.start()
        asyncio.run(_bootstrap(as_vault(cluster).server))
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def raft1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("raft1"), size=1)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


async def tokens(cluster: Cluster) -> set[str]:
    """Every token accessor the cluster knows."""
    status, answer = call(
        cluster.leader().addr, "LIST", "auth/token/accessors", token=cluster.token
    )
    assert status == 200, answer
    return set(answer["data"]["keys"])


def log_about(sidecar: Sidecar, ids: list[str]) -> list[str]:
    """The sidecar's log lines that name one of ``ids`` (for a failure's message)."""
    return [line for line in sidecar.log.read_text().splitlines()
            if any(f'"{i}"' in line for i in ids)]  # fmt: skip


def prepare_all(sidecar: Sidecar, ids: list[str]) -> dict[str, str]:
    """PUT each id from its own thread: id → "ok" or the sidecar's error."""

    def one(execution_id: str) -> str:
        try:
            sidecar.client.prepare(execution_id)
        except BrokerClientError as exc:
            return f"{exc.status}: {exc}"
        return "ok"

    if not ids:
        return {}
    with ThreadPoolExecutor(len(ids)) as pool:
        return dict(zip(ids, pool.map(one, ids), strict=True))


async def test_through_a_standby_the_broker_reads_its_own_writes(raft3: Cluster) -> None:
    """A standby answers reads (and routes writes) from what it has replicated so far: right
    after a mount is created, a raw request through a standby does not find it. The broker's
    client sends back the newest X-Vault-Index it was answered, so the same sequence through
    the same standby works every time."""
    standby = next(node for node in raft3.alive() if node is not raft3.leader())
    client = VaultClient(VaultSettings.local(standby.addr, raft3.token))
    raw_misses = 0
    try:
        for n in range(10):
            # KV v1: a new KV v2 mount refuses writes while it upgrades itself, wherever asked
            await client.post(f"sys/mounts/ryw-{n}", {"type": "kv", "options": {"version": "1"}})
            await client.post(f"ryw-{n}/claim", {"n": str(n)})
            assert (await client.get(f"ryw-{n}/claim"))["data"] == {"n": str(n)}
            status, _ = call(standby.addr, "POST", f"sys/mounts/raw-{n}",
                             {"type": "kv", "options": {"version": "1"}}, raft3.token)  # fmt: skip
            assert status in (200, 204)
            status, answer = call(standby.addr, "GET", f"raw-{n}/none", token=raft3.token)
            raw_misses += "no handler for route" in str(answer)  # not replicated here yet
    finally:
        await client.aclose()
    assert raw_misses > 0, "no stale read without the index: this test proves nothing here"


async def test_a_killed_leader_loses_nothing_and_delivers_nothing_twice(
    raft3: Cluster, tmp_path: Path, shm: Path
) -> None:
    vault = as_vault(raft3)
    admin = vault.client()
    tenant = "acme"
    before = await tokens(raft3)
    ids = [f"ha-{n}" for n in range(20)]
    try:
        for execution_id in ids:
            await issue_secrets(
                admin, vault.layout, tenant, execution_id, {"TOKEN_0": (CANARY, True)}
            )
        sidecar = await start_sidecar(vault, tenant, tmp_path, shm, "--vault-check-interval", "1s")
        try:
            loop = asyncio.get_running_loop()
            preparing = loop.run_in_executor(None, prepare_all, sidecar, ids)
            await asyncio.sleep(0.3)  # some prepared, some in flight
            leader = raft3.leader()
            leader.kill()
            first = await preparing
            failed = [i for i, outcome in first.items() if outcome != "ok"]
            for execution_id in failed:  # a classified, retryable error: 503
                assert first[execution_id].startswith("503"), first[execution_id]
            new_leader = raft3.wait_leader()
            again = await loop.run_in_executor(None, prepare_all, sidecar, failed)
            assert set(again.values()) <= {"ok"}, (again, log_about(sidecar, failed))
            # What the cluster holds, read on the active node: a standby answers reads from
            # what it has replicated so far (OpenBao 2.7+), and this client saw none of the
            # sidecar's writes (the sidecar itself reads its own writes: consistency.py).
            await admin.aclose()
            admin = VaultClient(VaultSettings.local(new_leader.addr, raft3.token))
            # one delivery each: one claim per execution, each naming its own live lease
            assert sorted(await claims(admin, tenant)) == sorted(ids)
            metadata = {i: await claim_metadata(admin, tenant, i) for i in ids}
            missing = {i: (m, first[i], again.get(i)) for i, m in metadata.items()
                       if "lease_accessor" not in m}  # fmt: skip
            assert not missing, (missing, log_about(sidecar, list(missing)))
            accessors = [m["lease_accessor"] for m in metadata.values()]
            assert len(set(accessors)) == len(ids)
            assert all([await accessor_alive(admin, a) for a in accessors])
            assert sorted(await context_paths(admin, vault, tenant)) == sorted(ids)
            for execution_id in ids:
                assert sidecar.client.end(execution_id)["ended"]["pending"] == []
        finally:
            assert sidecar.stop() == 0, sidecar.log.read_text()[-3000:]
        assert await context_paths(admin, vault, tenant) == []
        assert await claims(admin, tenant) == []

        async def every_token_gone() -> bool:
            # An accessor may outlive its token in the index when the leader died between the
            # two writes of a token's creation: what counts is that none of them resolves.
            new = await tokens(raft3) - before
            return not [a for a in new if await accessor_alive(admin, a)]

        await wait_until(every_token_gone, 20, "no token left: not one lease, not a login")
        assert CANARY not in sidecar.log.read_text()
    finally:
        await admin.aclose()
        raft3.restart(leader)  # for the next test: three nodes again


async def test_active_executions_survive_a_server_restart(
    raft1: Cluster, tmp_path: Path, shm: Path
) -> None:
    """kill -9 of the only (Raft-backed) server, restart, unseal: the sidecar goes unready and
    back, its executions' leases and contexts are intact, and ending them cleans up."""
    vault = as_vault(raft1)
    await asyncio.to_thread(_setup_dev, vault)
    admin = vault.client()
    try:
        await issue_secrets(admin, vault.layout, "acme", "rs-1", {"TOKEN_0": (CANARY, True)})
        sidecar = await start_sidecar(vault, "acme", tmp_path, shm, "--vault-check-interval", "1s")
        try:
            sidecar.client.prepare("rs-1")
            accessor = (await claim_metadata(admin, "acme", "rs-1"))["lease_accessor"]
            node = raft1.nodes[0]
            node.kill()
            await wait_until(lambda: not sidecar.client.ready(), 5, "unready")
            raft1.restart(node)
            await wait_until(sidecar.client.ready, 10, "ready again")
            assert await accessor_alive(admin, accessor)
            assert sidecar.client.get("rs-1")["state"] == "active"
            assert sidecar.client.end("rs-1")["ended"]["pending"] == []
            assert not await accessor_alive(admin, accessor)
            assert await context_paths(admin, vault, "acme") == []
        finally:
            assert sidecar.stop() == 0, sidecar.log.read_text()[-3000:]
    finally:
        await admin.aclose()


def _setup_dev(vault: Vault) -> None:
    """`setup` refuses the dev identity key on a server that is not a dev server; --dev
    accepts it (and the tenant's key is created)."""
    refused = cli(vault, "setup", "--tenant", "acme", "--state-dir", str(vault.server.state_dir))
    assert refused.returncode == 2, refused.stderr
    assert "not a dev server" in refused.stderr and "--jwks-file" in refused.stderr
    accepted = cli(vault, "setup", "--tenant", "acme", "--dev",
                   "--state-dir", str(vault.server.state_dir))  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr
