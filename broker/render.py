"""Write an execution's files to a memory-backed directory, safely, and wipe them afterwards.

``<out>/<execution id>/`` gets ``env``, ``env.json``, ``mcp.json`` and ``manifest.json``: 0700
and 0400 for `run` (one user), 0750 and 0440 for the sidecar (the runner is another uid in the
broker's group). Each file is written to a temp file opened with ``O_NOFOLLOW`` and renamed into
place relative to the directory's file descriptor, so a planted symlink cannot redirect a write.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from broker.errors import RenderError
from broker.model import McpServerDefinition
from broker.resolve import Variable

MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}
FILE_NAMES = ("env", "env.json", "mcp.json", "manifest.json")


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) for every mount of this process's namespace."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            separator = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")
            mounts.append((point, fields[separator + 1]))
    return mounts


def filesystem_type(path: Path) -> str:
    """The filesystem type of the mount that holds ``path`` (longest mount-point prefix)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    for point, fstype in _mounts():
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def is_memory_backed(path: Path) -> bool:
    return filesystem_type(path) in MEMORY_FILESYSTEMS


def default_out_dir() -> Path:
    """``$XDG_RUNTIME_DIR/stigmer-broker`` when that is memory-backed, else under /dev/shm."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir() and is_memory_backed(Path(runtime)):
        return Path(runtime) / "stigmer-broker"
    return Path("/dev/shm") / f"stigmer-broker-{os.getuid()}"  # noqa: S108 - 0700, checked


# --- file formats -----------------------------------------------------------------------------


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def dotenv(values: Mapping[str, str]) -> str:
    """``NAME='value'`` lines: POSIX-shell single quoting, so ``set -a; . env`` reads them back."""
    return "".join(f"{name}={_shell_quote(value)}\n" for name, value in sorted(values.items()))


def _with_query(url: str, params: Mapping[str, str]) -> str:
    if not params:
        return url
    parts = urlsplit(url)
    query = urlencode(sorted(params.items()))
    return urlunsplit(parts._replace(query=f"{parts.query}&{query}" if parts.query else query))


def mcp_entry(server: McpServerDefinition) -> dict[str, Any]:
    """One ``mcpServers`` entry, in the shape Claude Desktop / Claude Code / Cursor read."""
    if server.stdio is not None:
        stdio = server.stdio
        entry: dict[str, Any] = {"command": stdio.command, "args": list(stdio.args)}
        entry["env"] = dict(stdio.env_placeholders)
        if stdio.working_dir:
            entry["cwd"] = stdio.working_dir
        return entry
    if server.http is not None:
        http = server.http
        return {
            "type": "http",
            "url": _with_query(http.url, http.query_params),
            "headers": dict(http.headers),
        }
    assert server.docker is not None
    docker = server.docker
    args = ["run", "-i", "--rm"]
    for name in docker.env_placeholders:
        args += ["-e", name]
    for volume in docker.volumes:
        spec = f"{volume.host_path}:{volume.container_path}"
        args += ["-v", spec + (":ro" if volume.read_only else "")]
    if docker.network:
        args += ["--network", docker.network]
    for port in docker.ports:
        mapping = f"{port.host_port}:{port.container_port}"
        args += ["-p", mapping + (f"/{port.protocol}" if port.protocol else "")]
    if docker.container_name:
        args += ["--name", docker.container_name]
    args += [docker.image, *docker.args]
    return {"command": "docker", "args": args, "env": dict(docker.env_placeholders)}


def mcp_config(servers: Sequence[McpServerDefinition]) -> dict[str, Any]:
    return {"mcpServers": {server.name: mcp_entry(server) for server in servers}}


# --- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedFiles:
    directory: Path

    @property
    def env(self) -> Path:
        return self.directory / "env"

    @property
    def env_json(self) -> Path:
        return self.directory / "env.json"

    @property
    def mcp_json(self) -> Path:
        return self.directory / "mcp.json"

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.json"

    def as_json(self) -> dict[str, str]:
        return {
            "directory": str(self.directory),
            "env": str(self.env),
            "env_json": str(self.env_json),
            "mcp_json": str(self.mcp_json),
            "manifest": str(self.manifest),
        }


@contextmanager
def _directory_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        yield fd
    finally:
        os.close(fd)


def write_atomic(dir_fd: int, name: str, data: bytes, mode: int = 0o400) -> None:
    """Temp file + rename inside the directory given by ``dir_fd``; never follows a symlink."""
    temp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # exactly, whatever the umask
            handle.write(data)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
        raise


PRIVATE = (0o700, 0o400)  # one user: `run` and its child
GROUP_READABLE = (0o750, 0o440)  # sidecar: the runner is another uid in the broker's group


def prepare_directory(
    out: Path, execution_id: str, allow_disk: bool = False, dir_mode: int = PRIVATE[0]
) -> Path:
    """Create ``out`` and ``out/<execution id>`` (``dir_mode``); refuse a disk-backed ``out``."""
    try:
        out.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise RenderError(f"--out {out}: cannot create ({exc.strerror})") from None
    if out.is_symlink() or not out.is_dir():
        raise RenderError(f"--out {out}: not a directory")
    if not allow_disk and not is_memory_backed(out):
        raise RenderError(
            f"--out {out}: {filesystem_type(out)} is disk-backed; secrets go only to tmpfs "
            "(use a memory-backed directory, or --allow-disk to override)"
        )
    directory = out / execution_id
    try:
        with _directory_fd(out) as out_fd:
            os.mkdir(execution_id, dir_mode, dir_fd=out_fd)
            os.chmod(execution_id, dir_mode, dir_fd=out_fd)  # exactly, whatever the umask
    except FileExistsError:
        raise RenderError(f"{directory}: already exists (is the execution running?)") from None
    except OSError as exc:
        raise RenderError(f"{directory}: cannot create ({exc.strerror})") from None
    return directory


def _json(document: Any) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def render(
    directory: Path,
    execution_id: str,
    tenant: str,
    variables: Mapping[str, Variable],
    servers: Sequence[McpServerDefinition],
    expires_at: datetime | None,
    file_mode: int = PRIVATE[1],
) -> RenderedFiles:
    """Write the four files; ``variables`` hold plaintext, ``servers`` are already resolved."""
    values = {name: var.value for name, var in variables.items()}
    contents = {
        "env": dotenv(values).encode(),
        "env.json": _json(dict(sorted(values.items()))),
        "mcp.json": _json(mcp_config(servers)),
    }
    manifest = {
        "execution_id": execution_id,
        "tenant": tenant,
        "expires_at": expires_at.isoformat() if expires_at else None,
        "variables": {n: {"secret": v.is_secret} for n, v in sorted(variables.items())},
        "mcp_servers": {
            s.name: {"type": s.server_type, "enabled_tools": list(s.enabled_tools)} for s in servers
        },
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()},
    }
    contents["manifest.json"] = _json(manifest)
    try:
        with _directory_fd(directory) as dir_fd:
            for name, data in contents.items():
                write_atomic(dir_fd, name, data, file_mode)
    except OSError as exc:
        raise RenderError(f"{directory}: cannot write ({exc.strerror})") from None
    return RenderedFiles(directory)


def wipe(directory: Path) -> list[str]:
    """Overwrite and remove every file of an execution directory, then the directory.

    Returns the names removed. Missing directory: nothing to do.
    """
    removed: list[str] = []
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return removed
    try:
        for name in os.listdir(dir_fd):
            try:
                fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError:
                fd = -1  # no write permission or a symlink: just unlink it
            if fd >= 0:
                try:
                    size = os.fstat(fd).st_size
                    os.write(fd, b"\0" * size)
                finally:
                    os.close(fd)
            os.unlink(name, dir_fd=dir_fd)
            removed.append(name)
    finally:
        os.close(dir_fd)
    os.rmdir(directory)
    return removed
