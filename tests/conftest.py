"""Fixtures: one real OpenBao dev server per test session, bootstrapped like `dev up` does.

No mock of Vault anywhere: every test that needs Vault talks to this server on a free loopback
port. Each test gets its own tenant (and Transit key) so tests never see each other's data.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker import devserver, identity
from broker.config import Layout, VaultSettings
from broker.control.setup import AppRoleSettings, Bootstrap, JwtSettings
from broker.vault import Transit, VaultClient

_counter = itertools.count()


@dataclass(frozen=True)
class Vault:
    server: devserver.DevServer
    admin: VaultClient
    layout: Layout

    @property
    def identity_key(self) -> Path:
        return self.server.identity_key

    def server_settings(self, with_token: bool = False) -> VaultSettings:
        return VaultSettings(addr=self.server.addr, token=self.server.token if with_token else "")

    def environ(self, **extra: str) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        environ.update(self.server.environ())
        environ.update(extra)
        return environ

    def runner_role_like(self, name: str, **changes: int) -> None:
        """A copy of the stigmer-runner JWT role with some fields changed (e.g. short TTLs)."""
        role = self.admin.get("auth/jwt/role/stigmer-runner")["data"]
        role.update(changes)
        self.admin.post(f"auth/jwt/role/{name}", role)

    def jwt_for(self, tenant: str, tmp_path: Path, **claims: object) -> Path:
        path = tmp_path / f"{tenant}.jwt"
        path.write_text(identity.mint_token(self.identity_key, tenant, **claims))  # type: ignore[arg-type]
        return path


@pytest.fixture(scope="session")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    state = tmp_path_factory.mktemp("vault-dev")
    server = devserver.start(state)
    try:
        identity.create_key(server.identity_key)
        admin = VaultClient(VaultSettings(addr=server.addr, token=server.token))
        layout = Layout()
        jwt = JwtSettings(public_keys=(identity.public_pem(server.identity_key),))
        Bootstrap(admin, layout).run(
            ["acme", "beta"], jwt, approle=AppRoleSettings(("acme", "beta"))
        )
        yield Vault(server=server, admin=admin, layout=layout)
    finally:
        devserver.stop(state)


@pytest.fixture
def tenant(vault: Vault) -> str:
    """A fresh tenant with its own Transit key."""
    name = f"t{os.getpid() % 1000}-{next(_counter)}"
    Transit(vault.admin, vault.layout.transit_mount).create_key(vault.layout.transit_key(name))
    return name


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory on /dev/shm (memory-backed) for rendered files."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="stigmer-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def cli(
    vault: Vault, *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``stigmer-broker ARGS`` as a subprocess against the test server."""
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True,
        text=True,
        input=input if input is not None else "",
        env=env or vault.environ(),
        timeout=60,
        check=False,
    )


def start_run(
    vault: Vault, tenant: str, execution_id: str, out: Path, jwt: Path, child: str
) -> subprocess.Popen[str]:
    """`stigmer-broker run ... -- python -c CHILD` in the background, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "run", "--tenant", tenant, "--execution", execution_id,
         "--out", str(out), "--jwt-file", str(jwt), "--", sys.executable, "-c", child],
        env=vault.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def context_paths(vault: Vault, tenant: str) -> list[str]:
    return vault.admin.list(f"{vault.layout.kv_mount}/metadata/execution-contexts/{tenant}")
