"""Stigmer resources as pydantic models, with the validation the broker relies on.

Shape: ``api_version`` / ``kind`` / ``metadata`` / ``spec`` as in Stigmer's protos
(``agentic.stigmer.ai/v1``). Field names are the proto names; lowerCamelCase is accepted too,
as protobuf JSON does. Enums accept their number or their name. Unknown fields are refused,
so a typo or a documented-but-wrong shape (``{id: ...}`` in a reference) gets a clear error.
Values never show up in ``repr()`` or in validation errors (``hide_input_in_errors``).

``base`` (shared pieces) → ``environment``, ``mcp``, ``templates``, ``executions`` (the
resources) → ``documents`` (files and documents in, errors as lines out).
"""

from broker.model.base import (
    API_VERSION,
    MAX_VALUE_BYTES,
    RESOURCE_KINDS,
    ApiResourceReference,
    EnvironmentRef,
    Metadata,
    ProtoModel,
    Resource,
)
from broker.model.declarations import (
    EnvVarDeclaration,
    McpServer,
    McpServerSpec,
    McpServerUsage,
)
from broker.model.documents import (
    RESOURCE_TYPES,
    format_errors,
    load_documents,
    load_resource,
    parse_resource,
    to_document,
)
from broker.model.environment import Environment, EnvironmentSpec, EnvironmentValue
from broker.model.executions import (
    AgentExecution,
    AgentExecutionSpec,
    ExecutionContext,
    ExecutionContextSpec,
    ExecutionValue,
    WorkflowExecution,
    WorkflowExecutionSpec,
)
from broker.model.mcp import (
    DockerServer,
    HttpServer,
    McpServerDefinition,
    PortMapping,
    StdioServer,
    VolumeMount,
)
from broker.model.templates import (
    Agent,
    AgentInstance,
    AgentSpec,
    SubAgent,
    Workflow,
    WorkflowInstance,
    WorkflowSpec,
)

__all__ = [
    "API_VERSION",
    "MAX_VALUE_BYTES",
    "RESOURCE_KINDS",
    "RESOURCE_TYPES",
    "Agent",
    "AgentExecution",
    "AgentExecutionSpec",
    "AgentInstance",
    "AgentSpec",
    "ApiResourceReference",
    "DockerServer",
    "EnvVarDeclaration",
    "Environment",
    "EnvironmentRef",
    "EnvironmentSpec",
    "EnvironmentValue",
    "ExecutionContext",
    "ExecutionContextSpec",
    "ExecutionValue",
    "HttpServer",
    "McpServer",
    "McpServerDefinition",
    "McpServerSpec",
    "McpServerUsage",
    "Metadata",
    "PortMapping",
    "ProtoModel",
    "Resource",
    "StdioServer",
    "SubAgent",
    "VolumeMount",
    "Workflow",
    "WorkflowExecution",
    "WorkflowExecutionSpec",
    "WorkflowInstance",
    "WorkflowSpec",
    "format_errors",
    "load_documents",
    "load_resource",
    "parse_resource",
    "to_document",
]
