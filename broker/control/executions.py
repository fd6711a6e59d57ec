"""Execution create = resolve + issue: merge on ciphertext, check placeholders, write the context.

Everything that can be refused is checked before the first write, so invalid input leaves
nothing in Vault. The context's metadata goes first — ``delete_version_after`` (the TTL),
``max_versions`` 1 and custom metadata with the tenant and ``expires_at`` — so KV's own expiry
applies from the first version, then the context itself with check-and-set 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any

from broker import names, tasks
from broker.config import Layout
from broker.control import declared
from broker.control.environments import MASK, EnvironmentStore, is_ciphertext
from broker.control.orgs import org_problems
from broker.errors import Conflict, ContextNotFound, NotFound, ValidationError
from broker.model import (
    API_VERSION,
    Agent,
    AgentExecution,
    AgentInstance,
    EnvironmentSpec,
    ExecutionContext,
    McpServer,
    Resource,
    Workflow,
    WorkflowExecution,
    WorkflowInstance,
    parse_resource,
    to_document,
)
from broker.records import field, record
from broker.resolve import (
    Entry,
    Layer,
    Variable,
    environment_names,
    mask,
    merge,
    resolve_servers,
)
from broker.vault import KV, Transit, VaultClient

MAX_TTL = timedelta(days=7)


@record(frozen=True)
class RuntimeValue:
    """One runtime_env entry as given on the command line or in an AgentExecution."""

    value: str = field(repr=False)
    is_secret: bool = False


@record(frozen=True)
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


@record(frozen=True)
class ListedExecution:
    id: str
    expires_at: str
    live: bool  # False: KV already deleted its version (expired); the reaper destroys it
    claimed_by: dict[str, str] | None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "expires_at": self.expires_at, "live": self.live,
                "claimed_by": self.claimed_by}  # fmt: skip


def runtime_env(
    from_execution: Mapping[str, RuntimeValue], overrides: Mapping[str, RuntimeValue]
) -> dict[str, RuntimeValue]:
    """An execution resource's runtime_env with ``overrides`` (flags) on top; secret-ness is
    sticky, so an override of a secret stays secret."""
    merged = dict(from_execution)
    for key, value in overrides.items():
        earlier = merged.get(key)
        secret = value.is_secret or (earlier is not None and earlier.is_secret)
        merged[key] = RuntimeValue(value.value, secret)
    return merged


@record(frozen=True)
class _Ref:
    where: str
    name: str
    version: int | None = None  # None: the current one
    org: str = ""


def _version(where: str, text: str) -> int | None:
    """A reference's ``version``: '' or 'latest' is the current one, a number a stored one."""
    if text in ("", "latest"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValidationError("execution", [
            f"{where}.version: {text!r} is not a stored version (Environments are versioned "
            "1, 2, 3, … by KV v2; or 'latest')"])  # fmt: skip
    return int(text)


def _refs(
    instance: AgentInstance | WorkflowInstance | None, environments: Sequence[str]
) -> list[_Ref]:
    """The Environments in layering order: the instance's refs, then extra names."""
    ref_field = (
        "spec.env_refs" if isinstance(instance, WorkflowInstance) else "spec.environment_refs"
    )
    refs = [
        _Ref(f"{ref_field}[{i}]", ref.slug, _version(f"{ref_field}[{i}]", ref.version), ref.org)
        for i, ref in enumerate(instance.environment_refs if instance else [])
    ]
    return refs + [_Ref(f"--environment {n}", names.environment_name(n)) for n in environments]


def _ids(
    template: Agent | Workflow,
    instance: AgentInstance | WorkflowInstance | None,
    execution: AgentExecution | WorkflowExecution | None,
) -> list[str]:
    """Where the execution names its template (or instance) by id, the ids must agree."""
    problems = []
    template_ids = {i for i in (template.metadata.id, template.metadata.slug,
                                template.metadata.name) if i}  # fmt: skip
    if isinstance(execution, AgentExecution):
        named, field_name = execution.spec.agent_id, "agent_id"
    elif isinstance(execution, WorkflowExecution):
        named, field_name = execution.spec.workflow_id, "workflow_id"
    else:
        named, field_name = "", ""
    if named and template.metadata.id and named not in template_ids:
        problems.append(f"execution spec.{field_name}: {named!r} is not {template.kind} "
                        f"{template.metadata.id!r}")  # fmt: skip
    if isinstance(execution, WorkflowExecution) and instance is not None:
        bound = execution.spec.workflow_instance_id
        if bound and instance.metadata.id and bound != instance.metadata.id:
            problems.append(f"execution spec.workflow_instance_id: {bound!r} is not "
                            f"{instance.kind} {instance.metadata.id!r}")  # fmt: skip
    return problems


def _orgs(
    tenant: str,
    resources: Sequence[tuple[str, Resource | None]],
    refs: Sequence[_Ref],
) -> list[str]:
    found = [(f"{where} metadata.org", r.metadata.org) for where, r in resources if r is not None]
    found += [(f"{ref.where}.org", ref.org) for ref in refs]
    return org_problems(tenant, found)


def _runtime(runtime_env: Mapping[str, RuntimeValue] | None) -> Layer:
    entries = {n: Entry(v.value, v.is_secret, False) for n, v in (runtime_env or {}).items()}
    for name, entry in entries.items():
        if not entry.value:
            raise ValidationError("runtime_env", [f"{name}: value must not be empty"])
    return Layer("runtime_env", entries)


def _expiry(ttl: timedelta) -> datetime:
    """Now + ttl, shown to the second and rounded up: never shorter than asked."""
    exact = datetime.now(UTC) + ttl
    return exact.replace(microsecond=0) + timedelta(seconds=1 if exact.microsecond else 0)


def _context(
    execution_id: str,
    tenant: str,
    template: str,
    merged: Mapping[str, Variable],
    servers: Sequence[dict[str, Any]],
    expires_at: datetime,
    allow_secret_in_args: bool,
    allowed_env_names: Sequence[str],
    recorded_tasks: Sequence[dict[str, Any]] = (),
    broker_placeholders: bool = False,
) -> ExecutionContext:
    return parse_resource(
        {
            "api_version": API_VERSION,
            "kind": "ExecutionContext",
            "metadata": {"name": execution_id, "labels": {"stigmer.ai/tenant": tenant}},
            "spec": {
                "execution_id": execution_id,
                "tenant": tenant,
                "template": template,
                "data": {
                    n: {"value": v.value, "is_secret": v.is_secret} for n, v in merged.items()
                },
                "mcp_servers": list(servers),
                "expires_at": expires_at.isoformat(),
                "allow_secret_in_args": allow_secret_in_args,
                "allowed_env_names": list(allowed_env_names),
                "tasks": list(recorded_tasks),
                "broker_placeholders": broker_placeholders,
            },
        },
        ExecutionContext,
        stored=True,  # secret values are already ciphertext
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

    async def _environment_layers(self, tenant: str, refs: Sequence[_Ref]) -> list[Layer]:
        layers, problems = [], []
        for ref in refs:
            name = ref.name
            try:
                environment, _ = await self._environments.read(tenant, name, ref.version)
            except ValidationError as exc:
                problems.append(f"{ref.where}: Environment {name!r} {'; '.join(exc.problems)}")
                continue
            entries = {
                key: Entry(e.value, e.is_secret, e.is_secret and is_ciphertext(e.value))
                for key, e in environment.spec.data.items()
            }
            layers.append(Layer(f"environment {name}", entries))
        if problems:
            raise ValidationError("execution", problems)
        return layers

    async def _seal(self, tenant: str, merged: dict[str, Variable]) -> dict[str, Variable]:
        """Encrypt every secret whose value is still plaintext, in one batch."""
        plain = [n for n, v in merged.items() if v.is_secret and not v.sealed]
        if not plain:
            return merged
        ciphertexts = await self._transit.encrypt(
            self._layout.transit_key(tenant), [merged[n].value for n in plain]
        )
        sealed = dict(merged)
        for name, ciphertext in zip(plain, ciphertexts, strict=True):
            sealed[name] = Variable(ciphertext, True, True, merged[name].source)
        return sealed

    async def create(
        self,
        tenant: str,
        template: Agent | Workflow,
        instance: AgentInstance | WorkflowInstance | None = None,
        environments: Sequence[str] = (),
        runtime_env: Mapping[str, RuntimeValue] | None = None,
        ttl: timedelta = timedelta(hours=1),
        execution_id: str | None = None,
        allow_secret_in_args: bool = False,
        allowed_env_names: Sequence[str] = (),
        execution: AgentExecution | WorkflowExecution | None = None,
        mcp_servers: Sequence[McpServer] = (),
    ) -> IssuedContext:
        """Resolve the execution's environment and write its context; refuse before writing.

        Variable names that change how the runner's programs start (``names.refused_variable``)
        are refused unless listed in ``allowed_env_names``; the allowance is recorded.
        ``mcp_servers``: the McpServer resources a template of the newer model uses
        (``spec.mcp_server_usages``, by slug).
        """
        names.tenant(tenant)
        execution_id = (
            names.execution_id(execution_id) if execution_id else names.new_execution_id()
        )
        _check_ttl(ttl)
        _check_pairing(template, instance)
        refs = _refs(instance, environments)
        resources = [("template", template), ("instance", instance), ("execution", execution),
                     *((f"McpServer {s.slug}", s) for s in mcp_servers)]  # fmt: skip
        problems = _ids(template, instance, execution) + _orgs(tenant, resources, refs)
        if isinstance(template, Agent):
            problems += org_problems(tenant, [
                (f"spec.mcp_server_usages[{i}].mcp_server_ref.org", u.mcp_server_ref.org)
                for i, u in enumerate(template.spec.mcp_server_usages)])  # fmt: skip
        if problems:
            raise ValidationError("execution", problems)
        layers = [*await self._environment_layers(tenant, refs), _runtime(runtime_env)]
        if declared.uses_declarations(template):
            used = declared.used_servers(template, mcp_servers)
            env, optional, keys = declared.template_layer(template, [s for _, s, _ in used])
            merged = declared.whitelist(merge(env, layers, optional), keys)
            configs = declared.server_configs(used, merged)
        else:
            merged = merge(_template_layer(template.spec.env_spec), layers)
            servers = template.spec.mcp_servers if isinstance(template, Agent) else []
            configs = [s.model_dump(mode="json") for s in servers]
        resolve_servers(configs, merged, allow_secret_in_args)  # fail closed before any write
        recorded, broker = [], False
        if isinstance(template, Workflow):
            broker = tasks.opted_in(template.spec.document)
            tasks.check(template.spec.tasks, merged, broker)
            recorded = tasks.holding(template.spec.tasks, broker)
        allowed = sorted(set(allowed_env_names))
        refused = names.refused_variables(environment_names(merged, configs), set(allowed))
        if refused:
            raise ValidationError("execution", refused)
        merged = await self._seal(tenant, merged)
        expires_at = _expiry(ttl)
        label = f"{template.kind}/{template.metadata.display}"
        context = _context(execution_id, tenant, label, merged, configs, expires_at,
                           allow_secret_in_args, allowed, recorded, broker)  # fmt: skip
        path = self._layout.context_path(tenant, execution_id)
        await self._write(path, context, ttl)
        return IssuedContext(
            execution_id=execution_id,
            tenant=tenant,
            context_path=f"{self._layout.kv_mount}/data/{path}",
            expires_at=expires_at,
            variables=mask(merged),
        )

    async def import_context(
        self,
        tenant: str,
        imported: ExecutionContext,
        ttl: timedelta = timedelta(hours=1),
        allow_secret_in_args: bool = False,
        allowed_env_names: Sequence[str] = (),
    ) -> IssuedContext:
        """Issue an ExecutionContext produced elsewhere (Stigmer's backend: plaintext values
        with ``is_secret`` flags) with the checks of :meth:`create`: its secrets are encrypted
        here, nothing is written if anything is refused."""
        names.tenant(tenant)
        spec = imported.spec
        execution_id = names.execution_id(spec.execution_id)
        _check_ttl(ttl)
        problems = org_problems(tenant, [("metadata.org", imported.metadata.org)])
        if spec.tenant and spec.tenant != tenant:
            problems.append(f"spec.tenant: {spec.tenant!r} is not --tenant {tenant}")
        merged = {n: Variable(v.value, v.is_secret, False, "import") for n, v in spec.data.items()}
        configs = [s.model_dump(mode="json") for s in spec.mcp_servers]
        allowed = sorted(set(allowed_env_names) | set(spec.allowed_env_names))
        problems += names.refused_variables(environment_names(merged, configs), set(allowed))
        if problems:
            raise ValidationError("execution import", problems)
        allow_args = allow_secret_in_args or spec.allow_secret_in_args
        resolve_servers(configs, merged, allow_args)  # fail closed before any write
        recorded = [{"name": t.name, "config": t.config} for t in spec.tasks]
        tasks.check([{t["name"]: t["config"]} for t in recorded], merged, spec.broker_placeholders)
        merged = await self._seal(tenant, merged)
        expires_at = _expiry(ttl)
        context = _context(execution_id, tenant, spec.template or "imported", merged, configs,
                           expires_at, allow_args, allowed, recorded,
                           spec.broker_placeholders)  # fmt: skip
        path = self._layout.context_path(tenant, execution_id)
        await self._write(path, context, ttl)
        return IssuedContext(execution_id=execution_id, tenant=tenant,
                             context_path=f"{self._layout.kv_mount}/data/{path}",
                             expires_at=expires_at, variables=mask(merged))  # fmt: skip

    async def _write(self, path: str, context: ExecutionContext, ttl: timedelta) -> None:
        """Metadata first (so KV's expiry applies from version 1), then the context (cas 0)."""
        try:
            existing = (await self._kv.read_metadata(path)).current_version
        except NotFound:
            existing = 0
        spec = context.spec
        if existing:
            raise ValidationError(
                f"execution {spec.execution_id}", ["an execution with this id already exists"]
            )
        assert spec.expires_at is not None
        metadata: dict[str, Any] = {
            "max_versions": 1,
            "delete_version_after": f"{math.ceil(ttl.total_seconds()) + 1}s",
            "custom": {
                "tenant": spec.tenant,
                "execution_id": spec.execution_id,
                "expires_at": spec.expires_at.isoformat().replace("+00:00", "Z"),
            },
        }
        await self._kv.write_metadata(path, **metadata)
        try:
            await self._kv.write_resource(path, context.model_dump(mode="json"), cas=0)
        except Conflict:
            raise ValidationError(
                f"execution {spec.execution_id}", ["an execution with this id already exists"]
            ) from None
        await self._kv.write_metadata(path, **metadata)  # ours, should a racing create win

    async def show(self, tenant: str, execution_id: str) -> dict[str, Any]:
        """The context with secret values masked."""
        path = self._layout.context_path(tenant, execution_id)
        try:
            document, _ = await self._kv.read_resource(path)
        except NotFound:
            raise ContextNotFound(execution_id, tenant) from None
        shown = to_document(parse_resource(document, ExecutionContext, stored=True))
        for entry in shown["spec"].get("data", {}).values():
            if entry.get("is_secret"):
                entry["value"] = MASK
        return shown

    async def list(self, tenant: str) -> list[ListedExecution]:
        """Every live context of ``tenant`` with its expiry and holder: metadata only."""
        listed = []
        for name in await self._kv.list(self._layout.contexts_dir(tenant)):
            if name.endswith("/"):
                continue
            try:
                metadata = await self._kv.read_metadata(self._layout.context_path(tenant, name))
            except NotFound:
                continue
            holder = None
            with suppress(NotFound):
                claim = await self._kv.read_metadata(self._layout.claim_path(tenant, name))
                holder = {k: claim.custom.get(k, "") for k in ("pod", "mode", "claimed_at")}
            expires = metadata.custom.get("expires_at", "")
            listed.append(ListedExecution(name, expires, metadata.current_version > 0, holder))
        return listed

    async def end(self, tenant: str, execution_id: str) -> None:
        """Destroy the context (every version and its metadata)."""
        await self.show(tenant, execution_id)
        await self._kv.destroy(self._layout.context_path(tenant, execution_id))
