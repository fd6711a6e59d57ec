"""How `run` and the sidecar recover from Vault faults (`make bench-faults`), for the numbers in
the notes: time to recover, requests sent, tokens left alive (should be 0).

- `run` while Vault answers 503 (sealed) for the first 20 s (through the tests' fault proxy);
- `run` when a Transit decrypt answers 429 with `Retry-After: 7`;
- the sidecar preparing 20 executions while the leader of a 3-node Raft cluster is killed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    AGENT,
    TENANT,
    Bench,
    clean_environ,
    dev_server,
    instance,
    scratch,
    start_sidecar,
)
from broker.client import BrokerClient
from broker.config import Layout, VaultSettings
from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer
from broker.control.setup import Bootstrap, JwtSettings
from broker.dev import identity, server
from broker.errors import BrokerClientError
from broker.model import Environment, parse_resource
from broker.vault import VaultClient, lookup_accessor
from tests.cluster import Cluster, call
from tests.faultproxy import FaultProxy, Rule


def run_through(bench: Bench, proxy: FaultProxy, execution_id: str) -> tuple[int, float, str]:
    environ = clean_environ(proxy.url)
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "broker.cli", "run", "--tenant", TENANT, "--execution",
             execution_id, "--out", str(shm), "--jwt-file", str(bench.jwt), "--deadline", "90s",
             "--vault-deadline", "60s", "--", "true"],
            env=environ, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    login = next((json.loads(line)["accessor"] for line in result.stderr.splitlines()
                  if '"msg": "logged in"' in line), "")  # fmt: skip
    return result.returncode, time.monotonic() - started, login


async def alive(bench: Bench, accessor: str) -> bool:
    return bool(accessor) and await lookup_accessor(bench.admin, accessor) is not None


async def run_scenarios(state: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with dev_server(state, (10,)) as bench:
        proxy = FaultProxy(bench.running.addr).start()
        try:
            await bench.issue("sealed-20s", 10)
            proxy.add(Rule("sealed", until=time.monotonic() + 20))
            code, took, login = await asyncio.to_thread(run_through, bench, proxy, "sealed-20s")
            results["run_503_for_20s"] = {
                "exit": code, "seconds": round(took, 1),
                "recovered_after_outage_s": round(took - 20, 1),
                "requests_during_outage": sum(1 for s in proxy.seen if s.action == "sealed"),
                "login_left_alive": await alive(bench, login),
            }  # fmt: skip
            proxy.clear()
            proxy.seen.clear()
            await bench.issue("retry-after-7", 10)
            proxy.add(Rule("rate-limit", match="-transit/decrypt/", times=1, retry_after="7"))
            code, took, login = await asyncio.to_thread(run_through, bench, proxy, "retry-after-7")
            decrypts = [s.at for s in proxy.seen if "-transit/decrypt/" in s.path]
            results["run_429_retry_after_7"] = {
                "exit": code, "seconds": round(took, 1), "requests": len(proxy.seen),
                "decrypt_retry_waited_s": round(decrypts[1] - decrypts[0], 2),
                "login_left_alive": await alive(bench, login),
            }  # fmt: skip
        finally:
            proxy.stop()
    return results


def prepare(client: BrokerClient, ids: list[str]) -> dict[str, str]:
    def one(execution_id: str) -> str:
        try:
            client.prepare(execution_id)
        except BrokerClientError as exc:
            return str(exc.status)
        return "ok"

    with ThreadPoolExecutor(max(len(ids), 1)) as pool:
        return dict(zip(ids, pool.map(one, ids), strict=True))


async def leader_scenario(root: Path, shm: Path) -> dict[str, Any]:
    cluster = Cluster(root / "raft").start()
    admin = VaultClient(VaultSettings.local(cluster.addresses, cluster.token))
    sidecar = None
    try:
        key = root / "identity.pem"
        identity.create_key(key)
        layout = Layout()
        await Bootstrap(admin, layout).run(
            [TENANT], JwtSettings(public_keys=(identity.public_pem(key),))
        )
        data = {f"S{i}": {"value": f"s-{i}", "is_secret": True} for i in range(10)}
        environment = parse_resource({"api_version": "agentic.stigmer.ai/v1", "kind": "Environment",
                                      "metadata": {"name": "env10"}, "spec": {"data": data}},
                                     Environment)  # fmt: skip
        await EnvironmentStore(admin, layout).apply(TENANT, environment)
        issuer = ExecutionIssuer(admin, layout)
        ids = [f"ha-{n}" for n in range(20)]
        for execution_id in ids:
            await issuer.create(TENANT, AGENT, instance("env10"), execution_id=execution_id)
        jwt = root / "sa.jwt"
        jwt.write_text(identity.mint_token(key, TENANT))
        fake = Bench(server.DevServer(cluster.addresses, "", 0, root), admin, jwt, issuer)
        sidecar, socket_path = start_sidecar(fake, shm, "--vault-check-interval", "1s")
        client = BrokerClient(socket_path)
        _, before = call(cluster.leader().addr, "LIST", "auth/token/accessors", token=cluster.token)
        started = time.monotonic()
        preparing = asyncio.get_running_loop().run_in_executor(None, prepare, client, ids)
        await asyncio.sleep(0.3)
        cluster.leader().kill()
        killed = time.monotonic()
        first = await preparing
        failed = [i for i, outcome in first.items() if outcome != "ok"]
        new_leader = cluster.wait_leader()
        elected = time.monotonic()
        again = await asyncio.to_thread(prepare, client, failed)
        done = time.monotonic()
        for execution_id in ids:
            client.end(execution_id)
        sidecar.terminate()
        sidecar.wait(30)
        sidecar = None
        time.sleep(3)
        _, after = call(new_leader.addr, "LIST", "auth/token/accessors", token=cluster.token)
        new = set(after["data"]["keys"]) - set(before["data"]["keys"])
        alive = [a for a in new if await lookup_accessor(admin, a) is not None]
        return {
            "prepared_first_try": len(ids) - len(failed),
            "failed_first_try_classified_503": sum(1 for i in failed if first[i] == "503"),
            "succeeded_on_retry": sum(1 for v in again.values() if v == "ok"),
            "new_leader_after_s": round(elected - killed, 1),
            "all_prepared_after_s": round(done - started, 1),
            "tokens_left_alive": len(alive),
        }
    finally:
        if sidecar is not None:
            sidecar.kill()
        await admin.aclose()
        cluster.stop()


def main() -> int:
    with scratch() as (state, shm):
        results = asyncio.run(run_scenarios(state / "dev"))
        results["sidecar_raft_leader_killed"] = asyncio.run(leader_scenario(state, shm))
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
