"""What every benchmark needs: a throwaway dev server set up like `dev up`, a tenant with
environments of N secrets, executions to prepare, and a sidecar process to measure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from broker.client import BrokerClient
from broker.config import Layout
from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer
from broker.control.setup import Bootstrap, JwtSettings
from broker.dev import identity, server
from broker.model import Agent, AgentInstance, Environment, parse_resource
from broker.vault import VaultClient

TENANT = "bench"


def resource(kind: str, name: str, spec: Mapping[str, object]) -> dict[str, object]:
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


@dataclass
class Bench:
    """A running dev server with the bench tenant, its environments and a JWT for it."""

    running: server.DevServer
    admin: VaultClient
    jwt: Path
    issuer: ExecutionIssuer

    def environ(self) -> dict[str, str]:
        """A client process's environment for this server: address (and CA), no token."""
        return clean_environ(self.running.addr, self.running.cacert)

    async def issue(self, execution_id: str, size: int, minutes: int = 10) -> None:
        ttl = timedelta(minutes=minutes)
        await self.issuer.create(
            TENANT, AGENT, instance(f"env{size}"), ttl=ttl, execution_id=execution_id
        )


@asynccontextmanager
async def dev_server(
    state: Path, sizes: tuple[int, ...], audit: bool = True, tls: bool = False
) -> AsyncIterator[Bench]:
    """A dev server with one environment of N secrets per size ``env<N>``; stopped after.
    ``audit``: with the file audit device (to count requests) or without (``bao server -dev``
    as it comes). ``tls``: HTTPS with a CA of its own (``-dev-tls``), as Vault runs in
    production."""
    running = server.start(state, audit=audit, tls=tls)
    admin = VaultClient(running.settings())
    try:
        layout = Layout()
        identity.create_key(running.identity_key)
        jwt_settings = JwtSettings(public_keys=(identity.public_pem(running.identity_key),))
        await Bootstrap(admin, layout).run([TENANT], jwt_settings)
        for size in sizes:
            data = {
                f"S{i}": {"value": f"secret-{i}-" + "x" * 32, "is_secret": True}
                for i in range(size)
            }
            environment = parse_resource(
                resource("Environment", f"env{size}", {"data": data}), Environment
            )
            await EnvironmentStore(admin, layout).apply(TENANT, environment)
        jwt = state / "sa.jwt"
        jwt.write_text(identity.mint_token(running.identity_key, TENANT, ttl_seconds=3600))
        yield Bench(running, admin, jwt, ExecutionIssuer(admin, layout))
    finally:
        await admin.aclose()
        server.stop(state)


def clean_environ(addr: str, cacert: str = "") -> dict[str, str]:
    """This process's environment without any Vault settings, pointed at ``addr`` (trusting
    ``cacert``, if given): no token."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    environ["VAULT_ADDR"] = addr
    if cacert:
        environ["VAULT_CACERT"] = cacert
    return environ


@contextmanager
def scratch() -> Iterator[tuple[Path, Path]]:
    """A state directory and one on /dev/shm (memory-backed), both removed afterwards."""
    state = Path(tempfile.mkdtemp(prefix="stigmer-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="stigmer-bench-", dir="/dev/shm"))
    try:
        yield state, shm
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def start_sidecar(bench: Bench, shm: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A sidecar for the bench tenant on ``shm``, ready; (process, socket path)."""
    socket_path = shm / "broker.sock"
    environ = bench.environ()
    process = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "--log-level", "warning", "sidecar",
         "--tenant", TENANT, "--socket", str(socket_path), "--out", str(shm / "out"),
         "--jwt-file", str(bench.jwt), "--metrics-addr", "", *extra],
        env=environ,
    )  # fmt: skip
    client = BrokerClient(socket_path)
    deadline = time.monotonic() + 30
    while not (socket_path.exists() and client.ready()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the sidecar did not start")
        time.sleep(0.05)
    return process, socket_path


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (utime + stime, from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
