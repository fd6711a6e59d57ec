"""File contents: the MCP client config shapes and the manifest. No I/O.

Besides ``mcp.json``, ``--mcp-format vscode`` writes ``mcp.vscode.json`` (``{"servers": {name:
{"type": "stdio"|"http", ...}}}``) and ``--mcp-format stigmer`` writes ``mcp.stigmer.json``
(``{"mcp_servers": [definition, ...]}`` with ``timeout_seconds`` and ``enabled_tools``).

``mcp.json`` is ``{"mcpServers": {name: entry}}``, the shape Claude Desktop, Claude Code and
Cursor read: stdio → ``command``, ``args``, ``env``, ``cwd``; http → ``"type": "http"``,
``url`` (query params appended, URL-encoded), ``headers``; docker → ``"command": "docker"``
with ``run -i --rm`` arguments and the values in ``env``, never in argv.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from broker.resolve import ServerConfig, Variable, server_type


def _with_query(url: str, params: Mapping[str, str]) -> str:
    if not params:
        return url
    parts = urlsplit(url)
    query = urlencode(sorted(params.items()))
    return urlunsplit(parts._replace(query=f"{parts.query}&{query}" if parts.query else query))


def _stdio_entry(stdio: Mapping[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "command": stdio["command"],
        "args": list(stdio.get("args") or []),
        "env": dict(stdio.get("env_placeholders") or {}),
    }
    if stdio.get("working_dir"):
        entry["cwd"] = stdio["working_dir"]
    return entry


def _http_entry(http: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "http",
        "url": _with_query(http["url"], http.get("query_params") or {}),
        "headers": dict(http.get("headers") or {}),
    }


def _docker_entry(docker: Mapping[str, Any]) -> dict[str, Any]:
    environment = dict(docker.get("env_placeholders") or {})
    args = ["run", "-i", "--rm"]
    for name in environment:
        args += ["-e", name]
    for volume in docker.get("volumes") or []:
        spec = f"{volume['host_path']}:{volume['container_path']}"
        args += ["-v", spec + (":ro" if volume.get("read_only") else "")]
    if docker.get("network"):
        args += ["--network", docker["network"]]
    for port in docker.get("ports") or []:
        mapping = f"{port['host_port']}:{port['container_port']}"
        args += ["-p", mapping + (f"/{port['protocol']}" if port.get("protocol") else "")]
    if docker.get("container_name"):
        args += ["--name", docker["container_name"]]
    args += [docker["image"], *(docker.get("args") or [])]
    return {"command": "docker", "args": args, "env": environment}


_ENTRIES = {"stdio": _stdio_entry, "http": _http_entry, "docker": _docker_entry}


def mcp_entry(server: ServerConfig) -> dict[str, Any]:
    """One ``mcpServers`` entry for a resolved server definition."""
    kind = server_type(server)
    return _ENTRIES[kind](server[kind])


def mcp_config(servers: Sequence[ServerConfig]) -> dict[str, Any]:
    return {"mcpServers": {server["name"]: mcp_entry(server) for server in servers}}


def vscode_config(servers: Sequence[ServerConfig]) -> dict[str, Any]:
    """VS Code's ``.vscode/mcp.json`` shape: ``servers`` with an explicit ``type``."""
    entries = {}
    for server in servers:
        entry = mcp_entry(server)
        if server_type(server) != "http":
            entry = {"type": "stdio", **entry}
        entries[server["name"]] = entry
    return {"servers": entries}


# What a stdio server's process may inherit beside its declared variables (stigmer-model.md
# §8: "a minimal base environment"); the MCP client that spawns it passes these from its own.
BASE_ENV = ("HOME", "LANG", "LC_ALL", "PATH", "TERM", "TMPDIR", "TZ", "USER")


def stigmer_config(servers: Sequence[ServerConfig]) -> dict[str, Any]:
    """Stigmer's own shape: each resolved server definition as the agent declares it, with
    ``timeout_seconds`` and ``enabled_tools`` kept (the other shapes have no place for them);
    a stdio server also lists ``base_env``, all it may inherit beside its ``env_placeholders``."""
    shaped = []
    for server in servers:
        entry = dict(server)
        if server_type(server) == "stdio":
            entry["base_env"] = list(BASE_ENV)
        shaped.append(entry)
    return {"mcp_servers": shaped}


# --mcp-format: the file each shape goes to. mcp.json (mcpServers) is always written.
MCP_FORMATS: dict[str, tuple[str, Callable[[Sequence[ServerConfig]], dict[str, Any]]]] = {
    "mcpservers": ("mcp.json", mcp_config),
    "vscode": ("mcp.vscode.json", vscode_config),
    "stigmer": ("mcp.stigmer.json", stigmer_config),
}


def as_json(document: Any, sort_keys: bool = True) -> bytes:
    """Indented, for the small documents people read (mcp.json); ``sort_keys=False`` keeps a
    document's own order (task configs)."""
    return (json.dumps(document, indent=2, sort_keys=sort_keys) + "\n").encode()


def as_json_lines(document: Mapping[str, Any]) -> bytes:
    """A mapping with one entry per line, by the C encoder (``indent`` would make json fall
    back to its pure-Python encoder: milliseconds for a thousand values)."""
    if not document:
        return b"{}\n"
    body = json.dumps(document, sort_keys=True, separators=(",\n  ", ": "))
    return ("{\n  " + body[1:-1] + "\n}\n").encode()


def manifest(
    execution_id: str,
    tenant: str,
    variables: Mapping[str, Variable],
    servers: Sequence[ServerConfig],
    expires_at: datetime | None,
    contents: Mapping[str, bytes],
) -> dict[str, Any]:
    """Names, secret flags, server types, expiry and file hashes: never a value."""
    return {
        "execution_id": execution_id,
        "tenant": tenant,
        "expires_at": expires_at.isoformat() if expires_at else None,
        "variables": {n: {"secret": v.is_secret} for n, v in sorted(variables.items())},
        "mcp_servers": {
            s["name"]: {"type": server_type(s), "enabled_tools": list(s.get("enabled_tools") or [])}
            for s in servers
        },
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()},
    }
