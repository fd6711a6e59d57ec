"""The broker when Vault misbehaves: run and the sidecar through a fault proxy in front of the
real server (503 sealed, 429 with Retry-After, hangs, resets, lost responses, refusals)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bench.common import cpu_seconds
from broker.errors import BrokerClientError, NotFound, OutcomeUnknown
from broker.vault import KV, VaultClient, create_child_token, transport
from broker.vault.retry import Safety
from tests.conftest import (
    Sidecar,
    Vault,
    accessor_alive,
    claim_metadata,
    claims,
    context_paths,
    run_as_runner,
    runner_role_like,
    spawn,
    start_sidecar,
    wait_until,
)
from tests.factories import issue_secrets
from tests.faultproxy import FaultProxy, Rule, Seen

CANARY = "cnry-faults-c41d-do-not-leak"


async def claim_accessor(admin: VaultClient, tenant: str, execution_id: str) -> str:
    """The lease accessor a claim's metadata records; it is written alongside the decryption,
    so wait for it."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(NotFound):
            custom = await claim_metadata(admin, tenant, execution_id)
            if custom.get("lease_accessor"):
                return custom["lease_accessor"]
        assert time.monotonic() < deadline, "the claim's metadata was never written"
        await asyncio.sleep(0.05)


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


async def test_sigterm_cancels_a_prepare_waiting_on_vault_and_gives_everything_back(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    await issue_secrets(admin, vault.layout, tenant, "sig-1", {"TOKEN_0": (CANARY, True)})
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, "--vault-timeout", "2s",
                                  vault_addr=proxy.url)  # fmt: skip
    proxy.add(Rule("hang", match="-transit/decrypt/"))  # claimed and leased, then stuck
    preparing = asyncio.ensure_future(asyncio.to_thread(sidecar.client.prepare, "sig-1"))
    await wait_until(lambda: proxy.requests("-transit/decrypt/"), 10, "the decrypt request")
    accessor = await claim_accessor(admin, tenant, "sig-1")
    assert await accessor_alive(admin, accessor)
    started = time.monotonic()
    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.process.wait(10) == 0, sidecar.log.read_text()[-2000:]
    assert time.monotonic() - started < 2 + 2  # 2 s plus one request timeout
    with pytest.raises(BrokerClientError) as refused:
        await preparing
    assert refused.value.status == 503 and "shutting down" in str(refused.value)
    assert await claims(admin, tenant) == []
    assert not await accessor_alive(admin, accessor)
    assert "sig-1" in await context_paths(admin, vault, tenant)  # kept: it can be prepared again
    assert not (sidecar.out / "sig-1").exists()
    messages = [event["msg"] for event in sidecar.events()]
    assert "shutdown: preparations cancelled" in messages
    assert "execution prepared" not in messages


