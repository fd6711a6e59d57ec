"""The sidecar as a real process, driven over its Unix socket, against a real OpenBao."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from broker.client import AsyncBrokerClient, BrokerClient, BrokerClientError
from broker.control.executions import RuntimeValue
from broker.dev.server import free_port
from broker.vault import KV, VaultClient
from tests.conftest import (
    Sidecar,
    Vault,
    accessor_alive,
    claim_metadata,
    claims,
    context_paths,
    runner_role_like,
    start_sidecar,
    wait_until,
)
from tests.factories import HTTP_SERVER, issue_secrets

CANARY = "cnry-sidecar-3e9f1b-do-not-leak"


@pytest.fixture
async def sidecar(vault: Vault, tenant: str, tmp_path: Path, shm: Path) -> AsyncIterator[Sidecar]:
    running = await start_sidecar(vault, tenant, tmp_path, shm, "--lease-check-interval", "0.3")
    yield running
    running.stop()


async def issue(
    admin: VaultClient,
    vault: Vault,
    tenant: str,
    execution_id: str,
    ttl: timedelta = timedelta(minutes=5),
    secrets: int = 1,
) -> None:
    values = {f"TOKEN_{i}": (f"{CANARY}-{i}", True) for i in range(secrets)}
    await issue_secrets(
        admin, vault.layout, tenant, execution_id, values, ttl, [HTTP_SERVER],
        {"MODE": RuntimeValue("fast")},
    )  # fmt: skip


async def lease_accessor(admin: VaultClient, tenant: str, execution_id: str) -> str:
    """The execution's lease, as its claim's metadata records it for the reaper."""
    return (await claim_metadata(admin, tenant, execution_id))["lease_accessor"]


async def test_prepare_resolve_end(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    await issue(admin, vault, tenant, "sc-1")
    prepared = sidecar.client.prepare("sc-1")
    assert prepared.state == "active"
    assert prepared.variables == {"MODE": {"secret": False}, "TOKEN_0": {"secret": True}}
    assert (
        json.loads(prepared.mcp_config.read_text())["mcpServers"]["api"]["headers"]["A"]
        == f"Bearer {CANARY}-0"
    )
    assert prepared.environ()["TOKEN_0"] == f"{CANARY}-0"
    again = sidecar.client.prepare("sc-1")  # same caller: same answer
    assert again == prepared
    claim = (await KV(admin, "stigmer").read(f"execution-claims/{tenant}/sc-1")).data
    assert claim["pod"] == "pod-a" and claim["mode"] == "sidecar"
    # The login wrote the claim while the context was read; the lease recorded itself in the
    # claim's metadata, which is what the reaper reads and may revoke.
    login = next(e["accessor"] for e in sidecar.events() if e["msg"] == "logged in")
    assert claim["lease_accessor"] == login
    holder = await claim_metadata(admin, tenant, "sc-1")
    assert holder["pod"] == "pod-a" and holder["mode"] == "sidecar"
    accessor = holder["lease_accessor"]
    assert accessor != login
    lease = (await admin.post("auth/token/lookup-accessor", {"accessor": accessor}))["data"]
    assert lease["meta"] == {"execution_id": "sc-1", "tenant": tenant, "pod": "pod-a"}
    assert lease["policies"] == ["stigmer-runner"]
    assert sidecar.client.resolve("sc-1", {"h": ["x ${.secrets.TOKEN_0}", 3], "m": "${MODE}"}) == {
        "h": [f"x {CANARY}-0", 3], "m": "fast",
    }  # fmt: skip
    with pytest.raises(BrokerClientError) as unknown:
        sidecar.client.resolve("sc-1", {"a": "${NOPE}"})
    assert unknown.value.status == 422 and "unknown variable NOPE" in str(unknown.value)
    assert sidecar.client.list() == [{"id": "sc-1", "state": "active"}]
    ended = sidecar.client.end("sc-1")
    assert ended["state"] == "ended"
    assert ended["ended"]["context"] == "destroyed" and ended["ended"]["lease"] == "revoked"
    assert ended["ended"]["claim"] == "released"
    assert not prepared.directory.exists()
    assert not await accessor_alive(admin, accessor)
    assert await context_paths(admin, vault, tenant) == []
    with pytest.raises(BrokerClientError) as gone:
        sidecar.client.prepare("sc-1")
    assert gone.value.status == 410
    counted = sidecar.metrics()  # one of each of the execution's Vault requests, by operation
    for operation in ("read", "decrypt", "create-token", "write-metadata", "revoke-self"):
        assert f'operation="{operation}",outcome="ok"}} 1.0' in counted, operation
    assert 'stigmer_broker_vault_requests_total{operation="destroy",outcome="ok"} 2.0' in counted


async def test_errors_have_statuses(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    with pytest.raises(BrokerClientError) as missing:
        sidecar.client.prepare("never-issued")
    assert missing.value.status == 404 and "no context" in str(missing.value)
    # The login wrote a claim while it read: given back before the answer, so nothing is left
    # and the execution can be prepared once it is issued.
    assert await claims(admin, tenant) == []
    await issue(admin, vault, tenant, "never-issued")
    assert sidecar.client.prepare("never-issued").state == "active"
    sidecar.client.end("never-issued")
    with pytest.raises(BrokerClientError) as bad:
        sidecar.client.prepare("bad..id")
    assert bad.value.status == 400
    with pytest.raises(BrokerClientError) as unknown:
        sidecar.client.get("not-here")
    assert unknown.value.status == 404
    assert list(sidecar.out.iterdir()) == []


async def test_context_manager_ends_on_exception(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    await issue(admin, vault, tenant, "cm-1")
    with pytest.raises(RuntimeError), sidecar.client.execution("cm-1") as prepared:
        assert prepared.env_file.exists()
        raise RuntimeError("the agent crashed")
    assert not prepared.directory.exists()
    assert await context_paths(admin, vault, tenant) == []


async def test_sigterm_ends_every_active_execution(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    ids = [f"term-{i}" for i in range(20)]
    for execution_id in ids:
        await issue(admin, vault, tenant, execution_id)
    prepared = [sidecar.client.prepare(i) for i in ids]
    accessors = [await lease_accessor(admin, tenant, i) for i in ids]
    login = next(e["accessor"] for e in sidecar.events() if e["msg"] == "logged in")
    assert sidecar.stop() == 0
    assert all(not p.directory.exists() for p in prepared)
    assert not [a for a in accessors if await accessor_alive(admin, a)]
    assert not await accessor_alive(admin, str(login))
    assert await context_paths(admin, vault, tenant) == []
    assert not sidecar.socket.exists()
    stopped = next(e for e in sidecar.events() if e["msg"] == "sidecar stopped")
    assert isinstance(stopped["seconds"], float)


async def test_ttl_expiry_without_delete(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    await issue(admin, vault, tenant, "ttl-1", ttl=timedelta(seconds=2))
    prepared = sidecar.client.prepare("ttl-1")
    accessor = await lease_accessor(admin, tenant, "ttl-1")
    await wait_until(lambda: sidecar.client.get("ttl-1")["state"] == "ended", 10)
    assert sidecar.client.get("ttl-1")["ended"]["reason"] == "expired"
    assert not prepared.directory.exists()
    assert not await accessor_alive(admin, accessor)
    assert await context_paths(admin, vault, tenant) == []


async def test_second_sidecar_is_refused_and_first_untouched(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar, tmp_path: Path, shm: Path
) -> None:
    await issue(admin, vault, tenant, "dup-1")
    first = sidecar.client.prepare("dup-1")
    other = await start_sidecar(vault, tenant, tmp_path, shm, name="b")
    try:
        with pytest.raises(BrokerClientError) as refused:
            other.client.prepare("dup-1")
        assert refused.value.status == 409
        refusal = next(e for e in other.events() if e["msg"] == "security: execution claim refused")
        assert refusal["event"] == "claim-refused" and refusal["level"] == "warning"
        assert "stigmer_broker_claim_conflicts_total 1.0" in other.metrics()
        assert list(other.out.iterdir()) == []
    finally:
        assert other.stop() == 0
    assert sidecar.client.get("dup-1")["state"] == "active"
    assert first.env_file.exists()
    assert await accessor_alive(admin, await lease_accessor(admin, tenant, "dup-1"))


async def test_lease_revoked_from_outside(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    await issue(admin, vault, tenant, "rev-1")
    prepared = sidecar.client.prepare("rev-1")
    accessor = await lease_accessor(admin, tenant, "rev-1")
    await admin.post("auth/token/revoke-accessor", {"accessor": accessor})
    await wait_until(lambda: sidecar.client.get("rev-1")["state"] == "failed", 10)
    state = sidecar.client.get("rev-1")
    assert state["state"] == "failed" and state["ended"]["reason"] == "lease revoked"
    event = next(e for e in sidecar.events() if e.get("event") == "lease-revoked")
    assert event["level"] == "warning" and event["execution_id"] == "rev-1"
    assert not prepared.directory.exists()
    assert await context_paths(admin, vault, tenant) == []
    assert [e["msg"] for e in sidecar.events()].count("logged in") == 1  # the login was fine


async def test_login_revoked_from_outside_reauthenticates_once(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    ids = [f"relog-{i}" for i in range(3)]
    for execution_id in ids:
        await issue(admin, vault, tenant, execution_id)
    prepared = [sidecar.client.prepare(i) for i in ids]
    login = next(e["accessor"] for e in sidecar.events() if e["msg"] == "logged in")
    await admin.post("auth/token/revoke-accessor", {"accessor": login})  # and every lease
    await wait_until(lambda: all(sidecar.client.get(i)["state"] == "failed" for i in ids), 15)
    assert all(sidecar.client.get(i)["state"] == "failed" for i in ids)
    assert all(not p.directory.exists() for p in prepared)
    assert await context_paths(admin, vault, tenant) == []
    assert [e["msg"] for e in sidecar.events()].count("logged in") == 2  # re-authenticated once
    await issue(admin, vault, tenant, "relog-after")
    assert sidecar.client.prepare("relog-after").state == "active"  # and works again
    assert sidecar.client.ready()


def _as_nobody(socket_path: Path, execution_id: str) -> tuple[int, str]:
    """PUT from uid 65534 (group root, so the 0660 socket file lets it connect)."""
    script = (
        "import os, sys, encodings.idna\n"
        "from broker.client import BrokerClient, BrokerClientError\n"  # imported while still root
        "os.setgroups([]); os.setgid(0); os.setuid(65534)\n"
        "try:\n"
        f"    BrokerClient({str(socket_path)!r}).prepare({execution_id!r}); print(200)\n"
        "except BrokerClientError as e:\n"
        "    print(e.status)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    return int(result.stdout.strip() or 0), result.stderr


async def test_peer_uid_not_allowed_gets_403(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    await issue(admin, vault, tenant, "peer-1")
    status, stderr = _as_nobody(sidecar.socket, "peer-1")
    assert status == 403, stderr
    refused = [e for e in sidecar.events() if e["msg"] == "security: socket peer refused"]
    assert refused and refused[-1]["peer_uid"] == 65534
    assert oct(sidecar.socket.stat().st_mode & 0o777) == "0o660"
    assert "stigmer_broker_denied_peers_total 1.0" in sidecar.metrics()


async def test_another_allowed_caller_cannot_take_an_execution(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    running = await start_sidecar(
        vault, tenant, tmp_path, shm, "--allow-uid", "0", "--allow-uid", "65534", name="c"
    )
    try:
        await issue(admin, vault, tenant, "own-1")
        running.client.prepare("own-1")
        status, stderr = _as_nobody(running.socket, "own-1")
        assert status == 409, stderr
        assert running.client.get("own-1")["state"] == "active"
    finally:
        assert running.stop() == 0


async def test_fifty_concurrent_executions(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    ids = [f"many-{i}" for i in range(50)]
    for execution_id in ids:
        await issue(admin, vault, tenant, execution_id)

    async def prepare_all() -> list[str]:
        async with AsyncBrokerClient(sidecar.socket) as client:
            prepared = await asyncio.gather(*(client.prepare(i) for i in ids))
            return [str(p.directory) for p in prepared]

    directories = await prepare_all()
    assert len(set(directories)) == 50
    accessors = {await lease_accessor(admin, tenant, i) for i in ids}
    assert len(accessors) == 50
    order = ids[:]
    random.shuffle(order)

    async def end_all() -> None:
        async with AsyncBrokerClient(sidecar.socket) as client:
            await asyncio.gather(*(client.end(i) for i in order))

    await end_all()
    assert all(not Path(d).exists() for d in directories)
    assert not [a for a in accessors if await accessor_alive(admin, a)]
    assert await context_paths(admin, vault, tenant) == []
    assert "stigmer_broker_executions_started_total 50.0" in sidecar.metrics()


async def test_canaries_stay_out_of_logs_metrics_environ_and_cmdline(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    await issue(admin, vault, tenant, "canary-1", secrets=3)
    prepared = sidecar.client.prepare("canary-1")
    assert CANARY in prepared.env_json.read_text()  # live canaries
    sidecar.client.resolve("canary-1", {"a": "${TOKEN_1}"})
    proc = Path(f"/proc/{sidecar.process.pid}")
    environ = (proc / "environ").read_bytes().decode(errors="replace")
    cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
    metrics = sidecar.metrics()
    sidecar.client.end("canary-1")
    assert sidecar.stop() == 0
    logs = sidecar.log.read_text()
    for text in (environ, cmdline, metrics, logs):
        assert CANARY not in text
    assert vault.server.token not in environ and vault.server.token not in cmdline
    assert "VAULT_TOKEN" not in environ


def test_startup_deadline_with_vault_unreachable(tmp_path: Path, shm: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    environ["VAULT_ADDR"] = f"http://127.0.0.1:{free_port()}"
    jwt = tmp_path / "jwt"
    jwt.write_text("x.y.z")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "sidecar", "--tenant", "acme", "--socket", str(tmp_path / "s.sock"),
         "--out", str(shm / "o"), "--jwt-file", str(jwt), "--startup-timeout", "2s", "--metrics-addr", ""],
        env=environ, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 3  # Vault is unreachable: the Vault code, not the identity one
    assert "vault login auth/jwt/login: cannot reach Vault" in result.stderr.splitlines()[-2]
    assert result.stderr.splitlines()[-1].startswith("stigmer-broker: hint: ")
    assert time.monotonic() - started >= 2
    retries = [line for line in result.stderr.splitlines() if "failed, retrying" in line]
    assert len(retries) >= 2 and all('"fault": "unreachable"' in line for line in retries)
    assert not (tmp_path / "s.sock").exists()
    assert not (shm / "o").exists() or list((shm / "o").iterdir()) == []


def test_disk_backed_out_is_refused_at_startup(vault: Vault, tmp_path: Path) -> None:
    environ = vault.environ()
    environ.pop("VAULT_TOKEN")
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "sidecar", "--tenant", "acme", "--socket", str(tmp_path / "s.sock"),
         "--out", str(tmp_path / "out"), "--jwt-file", str(vault.jwt_for("acme", tmp_path)), "--metrics-addr", ""],
        env=environ, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 6 and "disk-backed" in result.stderr


async def test_renews_and_logs_in_again_at_max_ttl(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    """TTL 2 s, max 8 s: renewals keep it alive, then a fresh login when renewal stops helping."""
    await runner_role_like(admin, "sidecar-short", token_ttl=2, token_max_ttl=8)
    running = await start_sidecar(
        vault, tenant, tmp_path, shm, "--role", "sidecar-short", "--login-max-ttl", "8s", name="r"
    )
    try:
        await asyncio.sleep(9)
        assert running.client.ready()
        metrics = running.metrics()
        renewals = next(
            line
            for line in metrics.splitlines()
            if line.startswith('stigmer_broker_token_renewals_total{result="ok"}')
        )
        assert float(renewals.split()[-1]) >= 2
        logins = next(
            line
            for line in metrics.splitlines()
            if line.startswith('stigmer_broker_logins_total{result="ok"}')
        )
        assert float(logins.split()[-1]) >= 2
        await issue(admin, vault, tenant, "short-1", ttl=timedelta(seconds=3))
        assert running.client.prepare("short-1").state == "active"
    finally:
        assert running.stop() == 0
    assert await context_paths(admin, vault, tenant) == []


async def test_async_context_manager_ends_on_exception(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    await issue(admin, vault, tenant, "acm-1")

    async def use() -> Path:
        async with AsyncBrokerClient(sidecar.socket) as client:
            try:
                async with client.execution("acm-1") as prepared:
                    assert prepared.mcp_config.exists()
                    raise ValueError("agent failed")
            except ValueError:
                return prepared.directory
        raise AssertionError("unreachable")

    directory = await use()
    assert not directory.exists()
    assert sidecar.client.get("acm-1")["state"] == "ended"


async def test_files_are_private_to_the_broker_and_its_caller(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    """0700 / 0400: the caller here is the broker's own uid, so no ACL entry is added."""
    await issue(admin, vault, tenant, "modes-1")
    prepared = sidecar.client.prepare("modes-1")
    assert oct(prepared.directory.stat().st_mode & 0o777) == "0o700"
    for name in ("env", "env.json", "mcp.json", "manifest.json"):
        assert oct((prepared.directory / name).stat().st_mode & 0o777) == "0o400"


