"""Stigmer resources as pydantic models, with the validation the broker relies on.

Shape: ``api_version`` / ``kind`` / ``metadata`` / ``spec`` as in Stigmer's protos
(``agentic.stigmer.ai/v1``). Field names are the proto names; lowerCamelCase is accepted too,
as protobuf JSON does. Enums accept their number or their name. Unknown fields are refused,
so a typo or a documented-but-wrong shape (``{id: ...}`` in a reference) gets a clear error.

Values never show up in ``repr()`` or in validation errors (``hide_input_in_errors``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import pydantic
import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from broker.errors import ValidationError

API_VERSION = "agentic.stigmer.ai/v1"
MAX_VALUE_BYTES = 64 * 1024

VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
RESOURCE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
REF_VERSION = re.compile(r"^$|^latest$|^[a-zA-Z0-9._-]+$|^[a-f0-9]{64}$")

# ApiResourceKind numbers (api_resource_kind.proto).
RESOURCE_KINDS: dict[str, int] = {
    "agent": 40,
    "agent_execution": 41,
    "session": 42,
    "skill": 43,
    "mcp_server": 44,
    "agent_instance": 45,
    "workflow": 50,
    "workflow_instance": 51,
    "workflow_execution": 52,
    "environment": 53,
    "execution_context": 54,
}
KIND_NAMES = {number: name for name, number in RESOURCE_KINDS.items()}
OWNER_SCOPES: dict[str, int] = {
    "unspecified": 0,
    "platform": 1,
    "organization": 2,
    "identity_account": 3,
}


def _enum(names: Mapping[str, int], prefix: str) -> Any:
    """Accept an enum's number or its name (bare or with the proto prefix, any case)."""

    def convert(value: Any) -> Any:
        if isinstance(value, str):
            key = value.strip().lower()
            key = key.removeprefix(prefix)
            if key in names:
                return names[key]
            if key.isdigit():
                return int(key)
            raise ValueError(f"unknown value {value!r}; expected one of {', '.join(names)}")
        return value

    return BeforeValidator(convert)


ResourceKind = Annotated[int, _enum(RESOURCE_KINDS, "api_resource_kind_")]
OwnerScope = Annotated[int, _enum(OWNER_SCOPES, "api_resource_owner_scope_"), Field(ge=0, le=3)]


def _check_variable_name(name: str) -> str:
    if not VARIABLE_NAME.match(name):
        raise ValueError(
            f"variable name {name!r} is invalid: it must match {VARIABLE_NAME.pattern}"
        )
    return name


def _check_value_size(value: str) -> str:
    if len(value.encode("utf-8")) > MAX_VALUE_BYTES:
        raise ValueError(f"value is larger than {MAX_VALUE_BYTES} bytes")
    return value


VariableName = Annotated[str, AfterValidator(_check_variable_name)]
Value = Annotated[str, AfterValidator(_check_value_size)]


