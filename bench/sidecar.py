"""Benchmarks for the sidecar against a throwaway dev server: `make bench`.

- prepare latency (PUT /v1/executions/{id}: lease, claim, decrypt, render) for 10 and 100
  secrets, measured at the client over the Unix socket;
- shutdown time with 20 active executions (SIGTERM → exit 0, every execution ended).
"""

from __future__ import annotations

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

from broker import devserver, identity
from broker.client import BrokerClient
from broker.config import Layout, VaultSettings
from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer
from broker.control.setup import Bootstrap, JwtSettings
from broker.model import Agent, AgentInstance, Environment, parse_resource
from broker.vault import VaultClient

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
    refs = [{"kind": 53, "slug": slug}]
    spec = {"agent_id": "bench", "environment_refs": refs}
    return parse_resource(resource("AgentInstance", "i", spec), AgentInstance)


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="stigmer-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="stigmer-bench-", dir="/dev/shm"))
    server = devserver.start(state)
    sidecar: subprocess.Popen[bytes] | None = None
    try:
        identity.create_key(server.identity_key)
        admin = VaultClient(VaultSettings(addr=server.addr, token=server.token))
        layout = Layout()
        Bootstrap(admin, layout).run(
            [TENANT], JwtSettings(public_keys=(identity.public_pem(server.identity_key),))
        )
        store, issuer = EnvironmentStore(admin, layout), ExecutionIssuer(admin, layout)
        agent = parse_resource(
            resource("Agent", "bench", {"instructions": "Benchmark agent."}), Agent
        )
        for size in (10, 100):
            data = {
                f"S{i}": {"value": f"secret-{i}-" + "x" * 32, "is_secret": True}
                for i in range(size)
            }
            store.apply(
                TENANT,
                parse_resource(resource("Environment", f"env{size}", {"data": data}), Environment),
            )
        jwt = state / "sa.jwt"
        jwt.write_text(identity.mint_token(server.identity_key, TENANT, ttl_seconds=3600))
        socket_path = shm / "broker.sock"
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        environ["VAULT_ADDR"] = server.addr
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "--log-level", "warning", "sidecar",
             "--tenant", TENANT, "--socket", str(socket_path), "--out", str(shm / "out"),
             "--jwt-file", str(jwt), "--metrics-addr", ""],
            env=environ,
        )  # fmt: skip
        client = BrokerClient(socket_path)
        while not (socket_path.exists() and client.ready()):
            time.sleep(0.05)
        results: dict[str, object] = {}
        for size in (10, 100):
            inst = instance(f"env{size}")
            timings = []
            for run in range(RUNS):
                execution_id = f"b{size}-{run}"
                issuer.create(
                    TENANT, agent, inst, ttl=timedelta(minutes=10), execution_id=execution_id
                )
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
        inst = parse_resource(
            resource(
                "AgentInstance",
                "i",
                {"agent_id": "bench", "environment_refs": [{"kind": 53, "slug": "env10"}]},
            ),
            AgentInstance,
        )
        for n in range(20):
            issuer.create(TENANT, agent, inst, ttl=timedelta(minutes=10), execution_id=f"down-{n}")
            client.prepare(f"down-{n}")
        started = time.perf_counter()
        sidecar.send_signal(signal.SIGTERM)
        code = sidecar.wait(30)
        results["shutdown_ms_20_active"] = round((time.perf_counter() - started) * 1000, 1)
        results["shutdown_exit_code"] = code
        left = admin.list(f"stigmer/metadata/execution-contexts/{TENANT}")
        results["contexts_left_after_shutdown"] = len(left)
        sidecar = None
        print(json.dumps(results, indent=2))
        return 0
    finally:
        if sidecar is not None:
            sidecar.kill()
            sidecar.wait()
        devserver.stop(state)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
