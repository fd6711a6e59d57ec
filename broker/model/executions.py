"""Executions (AgentExecution, WorkflowExecution) and the ExecutionContext the broker issues."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from broker.model.base import ProtoModel, Resource, Value, VariableName
from broker.model.mcp import McpServers


class ExecutionValue(ProtoModel):
    value: Annotated[Value, Field(min_length=1, repr=False)]
    is_secret: bool = False


class ExecutionConfig(ProtoModel):
    model_name: str = ""


class AgentExecutionSpec(ProtoModel):
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


class AgentExecution(Resource):
    kind: Literal["AgentExecution"]
    spec: AgentExecutionSpec
    owner_scopes: ClassVar[tuple[int, ...] | None] = (0,)


class WorkflowExecutionSpec(ProtoModel):
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


class WorkflowExecution(Resource):
    kind: Literal["WorkflowExecution"]
    spec: WorkflowExecutionSpec
    owner_scopes: ClassVar[tuple[int, ...] | None] = (0,)


class RecordedTask(ProtoModel):
    """A workflow task whose config holds runtime placeholders, as the context keeps it."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    config: Any = None


class ExecutionContextSpec(ProtoModel):
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
    allowed_env_names: list[VariableName] = Field(default_factory=list)
    template: str = ""
    tasks: list[RecordedTask] = Field(default_factory=list)  # workflow tasks with placeholders
    broker_placeholders: bool = False  # the workflow lets ${NAME} resolve in its tasks


class ExecutionContext(Resource):
    kind: Literal["ExecutionContext"]
    spec: ExecutionContextSpec
    owner_scopes: ClassVar[tuple[int, ...] | None] = (0,)
