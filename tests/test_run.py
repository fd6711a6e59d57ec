"""One-shot runner mode against a real OpenBao: create → run → end, signals, refusals."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.config import Layout
from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer, RuntimeValue
from broker.errors import (
    ContextExpired,
    ContextNotFound,
    DecryptError,
    IdentityError,
    PermissionDenied,
    ValidationError,
)
from broker.execution import context as contexts
from broker.execution.credentials import Credentials
from broker.limits import CONTEXTS
from broker.render.outdir import OutputRoot
from broker.runner import RunSettings, run_command
from broker.vault import KV, Transit, VaultClient
from tests.conftest import (
    Vault,
    accessor_alive,
    claims,
    cli,
    context_paths,
    run_as_runner,
    runner_role_like,
    start_run,
    wait_until,
)
from tests.factories import agent, environment, instance
from tests.faultproxy import FaultProxy, Rule

CHILD = r"""
import hashlib, json, os, sys
expected = json.loads(sys.argv[1])
got = {k: hashlib.sha256(os.environ.get(k, "").encode()).hexdigest() for k in expected}
for key in ("STIGMER_EXECUTION_ID", "STIGMER_MCP_CONFIG", "STIGMER_ENV_FILE"):
    assert os.environ.get(key), key
assert not any(k.startswith(("VAULT_", "BAO_")) for k in os.environ), "vault credentials leaked"
assert json.load(open(os.environ["STIGMER_MCP_CONFIG"]))["mcpServers"]
sys.exit(0 if got == expected else 3)
"""


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def issue(
    admin: VaultClient,
    layout: Layout,
    tenant: str,
    execution_id: str,
    secret: str = "ghp_run_canary",
    ttl: int = 300,
) -> None:
    await EnvironmentStore(admin, layout).apply(
        tenant, environment("prod", GITHUB_TOKEN=(secret, True), REGION=("eu", False))
    )
    await ExecutionIssuer(admin, layout).create(
        tenant,
        agent(
            {"GITHUB_TOKEN": {"is_secret": True}},
            [
                {
                    "name": "github",
                    "stdio": {"command": "npx", "env_placeholders": {"GH": "${GITHUB_TOKEN}"}},
                },
                {
                    "name": "api",
                    "http": {"url": "https://x.example", "headers": {"A": "Bearer ${API_TOKEN}"}},
                },
            ],
        ),
        instance("prod"),
        runtime_env={"API_TOKEN": RuntimeValue("rt_api_canary", True)},
        ttl=timedelta(seconds=ttl),
        execution_id=execution_id,
    )


async def run(
    vault: Vault,
    tenant: str,
    execution_id: str,
    out: Path,
    command: list[str],
    jwt: Path | None = None,
    **options: Any,
) -> int:
    """`run` in this process (the library API the CLI wraps)."""
    credential_fields = {k: options.pop(k) for k in ("method", "role") if k in options}
    credentials = Credentials(jwt_file=jwt or Path("/nonexistent"), **credential_fields)
    settings = RunSettings(tenant, execution_id, OutputRoot(out), credentials, **options)
    client = vault.client(with_token=credentials.method == "token")
    try:
        return await run_command(client, vault.layout, settings, command)
    finally:
        await client.aclose()


def events(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.getMessage() == message]  # type: ignore[attr-defined]


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="stigmer_broker")
    return caplog


async def test_round_trip_library(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path, logged: Any
) -> None:
    await issue(admin, vault.layout, tenant, "round-1")
    expected = {
        "GITHUB_TOKEN": digest("ghp_run_canary"),
        "API_TOKEN": digest("rt_api_canary"),
        "REGION": digest("eu"),
    }
    command = [sys.executable, "-c", CHILD, json.dumps(expected)]
    status = await run(vault, tenant, "round-1", shm, command, vault.jwt_for(tenant, tmp_path))
    assert status == 0
    accessor = events(logged, "logged in")[0]["accessor"]
    assert not await accessor_alive(admin, accessor)
    assert await context_paths(admin, vault, tenant) == []
    assert list(shm.iterdir()) == []


async def test_exit_code_is_the_commands_and_cleanup_still_happens(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    await issue(admin, vault.layout, tenant, "code-7")
    command = [sys.executable, "-c", "import sys; sys.exit(7)"]
    assert await run(vault, tenant, "code-7", shm, command, vault.jwt_for(tenant, tmp_path)) == 7
    assert await context_paths(admin, vault, tenant) == []
    assert list(shm.iterdir()) == []


async def test_round_trip_cli_and_accessor_revoked(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    await issue(admin, vault.layout, tenant, "cli-run-1")
    jwt = vault.jwt_for(tenant, tmp_path)
    expected = {"GITHUB_TOKEN": digest("ghp_run_canary")}
    result = cli(
        vault, "run", "--tenant", tenant, "--execution", "cli-run-1", "--out", str(shm),
        "--jwt-file", str(jwt), "--", sys.executable, "-c", CHILD, json.dumps(expected),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    logged = [json.loads(line) for line in result.stderr.splitlines()]
    accessor = next(e["accessor"] for e in logged if e["msg"] == "logged in")
    ended = next(e for e in logged if e["msg"] == "execution ended")
    assert ended["context"] == "destroyed" and ended["lease"] == "revoked"
    assert ended["claim"] == "released" and len(ended["files_removed"]) == 4
    assert not await accessor_alive(admin, accessor)
    assert await context_paths(admin, vault, tenant) == []


async def test_sigterm_is_forwarded_and_everything_cleaned(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    await issue(admin, vault.layout, tenant, "sig-1")
    marker = tmp_path / "marker"
    child = (
        "import signal, sys, time, pathlib\n"
        f"p = pathlib.Path({str(marker)!r})\n"
        "signal.signal(signal.SIGTERM, lambda *a: (p.write_text('term'), sys.exit(42)))\n"
        "p.write_text('ready')\n"
        "time.sleep(60)\n"
    )
    process = start_run(vault, tenant, "sig-1", shm, vault.jwt_for(tenant, tmp_path), child)
    await wait_until(lambda: marker.exists() and marker.read_text() == "ready", 20)
    assert (shm / "sig-1" / "env").exists()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 42, stderr
    assert marker.read_text() == "term"
    assert not (shm / "sig-1").exists()
    assert await context_paths(admin, vault, tenant) == []


async def test_disk_backed_out_refused(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    await issue(admin, vault.layout, tenant, "disk-1")
    out = tmp_path / "out"
    result = cli(
        vault, "run", "--tenant", tenant, "--execution", "disk-1", "--out", str(out),
        "--jwt-file", str(vault.jwt_for(tenant, tmp_path)), "--", "true",
    )  # fmt: skip
    assert result.returncode == 6
    assert "disk-backed" in result.stderr and "--allow-disk" in result.stderr
    assert not (out / "disk-1").exists()
    assert "ghp_run_canary" not in result.stderr


async def test_other_tenants_identity_is_denied_by_vault(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    await issue(admin, vault.layout, tenant, "iso-1")
    with pytest.raises(PermissionDenied):
        await run(vault, tenant, "iso-1", shm, ["true"], vault.jwt_for("beta", tmp_path))
    assert await context_paths(admin, vault, tenant) == ["iso-1"]  # untouched
    assert list(shm.iterdir()) == []


async def test_jwt_for_wrong_service_account_cannot_log_in(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    await issue(admin, vault.layout, tenant, "sa-1")
    jwt = vault.jwt_for(tenant, tmp_path, service_account="default")
    with pytest.raises(IdentityError) as refused:
        await run(vault, tenant, "sa-1", shm, ["true"], jwt)
    assert "jwt login at auth/jwt with role 'stigmer-runner' failed" in str(refused.value)
    assert "a claim is not allowed by the role" in str(refused.value)  # the server's reason
    assert await context_paths(admin, vault, tenant) == ["sa-1"]


async def test_token_auth_uses_and_revokes_a_child(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, logged: Any
) -> None:
    await issue(admin, vault.layout, tenant, "tok-1")
    assert await run(vault, tenant, "tok-1", shm, ["true"], method="token") == 0
    lease = events(logged, "execution prepared")[0]["lease_accessor"]
    assert not await accessor_alive(admin, lease)
    assert (await admin.get("auth/token/lookup-self"))["data"]["id"]  # the parent is untouched
    assert await context_paths(admin, vault, tenant) == []


async def test_missing_context_is_a_clear_error(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    result = cli(
        vault, "run", "--tenant", tenant, "--execution", "never-issued", "--out", str(shm),
        "--jwt-file", str(vault.jwt_for(tenant, tmp_path)), "--", "true",
    )  # fmt: skip
    assert result.returncode == 2
    error = result.stderr.splitlines()[-2]
    assert f"execution never-issued: no context in tenant {tenant}" in error
    assert await claims(admin, tenant) == []  # the claim written alongside the read is gone


async def test_run_claims_while_it_reads_the_context(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path, proxy: FaultProxy
) -> None:
    """The login is the lease: its claim does not wait for the context (one round trip less)."""
    await issue(admin, vault.layout, tenant, "along-1")
    proxy.add(Rule("delay", match="/data/execution-contexts/", seconds=1.0, times=1))
    result = run_as_runner(vault, tenant, "along-1", shm, vault.jwt_for(tenant, tmp_path),
                           "pass", vault_addr=proxy.url)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (read,) = proxy.requests("/data/execution-contexts/")
    (claim,) = proxy.requests("/data/execution-claims/")
    assert claim.at - read.at < 0.5  # sent while the read was held for a second
    assert await context_paths(admin, vault, tenant) == [] and await claims(admin, tenant) == []


async def test_a_context_as_long_lived_as_the_login_is_claimed_again_with_a_fresh_login(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path, logged: Any
) -> None:
    """27 s of context + 3 s of slack = the role's 30 s token_max_ttl: the first login, a moment
    old, cannot outlive the context. Its claim is given back and a fresh login claims."""
    await runner_role_like(admin, "run-30", token_ttl=10, token_max_ttl=30)
    await issue(admin, vault.layout, tenant, "edge-1", ttl=27)
    path = vault.layout.context_path(tenant, "edge-1")
    stored = await contexts.read(KV(admin, vault.layout.kv_mount), path, "edge-1", tenant, CONTEXTS)
    await asyncio.sleep(stored.remaining() - 26.8)  # ceil(remaining) = 27 for the next 0.8 s
    status = await run(vault, tenant, "edge-1", shm, ["true"], vault.jwt_for(tenant, tmp_path),
                       role="run-30", login_max_ttl=30)  # fmt: skip
    assert status == 0
    logins = [event["accessor"] for event in events(logged, "logged in")]
    assert len(logins) == 2
    for accessor in logins:
        assert not await accessor_alive(admin, accessor)
    prepared = events(logged, "execution prepared")
    assert [event["lease_accessor"] for event in prepared] == [logins[1]]
    assert await context_paths(admin, vault, tenant) == [] and await claims(admin, tenant) == []


async def test_expired_context_is_refused(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    await issue(admin, vault.layout, tenant, "exp-1", ttl=1)
    await asyncio.sleep(2.2)  # expiry is rounded up to the next second: at most 2 s away
    # Refused by the runner (past expires_at) or already gone (KV's delete_version_after).
    with pytest.raises((ContextExpired, ContextNotFound)):
        await run(vault, tenant, "exp-1", shm, ["true"], vault.jwt_for(tenant, tmp_path))


async def test_command_not_found(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    await issue(admin, vault.layout, tenant, "nf-1")
    result = cli(
        vault, "run", "--tenant", tenant, "--execution", "nf-1", "--out", str(shm),
        "--jwt-file", str(vault.jwt_for(tenant, tmp_path)), "--", "/no/such/program",
    )  # fmt: skip
    assert result.returncode == 2
    assert "'/no/such/program' cannot be started" in result.stderr
    assert list(shm.iterdir()) == []
    assert await context_paths(admin, vault, tenant) == []  # the execution ended


def test_no_command_is_an_error(vault: Vault) -> None:
    result = cli(vault, "run", "--tenant", "acme", "--execution", "x", "--out", "/dev/shm")
    assert result.returncode == 2 and "no command given" in result.stderr


async def test_a_thousand_secrets_round_trip(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    """Larger than one request may carry: Environment and context storage, Transit batches."""
    data = {f"SECRET_{i}": (f"value-{i}-" + "x" * 40, True) for i in range(1000)}
    await EnvironmentStore(admin, vault.layout).create(tenant, environment("big", **data))
    await ExecutionIssuer(admin, vault.layout).create(
        tenant, agent(), instance("big"), execution_id="big-1"
    )
    check = (
        "import json, os, sys\n"
        "values = json.load(open(os.environ['STIGMER_ENV_JSON']))\n"
        "ok = all(values[f'SECRET_{i}'] == os.environ[f'SECRET_{i}'] == f'value-{i}-' + 'x' * 40 for i in range(1000))\n"
        "sys.exit(0 if ok and len(values) == 1000 else 5)\n"
    )
    command = [sys.executable, "-c", check]
    assert await run(vault, tenant, "big-1", shm, command, vault.jwt_for(tenant, tmp_path)) == 0


async def test_transit_batches_split_when_the_server_refuses_the_size(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    transit = Transit(admin, vault.layout.transit_mount, max_items=5000)  # above the limit
    values = [f"v{i}" for i in range(1200)]
    ciphertexts = await transit.encrypt(vault.layout.transit_key(tenant), values)
    assert await transit.decrypt(vault.layout.transit_key(tenant), ciphertexts) == values


async def test_tampered_ciphertext_is_one_opaque_error(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    transit = Transit(admin, vault.layout.transit_mount)
    good = await transit.encrypt(vault.layout.transit_key(tenant), ["a", "b"])
    with pytest.raises(DecryptError) as caught:
        await transit.decrypt(vault.layout.transit_key(tenant), [good[0], good[1][:-4] + "AAAA"])
    assert str(caught.value) == "decryption failed for the execution's secrets"


async def test_long_command_outlives_the_login_ttl(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path, logged: Any
) -> None:
    """The runner renews its token, so cleanup still works after the first TTL ran out."""
    await runner_role_like(admin, "short-ttl", token_ttl=2, token_max_ttl=60)
    await issue(admin, vault.layout, tenant, "long-1", ttl=40)
    command = [sys.executable, "-c", "import time; time.sleep(4)"]
    jwt = vault.jwt_for(tenant, tmp_path)
    status = await run(vault, tenant, "long-1", shm, command, jwt, role="short-ttl",
                       login_max_ttl=60)  # fmt: skip
    assert status == 0
    assert await context_paths(admin, vault, tenant) == []
    login = events(logged, "logged in")[0]
    assert login["ttl"] == 2
    assert not await accessor_alive(admin, login["accessor"])


async def test_a_context_outliving_the_login_is_refused_before_decrypting(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    await issue(admin, vault.layout, tenant, "too-long", ttl=600)
    with pytest.raises(ValidationError, match="longer than a lease can"):
        await run(vault, tenant, "too-long", shm, ["true"], vault.jwt_for(tenant, tmp_path),
                  login_max_ttl=120)  # fmt: skip
    assert await context_paths(admin, vault, tenant) == ["too-long"]
    assert await claims(admin, tenant) == []  # written alongside the read, given back


MODULES_AT_EXIT = """
import atexit, json, os, sys
atexit.register(lambda: open(os.environ["MODULES_OUT"], "w").write(json.dumps(sorted(k for k, v in sys.modules.items() if v is not None))))
sys.argv[0] = "stigmer-broker"
from broker.cli import entry
entry()
"""
# What `run` never needs: each costs its start-up milliseconds (issue 11's cold-run target).
# ssl too: the test server is plain http (over https, test_tls's whole flow runs `run`).
NOT_FOR_RUN = ("pydantic", "jwt", "cryptography", "hvac", "requests", "aiohttp", "yaml", "h11",
               "random", "secrets", "hmac", "ssl", "_ssl", "broker.model", "broker.control")  # fmt: skip


async def test_run_loads_only_what_it_uses(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    await issue(admin, vault.layout, tenant, "lean-run-1")
    out = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", MODULES_AT_EXIT, "run", "--tenant", tenant,
         "--execution", "lean-run-1", "--out", str(shm),
         "--jwt-file", str(vault.jwt_for(tenant, tmp_path)), "--", "true"],
        capture_output=True, text=True, env=vault.environ(MODULES_OUT=str(out)), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded = json.loads(out.read_text())
    assert "broker.execution.core" in loaded  # it did run
    assert [m for m in loaded if m.startswith(NOT_FOR_RUN)] == []
