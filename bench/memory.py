"""Does the sidecar forget? RSS after 100 prepare/end cycles against RSS after 10,000
(`make bench-memory`; the target: within 10 %). Cycles run from 8 concurrent callers with
N = 10 secrets each; RSS is read from /proc after each phase has settled."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from pathlib import Path

from bench.common import Bench, dev_server, rss_kib, scratch, start_sidecar
from broker.client import AsyncBrokerClient

CYCLES = int(os.environ.get("BENCH_CYCLES", "10000"))
CALLERS = 8
CHECKPOINTS = [c for c in (100, 1000, 5000, CYCLES) if c <= CYCLES]


async def cycles(bench: Bench, socket_path: Path, count: int, ids: itertools.count[int]) -> None:
    """``count`` issue → PUT → DELETE cycles from CALLERS concurrent callers."""
    left = iter(range(count))

    async def caller() -> None:
        async with AsyncBrokerClient(socket_path) as client:
            for _ in left:
                execution_id = f"m-{next(ids)}"
                await bench.issue(execution_id, 10)
                await client.prepare(execution_id)
                await client.end(execution_id)

    await asyncio.gather(*(caller() for _ in range(CALLERS)))


async def run(state: Path, shm: Path) -> dict[str, object]:
    async with dev_server(state, (10,)) as bench:
        sidecar, socket_path = start_sidecar(bench, shm)
        try:
            ids = itertools.count()
            done, points = 0, {}
            started = time.perf_counter()
            for checkpoint in CHECKPOINTS:
                await cycles(bench, socket_path, checkpoint - done, ids)
                done = checkpoint
                await asyncio.sleep(1)  # let freed memory settle
                points[checkpoint] = rss_kib(sidecar.pid)
                print(f"after {done} cycles: {points[checkpoint]}", file=sys.stderr)
            elapsed = time.perf_counter() - started
        finally:
            sidecar.terminate()
            sidecar.wait(30)
    first, last = points[CHECKPOINTS[0]]["VmRSS"], points[CHECKPOINTS[-1]]["VmRSS"]
    growth = (last - first) / first
    return {
        "cycles": CYCLES,
        "callers": CALLERS,
        "cycles_per_second": round(CYCLES / elapsed, 1),
        "rss_kib": {str(k): v for k, v in points.items()},
        "rss_growth_first_to_last": f"{growth:+.1%}",
        "within_10_percent": growth <= 0.10,
    }


def main() -> int:
    with scratch() as (state, shm):
        results = asyncio.run(run(state, shm))
        print(json.dumps(results, indent=2))
    return 0 if results["within_10_percent"] else 1


if __name__ == "__main__":
    sys.exit(main())
