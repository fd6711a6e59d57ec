"""The broker against OpenBao Agent and the wire, side by side: `make bench`.

One throwaway dev server; for N = 10, 100, 1000 secrets, interleaved and repeated (median and
min-max over ``--runs``):

- ``run_cold``: ``stigmer-broker run -- true`` as a fresh process (login, claim, decrypt,
  render, destroy, release, revoke), installed as pip installs it (``as_installed``);
- ``agent``: ``bao agent`` with JWT auto-auth, one template rendering the N values from one
  KV document (plaintext: the agent cannot batch Transit), ``exit_after_auth``;
- ``sidecar_put`` / ``sidecar_put_delete``: a warm sidecar, PUT then DELETE over its socket;
- ``floor``: raw HTTP on one keep-alive connection from this process: login + KV read +
  batch decrypt + revoke-self (what no broker can beat).

The warm rows (sidecar and floor) take ``WARM_PAIRS`` samples each per repetition, alternated.

Then, once: CLI start-up (``--help``, ``--version``), sidecar RSS (idle; with 50 active
executions of N = 100; VmHWM), cycles per second (N = 20, 20 concurrent callers), and Vault
requests per execution counted from the dev server's file audit device. ``--smoke``: N = 10,
one repetition, fewer cycles (the test suite runs it so the harness cannot rot). ``--tls``:
every row over HTTPS (``bao server -dev-tls``, its CA trusted by every client), as Vault runs
in production.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import random
import site
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import (
    TENANT,
    Bench,
    cpu_seconds,
    dev_server,
    rss_kib,
    scratch,
    start_sidecar,
)
from broker.client import BrokerClient
from broker.config import Layout, uses_tls
from broker.dev import server
from broker.vault import KV
from broker.vault.transit import MAX_ITEMS
from broker.vault.transport import IDLE_TIMEOUT

CONSOLE_SCRIPT = """#!{python}
import sys
from broker.cli import entry
if __name__ == "__main__":
    sys.exit(entry())
