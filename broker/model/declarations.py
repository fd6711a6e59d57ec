"""Stigmer's newer declaration model (stigmer-model.md §8): ``spec.env`` maps of
``EnvVarDeclaration`` on Agent, Workflow and McpServer, and McpServer resources that agents
use through ``mcp_server_usages``.

A declaration says a variable exists: secret or not, optional or required, and (not secret
only) a fixed value. Declared keys are a whitelist: what no template or used server declares
is dropped from the merged environment.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from broker import names
from broker.model.base import (
    RESOURCE_KINDS,
    ApiResourceReference,
    ProtoModel,
    Resource,
    Value,
    VariableName,
)
from broker.model.mcp import HttpServer

MAX_DECLARED_VALUE = 65_536


class EnvVarDeclaration(ProtoModel):
    is_secret: bool = False
    description: str = ""
    optional: bool = False  # False: required
    value: Annotated[Value, Field(max_length=MAX_DECLARED_VALUE, repr=False)] = ""

    @model_validator(mode="after")
    def _secret_has_no_value(self) -> EnvVarDeclaration:
        if self.is_secret and self.value:  # CEL: !is_secret || value == ''
            raise ValueError("a secret declaration must not carry a value")
        return self


Declarations = dict[VariableName, EnvVarDeclaration]


class McpServerRef(ApiResourceReference):
    """A reference that must name an McpServer (kind 44) by slug."""

    @model_validator(mode="after")
    def _is_mcp_server(self) -> McpServerRef:
        if self.kind != RESOURCE_KINDS["mcp_server"]:
            raise ValueError(f"kind must be 44 (mcp_server), got {self.kind}")
        if not names.matches(names.SERVER_NAME, self.slug):
            raise ValueError(f"slug {self.slug!r} is not a valid MCP server name")
        return self


class McpServerUsage(ProtoModel):
    mcp_server_ref: McpServerRef
    enabled_tools: list[str] = Field(default_factory=list)
    tool_approval_overrides: Any = None


class McpStdio(ProtoModel):
    command: Annotated[str, Field(min_length=1)]
    args: list[str] = Field(default_factory=list)  # may hold ${VAR}, resolved strictly
    working_dir: str = ""


class McpServerSpec(ProtoModel):
    description: str = ""
    env: Declarations = Field(default_factory=dict)
    stdio: McpStdio | None = None
    http: HttpServer | None = None  # the same fields as an inline http server

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSpec:
        kinds = [k for k in ("stdio", "http") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"needs exactly one of stdio, http (got {', '.join(kinds) or 'none'})")
        return self


class McpServer(Resource):
    kind: Literal["McpServer"]
    spec: McpServerSpec
    owner_scopes: ClassVar[tuple[int, ...] | None] = None

    @property
    def slug(self) -> str:
        return self.metadata.slug or self.metadata.name
