"""MCP server definitions as Stigmer's AgentSpec carries them inline (stdio, http, docker)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from broker import names
from broker.model.base import ProtoModel, VariableName


class StdioServer(ProtoModel):
    command: Annotated[str, Field(min_length=1)]
    args: list[str] = Field(default_factory=list)
    env_placeholders: dict[VariableName, str] = Field(default_factory=dict)
    working_dir: str = ""


class HttpServer(ProtoModel):
    url: Annotated[str, Field(min_length=1)]
    headers: dict[str, str] = Field(default_factory=dict)
    query_params: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: Annotated[int, Field(ge=0)] = 30


class VolumeMount(ProtoModel):
    host_path: Annotated[str, Field(min_length=1)]
    container_path: Annotated[str, Field(min_length=1)]
    read_only: bool = False


class PortMapping(ProtoModel):
    host_port: Annotated[int, Field(ge=1, le=65535)]
    container_port: Annotated[int, Field(ge=1, le=65535)]
    protocol: Literal["", "tcp", "udp"] = ""


class DockerServer(ProtoModel):
    image: Annotated[str, Field(min_length=1)]
    args: list[str] = Field(default_factory=list)
    env_placeholders: dict[VariableName, str] = Field(default_factory=dict)
    volumes: list[VolumeMount] = Field(default_factory=list)
    network: str = ""
    ports: list[PortMapping] = Field(default_factory=list)
    container_name: str = ""


class McpServerDefinition(ProtoModel):
    name: str
    stdio: StdioServer | None = None
    http: HttpServer | None = None
    docker: DockerServer | None = None
    enabled_tools: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> McpServerDefinition:
        if not names.matches(names.SERVER_NAME, self.name):
            raise ValueError(
                f"name {self.name!r} must match {names.SERVER_NAME.pattern} "
                "(it is used as a file name)"
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
