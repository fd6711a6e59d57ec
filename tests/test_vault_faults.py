"""The broker when Vault misbehaves: run and the sidecar through a fault proxy in front of the
real server (503 sealed, 429 with Retry-After, hangs, resets, lost responses, refusals)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.vault import VaultClient
from tests.conftest import Vault, runner_role_like, start_sidecar
from tests.faultproxy import FaultProxy, Rule


@pytest.fixture
def proxy(vault: Vault) -> Iterator[FaultProxy]:
    running = FaultProxy(vault.server.addr).start()
    try:
        yield running
    finally:
        running.stop()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_sidecar_that_cannot_log_in_again_waits_without_spinning(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    """Its login reaches its max TTL while its JWT is refused (a leaked sidecar whose projected
    token had expired once burned a core), then Vault becomes unreachable: it backs off, stays
    unready, and logs in again once both are back."""
    await runner_role_like(admin, "sc-short", token_ttl=2, token_max_ttl=4)
    jwt = vault.jwt_for(tenant, tmp_path)
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, "--role", "sc-short",
                                  "--login-max-ttl", "4s", vault_addr=proxy.url, jwt=jwt)  # fmt: skip
    try:
        saved = jwt.read_bytes()
        jwt.write_text("not-a-jwt")  # Vault refuses it at once: no network wait to hide a spin
        before = cpu_seconds(sidecar.process.pid)
        await asyncio.sleep(7)
        spent = cpu_seconds(sidecar.process.pid) - before
        assert spent < 1.0, f"the sidecar burned {spent:.2f} s of CPU in 7 s"
        assert not sidecar.client.ready()
        proxy.add(Rule("refuse"))
        jwt.write_bytes(saved)
        before = cpu_seconds(sidecar.process.pid)
        await asyncio.sleep(4)
        spent = cpu_seconds(sidecar.process.pid) - before
        assert spent < 1.0, f"the sidecar burned {spent:.2f} s of CPU in 4 s"
        assert not sidecar.client.ready()
        proxy.clear()
        for _ in range(150):
            if sidecar.client.ready():
                break
            await asyncio.sleep(0.1)
        assert sidecar.client.ready(), sidecar.log.read_text()[-2000:]
    finally:
        assert sidecar.stop() == 0, sidecar.log.read_text()[-2000:]
