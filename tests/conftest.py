"""Fixtures: one real OpenBao dev server per test process, bootstrapped like `dev up` does.

No mock of Vault anywhere: every test that needs Vault talks to this server on a free loopback
port (one per pytest-xdist worker). Each test gets its own tenant (and Transit key), so tests
never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest

from broker.client import BrokerClient
from broker.config import Layout, VaultSettings
from broker.control.setup import AppRoleSettings, Bootstrap, JwtSettings
from broker.dev import identity, server
from broker.vault import KV, Transit, VaultClient
from tests.faultproxy import FaultProxy

# Property tests assert on results, never on time: a busy CI machine must not fail them.
hypothesis.settings.register_profile("broker", deadline=None)
hypothesis.settings.load_profile("broker")

_counter = itertools.count()
_spawned: list[subprocess.Popen[Any]] = []


def spawn(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen``, remembered: whatever a test leaves running is killed after it."""
    process: subprocess.Popen[Any] = subprocess.Popen(*args, **kwargs)
    _spawned.append(process)
    return process


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Kill what a (failed) test left running: a leaked sidecar outlives its JWT and its tree."""
    yield
    while _spawned:
        process = _spawned.pop()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if is_group_leader(process):
                    os.killpg(process.pid, signal.SIGKILL)
                process.kill()
            process.wait(10)


def is_group_leader(process: subprocess.Popen[Any]) -> bool:
    """Was ``process`` started as a group leader (start_new_session)?"""
    try:
        return os.getpgid(process.pid) == process.pid
    except ProcessLookupError:
        return False


@dataclass(frozen=True)
class Vault:
    server: server.DevServer
    layout: Layout

    @property
    def identity_key(self) -> Path:
        return self.server.identity_key

    def settings(self, with_token: bool = True) -> VaultSettings:
        return self.server.settings(with_token)

    def client(self, with_token: bool = True) -> VaultClient:
        """A new client (the caller closes it with ``await client.aclose()``)."""
        return VaultClient(self.settings(with_token))

    def environ(self, **extra: str) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        environ.update(self.server.environ())
        environ.update(extra)
        return environ

    def jwt_for(self, tenant: str, tmp_path: Path, **claims: Any) -> Path:
        path = tmp_path / f"{tenant}-{next(_counter)}.jwt"
        path.write_text(identity.mint_token(self.identity_key, tenant, **claims))
        return path


async def _bootstrap(running: server.DevServer) -> None:
    identity.create_key(running.identity_key)
    admin = VaultClient(running.settings())
    try:
        jwt = JwtSettings(public_keys=(identity.public_pem(running.identity_key),))
        await Bootstrap(admin, Layout()).run(
            ["acme", "beta"], jwt, approle=AppRoleSettings(("acme", "beta"))
        )
    finally:
        await admin.aclose()


CANARY = re.compile(rb"cnry-[a-z0-9-]+-do-not-(?:leak|echo)")


def canary_hits(root: Path) -> list[str]:
    """Files under ``root`` that hold a test canary (a value that must never be written)."""
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and CANARY.search(path.read_bytes()):
                hits.append(str(path))
        except OSError:
            continue
    return hits


@pytest.fixture(scope="session", autouse=True)
def no_canary_on_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After every test of this worker: no canary in any file the tests or brokers wrote
    (sidecar logs, JWT files, the dev server's log and audit log live under this tree)."""
    yield
    root = tmp_path_factory.getbasetemp()
    assert canary_hits(root) == [], "a secret value reached a disk-backed file"


@pytest.fixture(scope="session")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    state = tmp_path_factory.mktemp("vault-dev")
    running = server.start(state)
    try:
        asyncio.run(_bootstrap(running))
        yield Vault(server=running, layout=Layout())
    finally:
        server.stop(state)


@pytest.fixture
async def admin(vault: Vault) -> AsyncIterator[VaultClient]:
    """A root-token client for this test's event loop."""
    client = vault.client()
    yield client
    await client.aclose()


@pytest.fixture
async def tenant(admin: VaultClient, vault: Vault) -> str:
    """A fresh tenant with its own Transit key."""
    name = f"t{os.getpid() % 1000}-{next(_counter)}"
    await Transit(admin, vault.layout.transit_mount).create_key(vault.layout.transit_key(name))
    return name


