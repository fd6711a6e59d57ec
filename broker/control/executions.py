"""Execution create = resolve + issue: merge on ciphertext, check placeholders, write the context.

Everything that can be refused is checked before the first write, so invalid input leaves
nothing in Vault. The only writes are the context (check-and-set 0) and its metadata
(``delete_version_after``); if the second fails the first is destroyed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from broker import ids
from broker.config import Layout
from broker.control.environments import MASK, EnvironmentStore, is_ciphertext
from broker.errors import BrokerError, Conflict, ValidationError
from broker.model import (
    API_VERSION,
    Agent,
    AgentInstance,
    EnvironmentSpec,
    ExecutionContext,
    Workflow,
    WorkflowInstance,
    parse_resource,
    to_document,
)
from broker.resolve import Entry, Layer, Variable, mask, merge, resolve_servers
from broker.store import read_context
from broker.vault import KV, Transit, VaultClient

MAX_TTL = timedelta(days=7)


@dataclass(frozen=True)
class RuntimeValue:
    """One runtime_env entry as given on the command line or in an AgentExecution."""

    value: str = field(repr=False)
    is_secret: bool = False


@dataclass(frozen=True)
class IssuedContext:
    execution_id: str
    tenant: str
    context_path: str
    expires_at: datetime
    variables: dict[str, dict[str, bool]]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.execution_id,
            "tenant": self.tenant,
            "context_path": self.context_path,
            "expires_at": self.expires_at.isoformat().replace("+00:00", "Z"),
            "variables": self.variables,
        }


def _template_layer(spec: EnvironmentSpec) -> Layer:
    return Layer("env_spec", {n: Entry(e.value, e.is_secret, False) for n, e in spec.data.items()})


def _check_pairing(
    template: Agent | Workflow, instance: AgentInstance | WorkflowInstance | None
) -> None:
    if instance is None:
        return
    expected = AgentInstance if isinstance(template, Agent) else WorkflowInstance
    if not isinstance(instance, expected):
        raise ValidationError(
            f"{instance.kind} {instance.metadata.display}",
            [f"kind: a {template.kind} needs a {expected.__name__} (--instance)"],
        )
    bound = (
        instance.spec.agent_id if isinstance(instance, AgentInstance) else instance.spec.workflow_id
    )
    template_ids = {template.metadata.id, template.metadata.slug, template.metadata.name}
    if template.metadata.id and bound not in template_ids:
        field_name = "agent_id" if isinstance(instance, AgentInstance) else "workflow_id"
        raise ValidationError(
            f"{instance.kind} {instance.metadata.display}",
            [f"spec.{field_name}: {bound!r} does not name {template.kind} {template.metadata.id}"],
        )


def _check_ttl(ttl: timedelta) -> None:
    if ttl <= timedelta(0) or ttl > MAX_TTL:
        raise ValidationError("execution", [f"ttl: must be more than 0s and at most {MAX_TTL}"])


class ExecutionIssuer:
    """Resolves an execution's environment and issues its ExecutionContext."""

    def __init__(self, client: VaultClient, layout: Layout) -> None:
        self._layout = layout
        self._client = client
        self._kv = KV(client, layout.kv_mount)
        self._transit = Transit(client, layout.transit_mount)
        self._environments = EnvironmentStore(client, layout)

    def _environment_layers(self, tenant: str, refs: Sequence[tuple[str, str]]) -> list[Layer]:
        layers, problems = [], []
        for where, name in refs:
            try:
                environment = self._environments.get(tenant, name)
            except ValidationError as exc:
                problems.append(f"{where}: Environment {name!r} {'; '.join(exc.problems)}")
                continue
            entries = {
                key: Entry(e.value, e.is_secret, e.is_secret and is_ciphertext(e.value))
                for key, e in environment.spec.data.items()
            }
            layers.append(Layer(f"environment {name}", entries))
        if problems:
            raise ValidationError("execution", problems)
        return layers

    def _seal(self, tenant: str, merged: dict[str, Variable]) -> dict[str, Variable]:
        """Encrypt every secret whose value is still plaintext, in one batch."""
        names = [n for n, v in merged.items() if v.is_secret and not v.sealed]
        if not names:
            return merged
        ciphertexts = self._transit.encrypt(
            self._layout.transit_key(tenant), [merged[n].value for n in names]
        )
        sealed = dict(merged)
        for name, ciphertext in zip(names, ciphertexts, strict=True):
            sealed[name] = Variable(ciphertext, True, True, merged[name].source)
        return sealed

    def create(
        self,
        tenant: str,
        template: Agent | Workflow,
        instance: AgentInstance | WorkflowInstance | None = None,
        environments: Sequence[str] = (),
        runtime_env: Mapping[str, RuntimeValue] | None = None,
        ttl: timedelta = timedelta(hours=1),
        execution_id: str | None = None,
        allow_secret_in_args: bool = False,
    ) -> IssuedContext:
        ids.tenant(tenant)
        execution_id = ids.execution_id(execution_id) if execution_id else ids.new_execution_id()
        _check_ttl(ttl)
        _check_pairing(template, instance)
        ref_field = (
            "spec.env_refs" if isinstance(instance, WorkflowInstance) else "spec.environment_refs"
        )
        refs = [
            (f"{ref_field}[{i}]", ref.slug)
            for i, ref in enumerate(instance.environment_refs if instance else [])
        ]
        refs += [(f"--environment {name}", ids.environment_name(name)) for name in environments]

        runtime = Layer(
            "runtime_env",
            {n: Entry(v.value, v.is_secret, False) for n, v in (runtime_env or {}).items()},
        )
        for name, entry in runtime.entries.items():
            if not entry.value:
                raise ValidationError("runtime_env", [f"{name}: value must not be empty"])
        layers = [*self._environment_layers(tenant, refs), runtime]
        merged = merge(_template_layer(template.spec.env_spec), layers)
        servers = template.spec.mcp_servers if isinstance(template, Agent) else []
        resolve_servers(servers, merged, allow_secret_in_args)  # fail closed before any write

        merged = self._seal(tenant, merged)
        exact = datetime.now(UTC) + ttl  # shown to the second, rounded up: never shorter
        expires_at = exact.replace(microsecond=0) + (
            timedelta(seconds=1) if exact.microsecond else timedelta(0)
        )
        context = parse_resource(
            {
                "api_version": API_VERSION,
                "kind": "ExecutionContext",
                "metadata": {"name": execution_id, "labels": {"stigmer.ai/tenant": tenant}},
                "spec": {
                    "execution_id": execution_id,
                    "tenant": tenant,
                    "template": f"{template.kind}/{template.metadata.display}",
                    "data": {
                        n: {"value": v.value, "is_secret": v.is_secret} for n, v in merged.items()
                    },
                    "mcp_servers": [s.model_dump(mode="json") for s in servers],
                    "expires_at": expires_at.isoformat(),
                    "allow_secret_in_args": allow_secret_in_args,
                },
            },
            ExecutionContext,
        )
        path = self._layout.context_path(tenant, execution_id)
        try:
            self._kv.write_resource(path, context.model_dump(mode="json"), cas=0)
        except Conflict:
            raise ValidationError(
                f"execution {execution_id}", ["an execution with this id already exists"]
            ) from None
        try:
            self._kv.write_metadata(
                path, delete_version_after=f"{math.ceil(ttl.total_seconds()) + 1}s", max_versions=1
            )
        except BrokerError:
            self._kv.destroy(path)
            raise
        return IssuedContext(
            execution_id=execution_id,
            tenant=tenant,
            context_path=f"{self._layout.kv_mount}/data/{path}",
            expires_at=expires_at,
            variables=mask(merged),
        )

    def show(self, tenant: str, execution_id: str) -> dict[str, Any]:
        """The context with secret values masked."""
        context = read_context(self._client, self._layout, tenant, execution_id)
        shown = to_document(context)
        for entry in shown["spec"].get("data", {}).values():
            if entry.get("is_secret"):
                entry["value"] = MASK
        return shown

    def end(self, tenant: str, execution_id: str) -> None:
        """Destroy the context (every version and its metadata)."""
        self.show(tenant, execution_id)
        self._kv.destroy(self._layout.context_path(tenant, execution_id))
