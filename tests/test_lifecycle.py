"""Nothing outlives its execution: expiry, the reaper, one claim for every mode, leftovers,
failed cleanup retried, bounded logins — with real processes killed for real."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.control.executions import RuntimeValue
from broker.errors import (
    BrokerClientError,
    IdentityError,
    NotFound,
    PermissionDenied,
    VaultError,
)
from broker.vault import KV, Transit, VaultClient, jwt_login
from tests.conftest import (
    Vault,
    accessor_alive,
    claim_metadata,
    claims,
    cli,
    context_paths,
    runner_role_like,
    spawn,
    start_sidecar,
    wait_until,
)
from tests.factories import issue_secrets
from tests.faultproxy import FaultProxy, Rule

CANARY = "cnry-lifecycle-0a1b-do-not-leak"
CHILD_SLEEPS = (  # proves it got the secret without writing it anywhere
    "import hashlib, os, pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text("
    "hashlib.sha256(os.environ['TOKEN_0'].encode()).hexdigest()); time.sleep(60)"
)


async def issue(
    admin: VaultClient, vault: Vault, tenant: str, execution_id: str, ttl: float = 300
) -> None:
    await issue_secrets(admin, vault.layout, tenant, execution_id, {"TOKEN_0": (CANARY, True)},
                        timedelta(seconds=ttl), runtime={"MODE": RuntimeValue("fast")})  # fmt: skip


def reap(vault: Vault, tmp_path: Path, *tenants: str, grace: str = "0s") -> dict[str, Any]:
    """One `reaper --once` pass with the reaper's own identity (a stigmer-system JWT)."""
    jwt = vault.jwt_for("stigmer-system", tmp_path, service_account="stigmer-reaper")
    environ = vault.environ()
    environ.pop("VAULT_TOKEN")
    scope = [a for t in tenants for a in ("--tenant", t)] or ["--all-tenants"]
    result = cli(vault, "reaper", *scope, "--once", "--grace", grace, "--jwt-file", str(jwt),
                 "-o", "json", env=environ)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def start_run(vault: Vault, tenant: str, execution_id: str, out: Path, jwt: Path, marker: Path,
              *extra: str) -> subprocess.Popen[str]:  # fmt: skip
    return spawn(
        [sys.executable, "-m", "broker.cli", "run", "--tenant", tenant, "--execution", execution_id,
         "--out", str(out), "--jwt-file", str(jwt), *extra, "--", sys.executable, "-c",
         CHILD_SLEEPS, str(marker)],
        env=vault.environ(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL the broker and the command it started (the whole session)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)


# --- a context really expires ----------------------------------------------------------------


async def test_revoking_a_lease_that_is_gone_already_is_not_an_error(
    admin: VaultClient, proxied_admin: VaultClient, proxy: FaultProxy
) -> None:
    """The reaper looks a lease up, then revokes it. A lease gone meanwhile is answered 200
    "No token found" — or 400 "invalid request" when its TTL ends during the revocation (seen
    once in this suite): both are the outcome the reaper wanted. A 400 for a lease that still
    exists is not."""
    from broker.vault import lookup_accessor, revoke_accessor

    async def token() -> tuple[str, str]:
        auth = await admin.post("auth/token/create", {"ttl": "1h", "policies": ["default"]})
        return auth["auth"]["client_token"], auth["auth"]["accessor"]

    _, live = await token()
    assert await revoke_accessor(admin, live) is True
    assert await lookup_accessor(admin, live) is None
    gone_token, gone = await token()
    await admin.with_token(gone_token).post("auth/token/revoke-self")
    assert await revoke_accessor(admin, gone) is False  # 200 with the warning
    assert await revoke_accessor(admin, "no-such-accessor") is False
    proxy.add(Rule("invalid", match="revoke-accessor"))
    assert await revoke_accessor(proxied_admin, gone) is False  # 400, and the lookup finds none
    _, alive = await token()
    with pytest.raises(VaultError):
        await revoke_accessor(proxied_admin, alive)  # 400, but the lease is still there
    assert await lookup_accessor(admin, alive) is not None
    proxy.clear()
    assert await revoke_accessor(proxied_admin, alive) is True  # and so it ends
    assert await lookup_accessor(admin, alive) is None


async def test_a_never_run_context_is_destroyed_by_one_reaper_pass(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    await issue(admin, vault, tenant, "never-run", ttl=3)
    metadata = await KV(admin, "stigmer").read_metadata(f"execution-contexts/{tenant}/never-run")
    assert metadata.delete_version_after == "4s" and metadata.custom["tenant"] == tenant
    await asyncio.sleep(4.2)
    report = reap(vault, tmp_path, tenant)
    assert report["contexts_destroyed"] == 1 and report["errors"] == []
    with pytest.raises(NotFound):
        await admin.get(f"stigmer/data/execution-contexts/{tenant}/never-run")
    with pytest.raises(NotFound):
        await admin.get(f"stigmer/metadata/execution-contexts/{tenant}/never-run")


async def test_the_reaper_reads_no_value(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    await issue(admin, vault, tenant, "secret-1")
    jwt = vault.jwt_for("stigmer-system", tmp_path, service_account="stigmer-reaper")
    login = await jwt_login(admin.with_token(""), "jwt", "stigmer-reaper", jwt.read_text())
    assert "stigmer-reaper" in login.policies and "stigmer-runner" not in login.policies
    reaper = admin.with_token(login.token)
    for path in (f"stigmer/data/execution-contexts/{tenant}/secret-1",
                 f"stigmer/data/environments/{tenant}/env-secret-1",
                 f"stigmer/data/execution-claims/{tenant}/secret-1"):  # fmt: skip
        with pytest.raises(PermissionDenied):
            await reaper.get(path)
    with pytest.raises(PermissionDenied):
        await Transit(reaper, "stigmer-transit").decrypt(
            vault.layout.transit_key(tenant), ["vault:v1:x"]
        )
    metadata = await KV(reaper, "stigmer").read_metadata(f"execution-contexts/{tenant}/secret-1")
    assert metadata.custom["execution_id"] == "secret-1"  # metadata is all it reads
    other = vault.jwt_for(tenant, tmp_path, service_account="stigmer-reaper")
    with pytest.raises(IdentityError, match="a claim is not allowed"):  # another namespace
        await jwt_login(admin.with_token(""), "jwt", "stigmer-reaper", other.read_text())


# --- killed holders, leftovers, one reaper pass ---------------------------------------------------


async def test_killed_run_and_sidecar_are_ended_by_the_reaper(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    await issue(admin, vault, tenant, "run-killed", ttl=7)
    for n in range(5):
        await issue(admin, vault, tenant, f"sc-killed-{n}", ttl=7)
    marker = tmp_path / "run-got"
    process = start_run(
        vault, tenant, "run-killed", shm / "run-out", vault.jwt_for(tenant, tmp_path), marker
    )
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, name="k")
    prepared = [sidecar.client.prepare(f"sc-killed-{n}") for n in range(5)]
    await wait_until(marker.exists, 30, "the run's command")
    accessors = [(await claim_metadata(admin, tenant, e))["lease_accessor"]
                 for e in ["run-killed", *(f"sc-killed-{n}" for n in range(5))]]  # fmt: skip
    login = next(e["accessor"] for e in sidecar.events() if e["msg"] == "logged in")
    assert login not in accessors  # the sidecar's login wrote its claims, each lease holds one
    kill_group(process)
    sidecar.process.send_signal(signal.SIGKILL)
    sidecar.process.wait(30)
    assert (shm / "run-out" / "run-killed").exists() and all(p.directory.exists() for p in prepared)
    assert all([await accessor_alive(admin, a) for a in accessors])  # nobody revoked them
    await asyncio.sleep(7.5)  # past every expiry
    report = reap(vault, tmp_path, tenant)
    assert report["claims_released"] == 6 and report["leases_revoked"] >= 1
    assert not [a for a in accessors if await accessor_alive(admin, a)]
    assert await accessor_alive(admin, login)  # the reaper revokes leases, never the login
    await admin.post("auth/token/revoke-accessor", {"accessor": login})
    assert await context_paths(admin, vault, tenant) == [] and await claims(admin, tenant) == []
    fresh = await start_sidecar(vault, tenant, tmp_path, shm, name="k")  # same output root
    assert list(fresh.out.iterdir()) == []
    swept = next(e for e in fresh.events() if e["msg"] == "swept leftover execution directories")
    assert sorted(swept["directories"]) == sorted(f"sc-killed-{n}" for n in range(5))
    assert fresh.stop() == 0


async def test_a_killed_run_can_be_run_again(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    """Its leftover directory is swept; its own dead claim is taken over (same pod)."""
    await runner_role_like(admin, "run-short", token_ttl=2, token_max_ttl=30)
    await issue(admin, vault, tenant, "again-1", ttl=20)
    jwt, marker = vault.jwt_for(tenant, tmp_path), tmp_path / "got"
    first = start_run(vault, tenant, "again-1", shm, jwt, marker, "--role", "run-short",
                      "--login-max-ttl", "30s")  # fmt: skip
    await wait_until(marker.exists, 30)
    kill_group(first)
    assert (shm / "again-1").exists()
    await asyncio.sleep(3)  # its login (the lease) expires unrenewed: provably dead
    again = cli(vault, "run", "--tenant", tenant, "--execution", "again-1", "--out", str(shm),
                "--jwt-file", str(jwt), "--role", "run-short", "--login-max-ttl", "30s", "--",
                sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ['TOKEN_0'] else 3)")  # fmt: skip
    assert again.returncode == 0, again.stderr
    messages = [
        json.loads(line)["msg"] for line in again.stderr.splitlines() if line.startswith("{")
    ]
    assert "swept leftover execution directories" in messages
    assert "taking over this pod's own dead claim" in messages
    assert await context_paths(admin, vault, tenant) == [] and await claims(admin, tenant) == []


# --- one claim for every mode ------------------------------------------------------------------


async def test_two_runs_and_a_sidecar_race_for_one_execution(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    await issue(admin, vault, tenant, "race-1")
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, name="race")
    jwt = vault.jwt_for(tenant, tmp_path)
    markers = [tmp_path / f"run-{n}" for n in range(2)]
    runs = [start_run(vault, tenant, "race-1", shm / f"out-{n}", jwt, markers[n]) for n in range(2)]
    outcome = "sidecar"
    try:
        sidecar.client.prepare("race-1")
    except BrokerClientError as error:
        assert error.status == 409 and "claimed by pod" in str(error)
        outcome = "refused"
    await asyncio.sleep(3)
    receivers = [m for m in markers if m.exists()] + ([1] if outcome == "sidecar" else [])
    assert len(receivers) == 1  # exactly one holder received the secrets
    for process in runs:
        if process.poll() is not None:  # a loser: its own exit code and one line, nothing decrypted
            _, stderr = process.communicate()
            assert process.returncode == 9
            error = [
                line for line in stderr.splitlines() if line.startswith("stigmer-broker: error")
            ]
            assert (
                len(error) == 1
                and "claimed by pod" in error[0]
                and "its lease is alive" in error[0]
            )
            assert not any('"msg": "execution prepared"' in line for line in stderr.splitlines())
        else:
            kill_group(process)
    sidecar.stop()


async def test_a_dead_claim_is_named_and_only_its_own_pod_takes_it_over(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    await runner_role_like(admin, "sc-short", token_ttl=6, token_max_ttl=60)
    await issue(admin, vault, tenant, "dead-1", ttl=40)
    first = await start_sidecar(vault, tenant, tmp_path, shm, "--role", "sc-short",
                                "--login-max-ttl", "60s", name="owner")  # fmt: skip
    first.client.prepare("dead-1")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(30)
    other = await start_sidecar(vault, tenant, tmp_path, shm, name="other")
    with pytest.raises(
        BrokerClientError, match=r"claimed by pod pod-owner \(sidecar\) since .*its lease is alive"
    ):
        other.client.prepare("dead-1")
    await asyncio.sleep(7)  # the killed sidecar's login expires unrenewed, and its lease with it
    with pytest.raises(BrokerClientError, match="its lease is dead"):
        other.client.prepare("dead-1")  # another pod waits for the reaper
    assert other.stop() == 0
    again = await start_sidecar(vault, tenant, tmp_path, shm, name="owner")  # the same pod
    assert again.client.prepare("dead-1").state == "active"
    assert any(e["msg"] == "taking over this pod's own dead claim" for e in again.events())
    assert again.stop() == 0
    assert await context_paths(admin, vault, tenant) == []


# --- failed cleanup is retried; logins are bounded ------------------------------------------------


async def test_a_vault_outage_during_delete_is_finished_later(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path, proxy: FaultProxy
) -> None:
    await issue(admin, vault, tenant, "outage-1")
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, name="o", vault_addr=proxy.url)
    prepared = sidecar.client.prepare("outage-1")
    accessor = (await claim_metadata(admin, tenant, "outage-1"))["lease_accessor"]
    outage = proxy.add(Rule("sealed"))
    ended = sidecar.client.end("outage-1")["ended"]
    assert not prepared.directory.exists()  # the files go at once
    assert set(ended["pending"]) == {"context", "claim", "lease"}
    assert set(sidecar.client.get("outage-1")["ended"]["pending"]) == {"context", "claim", "lease"}
    proxy.rules.remove(outage)  # Vault is back; the runner sends nothing more

    async def all_gone() -> bool:
        return (await context_paths(admin, vault, tenant) == [] and await claims(admin, tenant) == []
                and not await accessor_alive(admin, accessor))  # fmt: skip

    await wait_until(all_gone, 30, "the retried cleanup")
    assert sidecar.client.get("outage-1")["ended"]["pending"] == []
    assert sidecar.stop() == 0
    finished = next(e for e in sidecar.events() if e["msg"] == "cleanup finished")
    assert finished["execution_id"] == "outage-1"


async def test_logins_are_bounded_and_a_retired_login_goes_with_its_last_lease(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    await runner_role_like(admin, "sc-max20", token_ttl=3, token_max_ttl=20)
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, "--role", "sc-max20",
                                  "--login-max-ttl", "20s", name="l")  # fmt: skip
    await issue(admin, vault, tenant, "first", ttl=15)
    sidecar.client.prepare("first")
    await issue(admin, vault, tenant, "too-long", ttl=30)
    with pytest.raises(BrokerClientError, match="longer than a lease can"):
        sidecar.client.prepare("too-long")
    await asyncio.sleep(9)  # now the first login (max 20 s) cannot cover another 10 s
    await issue(admin, vault, tenant, "second", ttl=10)
    sidecar.client.prepare("second")  # the first login cannot cover it: a second login
    logins = [e["accessor"] for e in sidecar.events() if e["msg"] == "logged in"]
    assert len(logins) == 2
    assert await accessor_alive(admin, logins[0])  # retired, still parenting "first"'s lease
    await wait_until(lambda: sidecar.client.get("first")["state"] == "ended", 20)

    async def first_login_gone() -> bool:
        return not await accessor_alive(admin, logins[0])

    await wait_until(first_login_gone, 5, "the retired login's revocation")
    assert await accessor_alive(admin, logins[1])
    assert sidecar.stop() == 0


# --- operators -------------------------------------------------------------------------------


async def test_execution_list_names_the_holder(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    await issue(admin, vault, tenant, "listed-1")
    await issue(admin, vault, tenant, "listed-2")
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, name="lst")
    sidecar.client.prepare("listed-1")
    control_plane = await admin.post("auth/token/create", {"policies": ["stigmer-control-plane"]})
    environ = vault.environ(VAULT_TOKEN=control_plane["auth"]["client_token"])
    listed = cli(vault, "execution", "list", "--tenant", tenant, "-o", "json", env=environ)
    assert listed.returncode == 0, listed.stderr
    executions = {e["id"]: e for e in json.loads(listed.stdout)["executions"]}
    assert executions["listed-1"]["claimed_by"]["pod"] == "pod-lst"
    assert executions["listed-2"]["claimed_by"] is None and executions["listed-2"]["live"]
    assert CANARY not in listed.stdout
    assert sidecar.stop() == 0


async def test_the_reaper_as_a_service(vault: Vault, admin: VaultClient, tenant: str) -> None:
    from broker.dev.server import free_port

    token = (await admin.post("auth/token/create", {"policies": ["stigmer-reaper"]}))["auth"]
    port = free_port()
    process = spawn(
        [sys.executable, "-m", "broker.cli", "reaper", "--tenant", tenant, "--interval", "1s",
         "--grace", "0s", "--auth", "token", "--metrics-addr", f"127.0.0.1:{port}"],
        env=vault.environ(VAULT_TOKEN=token["client_token"]), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        await issue(admin, vault, tenant, "looped", ttl=2)

        async def destroyed() -> bool:
            return await context_paths(admin, vault, tenant) == []

        await wait_until(destroyed, 15, "a pass of the looping reaper")
        import urllib.request

        def counted() -> bool:  # the pass's report lands in the metrics when the pass ends
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as answer:
                metrics = answer.read().decode()
            return "stigmer_reaper_contexts_destroyed_total 1.0" in metrics

        await wait_until(counted, 10, "the reaper's metrics")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "reaper stopped" in stderr