class _Proto(pydantic.BaseModel):
    """Base for every message: proto names or lowerCamelCase in, unknown fields refused."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        frozen=True,
        hide_input_in_errors=True,
        validate_by_name=True,
        validate_by_alias=True,
    )


class ApiResourceReference(_Proto):
    scope: OwnerScope = 0
    org: str = ""
    kind: ResourceKind = 0
    slug: str = ""
    version: Annotated[str, Field(pattern=REF_VERSION.pattern)] = ""


class EnvironmentRef(ApiResourceReference):
    """A reference that must name an Environment (kind 53) by slug."""

    @model_validator(mode="after")
    def _is_environment(self) -> EnvironmentRef:
        if self.kind != RESOURCE_KINDS["environment"]:
            got = KIND_NAMES.get(self.kind, "unspecified" if self.kind == 0 else "unknown")
            raise ValueError(f"kind must be 53 (environment), got {self.kind} ({got})")
        if not self.slug:
            raise ValueError("slug is required: it names the Environment")
        if not RESOURCE_NAME.match(self.slug):
            raise ValueError(f"slug {self.slug!r} is not a valid Environment name")
        return self


class Metadata(_Proto):
    name: str = ""
    slug: str = ""
    id: str = ""
    org: str = ""
    owner_scope: OwnerScope = 0
    visibility: int | str = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    version: dict[str, Any] = Field(default_factory=dict)

    @property
    def display(self) -> str:
        return self.name or self.slug or self.id or "<unnamed>"


# --- Environment ------------------------------------------------------------------------------


class EnvironmentValue(_Proto):
    value: Value = Field(default="", repr=False)
    is_secret: bool = False
    description: str = ""


class EnvironmentSpec(_Proto):
    description: str = ""
    data: dict[VariableName, EnvironmentValue] = Field(default_factory=dict)


class _Resource(_Proto):
    api_version: Literal["agentic.stigmer.ai/v1"]
    metadata: Metadata
    status: dict[str, Any] | None = None

    owner_scopes: ClassVar[tuple[int, ...] | None] = None

    @model_validator(mode="after")
    def _check_owner_scope(self) -> _Resource:
        allowed = type(self).owner_scopes
        scope = self.metadata.owner_scope
        if allowed is not None and scope != 0 and scope not in allowed:
            raise ValueError(
                f"metadata.owner_scope {scope} is not allowed for {type(self).__name__}; "
                f"allowed: {', '.join(str(s) for s in allowed)}"
            )
        return self


class Environment(_Resource):
    kind: Literal["Environment"]
    spec: EnvironmentSpec = Field(default_factory=EnvironmentSpec)
    owner_scopes: ClassVar[tuple[int, ...] | None] = (2, 3)

    @model_validator(mode="after")
    def _check_name(self) -> Environment:
        _require_resource_name(self.metadata.slug or self.metadata.name, "metadata.name")
        return self

    @property
    def name(self) -> str:
        return self.metadata.slug or self.metadata.name


def _require_resource_name(name: str, field: str) -> None:
    if not name:
        raise ValueError(f"{field} is required")
    if not RESOURCE_NAME.match(name):
        raise ValueError(f"{field} {name!r} must match {RESOURCE_NAME.pattern}")


# --- MCP servers ------------------------------------------------------------------------------


class StdioServer(_Proto):
    command: Annotated[str, Field(min_length=1)]
    args: list[str] = Field(default_factory=list)
    env_placeholders: dict[VariableName, str] = Field(default_factory=dict)
    working_dir: str = ""


class HttpServer(_Proto):
    url: Annotated[str, Field(min_length=1)]
    headers: dict[str, str] = Field(default_factory=dict)
    query_params: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: Annotated[int, Field(ge=0)] = 30


class VolumeMount(_Proto):
    host_path: Annotated[str, Field(min_length=1)]
    container_path: Annotated[str, Field(min_length=1)]
    read_only: bool = False


class PortMapping(_Proto):
    host_port: Annotated[int, Field(ge=1, le=65535)]
    container_port: Annotated[int, Field(ge=1, le=65535)]
    protocol: Literal["", "tcp", "udp"] = ""


class DockerServer(_Proto):
    image: Annotated[str, Field(min_length=1)]
    args: list[str] = Field(default_factory=list)
    env_placeholders: dict[VariableName, str] = Field(default_factory=dict)
    volumes: list[VolumeMount] = Field(default_factory=list)
    network: str = ""
    ports: list[PortMapping] = Field(default_factory=list)
    container_name: str = ""


class McpServerDefinition(_Proto):
    name: str
    stdio: StdioServer | None = None
    http: HttpServer | None = None
    docker: DockerServer | None = None
    enabled_tools: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> McpServerDefinition:
        if not SERVER_NAME.match(self.name):
            raise ValueError(
                f"name {self.name!r} must match {SERVER_NAME.pattern} (it is used as a file name)"
            )
        kinds = [k for k in ("stdio", "http", "docker") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"server {self.name!r} needs exactly one of stdio, http, docker "
                f"(got {', '.join(kinds) or 'none'})"
            )
        return self

    @property
    def server_type(self) -> str:
        return "stdio" if self.stdio else "http" if self.http else "docker"


def _unique_servers(servers: list[McpServerDefinition]) -> list[McpServerDefinition]:
    seen: set[str] = set()
    for server in servers:
        if server.name in seen:
            raise ValueError(f"MCP server name {server.name!r} is used twice")
        seen.add(server.name)
    return servers


McpServers = Annotated[list[McpServerDefinition], AfterValidator(_unique_servers)]


# --- Templates --------------------------------------------------------------------------------


def _skill_refs(refs: list[ApiResourceReference]) -> list[ApiResourceReference]:
    for index, ref in enumerate(refs):
        if ref.kind != RESOURCE_KINDS["skill"]:
            raise ValueError(f"skill_refs[{index}].kind must be 43 (skill), got {ref.kind}")
    return refs


SkillRefs = Annotated[list[ApiResourceReference], AfterValidator(_skill_refs)]


class McpToolSelection(_Proto):
    enabled_tools: list[str] = Field(default_factory=list)


class SubAgent(_Proto):
    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    instructions: Annotated[str, Field(min_length=10)]
    mcp_servers: list[str] = Field(default_factory=list)
    mcp_tool_selections: dict[str, McpToolSelection] = Field(default_factory=dict)
    skill_refs: SkillRefs = Field(default_factory=list)


class AgentSpec(_Proto):
    description: str = ""
    icon_url: str = ""
    instructions: Annotated[str, Field(min_length=10)]
    mcp_servers: McpServers = Field(default_factory=list)
    skill_refs: SkillRefs = Field(default_factory=list)
    sub_agents: list[SubAgent] = Field(default_factory=list)
    env_spec: EnvironmentSpec = Field(default_factory=EnvironmentSpec)

    @model_validator(mode="after")
    def _sub_agents_use_known_servers(self) -> AgentSpec:
        names = {server.name for server in self.mcp_servers}
        for sub in self.sub_agents:
            for ref in sub.mcp_servers:
                if ref not in names:
                    raise ValueError(
                        f"sub-agent {sub.name!r} uses MCP server {ref!r}, "
                        "which the agent does not define"
                    )
        return self


class Agent(_Resource):
    kind: Literal["Agent"]
    spec: AgentSpec
    owner_scopes: ClassVar[tuple[int, ...] | None] = (1, 2)


class WorkflowSpec(_Proto):
    description: str = ""
    document: dict[str, Any]
    tasks: Annotated[list[dict[str, Any]], Field(min_length=1)]
    env_spec: EnvironmentSpec = Field(default_factory=EnvironmentSpec)


class Workflow(_Resource):
    kind: Literal["Workflow"]
    spec: WorkflowSpec


# --- Instances --------------------------------------------------------------------------------


class AgentInstanceSpec(_Proto):
    agent_id: Annotated[str, Field(min_length=1)]
    description: str = ""
    environment_refs: list[EnvironmentRef] = Field(default_factory=list)


class AgentInstance(_Resource):
    kind: Literal["AgentInstance"]
    spec: AgentInstanceSpec

    @property
    def environment_refs(self) -> list[EnvironmentRef]:
        return self.spec.environment_refs


class WorkflowInstanceSpec(_Proto):
    workflow_id: Annotated[str, Field(min_length=1)]
    description: str = ""
    env_refs: list[EnvironmentRef] = Field(default_factory=list)


class WorkflowInstance(_Resource):
    kind: Literal["WorkflowInstance"]
    spec: WorkflowInstanceSpec

    @property
    def environment_refs(self) -> list[EnvironmentRef]:
        return self.spec.env_refs


# --- Executions -------------------------------------------------------------------------------


class ExecutionValue(_Proto):
    value: Annotated[Value, Field(min_length=1, repr=False)]
    is_secret: bool = False


class ExecutionConfig(_Proto):
    model_name: str = ""


class AgentExecutionSpec(_Proto):
    session_id: str = ""
    agent_id: str = ""
    message: Annotated[str, Field(min_length=1)]
    execution_config: ExecutionConfig | None = None
    runtime_env: dict[VariableName, ExecutionValue] = Field(default_factory=dict)
    callback_token: str = Field(default="", repr=False)

    @model_validator(mode="after")
    def _session_or_agent(self) -> AgentExecutionSpec:
        if not self.session_id and not self.agent_id:
            raise ValueError("one of session_id or agent_id is required")
        return self


class AgentExecution(_Resource):
    kind: Literal["AgentExecution"]
    spec: AgentExecutionSpec
    owner_scopes: ClassVar[tuple[int, ...] | None] = (0,)


class WorkflowExecutionSpec(_Proto):
    workflow_instance_id: str = ""
    workflow_id: str = ""
    trigger_message: str = ""
    trigger_metadata: dict[str, str] = Field(default_factory=dict)
    runtime_env: dict[VariableName, ExecutionValue] = Field(default_factory=dict)
    callback_token: str = Field(default="", repr=False)

    @model_validator(mode="after")
    def _instance_or_workflow(self) -> WorkflowExecutionSpec:
        if not self.workflow_instance_id and not self.workflow_id:
            raise ValueError("one of workflow_instance_id or workflow_id is required")
        return self


class WorkflowExecution(_Resource):
    kind: Literal["WorkflowExecution"]
    spec: WorkflowExecutionSpec
    owner_scopes: ClassVar[tuple[int, ...] | None] = (0,)


class ExecutionContextSpec(_Proto):
    """Stigmer's ExecutionContextSpec plus what the sidecar needs to render.

    ``data`` holds the merged variables; secret values are Transit ciphertext. The MCP server
    definitions keep their placeholders: only the sidecar resolves them.
    """

    execution_id: Annotated[str, Field(min_length=1)]
    data: dict[VariableName, ExecutionValue] = Field(default_factory=dict)
    tenant: str = ""
    mcp_servers: McpServers = Field(default_factory=list)
    expires_at: datetime | None = None
    allow_secret_in_args: bool = False
    template: str = ""


class ExecutionContext(_Resource):
    kind: Literal["ExecutionContext"]
    spec: ExecutionContextSpec
    owner_scopes: ClassVar[tuple[int, ...] | None] = (0,)


RESOURCE_TYPES: dict[str, type[_Resource]] = {
    cls.__name__: cls
    for cls in (
        Environment,
        Agent,
        Workflow,
        AgentInstance,
        WorkflowInstance,
        AgentExecution,
        WorkflowExecution,
        ExecutionContext,
    )
}

T = TypeVar("T", bound=_Resource)

_HINTS = {
    "ApiResourceReference": "a reference has scope, org, kind, slug and version (no id or name)",
}


def _describe(document: Mapping[str, Any]) -> str:
    kind = document.get("kind", "resource")
    metadata = document.get("metadata")
    name = ""
    if isinstance(metadata, Mapping):
        name = str(metadata.get("name") or metadata.get("slug") or metadata.get("id") or "")
    return f"{kind} {name}".strip() if isinstance(kind, str) else "resource"


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in {"function-after", "function-before"} or "[" in str(part):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text or "(document)"


def format_errors(error: pydantic.ValidationError) -> list[str]:
    """Turn pydantic's errors into 'field: reason' lines that never quote the input."""
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        where = _location(tuple(item["loc"]))
        kind = item["type"]
        if kind == "extra_forbidden":
            reason = "unknown field"
            if ".environment_refs[" in where or ".env_refs[" in where or "skill_refs[" in where:
                reason += f" ({_HINTS['ApiResourceReference']})"
        elif kind == "missing":
            reason = "is required"
        elif kind == "string_type":
            reason = "must be a string (quote numbers and booleans in YAML)"
        else:
            reason = str(item["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {reason}")
    return problems


def parse_resource(
    document: Any, expected: type[T] | tuple[type[_Resource], ...] | None = None
) -> T:
    """Validate one resource document (already parsed from YAML/JSON)."""
    if not isinstance(document, Mapping):
        raise ValidationError("resource", ["(document): must be a mapping"])
    label = _describe(document)
    kind = document.get("kind")
    cls = RESOURCE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValidationError(
            label, [f"kind: must be one of {', '.join(RESOURCE_TYPES)}, got {kind!r}"]
        )
    allowed = (expected,) if isinstance(expected, type) else expected
    if allowed and cls not in allowed:
        names = " or ".join(c.__name__ for c in allowed)
        raise ValidationError(label, [f"kind: expected {names}, got {kind}"])
    try:
        return cls.model_validate(document)  # type: ignore[return-value]
    except pydantic.ValidationError as exc:
        raise ValidationError(label, format_errors(exc)) from None


def to_document(resource: _Resource) -> dict[str, Any]:
    """The resource as a plain document for people: fields at their defaults left out."""
    dumped = resource.model_dump(mode="json", exclude_defaults=True)
    order = ("api_version", "kind", "metadata", "spec", "status")
    return {key: dumped[key] for key in order if key in dumped}


def load_documents(path: Path) -> list[Any]:
    """Read every document from a YAML (multi-document) or JSON file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    try:
        if path.suffix == ".json":
            loaded = json.loads(text)
            return loaded if isinstance(loaded, list) else [loaded]
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else getattr(exc, "lineno", None)
        where = f" at line {line}" if line else ""
        raise ValidationError(str(path), [f"not valid YAML/JSON{where}"]) from None


def load_resource(path: Path, expected: type[T] | tuple[type[_Resource], ...] | None = None) -> T:
    """Load exactly one resource from a file."""
    documents = load_documents(path)
    if len(documents) != 1:
        raise ValidationError(str(path), [f"expected one resource, found {len(documents)}"])
    return parse_resource(documents[0], expected)
