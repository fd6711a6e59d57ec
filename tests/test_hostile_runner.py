"""Hostile runners, other uids, crashes: the broker runs as a non-root uid and is attacked by
the runner it serves (same uid under `run`), by a refused member of its group, and by floods."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.control.executions import RuntimeValue
from broker.dev.server import free_port
from broker.vault import VaultClient
from tests.conftest import (
    BROKER_UID,
    OTHER_UID,
    RUNNER_UID,
    SHARED_GID,
    Vault,
    accessor_alive,
    as_uid,
    context_paths,
    nonroot_environ,
    owned_dir,
    spawn,
    wait_until,
)
from tests.factories import issue_secrets, write_context

CANARY = "cnry-runner-77b2-do-not-leak"
SECOND_UID = 10004


async def issue(admin: VaultClient, vault: Vault, tenant: str, execution_id: str) -> None:
    await issue_secrets(admin, vault.layout, tenant, execution_id, {"TOKEN_0": (CANARY, True)},
                        runtime={"MODE": RuntimeValue("fast")})  # fmt: skip


def broker_command(python: str, uid: int, *args: str) -> list[str]:
    return [*as_uid(uid), python, "-m", "broker.cli", *args]


def as_user(python: str, uid: int, script: str, env: dict[str, str]) -> dict[str, Any]:
    """Run a Python ``script`` as ``uid``; it prints one JSON line, which is returned."""
    result = subprocess.run(
        [*as_uid(uid), python, "-c", script], env=nonroot_environ(env), capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.fixture
def home(user_dir: Path) -> Path:
    """The broker uid's own directory, which callers of its group may traverse."""
    return owned_dir(user_dir, "broker", BROKER_UID, 0o711)


def jwt_file(vault: Vault, tenant: str, home: Path) -> Path:
    path = home / "sa.jwt"
    path.write_text(vault.jwt_for(tenant, home).read_text())
    os.chown(path, BROKER_UID, -1)
    path.chmod(0o400)
    return path


# --- the output directory belongs to the broker alone -----------------------------------------


