"""The newer declaration model at create: declarations as the template layer, McpServer
resources as server configs, declared keys as a whitelist (stigmer-model.md §8).

* The template layer holds every declaration of the template and of the McpServers it uses: a
  non-secret ``value`` is a default, no value declares the key; it is required unless every
  declaration of it says ``optional``. Secret-ness is sticky as in every layer.
* After the merge, keys nobody declared are dropped (their names are logged, never a value);
  a template that declares nothing receives the full map.
* Each ``mcp_server_usages`` entry becomes a server config in the shape the context stores:
  stdio gets ``env_placeholders`` for exactly its declared keys that have a value (its process
  gets those plus the client's minimal base), and every placeholder in its args, url, headers
  or query must name a key the server declares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from broker import logs
from broker.errors import ValidationError
from broker.model import Agent, McpServer, Workflow
from broker.model.declarations import Declarations
from broker.resolve import PLACEHOLDER, Entry, Layer, Variable, referenced_name


def uses_declarations(template: Agent | Workflow) -> bool:
    return template.spec.declares


def used_servers(
    template: Agent | Workflow, given: Sequence[McpServer]
) -> list[tuple[str, McpServer, list[str]]]:
    """(where, server, enabled tools) for each usage; refuses a server not given."""
    if not isinstance(template, Agent):
        return []
    by_slug = {server.slug: server for server in given}
    used, problems = [], []
    for index, usage in enumerate(template.spec.mcp_server_usages):
        where = f"spec.mcp_server_usages[{index}].mcp_server_ref"
        server = by_slug.get(usage.mcp_server_ref.slug)
        if server is None:
            problems.append(f"{where}: McpServer {usage.mcp_server_ref.slug!r} not given "
                            "(--mcp-server FILE, or mcp_servers in the API body)")  # fmt: skip
            continue
        used.append((where, server, list(usage.enabled_tools)))
    if problems:
        raise ValidationError("execution", problems)
    return used


def template_layer(
    template: Agent | Workflow, servers: Sequence[McpServer]
) -> tuple[Layer, frozenset[str], frozenset[str]]:
    """The declarations as a layer, the optional keys, and every declared key."""
    sources: list[Declarations] = [template.spec.env, *(s.spec.env for s in servers)]
    entries: dict[str, Entry] = {}
    optional: dict[str, bool] = {}
    for declarations in sources:
        for name, declaration in declarations.items():
            earlier = entries.get(name)
            value = earlier.value if earlier and earlier.value else declaration.value
            secret = declaration.is_secret or bool(earlier and earlier.is_secret)
            entries[name] = Entry(value, secret)
            optional[name] = optional.get(name, True) and declaration.optional
    layer = Layer("env", entries)
    return layer, frozenset(n for n, o in optional.items() if o), frozenset(entries)


def whitelist(merged: Mapping[str, Variable], declared: frozenset[str]) -> dict[str, Variable]:
    """Only the declared keys (all of them when nothing is declared); the rest are logged."""
    if not declared:
        return dict(merged)
    dropped = sorted(set(merged) - declared)
    if dropped:
        logs.event("undeclared variables dropped", level=30, names=dropped)
    return {name: variable for name, variable in merged.items() if name in declared}


def server_configs(
    used: Sequence[tuple[str, McpServer, list[str]]], merged: Mapping[str, Variable]
) -> list[dict[str, Any]]:
    """The context's server configs (placeholders kept) for the servers used."""
    configs, problems = [], []
    for _, server, tools in used:
        spec, declared = server.spec, set(server.spec.env)
        if spec.stdio is not None:
            present = sorted(n for n in declared if n in merged)
            transport: dict[str, Any] = {
                "stdio": {"command": spec.stdio.command, "args": list(spec.stdio.args),
                          "env_placeholders": {n: "${" + n + "}" for n in present},
                          "working_dir": spec.stdio.working_dir}}  # fmt: skip
        else:
            assert spec.http is not None
            transport = {"http": spec.http.model_dump(mode="json")}
        problems += _undeclared(server, transport, declared)
        configs.append({"name": server.slug, **transport, "enabled_tools": tools})
    if problems:
        raise ValidationError("execution", problems)
    return configs


def _undeclared(
    server: McpServer, value: Any, declared: set[str], where: str = "spec"
) -> list[str]:
    """Placeholders in a server's args, url, headers or query that name an undeclared key."""
    if isinstance(value, str):
        found = [referenced_name(m) for m in PLACEHOLDER.finditer(value)]
        return [f"McpServer {server.slug} {where}: ${{{name}}} is not declared in its spec.env"
                for name in found if name and name not in declared]  # fmt: skip
    if isinstance(value, Mapping):  # env_placeholders: built from the declarations themselves
        pairs = [(f".{k}", v) for k, v in value.items() if k != "env_placeholders"]
    elif isinstance(value, list):
        pairs = [(f"[{i}]", v) for i, v in enumerate(value)]
    else:
        return []
    return [p for step, item in pairs for p in _undeclared(server, item, declared, where + step)]
