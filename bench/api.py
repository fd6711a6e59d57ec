"""Control API throughput against a throwaway dev server: `make bench-api`.

Requests per second for `GET /v1/tenants/{t}/environments/{name}` and for
`POST /v1/tenants/{t}/executions` (an agent with one Environment of 10 secrets), from
``CALLERS`` concurrent keep-alive clients for ``SECONDS`` each, with a control-plane token.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import AGENT, TENANT, clean_environ, dev_server, scratch
from broker.dev.server import free_port
from broker.model import to_document

CALLERS = int(os.environ.get("BENCH_CALLERS", "8"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))


def hammer(port: int, token: str, method: str, path: str, body: Any) -> float:
    """Requests per second answered 2xx by CALLERS threads in SECONDS."""
    counts = [0] * CALLERS
    stop = time.monotonic() + SECONDS
    payload = json.dumps(body).encode() if body is not None else None

    def caller(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        serial = 0
        while time.monotonic() < stop:
            serial += 1
            sent = payload
            if body is not None and "id" in body:  # a fresh execution id each time
                sent = json.dumps({**body, "id": f"api-{index}-{serial}"}).encode()
            headers = {"X-Vault-Token": token, "Content-Type": "application/json"}
            connection.request(method, path, sent, headers)
            answer = connection.getresponse()
            answer.read()
            if answer.status >= 300:
                raise SystemExit(f"{method} {path}: {answer.status}")
            counts[index] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return round(sum(counts) / (time.monotonic() - started), 1)


async def run(state: Path) -> dict[str, Any]:
    async with dev_server(state, (10,)) as bench:
        policies = {"policies": ["stigmer-control-plane"]}
        token = (await bench.admin.post("auth/token/create", policies))["auth"]
        environ = clean_environ(bench.running.addr)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "--log-level", "warning", "control", "serve",
             "--addr", f"127.0.0.1:{port}"], env=environ,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    probe = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    probe.request("GET", "/healthz")
                    if probe.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("control serve did not start")
                time.sleep(0.1)
            base = f"/v1/tenants/{TENANT}"
            request = {"template": to_document(AGENT), "environments": ["env10"], "ttl": "10m",
                       "id": ""}  # fmt: skip
            results = {
                "callers": CALLERS,
                "seconds": SECONDS,
                "environment_get_per_second": await asyncio.to_thread(
                    hammer, port, token["client_token"], "GET", f"{base}/environments/env10", None
                ),
                "execution_create_per_second": await asyncio.to_thread(
                    hammer, port, token["client_token"], "POST", f"{base}/executions", request
                ),
            }
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        return results


def main() -> int:
    with scratch() as (state, _):
        print(json.dumps(asyncio.run(run(state)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