@pytest.fixture
def shm() -> Iterator[Path]:
    """A fresh directory on /dev/shm (memory-backed), 0700 like an output root must be."""
    path = Path(tempfile.mkdtemp(prefix="stigmer-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    """Poll ``condition`` (sync or async) until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.05)


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
    vault: Vault, tenant: str, execution_id: str, out: Path, jwt: Path, child: str, *extra: str
) -> subprocess.Popen[str]:
    """`stigmer-broker run ... -- python -c CHILD` in the background, output captured."""
    return spawn(
        [sys.executable, "-m", "broker.cli", "run", "--tenant", tenant, "--execution", execution_id,
         "--out", str(out), "--jwt-file", str(jwt), *extra, "--", sys.executable, "-c", child],
        env=vault.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run_as_runner(
    vault: Vault,
    tenant: str,
    execution_id: str,
    out: Path,
    jwt: Path,
    child: str,
    *flags: str,
    vault_addr: str = "",
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`stigmer-broker run ... -- python -c CHILD` to its end, logged in with ``jwt`` and, as in a
    runner pod, no Vault token in its environment; ``vault_addr``: e.g. a fault proxy's."""
    environ = vault.environ(**({"VAULT_ADDR": vault_addr} if vault_addr else {}))
    environ.pop("VAULT_TOKEN")
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "run", "--tenant", tenant, "--execution", execution_id,
         "--out", str(out), "--jwt-file", str(jwt), *flags, "--", sys.executable, "-c", child],
        env=environ, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    socket: Path
    out: Path
    log: Path
    metrics_port: int
    client: BrokerClient

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return str(answer.read().decode())

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


async def start_sidecar(
    vault: Vault,
    tenant: str,
    tmp_path: Path,
    shm: Path,
    *extra: str,
    name: str = "a",
    vault_addr: str = "",
    jwt: Path | None = None,
) -> Sidecar:
    """A sidecar process (as root) on ``shm``; ``vault_addr``: e.g. a fault proxy's."""
    shm.chmod(0o750)  # like a shared volume: the runner's group may enter, others may not
    socket_path = shm / f"{name}.sock"
    out = shm / f"out-{name}"
    log = tmp_path / f"{name}.log"
    port = server.free_port()
    environ = vault.environ()
    environ.pop("VAULT_TOKEN")  # the sidecar holds no token of ours
    if vault_addr:
        environ["VAULT_ADDR"] = vault_addr
    with log.open("wb") as log_file:
        process = spawn(
            [sys.executable, "-m", "broker.cli", "sidecar", "--tenant", tenant, "--socket", str(socket_path),
             "--out", str(out), "--jwt-file", str(jwt or vault.jwt_for(tenant, tmp_path)), "--pod", f"pod-{name}",
             "--metrics-addr", f"127.0.0.1:{port}", *extra],
            env=environ, stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
    client = BrokerClient(socket_path, timeout=30)

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"sidecar exited at start: {log.read_text()}")
        return socket_path.exists() and client.ready()

    await wait_until(up, 20, "the sidecar to be ready")
    return Sidecar(process, socket_path, out, log, port, client)


@pytest.fixture
def proxy(vault: Vault) -> Iterator[FaultProxy]:
    """A fault proxy in front of this worker's dev server (see tests/faultproxy.py)."""
    running = FaultProxy(vault.server.addr).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def proxied_admin(vault: Vault, proxy: FaultProxy) -> AsyncIterator[VaultClient]:
    """A root-token client whose requests go through this test's fault proxy."""
    client = VaultClient(VaultSettings.local(proxy.url, vault.server.token))
    yield client
    await client.aclose()


async def claim_metadata(admin: VaultClient, tenant: str, execution_id: str) -> dict[str, str]:
    return (
        await KV(admin, "stigmer").read_metadata(f"execution-claims/{tenant}/{execution_id}")
    ).custom


async def claims(admin: VaultClient, tenant: str) -> list[str]:
    return await KV(admin, "stigmer").list(f"execution-claims/{tenant}")


async def context_paths(admin: VaultClient, vault: Vault, tenant: str) -> list[str]:
    return await KV(admin, vault.layout.kv_mount).list(vault.layout.contexts_dir(tenant))


async def runner_role_like(admin: VaultClient, name: str, **changes: int) -> None:
    """A copy of the stigmer-runner JWT role with some fields changed (e.g. short TTLs)."""
    role = (await admin.get("auth/jwt/role/stigmer-runner"))["data"]
    role.update(changes)
    await admin.post(f"auth/jwt/role/{name}", role)


async def accessor_alive(admin: VaultClient, accessor: str) -> bool:
    from broker.vault import lookup_accessor

    return await lookup_accessor(admin, accessor) is not None


# --- other uids: the broker is not root in production, and root hides permission bugs ------

SHARED_GID = 10000  # the pod's shared group (deploy/kubernetes)
BROKER_UID, RUNNER_UID, OTHER_UID = 10002, 10001, 10003


def nonroot_python() -> str:
    """An interpreter another uid can run with this project's packages.

    The test venv's interpreter may live under a directory only root can enter (pyenv in
    /root); the distribution's python3.11 has the same ABI and reads the venv's packages.
    """
    import sysconfig

    for candidate in ("/usr/bin/python3.11", "/usr/local/bin/python3.11", sys.executable):
        script = f"exec {candidate} -c 'import broker.cli, aiohttp.web, pydantic'"
        probe = subprocess.run(  # exec'd by a process of the other uid, as `run` will
            [*as_uid(65534, 65534, ()), "/bin/sh", "-c", script],
            env=nonroot_environ({}), capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if probe.returncode == 0:
            return candidate
    paths = sysconfig.get_paths()
    raise AssertionError(
        f"no Python 3.11 that uid 65534 can run with {paths['purelib']}: install the "
        "distribution's python3.11 (apt-get install python3.11), or make the interpreter "
        "readable by other users"
    )


def nonroot_environ(base: dict[str, str]) -> dict[str, str]:
    """``base`` plus the paths another uid's interpreter needs to import the broker."""
    import sysconfig

    project = str(Path(__file__).resolve().parents[1])
    paths = sysconfig.get_paths()
    return {
        **base,
        "PYTHONPATH": os.pathsep.join(dict.fromkeys([project, paths["purelib"], paths["platlib"]])),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def as_uid(uid: int, gid: int = SHARED_GID, groups: tuple[int, ...] = (SHARED_GID,)) -> list[str]:
    """The command prefix that runs what follows as ``uid`` (setpriv, no capabilities)."""
    group_flag = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", group_flag, "--"]


@pytest.fixture(scope="session")
def python_for_users() -> str:
    return nonroot_python()


@pytest.fixture
def user_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on /dev/shm other uids can enter (0711, root's), for their own dirs."""
    path = Path(tempfile.mkdtemp(prefix="stigmer-users-", dir="/dev/shm"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def owned_dir(parent: Path, name: str, uid: int, mode: int = 0o700) -> Path:
    path = parent / name
    path.mkdir()
    os.chown(path, uid, SHARED_GID)
    path.chmod(mode)
    return path
