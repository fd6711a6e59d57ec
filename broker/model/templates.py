"""Templates (Agent, Workflow) and instances (AgentInstance, WorkflowInstance)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from broker.model.base import (
    RESOURCE_KINDS,
    ApiResourceReference,
    EnvironmentRef,
    ProtoModel,
    Resource,
)
from broker.model.declarations import Declarations, McpServerUsage
from broker.model.environment import EnvironmentSpec
from broker.model.mcp import McpServers


def _skill_refs(refs: list[ApiResourceReference]) -> list[ApiResourceReference]:
    for index, ref in enumerate(refs):
        if ref.kind != RESOURCE_KINDS["skill"]:
            raise ValueError(f"skill_refs[{index}].kind must be 43 (skill), got {ref.kind}")
    return refs


SkillRefs = Annotated[list[ApiResourceReference], AfterValidator(_skill_refs)]


_MIXED = (
    "uses both declaration models ({old}; {new}): use spec.env and mcp_server_usages, "
    "or the deprecated spec.env_spec and inline mcp_servers, not both"
)


class McpToolSelection(ProtoModel):
    enabled_tools: list[str] = Field(default_factory=list)


class SubAgent(ProtoModel):
    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    instructions: Annotated[str, Field(min_length=10)]
    mcp_servers: list[str] = Field(default_factory=list)
    mcp_tool_selections: dict[str, McpToolSelection] = Field(default_factory=dict)
    skill_refs: SkillRefs = Field(default_factory=list)


class AgentSpec(ProtoModel):
    description: str = ""
    icon_url: str = ""
    instructions: Annotated[str, Field(min_length=10)]
    mcp_servers: McpServers = Field(default_factory=list)
    skill_refs: SkillRefs = Field(default_factory=list)
    sub_agents: list[SubAgent] = Field(default_factory=list)
    env_spec: EnvironmentSpec = Field(default_factory=EnvironmentSpec)
    env: Declarations = Field(default_factory=dict)  # the newer model (§8)
    mcp_server_usages: list[McpServerUsage] = Field(default_factory=list)

    @property
    def declares(self) -> bool:
        """Does this template use the newer declaration model?"""
        return bool(self.env or self.mcp_server_usages)

    @model_validator(mode="after")
    def _one_model(self) -> AgentSpec:
        old = [f for f, v in (("env_spec", self.env_spec.data), ("mcp_servers", self.mcp_servers))
               if v]  # fmt: skip
        new = [f for f, v in (("env", self.env), ("mcp_server_usages", self.mcp_server_usages))
               if v]  # fmt: skip
        if old and new:
            raise ValueError(_MIXED.format(old=", ".join(old), new=", ".join(new)))
        return self

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


class Agent(Resource):
    kind: Literal["Agent"]
    spec: AgentSpec
    owner_scopes: ClassVar[tuple[int, ...] | None] = (1, 2)


class WorkflowSpec(ProtoModel):
    description: str = ""
    document: dict[str, Any]
    tasks: Annotated[list[dict[str, Any]], Field(min_length=1)]
    env_spec: EnvironmentSpec = Field(default_factory=EnvironmentSpec)
    env: Declarations = Field(default_factory=dict)  # the newer model (§8)

    @property
    def declares(self) -> bool:
        return bool(self.env)

    @model_validator(mode="after")
    def _one_model(self) -> WorkflowSpec:
        if self.env_spec.data and self.env:
            raise ValueError(_MIXED.format(old="env_spec", new="env"))
        return self


class Workflow(Resource):
    kind: Literal["Workflow"]
    spec: WorkflowSpec


# --- Instances --------------------------------------------------------------------------------


class AgentInstanceSpec(ProtoModel):
    agent_id: Annotated[str, Field(min_length=1)]
    description: str = ""
    environment_refs: list[EnvironmentRef] = Field(default_factory=list)


class AgentInstance(Resource):
    kind: Literal["AgentInstance"]
    spec: AgentInstanceSpec

    @property
    def environment_refs(self) -> list[EnvironmentRef]:
        return self.spec.environment_refs


class WorkflowInstanceSpec(ProtoModel):
    workflow_id: Annotated[str, Field(min_length=1)]
    description: str = ""
    env_refs: list[EnvironmentRef] = Field(default_factory=list)


class WorkflowInstance(Resource):
    kind: Literal["WorkflowInstance"]
    spec: WorkflowInstanceSpec

    @property
    def environment_refs(self) -> list[EnvironmentRef]:
        return self.spec.env_refs