async def test_second_signal_forces_exit(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    for n in range(20):
        await issue(admin, vault, tenant, f"force-{n}")
        sidecar.client.prepare(f"force-{n}")
    sidecar.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.02)
    sidecar.process.send_signal(signal.SIGINT)
    assert sidecar.process.wait(30) == 130
    assert any(e["msg"] == "second signal: exiting now" for e in sidecar.events())


def test_refuses_a_vault_token_in_its_environment(vault: Vault, tmp_path: Path, shm: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "sidecar", "--tenant", "acme", "--socket", str(shm / "t.sock"),
         "--out", str(shm / "o"), "--jwt-file", str(vault.jwt_for("acme", tmp_path)), "--metrics-addr", ""],
        env=vault.environ(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "must not have a Vault token in its environment" in result.stderr
    assert vault.server.token not in result.stderr


async def test_executions_are_listed_page_by_page(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    import http.client
    import socket as sockets

    for n in range(5):
        await issue(admin, vault, tenant, f"page-{n}")
        sidecar.client.prepare(f"page-{n}")
    sidecar.client.end("page-0")  # an ended one stays listed, as a summary

    def page(query: str) -> dict[str, object]:
        connection = http.client.HTTPConnection("localhost")
        connection.sock = sockets.socket(sockets.AF_UNIX)
        connection.sock.connect(str(sidecar.socket))
        connection.request("GET", f"/v1/executions?{query}")
        answer = json.loads(connection.getresponse().read())
        connection.close()
        return dict(answer)

    first = page("limit=2")
    assert [e["id"] for e in first["executions"]] == ["page-0", "page-1"]
    assert first["next"] == "page-1" and first["executions"][0]["state"] == "ended"
    rest = page(f"limit=10&after={first['next']}")
    assert [e["id"] for e in rest["executions"]] == ["page-2", "page-3", "page-4"]
    assert rest["next"] is None
    assert len(sidecar.client.list()) == 5  # the client follows the pages


async def test_other_requests_are_served_while_a_large_directory_is_wiped(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar
) -> None:
    """The wipe runs beside the event loop: a runner that left thousands of files does not
    stall the sidecar's other callers (nor the Vault steps of the same end)."""
    await issue(admin, vault, tenant, "wide-1")
    directory = sidecar.client.prepare("wide-1").directory
    planted = 9000  # under the wipe's 10,000-entry budget, with the broker's own files
    for index in range(planted):
        (directory / f"junk-{index}").write_bytes(b"x")
    ending = asyncio.ensure_future(asyncio.to_thread(sidecar.client.end, "wide-1"))
    during: list[int] = []  # entries left when an answer came while the wipe was under way
    other = BrokerClient(sidecar.socket)
    while not ending.done():
        assert await asyncio.to_thread(other.ready)
        try:
            left = len(os.listdir(directory))
        except FileNotFoundError:
            break
        if 0 < left < planted:
            during.append(left)
    ended = await ending
    other.close()
    assert during, "no request was answered while the directory was being wiped"
    assert len(ended["ended"]["files_removed"]) > planted
    assert ended["ended"]["context"] == "destroyed" and ended["ended"]["lease"] == "revoked"
    assert not directory.exists()