async def test_sigterm_stops_a_run_waiting_on_vault_and_gives_everything_back(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    await issue_secrets(admin, vault.layout, tenant, "sig-run", {"TOKEN_0": (CANARY, True)})
    proxy.add(Rule("hang", match="-transit/decrypt/"))
    environ = vault.environ(VAULT_ADDR=proxy.url)
    environ.pop("VAULT_TOKEN")
    marker = tmp_path / "ran"
    process = spawn(
        [sys.executable, "-m", "broker.cli", "run", "--vault-timeout", "2s", "--tenant", tenant,
         "--execution", "sig-run", "--out", str(shm), "--jwt-file",
         str(vault.jwt_for(tenant, tmp_path)), "--", "touch", str(marker)],
        env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    await wait_until(lambda: proxy.requests("-transit/decrypt/"), 15, "the decrypt request")
    accessor = await claim_accessor(admin, tenant, "sig-run")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert time.monotonic() - started < 2 + 2, stderr
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted before the command started" in stderr
    assert not marker.exists() and not (shm / "sig-run").exists()
    assert await claims(admin, tenant) == []
    assert not await accessor_alive(admin, accessor)
    assert "sig-run" in await context_paths(admin, vault, tenant)


def readyz(sidecar: Sidecar) -> tuple[int, dict[str, object]]:
    """The Kubernetes view: GET /readyz on the metrics port."""
    url = f"http://127.0.0.1:{sidecar.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


async def until_readyz(sidecar: Sidecar, status: int, within: float) -> dict[str, object]:
    deadline = time.monotonic() + within
    while True:
        code, body = await asyncio.to_thread(readyz, sidecar)
        if code == status:
            return body
        assert time.monotonic() < deadline, f"/readyz stayed {code} {body}"
        await asyncio.sleep(0.1)


async def test_readyz_tells_the_truth_about_vault(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    """Sealed, unreachable, token revoked: 503 within one check interval (1 s here, plus the
    check's own bounded time); 200 again within one interval after each recovery."""
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, "--vault-check-interval", "1s",
                                  vault_addr=proxy.url)  # fmt: skip
    try:
        assert readyz(sidecar) == (200, {"ready": True, "vault": "ok", "active_executions": 0})
        proxy.add(Rule("sealed"))
        assert (await until_readyz(sidecar, 503, 1 + 1 + 1))["vault"] == "sealed"
        proxy.clear()
        await until_readyz(sidecar, 200, 1 + 1)

        proxy.go_away()
        assert (await until_readyz(sidecar, 503, 1 + 1 + 1))["vault"] == "unreachable"
        proxy.come_back()
        await until_readyz(sidecar, 200, 1 + 1)

        first = [e["accessor"] for e in sidecar.events() if e["msg"] == "logged in"]
        await admin.post("auth/token/revoke-accessor", {"accessor": first[-1]})

        def logins() -> list[object]:
            return [e["accessor"] for e in sidecar.events() if e["msg"] == "logged in"]

        await wait_until(lambda: len(logins()) == len(first) + 1, 1 + 1 + 1, "a new login")
        assert readyz(sidecar)[0] == 200
        assert "login refused by Vault: logging in again" in [e["msg"] for e in sidecar.events()]
        assert "stigmer_broker_vault_ready 1.0" in sidecar.metrics()
    finally:
        assert sidecar.stop() == 0, sidecar.log.read_text()[-2000:]


# --- run through the proxy -------------------------------------------------------------------


def run_via(
    proxy: FaultProxy,
    vault: Vault,
    tenant: str,
    execution_id: str,
    tmp_path: Path,
    shm: Path,
    *flags: str,
    child: str = "import os, sys; sys.exit(0 if os.environ['TOKEN_0'] else 3)",
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """`run` against the proxy; (the process, its JSON log events)."""
    result = run_as_runner(vault, tenant, execution_id, shm, vault.jwt_for(tenant, tmp_path),
                           child, *flags, vault_addr=proxy.url, timeout=120)  # fmt: skip
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return result, events


def gaps(seen: list[Seen]) -> list[float]:
    return [later.at - earlier.at for earlier, later in itertools.pairwise(seen)]


async def all_gone(admin: VaultClient, vault: Vault, tenant: str, accessor: str) -> bool:
    return (
        await context_paths(admin, vault, tenant) == []
        and await claims(admin, tenant) == []
        and not await accessor_alive(admin, accessor)
    )


def login_accessor(events: list[dict[str, Any]]) -> str:
    return str(next(e["accessor"] for e in events if e["msg"] == "logged in"))


async def test_run_rides_out_a_sealed_vault_and_honours_retry_after(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    await issue_secrets(admin, vault.layout, tenant, "ride-1", {"TOKEN_0": (CANARY, True)})
    proxy.add(Rule("sealed", match="/execution-contexts/", times=3))
    proxy.add(Rule("rate-limit", match="-transit/decrypt/", times=1, retry_after="3"))
    proxy.add(Rule("reset", match="/execution-claims/", times=1))  # a claim write, half answered
    result, events = run_via(proxy, vault, tenant, "ride-1", tmp_path, shm)
    assert result.returncode == 0, result.stderr
    reads = [s for s in proxy.requests("/execution-contexts/") if s.method == "GET"]
    assert [s.action for s in reads[:4]] == ["sealed"] * 3 + ["pass"]
    decrypts = proxy.requests("-transit/decrypt/")
    assert [s.action for s in decrypts] == ["rate-limit", "pass"]
    assert gaps(decrypts)[0] >= 3.0  # Retry-After honoured, never shortened
    assert len(proxy.requests("/auth/jwt/login")) == 1
    assert await all_gone(admin, vault, tenant, login_accessor(events))
    assert CANARY not in result.stderr


async def test_run_gives_up_on_a_trickling_answer_at_its_deadline(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    """One byte every 0.3 s: each request times out (2 s), the execution's deadline (5 s)
    ends the retries, the login is revoked and the context kept for another try."""
    await issue_secrets(admin, vault.layout, tenant, "slow-1", {"TOKEN_0": (CANARY, True)})
    proxy.add(Rule("trickle", match="/execution-contexts/", seconds=0.3))
    started = time.monotonic()
    result, events = run_via(proxy, vault, tenant, "slow-1", tmp_path, shm,
                             "--vault-timeout", "2s", "--deadline", "5s")  # fmt: skip
    assert time.monotonic() - started < 5 + 5, result.stderr
    assert result.returncode == 3, result.stderr
    assert "did not answer in time" in result.stderr.splitlines()[-2]
    assert not await accessor_alive(admin, login_accessor(events))
    assert await context_paths(admin, vault, tenant) == ["slow-1"]
    assert await claims(admin, tenant) == []


async def test_a_lost_login_answer_is_reported_not_retried(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    """Vault minted a token but the answer never arrived: logging in again blindly would leave
    orphans behind in a loop. One login request, a clear error, exit 3."""
    await issue_secrets(admin, vault.layout, tenant, "lost-1", {"TOKEN_0": (CANARY, True)})
    proxy.add(Rule("drop", match="/auth/jwt/login"))
    result, _ = run_via(proxy, vault, tenant, "lost-1", tmp_path, shm)
    assert result.returncode == 3, result.stderr
    assert len(proxy.requests("/auth/jwt/login")) == 1
    assert "may have" in result.stderr and "login" in result.stderr
    assert proxy.requests("/execution-contexts/") == []


async def test_a_token_is_minted_on_a_connection_just_used_or_a_new_one_and_never_twice(
    proxied_admin: VaultClient, proxy: FaultProxy
) -> None:
    """A child token's creation may ride a keep-alive connection used less than a second ago
    (no server closes it for idleness), saving a TCP connect per execution; an older one is
    not used. Either way a lost answer is reported, never re-sent as if the connection had
    been stale."""
    client = proxied_admin
    body = {"policies": ["default"], "ttl": "1m"}
    await client.get("auth/token/lookup-self")
    await create_child_token(client, 60, "t", {}, ["default"])
    assert proxy.connections == 1  # the lookup's connection, reused
    await asyncio.sleep(transport.RECENT + 0.2)
    await create_child_token(client, 60, "t", {}, ["default"])
    assert proxy.connections == 2  # too old for a mint: a new one
    await client.get("auth/token/lookup-self")  # recent again
    proxy.add(Rule("drop", match="/auth/token/create", times=1))
    with pytest.raises(OutcomeUnknown):
        await client.post("auth/token/create", body, safety=Safety.MINTS_TOKEN)
    assert len(proxy.requests("/auth/token/create")) == 3  # sent once, not re-sent


async def test_run_finishes_its_cleanup_after_an_outage(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    """Vault is sealed for 8 s from the moment the command ends: the first cleanup try (5 s)
    fails, the retries until --deadline finish it; nothing is left and run exits 0."""
    await issue_secrets(admin, vault.layout, tenant, "out-1", {"TOKEN_0": (CANARY, True)})
    marker = tmp_path / "ended"
    child = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')"

    def seal_when_done() -> None:
        while not marker.exists():
            time.sleep(0.01)
        proxy.add(Rule("sealed", until=time.monotonic() + 8))

    sealer = threading.Thread(target=seal_when_done, daemon=True)
    sealer.start()  # a thread: run_via blocks this event loop
    result, events = run_via(proxy, vault, tenant, "out-1", tmp_path, shm, "--deadline", "30s",
                             child=child)  # fmt: skip
    sealer.join(5)
    assert result.returncode == 0, result.stderr
    messages = [e["msg"] for e in events]
    assert "cleanup finished" in messages
    assert await all_gone(admin, vault, tenant, login_accessor(events))


# --- the sidecar's request rate under faults ----------------------------------------------------


async def test_renewal_against_a_sealed_vault_backs_off(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    await runner_role_like(admin, "sc-renew", token_ttl=3, token_max_ttl=120)
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, "--role", "sc-renew",
                                  "--vault-check-interval", "30s", vault_addr=proxy.url)  # fmt: skip
    try:
        await wait_until(lambda: proxy.requests("renew-self"), 5, "a first renewal")
        since = time.monotonic()
        proxy.add(Rule("sealed", until=since + 8))
        await asyncio.sleep(8)
        sealed = [s for s in proxy.requests(since=since) if s.action == "sealed"]
        # Old behaviour: ~10 a second. Now a renewal is one request at least 1 s after the
        # last; once the 3 s token cannot be renewed in time, logins back off like any call.
        assert len(sealed) <= 12, [(s.path, round(s.at - since, 2)) for s in sealed]
        renewals = [s for s in sealed if "renew-self" in s.path]
        assert all(gap >= 1.0 for gap in gaps(renewals)), gaps(renewals)
        # Recovered: a fresh login, as the old one lapsed, within the backoff's cap (5 s).
        await until_readyz(sidecar, 200, 5 + 2)
    finally:
        assert sidecar.stop() == 0, sidecar.log.read_text()[-2000:]


async def test_retries_from_many_callers_stay_under_the_process_cap(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    """20 prepares against a Vault sealed for 4 s: retries are capped at 10 a second for the
    whole process (plus a burst of 10), and every prepare succeeds once Vault is back."""
    ids = [f"cap-{n}" for n in range(20)]
    for execution_id in ids:
        await issue_secrets(admin, vault.layout, tenant, execution_id, {"TOKEN_0": (CANARY, True)})
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, vault_addr=proxy.url)
    try:
        since = time.monotonic()
        proxy.add(Rule("sealed", match="/execution-contexts/", until=since + 4))
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(len(ids)) as callers:  # all at once (to_thread's pool is 6)
            prepared = await asyncio.gather(
                *(loop.run_in_executor(callers, sidecar.client.prepare, i) for i in ids)
            )
        assert sorted(p.id for p in prepared) == sorted(ids)
        sealed = [s for s in proxy.requests(since=since) if s.action == "sealed"]
        retries = len(sealed) - len(ids)
        assert retries <= 10 * 4 + 10 + 2, retries  # the cap, its burst, timing slack
        assert time.monotonic() - since < 4 + 5
    finally:
        assert sidecar.stop() == 0, sidecar.log.read_text()[-2000:]


# --- a preparation that fails between its claim and the claim's metadata -------------------------


@contextlib.asynccontextmanager
async def proxied_sidecar(
    vault: Vault, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy, *flags: str
) -> AsyncIterator[Sidecar]:
    """A sidecar talking to Vault through ``proxy``: it must stop cleanly, and (when the body
    passed) its log must hold no canary."""
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, *flags, vault_addr=proxy.url)
    try:
        yield sidecar
    finally:
        assert sidecar.stop() == 0, sidecar.log.read_text()[-2000:]
    assert CANARY not in sidecar.log.read_text()


async def claim_record(admin: VaultClient, tenant: str, execution_id: str) -> dict[str, Any]:
    """The claim's own data (pod, mode, lease accessor): what is left if its metadata is not."""
    return (await KV(admin, "stigmer").read(f"execution-claims/{tenant}/{execution_id}")).data


async def _given_back(sidecar: Sidecar, execution_id: str) -> dict[str, object]:
    """The sidecar's "failed preparation given back" line for ``execution_id``."""
    deadline = time.monotonic() + 10
    while True:
        for event in sidecar.events():
            if (event["msg"], event.get("execution_id")) == (
                "failed preparation given back",
                execution_id,
            ):
                return event
        assert time.monotonic() < deadline, "the failed preparation was never given back"
        await asyncio.sleep(0.05)


async def test_a_claim_left_half_written_by_the_sidecar_is_given_back(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    """Vault takes the claim, then refuses its metadata and its destroy (a leader lost between
    the two writes). The preparation fails with a 503; what it left is given back once Vault
    recovers, so the next prepare from this sidecar succeeds instead of a 409 for ever."""
    await issue_secrets(admin, vault.layout, tenant, "half-1", {"TOKEN_0": (CANARY, True)})
    async with proxied_sidecar(vault, tenant, tmp_path, shm, proxy, "--deadline", "2s") as sidecar:
        window = time.monotonic() + 8
        proxy.add(Rule("sealed", match="/metadata/execution-claims/", until=window))
        with pytest.raises(BrokerClientError) as failed:
            await asyncio.to_thread(sidecar.client.prepare, "half-1")
        assert failed.value.status == 503, failed.value
        assert time.monotonic() < window - 4  # the caller is told at once, not after a cleanup
        # The files, written while the metadata was being retried, went with the failure.
        assert list(sidecar.out.iterdir()) == []
        login = next(e["accessor"] for e in sidecar.events() if e["msg"] == "logged in")
        # Half written: the login's claim stands, with no holder in its metadata.
        assert (await claim_record(admin, tenant, "half-1"))["lease_accessor"] == login
        assert "lease_accessor" not in await claim_metadata(admin, tenant, "half-1")
        await asyncio.sleep(max(0.0, window - time.monotonic()))
        prepared = await asyncio.to_thread(sidecar.client.prepare, "half-1")
        assert CANARY in prepared.env_file.read_text()
        second = (await claim_metadata(admin, tenant, "half-1"))["lease_accessor"]
        given_back = await _given_back(sidecar, "half-1")
        first = given_back["lease_accessor"]
        assert given_back["claim_accessor"] == login and first not in ("", second, login)
        await wait_until_async(lambda: _dead(admin, first), 10, "the first lease revoked")
        assert await accessor_alive(admin, login)  # the login goes on: it was never the lease
        await asyncio.to_thread(sidecar.client.end, "half-1")
        assert await claims(admin, tenant) == []


async def test_run_gives_back_a_half_written_claim_before_it_exits(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    await issue_secrets(admin, vault.layout, tenant, "half-run", {"TOKEN_0": (CANARY, True)})
    """The same in `run`: it fails at its deadline (4 s) and retries the give-back for up to
    another --deadline before it exits; Vault is back after 5 s."""
    proxy.add(Rule("sealed", match="/metadata/execution-claims/", until=time.monotonic() + 5))
    result, events = run_via(proxy, vault, tenant, "half-run", tmp_path, shm, "--deadline", "4s")
    assert result.returncode == 3, result.stderr
    assert "failed preparation given back" in [e["msg"] for e in events], result.stderr
    assert await claims(admin, tenant) == []
    assert not await accessor_alive(admin, login_accessor(events))
    assert await context_paths(admin, vault, tenant) == ["half-run"]  # kept for another try
    assert CANARY not in result.stderr


# --- a give-back still under way when the same execution is prepared again ---------------------


async def _fail_leaving_a_claim(
    sidecar: Sidecar, admin: VaultClient, tenant: str, proxy: FaultProxy, execution_id: str
) -> str:
    """A PUT that fails after its claim (Transit answers 400), whose first give-back cannot
    destroy the claim (500): the claim stands, its release retried in the background.
    Returns the claim's metadata path, as the proxy sees it."""
    path = f"/metadata/execution-claims/{tenant}/{execution_id}"
    proxy.add(Rule("invalid", match="/decrypt/", times=1))
    refused = proxy.add(Rule("error", match=path, method="DELETE", times=1))
    with pytest.raises(BrokerClientError):
        await asyncio.to_thread(sidecar.client.prepare, execution_id)
    assert refused.times == 0, "the give-back never tried to destroy the claim"
    assert execution_id in await claims(admin, tenant)
    return path


async def _prepared_once(
    sidecar: Sidecar, admin: VaultClient, tenant: str, execution_id: str
) -> None:
    """The second PUT gets the execution, and its claim (naming its live lease) outlives the
    earlier give-back, which revokes the first lease; ending leaves nothing."""
    prepared = await asyncio.to_thread(sidecar.client.prepare, execution_id)
    assert CANARY in prepared.env_file.read_text()
    first = str((await _given_back(sidecar, execution_id))["lease_accessor"])
    await wait_until_async(lambda: _dead(admin, first), 10, "the first lease revoked")
    holder = (await claim_metadata(admin, tenant, execution_id))["lease_accessor"]
    assert holder != first and await accessor_alive(admin, holder)
    await asyncio.to_thread(sidecar.client.end, execution_id)
    assert await claims(admin, tenant) == []


async def test_a_claim_released_while_a_new_prepare_is_refused_is_written_again(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    """The re-PUT's claim write is refused (the old claim stands); while it asks who holds the
    claim (that answer held back 2 s), the give-back's retry is due. The re-PUT gets the
    execution: not a 403 because the claim it was refused had gone by the time it looked."""
    await issue_secrets(admin, vault.layout, tenant, "race-1", {"TOKEN_0": (CANARY, True)})
    async with proxied_sidecar(vault, tenant, tmp_path, shm, proxy) as sidecar:
        path = await _fail_leaving_a_claim(sidecar, admin, tenant, proxy, "race-1")
        proxy.add(Rule("delay", match=path, method="GET", times=1, seconds=2.0))
        await _prepared_once(sidecar, admin, tenant, "race-1")


async def test_a_late_release_never_destroys_the_claim_of_a_new_prepare(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    """The give-back's retry has found the claim its own and sent the destroy (held back 2 s)
    when the same execution is prepared again. The re-PUT waits for that release rather than
    taking the claim over under it, so the old release cannot destroy the new claim."""
    await issue_secrets(admin, vault.layout, tenant, "race-2", {"TOKEN_0": (CANARY, True)})
    async with proxied_sidecar(vault, tenant, tmp_path, shm, proxy) as sidecar:
        path = await _fail_leaving_a_claim(sidecar, admin, tenant, proxy, "race-2")
        late = proxy.add(Rule("delay", match=path, method="DELETE", times=1, seconds=2.0))
        await wait_until(lambda: late.times == 0, 10, "the give-back's retry sent its destroy")
        await _prepared_once(sidecar, admin, tenant, "race-2")


async def test_a_give_back_of_one_execution_never_ends_the_takeover_of_another(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    """One login writes every claim. Two preparations fail: x's claim is released soon, y's
    (left half written: no holder in its metadata, so it names the login) stays while Vault
    refuses its destroy. Once x is given back, a new PUT of y still takes y's claim over:
    what this process gave up is kept per execution."""
    for execution_id in ("gx", "gy"):
        await issue_secrets(admin, vault.layout, tenant, execution_id, {"TOKEN_0": (CANARY, True)})
    async with proxied_sidecar(vault, tenant, tmp_path, shm, proxy) as sidecar:
        await _fail_leaving_a_claim(sidecar, admin, tenant, proxy, "gx")
        y = f"/metadata/execution-claims/{tenant}/gy"
        proxy.add(Rule("invalid", match=y, method="POST", times=1))
        proxy.add(Rule("error", match=y, method="DELETE", until=time.monotonic() + 5))
        with pytest.raises(BrokerClientError):
            await asyncio.to_thread(sidecar.client.prepare, "gy")
        assert "lease_accessor" not in await claim_metadata(admin, tenant, "gy")
        await _given_back(sidecar, "gx")
        assert "gy" in await claims(admin, tenant)  # still given back
        await _prepared_once(sidecar, admin, tenant, "gy")


async def _dead(admin: VaultClient, accessor: str) -> bool:
    return not await accessor_alive(admin, accessor)


async def wait_until_async(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)
