"""Write one execution's files: ``env``, ``env.json``, ``mcp.json`` (and the shapes that
``--mcp-format`` asks for), ``tasks.json`` for a workflow's tasks, ``manifest.json``.

All contents are built first, then written, so a failure leaves no half-written set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from broker import envfile
from broker.errors import RenderError
from broker.records import record
from broker.render import formats
from broker.render.outdir import ExecutionDirectory, write_atomic
from broker.resolve import ServerConfig, Variable

FILE_NAMES = ("env", "env.json", "mcp.json", "manifest.json")


@record(frozen=True)
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


def contents(
    execution_id: str,
    tenant: str,
    variables: Mapping[str, Variable],
    servers: Sequence[ServerConfig],
    expires_at: datetime | None,
    mcp_formats: Sequence[str] = (),
    tasks: Mapping[str, Any] | None = None,
) -> dict[str, bytes]:
    """The files' bytes; ``variables`` hold plaintext, ``servers`` are resolved.
    ``mcp_formats``: more MCP config shapes beside ``mcp.json`` (``formats.MCP_FORMATS``)."""
    values = {name: var.value for name, var in variables.items()}
    files = {
        "env": envfile.write(values).encode(),
        "env.json": formats.as_json_lines(values),
    }
    written = {}
    for shape in ("mcpservers", *sorted(set(mcp_formats) - {"mcpservers"})):
        file_name, build = formats.MCP_FORMATS[shape]
        files[file_name] = formats.as_json(build(servers))
        written[shape] = file_name
    if tasks:  # a workflow's task configs, resolved: {"tasks": {name: config}}
        files["tasks.json"] = formats.as_json({"tasks": dict(tasks)}, sort_keys=False)
    manifest = formats.manifest(execution_id, tenant, variables, servers, expires_at, files)
    manifest["mcp_configs"] = written
    files["manifest.json"] = formats.as_json_lines(manifest)
    return files


def render(
    directory: ExecutionDirectory, files: Mapping[str, bytes], reader_uid: int | None = None
) -> RenderedFiles:
    """Write ``files`` into ``directory`` (0400, readable by ``reader_uid`` if another uid)."""
    try:
        with directory.open() as fd:
            for name, data in files.items():
                write_atomic(fd, name, data, reader_uid)
    except OSError as exc:
        raise RenderError(f"{directory.path}: cannot write ({exc.strerror})") from None
    return RenderedFiles(directory.path)
