"""Sidecar latency against a throwaway dev server: `make bench`.

- prepare latency (PUT /v1/executions/{id}: lease, claim, decrypt, render) for 10 and 100
  secrets, measured at the client over the Unix socket;
- shutdown time with 20 active executions (SIGTERM → exit 0, every execution ended).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from bench.common import TENANT, Bench, dev_server, scratch, start_sidecar
from broker.client import BrokerClient
from broker.vault import KV

RUNS = int(os.environ.get("BENCH_RUNS", "30"))


async def measure(bench: Bench, client: BrokerClient) -> dict[str, object]:
    results: dict[str, object] = {}
    for size in (10, 100):
        timings = []
        for run in range(RUNS):
            execution_id = f"b{size}-{run}"
            await bench.issue(execution_id, size)
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
        await bench.issue(f"down-{n}", 10)
        client.prepare(f"down-{n}")
    return results


async def run(state: Path, shm: Path) -> dict[str, object]:
    async with dev_server(state, (10, 100)) as bench:
        sidecar, socket_path = start_sidecar(bench, shm)
        try:
            results = await measure(bench, BrokerClient(socket_path))
            started = time.perf_counter()
            sidecar.send_signal(signal.SIGTERM)
            results["shutdown_exit_code"] = sidecar.wait(30)
            results["shutdown_ms_20_active"] = round((time.perf_counter() - started) * 1000, 1)
        finally:
            if sidecar.poll() is None:
                sidecar.kill()
                sidecar.wait()
        left = await KV(bench.admin, "stigmer").list(f"execution-contexts/{TENANT}")
        results["contexts_left_after_shutdown"] = len(left)
        return results


def main() -> int:
    with scratch() as (state, shm):
        print(json.dumps(asyncio.run(run(state, shm)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
