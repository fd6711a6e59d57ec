"""Request bodies: JSON within limits, then the very models and rules the CLI uses.

Each function raises a :class:`~broker.errors.ValidationError` (or ``ConfigError``) whose
problem lines name fields; ``routes`` turns them into problem documents with JSON pointers,
prefixed with where the resource sits in the body (``/template``, ``/instance``, …)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pydantic
from pydantic import TypeAdapter

from broker import names
from broker.cli.common import parse_duration
from broker.control.executions import RuntimeValue, runtime_env
from broker.errors import ConfigError, ValidationError
from broker.limits import REQUESTS, parse_json
from broker.model import (
    API_VERSION,
    Agent,
    AgentExecution,
    AgentInstance,
    Environment,
    ExecutionValue,
    McpServer,
    Workflow,
    WorkflowExecution,
    WorkflowInstance,
    format_errors,
    parse_resource,
)
from broker.model.base import VariableName
from broker.records import field, record

EXECUTION_FIELDS = {"template", "instance", "execution", "environments", "runtime_env", "ttl",
                    "id", "allow_secret_in_args", "allow_env_names", "mcp_servers"}  # fmt: skip
CAMEL = {"runtimeEnv": "runtime_env", "allowSecretInArgs": "allow_secret_in_args",
         "allowEnvNames": "allow_env_names", "mcpServers": "mcp_servers"}  # fmt: skip
RUNTIME_ENV = TypeAdapter(dict[VariableName, ExecutionValue])


class BodyError(ValidationError):
    """A problem with one part of a request body; ``prefix`` points at that part."""

    def __init__(self, error: ValidationError, prefix: str) -> None:
        super().__init__(error.resource, error.problems)
        self.prefix = prefix


def document(raw: bytes, what: str) -> Any:
    return parse_json(raw, REQUESTS, what)


def environment(raw: bytes, name: str) -> Environment:
    """An Environment for ``PUT …/environments/{name}``; ``metadata.name`` may be left out,
    and must match the path when given."""
    names.environment_name(name)
    body = document(raw, f"Environment {name}")
    if isinstance(body, dict):
        if "api_version" not in body and "apiVersion" not in body:
            body["api_version"] = API_VERSION  # the only one there is
        metadata = body.setdefault("metadata", {})
        if isinstance(metadata, dict):
            given = metadata.get("name", metadata.get("slug"))
            if given is not None and given != name:
                mismatch = "metadata.name: does not match the name in the path"
                raise ValidationError(f"Environment {name}", [mismatch])
            metadata.setdefault("name", name)
    return parse_resource(body, Environment)


@record
class ExecutionRequest:
    """What ``execution create`` takes, as one JSON body."""

    template: Agent | Workflow
    instance: AgentInstance | WorkflowInstance | None = None
    runtime: dict[str, RuntimeValue] = field(default_factory=dict, repr=False)
    environments: list[str] = field(default_factory=list)
    ttl: timedelta = timedelta(hours=1)
    execution_id: str | None = None
    allow_secret_in_args: bool = False
    allow_env_names: list[str] = field(default_factory=list)
    execution: AgentExecution | WorkflowExecution | None = None
    mcp_servers: list[McpServer] = field(default_factory=list)


def execution(raw: bytes) -> ExecutionRequest:
    body = document(raw, "execution request")
    if not isinstance(body, dict):
        raise ValidationError("execution request", ["(document): must be a JSON object"])
    for camel, snake in CAMEL.items():  # lowerCamelCase as protobuf JSON allows
        if camel in body:
            if snake in body:
                raise ValidationError("execution request", [f"{camel}: given twice (and {snake})"])
            body[snake] = body.pop(camel)
    unknown = sorted(set(body) - EXECUTION_FIELDS)
    if unknown:
        raise ValidationError("execution request", [f"{k}: unknown field" for k in unknown])
    if "template" not in body:
        raise ValidationError("execution request", ["template: is required"])
    template = _part(body, "template", (Agent, Workflow))
    instance = _part(body, "instance", (AgentInstance, WorkflowInstance)) if body.get(
        "instance") is not None else None  # fmt: skip
    runtime: dict[str, RuntimeValue] = {}
    run = None
    if body.get("execution") is not None:
        expected = AgentExecution if isinstance(template, Agent) else WorkflowExecution
        run = _part(body, "execution", (expected,))
        runtime = {k: RuntimeValue(v.value, v.is_secret) for k, v in run.spec.runtime_env.items()}
    if body.get("runtime_env") is not None:  # on top, as `--env`/`--secret` are on the CLI
        try:
            extra = RUNTIME_ENV.validate_python(body["runtime_env"])
        except pydantic.ValidationError as error:
            raise BodyError(ValidationError("runtime_env", format_errors(error)),
                            "/runtime_env") from None  # fmt: skip
        runtime = runtime_env(runtime, {k: RuntimeValue(v.value, v.is_secret)
                                        for k, v in extra.items()})  # fmt: skip
    return ExecutionRequest(
        template=template,
        instance=instance,
        runtime=runtime,
        environments=_names(body, "environments", names.environment_name),
        ttl=_ttl(body.get("ttl", "1h")),
        execution_id=_optional_id(body.get("id")),
        allow_secret_in_args=_flag(body, "allow_secret_in_args"),
        allow_env_names=_names(body, "allow_env_names", names.variable_name),
        execution=run,
        mcp_servers=_servers(body),
    )


def _servers(body: dict[str, Any]) -> list[McpServer]:
    listed = body.get("mcp_servers", [])
    if not isinstance(listed, list):
        raise ValidationError("execution request", ["mcp_servers: must be a list of McpServers"])
    servers = []
    for index, document in enumerate(listed):
        try:
            servers.append(parse_resource(document, McpServer))
        except ValidationError as error:
            raise BodyError(error, f"/mcp_servers/{index}") from None
    return servers


def _part(body: dict[str, Any], key: str, kinds: tuple[type[Any], ...]) -> Any:
    try:
        return parse_resource(body[key], kinds)
    except ValidationError as error:
        raise BodyError(error, f"/{key}") from None


def _names(body: dict[str, Any], key: str, check: Any) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError("execution request", [f"{key}: must be a list of names"])
    try:
        return [check(v) for v in value]
    except ValidationError as error:
        raise ValidationError(
            "execution request", [f"{key}: {p}" for p in error.problems]
        ) from None


def _ttl(value: Any) -> timedelta:
    if not isinstance(value, str):
        raise ValidationError("execution request", ["ttl: must be a duration such as 15m"])
    try:
        return parse_duration(value)
    except ConfigError:
        raise ValidationError("execution request", ["ttl: not a duration (90s, 15m, 1h)"]) from None


def _optional_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError("execution request", ["id: must be a string"])
    return names.execution_id(value)


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise ValidationError("execution request", [f"{key}: must be true or false"])
    return value
