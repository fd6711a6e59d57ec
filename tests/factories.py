"""Builders for Stigmer resources and issued executions, shared by the test modules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from broker.config import Layout
from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer, RuntimeValue
from broker.model import Agent, AgentInstance, Environment, Workflow, parse_resource
from broker.vault import KV, VaultClient

API_VERSION = "agentic.stigmer.ai/v1"


def resource(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"api_version": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def environment(name: str, **data: tuple[str, bool]) -> Environment:
    values = {k: {"value": v, "is_secret": s} for k, (v, s) in data.items()}
    return parse_resource(resource("Environment", name, {"data": values}), Environment)


def agent(
    env_spec: dict[str, Any] | None = None, servers: list[dict[str, Any]] | None = None
) -> Agent:
    spec = {
        "instructions": "Review pull requests.",
        "env_spec": {"data": env_spec or {}},
        "mcp_servers": servers or [],
    }
    return parse_resource(resource("Agent", "reviewer", spec), Agent)


def workflow(env_spec: dict[str, Any] | None = None) -> Workflow:
    spec = {
        "document": {"dsl": "1.0.0"},
        "tasks": [{"call": {}}],
        "env_spec": {"data": env_spec or {}},
    }
    return parse_resource(resource("Workflow", "w", spec), Workflow)


def instance(*refs: str) -> AgentInstance:
    spec = {"agent_id": "reviewer", "environment_refs": [{"kind": 53, "slug": r} for r in refs]}
    return parse_resource(resource("AgentInstance", "inst", spec), AgentInstance)


HTTP_SERVER = {
    "name": "api",
    "http": {"url": "https://x.example", "headers": {"A": "Bearer ${TOKEN_0}"}},
}


async def issue_secrets(
    admin: VaultClient,
    layout: Layout,
    tenant: str,
    execution_id: str,
    values: dict[str, tuple[str, bool]],
    ttl: timedelta = timedelta(minutes=5),
    servers: list[dict[str, Any]] | None = None,
    runtime: dict[str, RuntimeValue] | None = None,
) -> None:
    """An Environment with ``values`` and an execution of an agent bound to it."""
    await EnvironmentStore(admin, layout).apply(
        tenant, environment(f"env-{execution_id}", **values)
    )
    await ExecutionIssuer(admin, layout).create(
        tenant,
        agent(servers=servers or []),
        instance(f"env-{execution_id}"),
        runtime_env=runtime or {},
        ttl=ttl,
        execution_id=execution_id,
    )


async def write_context(
    admin: VaultClient, vault: Any, tenant: str, execution_id: str, **spec: Any
) -> None:
    expires = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    """A context written straight to KV, as a broken or hostile control plane could."""
    document = {
        "api_version": "agentic.stigmer.ai/v1", "kind": "ExecutionContext",
        "metadata": {"name": execution_id},
        "spec": {"execution_id": execution_id, "tenant": tenant, "data": {}, "mcp_servers": [],
                 "expires_at": expires, **spec},
    }  # fmt: skip
    path = vault.layout.context_path(tenant, execution_id)
    await KV(admin, vault.layout.kv_mount).write_resource(path, document)
