"""Benchmarks for the sidecar against a throwaway dev server: `make bench`.

- prepare latency (PUT /v1/executions/{id}: lease, claim, decrypt, render) for 10 and 100
  secrets, measured at the client over the Unix socket;
- shutdown time with 20 active executions (SIGTERM → exit 0, every execution ended).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from broker.client import BrokerClient
from broker.config import Layout, VaultSettings
from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer
from broker.control.setup import Bootstrap, JwtSettings
from broker.dev import identity, server
from broker.model import Agent, AgentInstance, Environment, parse_resource
from broker.vault import KV, VaultClient

TENANT = "bench"
RUNS = int(os.environ.get("BENCH_RUNS", "30"))


def resource(kind: str, name: str, spec: dict[str, object]) -> dict[str, object]:
    return {
        "api_version": "agentic.stigmer.ai/v1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }


def instance(slug: str) -> AgentInstance:
    spec = {"agent_id": "bench", "environment_refs": [{"kind": 53, "slug": slug}]}
    return parse_resource(resource("AgentInstance", "i", spec), AgentInstance)


AGENT = parse_resource(resource("Agent", "bench", {"instructions": "Benchmark agent."}), Agent)


async def prepare_environments(admin: VaultClient, identity_key: Path) -> None:
    layout = Layout()
    await Bootstrap(admin, layout).run(
        [TENANT], JwtSettings(public_keys=(identity.public_pem(identity_key),))
    )
    for size in (10, 100):
        data = {
            f"S{i}": {"value": f"secret-{i}-" + "x" * 32, "is_secret": True} for i in range(size)
        }
        environment = parse_resource(
            resource("Environment", f"env{size}", {"data": data}), Environment
        )
        await EnvironmentStore(admin, layout).apply(TENANT, environment)


def start_sidecar(addr: str, jwt: Path, socket_path: Path, out: Path) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    environ["VAULT_ADDR"] = addr
    return subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "--log-level", "warning", "sidecar",
         "--tenant", TENANT, "--socket", str(socket_path), "--out", str(out),
         "--jwt-file", str(jwt), "--metrics-addr", ""],
        env=environ,
    )  # fmt: skip


async def measure(admin: VaultClient, client: BrokerClient) -> dict[str, object]:
    issuer = ExecutionIssuer(admin, Layout())
    results: dict[str, object] = {}
    for size in (10, 100):
        timings = []
        for run in range(RUNS):
            execution_id = f"b{size}-{run}"
            await issuer.create(TENANT, AGENT, instance(f"env{size}"),
                                ttl=timedelta(minutes=10), execution_id=execution_id)  # fmt: skip
            started = time.perf_counter()
            client.prepare(execution_id)
            timings.append((time.perf_counter() - started) * 1000)
            client.end(execution_id)
        timings.sort()
        results[f"prepare_ms_{size}_secrets"] = {
            "median": round(statistics.median(timings), 1),
            "p95": round(timings[int(len(timings) * 0.95) - 1], 1),
            "runs": RUNS,
        }
    for n in range(20):
        await issuer.create(TENANT, AGENT, instance("env10"), ttl=timedelta(minutes=10),
                            execution_id=f"down-{n}")  # fmt: skip
        client.prepare(f"down-{n}")
    return results


async def bench(state: Path, shm: Path) -> dict[str, object]:
    running = server.start(state)
    admin = VaultClient(VaultSettings.local(running.addr, running.token))
    sidecar: subprocess.Popen[bytes] | None = None
    try:
        identity.create_key(running.identity_key)
        await prepare_environments(admin, running.identity_key)
        jwt = state / "sa.jwt"
        jwt.write_text(identity.mint_token(running.identity_key, TENANT, ttl_seconds=3600))
        socket_path = shm / "broker.sock"
        sidecar = start_sidecar(running.addr, jwt, socket_path, shm / "out")
        client = BrokerClient(socket_path)
        while not (socket_path.exists() and client.ready()):
            time.sleep(0.05)
        results = await measure(admin, client)
        started = time.perf_counter()
        sidecar.send_signal(signal.SIGTERM)
        results["shutdown_exit_code"] = sidecar.wait(30)
        results["shutdown_ms_20_active"] = round((time.perf_counter() - started) * 1000, 1)
        sidecar = None
        left = await KV(admin, "stigmer").list(f"execution-contexts/{TENANT}")
        results["contexts_left_after_shutdown"] = len(left)
        return results
    finally:
        if sidecar is not None:
            sidecar.kill()
            sidecar.wait()
        await admin.aclose()
        server.stop(state)


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="stigmer-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="stigmer-bench-", dir="/dev/shm"))
    try:
        print(json.dumps(asyncio.run(bench(state, shm)), indent=2))
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
