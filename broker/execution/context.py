"""Reading an ExecutionContext on the runner side: lean, strict about what the runner relies on.

The control plane validated the context with the full resource models when it issued it; the
runner does not trust that blindly, but it does not need pydantic either (it would double a
cold ``run``'s start-up). It checks, with the same rules (``broker.names``), everything that
reaches a file, a shell or a process: variable names, string values without NUL, secret flags,
MCP server names and shapes, the tenant, the execution id and the expiry.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from broker import names
from broker.errors import ContextExpired, ContextNotFound, NotFound, ValidationError
from broker.limits import CONTEXTS, Limits
from broker.records import field, record
from broker.resolve import SERVER_TYPES, ServerConfig, environment_names
from broker.vault import KV


@record(frozen=True)
class StoredValue:
    value: str = field(repr=False)  # Transit ciphertext when is_secret
    is_secret: bool


@record(frozen=True)
class StoredContext:
    execution_id: str
    tenant: str
    expires_at: datetime | None
    data: dict[str, StoredValue]
    mcp_servers: list[ServerConfig]
    allow_secret_in_args: bool = False
    allowed_env_names: frozenset[str] = frozenset()
    tasks: list[tuple[str, Any]] = field(default_factory=list)  # (name, config) with placeholders
    broker_placeholders: bool = False

    def remaining(self) -> float:
        """Seconds until expiry (an hour when the context has none)."""
        if self.expires_at is None:
            return 3600.0
        return (self.expires_at - datetime.now(UTC)).total_seconds()


def _values(data: Any, problems: list[str]) -> dict[str, StoredValue]:
    if not isinstance(data, dict):
        problems.append("spec.data: must be a mapping")
        return {}
    values = {}
    for name, entry in data.items():
        value = entry.get("value") if isinstance(entry, dict) else None
        secret = entry.get("is_secret", False) if isinstance(entry, dict) else None
        if not names.matches(names.VARIABLE_NAME, name):
            problems.append(f"spec.data: {name!r} is not a valid variable name")
        elif not isinstance(value, str) or "\0" in value or not isinstance(secret, bool):
            problems.append(f"spec.data.{name}: needs a string value without NUL and is_secret")
        else:
            values[name] = StoredValue(value, secret)
    return values


def _servers(servers: Any, problems: list[str]) -> list[ServerConfig]:
    if not isinstance(servers, list):
        problems.append("spec.mcp_servers: must be a list")
        return []
    checked = []
    for index, server in enumerate(servers):
        name = server.get("name") if isinstance(server, dict) else None
        kinds = [k for k in SERVER_TYPES if isinstance(server, dict) and server.get(k) is not None]
        if not names.matches(names.SERVER_NAME, name):
            problems.append(f"spec.mcp_servers[{index}].name: not a valid server name")
        elif len(kinds) != 1 or not isinstance(server[kinds[0]], dict):
            problems.append(f"spec.mcp_servers[{index}]: needs exactly one of stdio, http, docker")
        else:
            checked.append(server)
    return checked


def _expiry(text: Any, problems: list[str]) -> datetime | None:
    if text is None:
        return None
    try:
        expires = datetime.fromisoformat(str(text))
    except ValueError:
        problems.append("spec.expires_at: not a timestamp")
        return None
    return expires if expires.tzinfo else expires.replace(tzinfo=UTC)


def _tasks(recorded: Any, problems: list[str]) -> list[tuple[str, Any]]:
    if not isinstance(recorded, list):
        problems.append("spec.tasks: must be a list")
        return []
    checked = []
    for index, task in enumerate(recorded):
        name = task.get("name") if isinstance(task, dict) else None
        if not isinstance(name, str) or not name.isprintable() or not 0 < len(name) <= 256:
            problems.append(f"spec.tasks[{index}].name: needs a printable name")
        else:
            checked.append((name, task.get("config")))
    return checked


def _allowed(names_: Any, problems: list[str]) -> frozenset[str]:
    if not isinstance(names_, list) or not all(
        names.matches(names.VARIABLE_NAME, n) for n in names_
    ):
        problems.append("spec.allowed_env_names: must be a list of variable names")
        return frozenset()
    return frozenset(names_)


def decode(document: dict[str, Any], execution_id: str, tenant: str) -> StoredContext:
    """Check a stored context document and keep what the runner uses."""
    spec = document.get("spec")
    if document.get("kind") != "ExecutionContext" or not isinstance(spec, dict):
        raise ValidationError(f"execution {execution_id}", ["not an ExecutionContext"])
    problems: list[str] = []
    if spec.get("execution_id") != execution_id:
        problems.append("spec.execution_id: does not match the execution")
    if spec.get("tenant", tenant) != tenant:
        problems.append("context belongs to another tenant")
    context = StoredContext(
        execution_id=execution_id,
        tenant=tenant,
        expires_at=_expiry(spec.get("expires_at"), problems),
        data=_values(spec.get("data", {}), problems),
        mcp_servers=_servers(spec.get("mcp_servers", []), problems),
        allow_secret_in_args=spec.get("allow_secret_in_args") is True,
        allowed_env_names=_allowed(spec.get("allowed_env_names", []), problems),
        tasks=_tasks(spec.get("tasks", []), problems),
        broker_placeholders=spec.get("broker_placeholders") is True,
    )
    found = environment_names(context.data, context.mcp_servers)
    problems += names.refused_variables(found, context.allowed_env_names)
    if problems:
        raise ValidationError(f"execution {execution_id}", problems)
    return context


async def read(
    kv: KV, path: str, execution_id: str, tenant: str, limits: Limits = CONTEXTS
) -> StoredContext:
    """The context at ``path``, checked; refused if missing, beyond ``limits`` or expired."""
    try:
        document, _ = await kv.read_resource(path, limits)
    except NotFound:
        raise ContextNotFound(execution_id, tenant) from None
    context = decode(document, execution_id, tenant)
    if context.remaining() <= 0:
        raise ContextExpired(execution_id)
    return context