"""
BACKGROUND = ("auth/token/lookup-self", "auth/token/renew-self")  # the sidecar's own upkeep
AGENT_POLICY = 'path "stigmer/data/bench-agent/*" { capabilities = ["read"] }'
ROWS = ("run_cold", "agent", "sidecar_put_delete", "sidecar_put", "floor")
WARM_PAIRS = 3  # sidecar cycles and floors per repetition (the cold rows: one each)


def as_installed(work: Path) -> list[str]:
    """``stigmer-broker`` as ``pip install stigmer-broker`` leaves it: a venv whose
    site-packages names this checkout and the dev venv's packages by path, and pip's console
    script. The dev venv's editable install would add its import hook (pathlib, importlib.util:
    20-30 ms) to every start, which no installed copy pays."""
    venv = work / "installed"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site_packages,) = venv.glob("lib/python*/site-packages")
    checkout = Path(__file__).resolve().parents[1]
    paths = [str(checkout), *(p for p in site.getsitepackages() if Path(p).is_dir())]
    (site_packages / "stigmer-broker.pth").write_text("\n".join(paths) + "\n")
    script = venv / "bin" / "stigmer-broker"
    script.write_text(CONSOLE_SCRIPT.format(python=venv / "bin" / "python"))
    script.chmod(0o755)
    return [str(script)]


def median_range(samples: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(samples), 1),
        "min": round(min(samples), 1),
        "max": round(max(samples), 1),
    }


def trusting(cacert: str) -> ssl.SSLContext:
    """A client TLS context trusting the dev server's CA (``-dev-tls``), or the system's."""
    return ssl.create_default_context(cafile=cacert or None)


class Wire:
    """The floor: the least one execution costs over HTTP, on one keep-alive connection."""

    def __init__(self, addr: str, jwt: str, layout: Layout, cacert: str = "") -> None:
        parts = urlsplit(addr)
        self._connection: http.client.HTTPConnection
        if uses_tls((addr,)):
            self._connection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, context=trusting(cacert)
            )
        else:
            self._connection = http.client.HTTPConnection(parts.hostname or "", parts.port)
        self._jwt, self._layout = jwt, layout

    def _call(self, method: str, path: str, token: str = "", body: Any = None) -> Any:
        headers = {"X-Vault-Token": token} if token else {}
        payload = json.dumps(body).encode() if body is not None else None
        self._connection.request(method, f"/v1/{path}", payload, headers)
        response = self._connection.getresponse()
        data = response.read()
        if response.status >= 300:
            raise SystemExit(f"floor: {method} {path}: {response.status} {data[:200]!r}")
        return json.loads(data) if data else {}

    def execution(self, execution_id: str) -> None:
        login = self._call("POST", "auth/jwt/login", body={"role": "stigmer-runner",
                                                            "jwt": self._jwt})  # fmt: skip
        token = login["auth"]["client_token"]
        path = f"{self._layout.kv_mount}/data/{self._layout.context_path(TENANT, execution_id)}"
        context = json.loads(self._call("GET", path, token)["data"]["data"]["resource"])
        ciphertexts = [
            {"ciphertext": v["value"]} for v in context["spec"]["data"].values() if v["is_secret"]
        ]
        key = f"{self._layout.transit_mount}/decrypt/{self._layout.transit_key(TENANT)}"
        for start in range(0, len(ciphertexts), MAX_ITEMS):
            batch = ciphertexts[start : start + MAX_ITEMS]
            self._call("POST", key, token, {"batch_input": batch})
        self._call("POST", "auth/token/revoke-self", token, {})

    def close(self) -> None:
        self._connection.close()


class Harness:
    def __init__(self, bench: Bench, work: Path, shm: Path, sizes: tuple[int, ...]) -> None:
        self.bench, self.work, self.shm, self.sizes = bench, work, shm, sizes
        self.addr, self.cacert = bench.running.addr, bench.running.cacert
        self.layout = Layout()
        self.counter = 0
        self.sidecar: subprocess.Popen[bytes] | None = None
        self.client: BrokerClient | None = None

    @cached_property
    def broker(self) -> list[str]:
        return as_installed(self.work)

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    async def issue(self, prefix: str, size: int) -> str:
        execution_id = self.next_id(prefix)
        await self.bench.issue(execution_id, size)
        return execution_id

    # --- set-up -------------------------------------------------------------------------------

    async def prepare_agent(self) -> None:
        """A JWT role like the runner's that may read the plaintext KV documents, and one
        document of N values per size (what the agent is fastest with)."""
        admin = self.bench.admin
        await admin.post("sys/policies/acl/bench-agent", {"policy": AGENT_POLICY})
        role = (await admin.get("auth/jwt/role/stigmer-runner"))["data"]
        role.update(token_policies=["bench-agent"], policies=["bench-agent"])
        await admin.post("auth/jwt/role/bench-agent", role)
        for size in self.sizes:
            values = [(f"S{i}", f"secret-{i}-" + "x" * 32) for i in range(size)]
            path = f"bench-agent/env{size}"
            await KV(admin, "stigmer").write(path, dict(values[:400]))
            for start in range(400, size, 400):  # a request holds at most 1000 JSON strings
                self.patch(f"stigmer/data/{path}", dict(values[start : start + 400]))

    def patch(self, path: str, values: dict[str, str]) -> None:
        """KV v2 merge-patch (the broker's client has no PATCH: it never needs one)."""
        request = urllib.request.Request(  # noqa: S310 - the bench's own http:// server
            f"{self.addr}/v1/{path}", json.dumps({"data": values}).encode(), method="PATCH",
            headers={"X-Vault-Token": self.bench.running.token,
                     "Content-Type": "application/merge-patch+json"},
        )  # fmt: skip
        context = trusting(self.cacert)  # not used for http://
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:  # noqa: S310
            answer.read()

    def agent_config(self, size: int, destination: Path) -> Path:
        config = self.work / f"agent-{size}.hcl"
        template = (
            f'{{{{ with secret "stigmer/data/bench-agent/env{size}" }}}}'
            "{{ range $k, $v := .Data.data }}{{ $k }}={{ $v }}\n{{ end }}{{ end }}"
        )
        config.write_text(
            f'vault {{\n  address = "{self.addr}"\n'
            + (f'  ca_cert = "{self.cacert}"\n' if self.cacert else "")
            + "}\n"
            'auto_auth {\n  method "jwt" {\n    config = {\n'
            f'      path = "{self.bench.jwt}"\n      role = "bench-agent"\n'
            "      remove_jwt_after_reading = false\n    }\n  }\n}\n"
            f'template {{\n  destination = "{destination}"\n'
            f"  contents = <<EOT\n{template}\nEOT\n}}\n"
            "exit_after_auth = true\n"
        )
        return config

    def start_sidecar(self) -> None:
        self.sidecar, socket_path = start_sidecar(self.bench, self.shm)
        self.client = BrokerClient(socket_path)

    def stop_sidecar(self) -> None:
        if self.sidecar is not None:
            self.sidecar.terminate()
            self.sidecar.wait(30)
            self.sidecar = None

    # --- one measurement each (milliseconds) ---------------------------------------------------

    async def run_cold(self, size: int, execution_id: str = "") -> dict[str, float]:
        execution_id = execution_id or await self.issue("cold", size)
        command = [*self.broker, "run", "--tenant", TENANT, "--execution", execution_id,
                   "--out", str(self.shm / "run"), "--jwt-file", str(self.bench.jwt),
                   "--log-level", "warning", "--", "true"]  # fmt: skip
        (self.shm / "run").mkdir(mode=0o700, exist_ok=True)
        started = time.perf_counter()
        result = subprocess.run(command, env=self.bench.environ(), capture_output=True)
        elapsed = (time.perf_counter() - started) * 1000
        if result.returncode != 0:
            raise SystemExit(f"run failed: {result.stderr.decode()[-500:]}")
        return {"run_cold": elapsed}

    async def agent(self, size: int) -> dict[str, float]:
        destination = self.shm / f"agent-{size}.env"
        destination.unlink(missing_ok=True)
        config = self.agent_config(size, destination)
        started = time.perf_counter()
        result = subprocess.run([server.find_binary(), "agent", f"-config={config}"],
                                env=self.bench.environ(), capture_output=True)  # fmt: skip
        elapsed = (time.perf_counter() - started) * 1000
        lines = destination.read_text().count("\n") if destination.exists() else 0
        if result.returncode != 0 or lines < size:
            raise SystemExit(f"bao agent failed ({lines} lines): {result.stdout[-800:]!r}")
        destination.unlink()
        return {"agent": elapsed}

    async def sidecar_cycle(self, size: int, execution_id: str = "") -> dict[str, float]:
        assert self.client is not None
        execution_id = execution_id or await self.issue("warm", size)
        started = time.perf_counter()
        self.client.prepare(execution_id)
        prepared = time.perf_counter()
        self.client.end(execution_id)
        ended = time.perf_counter()
        return {
            "sidecar_put": (prepared - started) * 1000,
            "sidecar_put_delete": (ended - started) * 1000,
        }

    async def floor(self, size: int) -> dict[str, float]:
        execution_id = await self.issue("floor", size)
        wire = Wire(self.addr, self.bench.jwt.read_text(), self.layout, self.cacert)
        wire.execution(execution_id)  # connect outside the timing: the floor is warm
        execution_id = await self.issue("floor", size)
        started = time.perf_counter()
        wire.execution(execution_id)
        elapsed = (time.perf_counter() - started) * 1000
        wire.close()
        return {"floor": elapsed}

    async def warm(self, size: int) -> dict[str, list[float]]:
        """WARM_PAIRS sidecar cycles and floors, alternated: a warm sample takes ~10-90 ms, so
        a few per repetition cost little and tame this VM's noise (one sample of each moved
        ±50 % between repetitions)."""
        rows: dict[str, list[float]] = {"sidecar_put": [], "sidecar_put_delete": [], "floor": []}
        for _ in range(WARM_PAIRS):
            for measured in (await self.sidecar_cycle(size), await self.floor(size)):
                for row, value in measured.items():
                    rows[row].append(value)
        return rows

    async def latency(self, runs: int) -> dict[str, dict[str, Any]]:
        """Every row for every size, interleaved in a shuffled order each repetition."""
        samples: dict[str, dict[str, list[float]]] = {
            row: {str(size): [] for size in self.sizes} for row in ROWS
        }
        kinds: list[Callable[[int], Any]] = [self.run_cold, self.agent, self.warm]
        for _ in range(runs):
            plan = [(kind, size) for kind in kinds for size in self.sizes]
            random.shuffle(plan)
            for kind, size in plan:
                for row, value in (await kind(size)).items():
                    samples[row][str(size)] += value if isinstance(value, list) else [value]
        return {
            row: {size: median_range(values) for size, values in by_size.items()}
            for row, by_size in samples.items()
        }

    # --- the one-off measurements --------------------------------------------------------------

    def startup(self, runs: int) -> dict[str, dict[str, float]]:
        results = {}
        for flag in ("--help", "--version"):
            timings = []
            for _ in range(runs):
                started = time.perf_counter()
                subprocess.run([*self.broker, flag], capture_output=True, check=True)
                timings.append((time.perf_counter() - started) * 1000)
            results[flag] = median_range(timings)
        return results

    async def memory(self, active: int, idle: dict[str, int], pause: bool) -> dict[str, int]:
        """RSS at start (``idle``), after the latency and throughput runs, with ``active``
        executions, and (``pause``) idle again once the pooled Vault connections have closed."""
        assert self.sidecar is not None and self.client is not None
        after = rss_kib(self.sidecar.pid)
        ids = [await self.issue("rss", 100) for _ in range(active)]
        for execution_id in ids:
            self.client.prepare(execution_id)
        busy = rss_kib(self.sidecar.pid)
        for execution_id in ids:
            self.client.end(execution_id)
        results = {"idle_rss_kib": idle["VmRSS"], "idle_after_the_runs_rss_kib": after["VmRSS"],
                   f"rss_kib_{active}_active_n100": busy["VmRSS"],
                   "peak_kib_VmHWM": rss_kib(self.sidecar.pid)["VmHWM"]}  # fmt: skip
        if pause:
            time.sleep(IDLE_TIMEOUT + 2.0)  # the idle connections close, their memory goes back
            results["idle_after_a_pause_rss_kib"] = rss_kib(self.sidecar.pid)["VmRSS"]
        return results

    async def throughput(self, cycles: int, callers: int, size: int) -> dict[str, float]:
        assert self.client is not None
        ids = [await self.issue("tp", size) for _ in range(cycles)]
        socket_path = self.client.socket_path

        def caller(mine: list[str]) -> None:
            client = BrokerClient(socket_path)
            for execution_id in mine:
                client.prepare(execution_id)
                client.end(execution_id)

        shares = [ids[n::callers] for n in range(callers)]
        assert self.sidecar is not None
        processes = {"vault": self.bench.running.pid, "sidecar": self.sidecar.pid}
        before = {name: cpu_seconds(pid) for name, pid in processes.items()}
        started = time.perf_counter()
        with ThreadPoolExecutor(callers) as pool:
            list(pool.map(caller, shares))
        elapsed = time.perf_counter() - started
        cpu_ms = {f"{name}_cpu_ms_per_cycle": round((cpu_seconds(pid) - before[name]) / cycles
                                                    * 1000, 1)
                  for name, pid in processes.items()}  # fmt: skip
        return {"cycles": cycles, "callers": callers, "secrets": size,
                "cycles_per_second": round(cycles / elapsed, 1), **cpu_ms}  # fmt: skip

    async def requests(self) -> dict[str, dict[str, Any]]:
        """Vault requests per execution, from the audit log: one `run` and one sidecar PUT +
        DELETE per size, each counted by operation."""
        audit = self.bench.running.audit_log
        counted: dict[str, dict[str, Any]] = {}
        for size in self.sizes:
            for mode in ("run", "sidecar"):
                execution_id = await self.issue(f"count-{mode}", size)
                time.sleep(0.2)  # the audit device writes as the server answers
                before = audit.stat().st_size
                if mode == "run":
                    await self.run_cold(size, execution_id)
                else:
                    await self.sidecar_cycle(size, execution_id)
                time.sleep(0.2)
                with audit.open("rb") as log:
                    log.seek(before)
                    entries = [json.loads(line) for line in log if line.strip()]
                paths = Counter(
                    _operation(e["request"]) for e in entries
                    if e.get("type") == "request" and e["request"].get("path") not in BACKGROUND
                )  # fmt: skip
                counted[f"{mode}_n{size}"] = {"total": sum(paths.values()), **dict(paths)}
        return counted


def _operation(request: dict[str, Any]) -> str:
    path = request.get("path", "")
    parts = path.split("/")
    if "execution-contexts" in parts or "execution-claims" in parts:
        index = max(parts.index(p) for p in ("execution-contexts", "execution-claims")
                    if p in parts)  # fmt: skip
        path = "/".join(parts[: index + 1])
    elif "decrypt" in parts:
        path = "stigmer-transit/decrypt"
    return f"{request.get('operation')} {path}"


def table(latency: dict[str, dict[str, Any]], sizes: tuple[int, ...]) -> str:
    header = ("| N | `run -- true` cold | `bao agent` | sidecar PUT+DELETE | PUT alone | floor "
              "| PUT / floor |\n|---|---|---|---|---|---|---|\n")  # fmt: skip
    rows = []
    for size in sizes:
        cells = [latency[row][str(size)]["median"] for row in ROWS]
        ratio = cells[3] / cells[4]
        rows.append(f"| {size} | " + " | ".join(f"{c:.1f} ms" for c in cells) +
                    f" | {ratio:.2f}x |")  # fmt: skip
    return header + "\n".join(rows)


async def measure(args: argparse.Namespace, work: Path, shm: Path) -> dict[str, Any]:
    sizes = tuple(args.sizes)
    environments = tuple(sorted({*sizes, 20, 100}))  # 20: throughput, 100: memory
    async with dev_server(work / "server", environments, tls=args.tls) as bench:
        harness = Harness(bench, work, shm, sizes)
        await harness.prepare_agent()
        harness.start_sidecar()
        assert harness.sidecar is not None
        time.sleep(1)  # settled
        idle = rss_kib(harness.sidecar.pid)
        try:
            results: dict[str, Any] = {"runs": args.runs, "sizes": list(sizes), "tls": args.tls}
            results["latency_ms"] = await harness.latency(args.runs)
            results["startup_ms"] = harness.startup(max(3, args.runs))
            results["throughput"] = await harness.throughput(args.cycles, 20, 20)
            results["memory"] = await harness.memory(args.active, idle, pause=not args.smoke)
            results["requests_per_execution"] = await harness.requests()
            results["transit_chunk"] = MAX_ITEMS
            results["decrypt_requests"] = {str(n): math.ceil(n / MAX_ITEMS) for n in sizes}
        finally:
            harness.stop_sidecar()
    # The audit device costs Vault CPU on every request: the same throughput without it, as
    # `bao server -dev` comes.
    async with dev_server(work / "server-no-audit", (20,), audit=False, tls=args.tls) as bench:
        harness = Harness(bench, work / "no-audit", shm, sizes)
        harness.start_sidecar()
        try:
            without = await harness.throughput(args.cycles, 20, 20)
            results["throughput_without_audit_device"] = without
        finally:
            harness.stop_sidecar()
    results["table"] = table(results["latency_ms"], sizes)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "7")))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--cycles", type=int, default=400, help="for cycles per second")
    parser.add_argument("--active", type=int, default=50, help="active executions for RSS")
    parser.add_argument("--smoke", action="store_true", help="N = 10, one repetition")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--tls",
        action="store_true",
        default=os.environ.get("BENCH_TLS", "") not in ("", "0"),
        help="every row over HTTPS, as in production (or $BENCH_TLS=1)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.sizes, args.cycles, args.active = 1, [10], 20, 5
    with scratch() as (work, shm):
        results = asyncio.run(measure(args, work, shm))
    text = json.dumps(results, indent=2)
    print(text)
    print("\n" + results["table"], file=sys.stderr)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