def _run(
    vault: Vault, python: str, tenant: str, execution_id: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        broker_command(python, BROKER_UID, "run", "--tenant", tenant, "--execution", execution_id,
                       *args),
        env=nonroot_environ(vault.environ()), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def test_an_output_root_prepared_by_someone_else_is_refused(
    vault: Vault, admin: VaultClient, tenant: str, home: Path, user_dir: Path, python_for_users: str
) -> None:
    await issue(admin, vault, tenant, "root-1")
    jwt = str(jwt_file(vault, tenant, home))
    planted = owned_dir(user_dir, "planted", OTHER_UID, 0o777)
    refused = _run(
        vault,
        python_for_users,
        tenant,
        "root-1",
        "--out",
        str(planted),
        "--jwt-file",
        jwt,
        "--",
        "true",
    )
    assert (
        refused.returncode == 6 and f"owned by uid {OTHER_UID}, not by the broker" in refused.stderr
    )
    loose = owned_dir(user_dir, "loose", BROKER_UID, 0o777)
    refused = _run(
        vault,
        python_for_users,
        tenant,
        "root-1",
        "--out",
        str(loose),
        "--jwt-file",
        jwt,
        "--",
        "true",
    )
    assert refused.returncode == 6 and "writable by group or others (mode 0777)" in refused.stderr
    default = Path(f"/dev/shm/stigmer-broker-{BROKER_UID}")  # what `run` uses without --out
    default.mkdir(mode=0o777, exist_ok=False)
    try:
        os.chown(default, OTHER_UID, SHARED_GID)
        default.chmod(0o777)
        refused = _run(vault, python_for_users, tenant, "root-1", "--jwt-file", jwt, "--", "true")
        assert refused.returncode == 6 and str(default) in refused.stderr
    finally:
        default.rmdir()
    assert await context_paths(admin, vault, tenant) == ["root-1"]  # nothing was delivered


async def test_no_other_uid_can_plant_or_swap_an_execution_directory(
    vault: Vault, admin: VaultClient, tenant: str, home: Path, python_for_users: str
) -> None:
    await issue(admin, vault, tenant, "swap-1")
    out = home / "out"
    marker = home / "ready"
    child = (f"import pathlib, time; pathlib.Path({str(marker)!r}).write_text('x'); "
             "time.sleep(3)")  # fmt: skip
    process = spawn(
        broker_command(python_for_users, BROKER_UID, "run", "--tenant", tenant, "--execution",
                       "swap-1", "--out", str(out), "--jwt-file", str(jwt_file(vault, tenant, home)),
                       "--", python_for_users, "-c", child),
        env=nonroot_environ(vault.environ()), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    await wait_until(marker.exists, 30)
    attempt = (f"import os, json\ntry:\n    os.rename({str(out / 'swap-1')!r}, {str(out / 'x')!r}); "
               "r = 'renamed'\nexcept OSError as e:\n    r = e.strerror\nprint(json.dumps(r))")  # fmt: skip
    assert as_user(python_for_users, OTHER_UID, attempt.replace("json.dumps(r)", "json.dumps({'r': r})"),
                   {})["r"] == "Permission denied"  # fmt: skip
    # Root can still swap it (a compromised node): the broker notices and touches nothing.
    (out / "swap-1").rename(out / "original")
    impostor = out / "swap-1"
    impostor.mkdir()
    (impostor / "keep").write_text("someone else's")
    os.chown(impostor, BROKER_UID, -1)
    _, stderr = process.communicate(timeout=30)
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    tampering = [e for e in events if e.get("event") == "tampering"]
    assert tampering and tampering[0]["level"] == "warning"
    assert (impostor / "keep").read_text() == "someone else's"  # not wiped
    assert process.returncode == 7  # cleanup left something behind, and says so
    ended = next(e for e in events if e["msg"] == "execution ended")
    assert ended["context"] == "destroyed" and ended["lease"] == "revoked"
    assert await context_paths(admin, vault, tenant) == []


# --- only the caller the socket admits reads an execution's secrets ----------------------------


@dataclass
class Sidecar:
    process: subprocess.Popen[str]
    socket: Path
    metrics_port: int

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=30)
        return self.process.returncode, stderr


async def start_sidecar(vault: Vault, tenant: str, home: Path, python: str, *extra: str) -> Sidecar:
    sockets = home / "sock"
    if not sockets.exists():
        owned_dir(home, "sock", BROKER_UID, 0o750)
    socket_path = sockets / f"broker-{free_port()}.sock"
    port = free_port()
    environ = vault.environ()
    environ.pop("VAULT_TOKEN")
    process = spawn(
        broker_command(python, BROKER_UID, "sidecar", "--tenant", tenant, "--socket", str(socket_path),
                       "--out", str(home / "out"), "--jwt-file", str(jwt_file(vault, tenant, home)),
                       "--metrics-addr", f"127.0.0.1:{port}", *extra),
        env=nonroot_environ(environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(process.communicate()[1])
        return socket_path.exists()

    await wait_until(up, 30, "the sidecar's socket")
    return Sidecar(process, socket_path, port)


CLIENT = """
import json, os, sys, time
from broker.client import BrokerClient
from broker.errors import BrokerClientError
client = BrokerClient({socket!r})
out = {{}}
for action in {actions!r}:
    verb, execution_id = action
    try:
        if verb == "put":
            answer = client.prepare(execution_id)
            out["files"] = answer.files.__dict__
            out["env"] = open(answer.env_json).read()
        elif verb == "get":
            out["get"] = client.get(execution_id)["state"]
        elif verb == "list":
            out["list"] = [e["id"] for e in client.list()]
        elif verb == "delete":
            out["delete"] = client.end(execution_id)["state"]
        elif verb == "read":
            out["read"] = open(execution_id).read()[:8]
        elif verb == "ls":
            out["ls"] = os.listdir(execution_id)
    except BrokerClientError as error:
        out[verb] = error.status
    except OSError as error:
        out[verb] = error.strerror
print(json.dumps(out))
"""


def client_as(python: str, uid: int, socket: Path, *actions: tuple[str, str]) -> dict[str, Any]:
    return as_user(python, uid, CLIENT.format(socket=str(socket), actions=list(actions)), {})


@pytest.fixture
async def sidecar(
    vault: Vault, tenant: str, home: Path, python_for_users: str
) -> AsyncIterator[Sidecar]:
    running = await start_sidecar(vault, tenant, home, python_for_users, "--allow-uid",
                                  str(RUNNER_UID), "--allow-uid", str(SECOND_UID))  # fmt: skip
    yield running
    running.stop()


async def test_three_uids_only_the_admitted_caller_reads_the_secrets(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar, python_for_users: str
) -> None:
    await issue(admin, vault, tenant, "acl-1")
    runner = client_as(python_for_users, RUNNER_UID, sidecar.socket, ("put", "acl-1"))
    assert CANARY in runner["env"]  # the admitted runner reads its files
    files = runner["files"]
    other = client_as(python_for_users, OTHER_UID, sidecar.socket, ("put", "acl-1"),
                      ("read", files["env"]), ("read", files["env_json"]),
                      ("ls", files["directory"]), ("ls", str(Path(files["directory"]).parent)))  # fmt: skip
    assert other["put"] == 403  # refused at the socket
    assert other["read"] == "Permission denied"  # same group, but no ACL entry: no read
    assert other["ls"] == "Permission denied"
    second = client_as(python_for_users, SECOND_UID, sidecar.socket, ("get", "acl-1"),
                       ("list", ""), ("delete", "acl-1"), ("read", files["env"]))  # fmt: skip
    assert second == {"get": 404, "list": [], "delete": 404, "read": "Permission denied"}
    code, stderr = sidecar.stop()
    assert code == 0
    refused = [json.loads(line) for line in stderr.splitlines() if '"peer-refused"' in line]
    assert refused and refused[0]["level"] == "warning" and refused[0]["peer_uid"] == OTHER_UID
    assert CANARY not in stderr


async def test_sharing_is_explicit(
    vault: Vault, admin: VaultClient, tenant: str, home: Path, python_for_users: str
) -> None:
    running = await start_sidecar(vault, tenant, home, python_for_users, "--allow-uid", str(RUNNER_UID),
                                  "--allow-uid", str(SECOND_UID), "--share-executions")  # fmt: skip
    try:
        await issue(admin, vault, tenant, "share-1")
        client_as(python_for_users, RUNNER_UID, running.socket, ("put", "share-1"))
        second = client_as(python_for_users, SECOND_UID, running.socket, ("get", "share-1"),
                           ("delete", "share-1"))  # fmt: skip
        assert second == {"get": "active", "delete": "ended"}
    finally:
        assert running.stop()[0] == 0


async def test_bad_ids_in_the_url_are_400(
    vault: Vault, tenant: str, sidecar: Sidecar, python_for_users: str
) -> None:
    script = f"""
import json, socket
out = {{}}
for raw in ("exec%0Aid", "exec%00id", "exec%0D%0Aid", "..%2Fx"):
    s = socket.socket(socket.AF_UNIX); s.connect({str(sidecar.socket)!r})
    s.sendall(f"PUT /v1/executions/{{raw}} HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\n\\r\\n".encode())
    out[raw] = int(s.recv(4096).split()[1])
print(json.dumps(out))
"""
    statuses = as_user(python_for_users, RUNNER_UID, script, {})
    assert set(statuses.values()) == {400}, statuses


# --- cleanup that the runner cannot stop ----------------------------------------------------

JUNK = r"""
import os, socket, stat, subprocess, sys, time
d = os.path.dirname(os.environ["STIGMER_ENV_FILE"])
os.mkfifo(os.path.join(d, "fifo"))
s = socket.socket(socket.AF_UNIX); s.bind(os.path.join(d, "sock"))
os.symlink("/etc/passwd", os.path.join(d, "link-out"))
os.symlink(os.environ["STIGMER_ENV_FILE"], os.path.join(d, "link-in"))
open(os.path.join(d, "zero"), "w").write("runner data"); os.chmod(os.path.join(d, "zero"), 0)
os.makedirs(os.path.join(d, "deep", "er", "still"))
open(os.path.join(d, "deep", "er", "still", "f"), "w").write("x")
os.chmod(os.path.join(d, "deep", "er"), 0)
for i in range(200):
    open(os.path.join(d, f"many-{i}"), "w").write("x")
holder = '''
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
while os.path.exists(os.path.dirname(sys.argv[1])):
    time.sleep(0.05)
time.sleep(0.2)
open(sys.argv[2], "w").write(repr(set(os.pread(fd, 1 << 20, 0))))
'''
subprocess.Popen([sys.executable, "-c", holder, os.environ["STIGMER_ENV_FILE"], sys.argv[1]],
                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.3)
"""


async def test_cleanup_finishes_whatever_the_runner_left(
    vault: Vault, admin: VaultClient, tenant: str, home: Path, python_for_users: str
) -> None:
    await issue(admin, vault, tenant, "junk-1")
    seen = home / "seen-by-holder"
    started = time.monotonic()
    result = _run(vault, python_for_users, tenant, "junk-1", "--out", str(home / "out"),
                  "--jwt-file", str(jwt_file(vault, tenant, home)), "--",
                  python_for_users, "-c", JUNK, str(seen))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    assert not (home / "out" / "junk-1").exists()
    assert Path("/etc/passwd").exists()
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    ended = next(e for e in events if e["msg"] == "execution ended")
    assert ended["errors"] == [] and len(ended["files_removed"]) > 200
    assert ended["context"] == "destroyed" and ended["lease"] == "revoked"
    await wait_until(seen.exists, 10, "the holder's report")
    assert seen.read_text() in ("{0}", "set()")  # the held env file was overwritten with zeros
    accessor = next(e["accessor"] for e in events if e["msg"] == "logged in")
    assert not await accessor_alive(admin, accessor)


async def test_sigterm_gives_the_command_its_grace_then_kills_it(
    vault: Vault, admin: VaultClient, tenant: str, home: Path, python_for_users: str
) -> None:
    await issue(admin, vault, tenant, "grace-1")
    marker = home / "stubborn"
    child = ("import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             f"pathlib.Path({str(marker)!r}).write_text('x'); time.sleep(60)")  # fmt: skip
    process = spawn(
        broker_command(python_for_users, BROKER_UID, "run", "--tenant", tenant, "--execution",
                       "grace-1", "--out", str(home / "out"), "--jwt-file",
                       str(jwt_file(vault, tenant, home)), "--kill-after", "1s", "--",
                       python_for_users, "-c", child),
        env=nonroot_environ(vault.environ()), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    await wait_until(marker.exists, 30)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGKILL
    assert 1 <= time.monotonic() - signalled < 10
    assert "command ignored the signal: killing it" in stderr
    assert await context_paths(admin, vault, tenant) == []


# --- the broker process itself ------------------------------------------------------------

PEEK = r"""
import json, os, sys
parent = os.getppid()
out = {}
for name in ("environ", "mem", "cmdline"):
    try:
        with open(f"/proc/{parent}/{name}", "rb") as f:
            f.read(64)
        out[name] = "readable"
    except OSError as e:
        out[name] = e.strerror
out["core"] = [l for l in open(f"/proc/{parent}/limits") if l.startswith("Max core file size")][0].split()[4:6]
print(json.dumps(out))
"""


async def test_the_broker_is_not_dumpable_and_leaves_no_core(
    vault: Vault, admin: VaultClient, tenant: str, home: Path, python_for_users: str
) -> None:
    await issue(admin, vault, tenant, "dump-1")
    result = _run(vault, python_for_users, tenant, "dump-1", "--out", str(home / "out"),
                  "--auth", "token", "--", python_for_users, "-c", PEEK)  # fmt: skip
    assert result.returncode == 0, result.stderr
    peeked = json.loads(result.stdout.strip().splitlines()[-1])
    assert peeked["environ"] == "Permission denied"  # VAULT_TOKEN stays the broker's
    assert peeked["mem"] == "Permission denied"
    assert peeked["core"] == ["0", "0"]
    assert vault.server.token not in result.stdout + result.stderr


async def test_the_sidecar_is_not_dumpable_either(
    vault: Vault, tenant: str, sidecar: Sidecar, python_for_users: str
) -> None:
    pid = sidecar.process.pid  # setpriv execs the broker: same pid
    script = (f"import json\ntry:\n    open('/proc/{pid}/environ','rb').read(); r = 'readable'\n"
              "except OSError as e:\n    r = e.strerror\nprint(json.dumps({'r': r}))")  # fmt: skip
    assert as_user(python_for_users, BROKER_UID, script, {})["r"] == "Permission denied"
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert next(line for line in limits.splitlines() if line.startswith("Max core")).split()[
        4:6
    ] == ["0", "0"]


# --- the local socket under abuse -----------------------------------------------------------

FLOOD = """
import json, socket, time
opened = 0
for batch in range(40):
    held = []
    for _ in range(500):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect({socket!r}); held.append(s); opened += 1
        except OSError:
            s.close()
    time.sleep(0.05)  # slow: they send nothing
    for s in held:
        s.close()
print(json.dumps({{"opened": opened}}))
"""


async def test_a_flood_from_a_refused_uid_does_not_starve_the_runner(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar, python_for_users: str
) -> None:
    for n in range(5):
        await issue(admin, vault, tenant, f"flood-{n}")
    attacker = spawn(
        [*as_uid(OTHER_UID), python_for_users, "-c", FLOOD.format(socket=str(sidecar.socket))],
        env=nonroot_environ({}), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    script = f"""
import json, time, urllib.request
from broker.client import BrokerClient
client = BrokerClient({str(sidecar.socket)!r})
put, health = [], []
for n in range(5):
    started = time.monotonic(); client.prepare(f"flood-{{n}}"); put.append(time.monotonic() - started)
    client.end(f"flood-{{n}}")
    started = time.monotonic()
    urllib.request.urlopen("http://127.0.0.1:{sidecar.metrics_port}/healthz", timeout=10).read()
    health.append(time.monotonic() - started)
print(json.dumps({{"put": put, "health": health}}))
"""
    timings = as_user(python_for_users, RUNNER_UID, script, {})
    descriptors = len(os.listdir(f"/proc/{sidecar.process.pid}/fd"))
    out, _ = attacker.communicate(timeout=120)
    assert json.loads(out)["opened"] > 1000  # the flood really happened
    assert max(timings["put"]) < 5 and max(timings["health"]) < 5  # served, not starved
    assert descriptors < 400  # refused connections hold nothing
    code, stderr = sidecar.stop()
    assert code == 0
    refusal_lines = [line for line in stderr.splitlines() if '"peer-refused"' in line]
    assert 1 <= len(refusal_lines) < 50  # rate-limited, with counts
    assert sum(json.loads(line)["refused_since_last"] for line in refusal_lines) >= 1
    assert await context_paths(admin, vault, tenant) == []


# --- the same refusals through the sidecar ------------------------------------------------


async def test_the_sidecar_refuses_what_run_refuses(
    vault: Vault, admin: VaultClient, tenant: str, sidecar: Sidecar, python_for_users: str
) -> None:
    await write_context(
        admin, vault, tenant, "nl", data={"X\nid": {"value": "1", "is_secret": False}}
    )
    await write_context(
        admin, vault, tenant, "ld", data={"LD_PRELOAD": {"value": "/x.so", "is_secret": False}}
    )
    await write_context(
        admin, vault, tenant, "nul", data={"K": {"value": "a\u0000b", "is_secret": False}}
    )
    big = {f"V{i}": {"value": "x" * 20_000, "is_secret": False} for i in range(500)}
    await write_context(admin, vault, tenant, "big", data=big)
    for execution_id in ("nl", "ld", "nul", "big"):
        one = client_as(python_for_users, RUNNER_UID, sidecar.socket, ("put", execution_id))
        assert one == {"put": 400}, execution_id
    assert os.listdir(Path(sidecar.socket).parents[1] / "out") == []  # nothing rendered


async def test_slow_hoarding_and_deep_requests_from_an_admitted_uid(
    vault: Vault, admin: VaultClient, tenant: str, home: Path, python_for_users: str
) -> None:
    running = await start_sidecar(vault, tenant, home, python_for_users, "--allow-uid",
                                  str(RUNNER_UID), "--request-timeout", "1s")  # fmt: skip
    try:
        await issue(admin, vault, tenant, "abuse-1")
        script = f"""
import json, socket, time
from broker.client import BrokerClient
from broker.errors import BrokerClientError
path = {str(running.socket)!r}
out = {{}}
silent = socket.socket(socket.AF_UNIX); silent.connect(path)
silent.settimeout(5); started = time.monotonic()
out["silent_closed"] = silent.recv(1) == b""; out["silent_after"] = time.monotonic() - started
held = []
for _ in range(70):
    s = socket.socket(socket.AF_UNIX); s.connect(path); held.append(s)
time.sleep(0.3)
out["refused_over_cap"] = sum(1 for s in held[64:] if s.recv(64).startswith(b"HTTP/1.1 403"))
for s in held:
    s.close()
client = BrokerClient(path)
client.prepare("abuse-1")
deep = "x"
for _ in range(500):
    deep = [deep]
try:
    client.resolve("abuse-1", deep); out["deep"] = 200
except BrokerClientError as e:
    out["deep"] = e.status
print(json.dumps(out))
"""
        out = as_user(python_for_users, RUNNER_UID, script, {})
        assert out["silent_closed"] and out["silent_after"] < 4  # header timeout: closed
        assert out["refused_over_cap"] == 6  # 64 held, the rest refused
        assert out["deep"] == 400  # a 500-level body: 400, never a 500
    finally:
        code, stderr = running.stop()
    assert code == 0 and "Traceback" not in stderr
