"""One-shot runner mode against a real OpenBao: create → run → end, signals, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer, RuntimeValue
from broker.errors import PermissionDenied, ValidationError, VaultError
from broker.runner import ExecutionSession, RunOptions, run
from broker.vault import KV, VaultClient, lookup_self
from tests.conftest import Vault, cli, context_paths, start_run
from tests.test_control import agent, environment, instance

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


def issue(
    vault: Vault, tenant: str, execution_id: str, secret: str = "ghp_run_canary", ttl: int = 300
) -> None:
    EnvironmentStore(vault.admin, vault.layout).apply(
        tenant, environment("prod", GITHUB_TOKEN=(secret, True), REGION=("eu", False))
    )
    ExecutionIssuer(vault.admin, vault.layout).create(
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


def session(
    vault: Vault, tenant: str, execution_id: str, out: Path, jwt: Path, **extra: Any
) -> ExecutionSession:
    options = RunOptions(
        tenant=tenant, execution_id=execution_id, out_dir=out, jwt_file=jwt, **extra
    )
    return ExecutionSession(VaultClient(vault.server_settings()), vault.layout, options)


def test_round_trip_library(vault: Vault, tenant: str, shm: Path, tmp_path: Path) -> None:
    issue(vault, tenant, "round-1")
    run_session = session(vault, tenant, "round-1", shm, vault.jwt_for(tenant, tmp_path))
    expected = {
        "GITHUB_TOKEN": digest("ghp_run_canary"),
        "API_TOKEN": digest("rt_api_canary"),
        "REGION": digest("eu"),
    }
    status = run(run_session, [sys.executable, "-c", CHILD, json.dumps(expected)])
    assert status == 0
    assert run_session.login is not None
    token_client = vault.admin.with_token(run_session.login.token)
    with pytest.raises(PermissionDenied):
        lookup_self(token_client)
    with pytest.raises(VaultError):
        KV(vault.admin, vault.layout.kv_mount).read(f"execution-contexts/{tenant}/round-1")
    assert context_paths(vault, tenant) == []
    assert list(shm.iterdir()) == []


def test_exit_code_is_the_commands_and_cleanup_still_happens(
    vault: Vault, tenant: str, shm: Path, tmp_path: Path
) -> None:
    issue(vault, tenant, "code-7")
    run_session = session(vault, tenant, "code-7", shm, vault.jwt_for(tenant, tmp_path))
    assert run(run_session, [sys.executable, "-c", "import sys; sys.exit(7)"]) == 7
    assert context_paths(vault, tenant) == []
    assert list(shm.iterdir()) == []


def test_round_trip_cli_and_accessor_revoked(
    vault: Vault, tenant: str, shm: Path, tmp_path: Path
) -> None:
    issue(vault, tenant, "cli-run-1")
    jwt = vault.jwt_for(tenant, tmp_path)
    expected = {"GITHUB_TOKEN": digest("ghp_run_canary")}
    result = cli(
        vault, "run", "--tenant", tenant, "--execution", "cli-run-1", "--out", str(shm),
        "--jwt-file", str(jwt), "--", sys.executable, "-c", CHILD, json.dumps(expected),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    accessor = next(e["accessor"] for e in events if e["msg"] == "logged in")
    ended = next(e for e in events if e["msg"] == "execution ended")
    assert (
        ended["context"] == "destroyed"
        and ended["token"] == "revoked"
        and ended["files_removed"] == 4
    )
    with pytest.raises(VaultError):
        vault.admin.post("auth/token/lookup-accessor", {"accessor": accessor})
    assert context_paths(vault, tenant) == []


def test_sigterm_is_forwarded_and_everything_cleaned(
    vault: Vault, tenant: str, shm: Path, tmp_path: Path
) -> None:
    issue(vault, tenant, "sig-1")
    marker = shm / "marker"
    child = (
        "import signal, sys, time, pathlib\n"
        f"p = pathlib.Path({str(marker)!r})\n"
        "signal.signal(signal.SIGTERM, lambda *a: (p.write_text('term'), sys.exit(42)))\n"
        "p.write_text('ready')\n"
        "time.sleep(60)\n"
    )
    process = start_run(vault, tenant, "sig-1", shm, vault.jwt_for(tenant, tmp_path), child)
    deadline = time.monotonic() + 20
    while not (marker.exists() and marker.read_text() == "ready") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (shm / "sig-1" / "env").exists()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 42, stderr
    assert marker.read_text() == "term"
    assert not (shm / "sig-1").exists()
    assert context_paths(vault, tenant) == []


def test_disk_backed_out_refused(vault: Vault, tenant: str, tmp_path: Path) -> None:
    issue(vault, tenant, "disk-1")
    out = tmp_path / "out"
    result = cli(
        vault, "run", "--tenant", tenant, "--execution", "disk-1", "--out", str(out),
        "--jwt-file", str(vault.jwt_for(tenant, tmp_path)), "--", "true",
    )  # fmt: skip
    assert result.returncode != 0
    assert "disk-backed" in result.stderr and "--allow-disk" in result.stderr
    assert not (out / "disk-1").exists()
    assert "ghp_run_canary" not in result.stderr


def test_other_tenants_identity_is_denied_by_vault(
    vault: Vault, tenant: str, shm: Path, tmp_path: Path
) -> None:
    issue(vault, tenant, "iso-1")
    intruder = session(vault, tenant, "iso-1", shm, vault.jwt_for("beta", tmp_path))
    with pytest.raises(PermissionDenied):
        run(intruder, ["true"])
    assert context_paths(vault, tenant) == ["iso-1"]  # untouched
    assert list(shm.iterdir()) == []


def test_jwt_for_wrong_service_account_cannot_log_in(
    vault: Vault, tenant: str, shm: Path, tmp_path: Path
) -> None:
    from broker.errors import IdentityError

    issue(vault, tenant, "sa-1")
    jwt = vault.jwt_for(tenant, tmp_path, service_account="default")
    with pytest.raises(
        IdentityError, match="jwt login at auth/jwt with role 'stigmer-runner' failed"
    ):
        run(session(vault, tenant, "sa-1", shm, jwt), ["true"])
    assert context_paths(vault, tenant) == ["sa-1"]


def test_token_auth_uses_and_revokes_a_child(vault: Vault, tenant: str, shm: Path) -> None:
    issue(vault, tenant, "tok-1")
    run_session = ExecutionSession(
        VaultClient(vault.server_settings(with_token=True)),
        vault.layout,
        RunOptions(tenant=tenant, execution_id="tok-1", out_dir=shm, auth="token"),
    )
    assert run(run_session, ["true"]) == 0
    assert run_session.login is not None
    with pytest.raises(PermissionDenied):
        lookup_self(vault.admin.with_token(run_session.login.token))
    assert lookup_self(vault.admin)["id"]  # the parent token is untouched
    assert context_paths(vault, tenant) == []


def test_missing_context_is_a_clear_error(
    vault: Vault, tenant: str, shm: Path, tmp_path: Path
) -> None:
    result = cli(
        vault, "run", "--tenant", tenant, "--execution", "never-issued", "--out", str(shm),
        "--jwt-file", str(vault.jwt_for(tenant, tmp_path)), "--", "true",
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        f"execution never-issued: no context in tenant {tenant}" in result.stderr.splitlines()[-1]
    )


def test_expired_context_is_refused(vault: Vault, tenant: str, shm: Path, tmp_path: Path) -> None:
    issue(vault, tenant, "exp-1", ttl=1)
    time.sleep(2.2)  # expiry is rounded up to the next second: at most 2 s away
    with pytest.raises(ValidationError):
        run(session(vault, tenant, "exp-1", shm, vault.jwt_for(tenant, tmp_path)), ["true"])


def test_command_not_found(vault: Vault, tenant: str, shm: Path, tmp_path: Path) -> None:
    issue(vault, tenant, "nf-1")
    result = cli(
        vault, "run", "--tenant", tenant, "--execution", "nf-1", "--out", str(shm),
        "--jwt-file", str(vault.jwt_for(tenant, tmp_path)), "--", "/no/such/program",
    )  # fmt: skip
    assert result.returncode != 0
    assert "'/no/such/program' cannot be started" in result.stderr
    assert list(shm.iterdir()) == []


def test_no_command_is_an_error(vault: Vault) -> None:
    result = cli(vault, "run", "--tenant", "acme", "--execution", "x", "--out", "/dev/shm")
    assert result.returncode == 2 and "no command given" in result.stderr


def test_child_env_does_not_get_broker_credentials(vault: Vault) -> None:
    options = RunOptions(tenant="acme", execution_id="x", out_dir=Path("/dev/shm"))
    run_session = ExecutionSession(VaultClient(vault.server_settings()), vault.layout, options)
    environ = run_session.child_environment(
        {"VAULT_TOKEN": "t", "BAO_ADDR": "a", "PATH": os.environ["PATH"]}
    )
    assert set(environ) == {"PATH"}


def test_a_thousand_secrets_round_trip(
    vault: Vault, tenant: str, shm: Path, tmp_path: Path
) -> None:
    """Larger than one request may carry: Environment and context storage, and Transit batches."""
    data = {f"SECRET_{i}": (f"value-{i}-" + "x" * 40, True) for i in range(1000)}
    EnvironmentStore(vault.admin, vault.layout).create(tenant, environment("big", **data))
    ExecutionIssuer(vault.admin, vault.layout).create(
        tenant, agent(), instance("big"), execution_id="big-1"
    )
    check = (
        "import json, os, sys\n"
        "values = json.load(open(os.environ['STIGMER_ENV_JSON']))\n"
        "ok = all(values[f'SECRET_{i}'] == os.environ[f'SECRET_{i}'] == f'value-{i}-' + 'x' * 40 for i in range(1000))\n"
        "sys.exit(0 if ok and len(values) == 1000 else 5)\n"
    )
    assert (
        run(
            session(vault, tenant, "big-1", shm, vault.jwt_for(tenant, tmp_path)),
            [sys.executable, "-c", check],
        )
        == 0
    )


def test_transit_batches_split_when_the_server_refuses_the_size(vault: Vault, tenant: str) -> None:
    from broker.vault import Transit

    transit = Transit(vault.admin, vault.layout.transit_mount, chunk=5000)  # above the server limit
    values = [f"v{i}" for i in range(1200)]
    ciphertexts = transit.encrypt(vault.layout.transit_key(tenant), values)
    assert transit.decrypt(vault.layout.transit_key(tenant), ciphertexts) == values


def test_tampered_ciphertext_is_one_opaque_error(vault: Vault, tenant: str) -> None:
    from broker.errors import DecryptError
    from broker.vault import Transit

    transit = Transit(vault.admin, vault.layout.transit_mount)
    good = transit.encrypt(vault.layout.transit_key(tenant), ["a", "b"])
    with pytest.raises(DecryptError) as caught:
        transit.decrypt(vault.layout.transit_key(tenant), [good[0], good[1][:-4] + "AAAA"])
    assert str(caught.value) == "decryption failed for the execution's secrets"


def test_long_command_outlives_the_login_ttl(
    vault: Vault, tenant: str, shm: Path, tmp_path: Path
) -> None:
    """The runner renews its token, so cleanup still works after the first TTL ran out."""
    vault.runner_role_like("short-ttl", token_ttl=2, token_max_ttl=60)
    issue(vault, tenant, "long-1")
    run_session = session(
        vault, tenant, "long-1", shm, vault.jwt_for(tenant, tmp_path), role="short-ttl"
    )
    assert run(run_session, [sys.executable, "-c", "import time; time.sleep(4)"]) == 0
    assert context_paths(vault, tenant) == []
    assert run_session.login is not None and run_session.login.ttl == 2
    with pytest.raises(PermissionDenied):
        lookup_self(vault.admin.with_token(run_session.login.token))
