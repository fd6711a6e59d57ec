"""Commands for the control plane: ``env apply|create|get|list|delete`` and
``execution create|show|end``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from broker.cli.common import (
    Group,
    add_output,
    add_tenant,
    add_value_flags,
    collect_values,
    command,
    emit,
    parse_duration,
    vault,
)

if TYPE_CHECKING:
    from broker.control.executions import RuntimeValue
    from broker.model import (
        Agent,
        AgentExecution,
        AgentInstance,
        McpServer,
        Workflow,
        WorkflowExecution,
        WorkflowInstance,
    )

# --- env ----------------------------------------------------------------------------------


async def env_apply(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.control.environments import EnvironmentStore
    from broker.errors import ValidationError
    from broker.model import Environment, load_documents, parse_resource

    names.tenant(args.tenant)
    environments = [parse_resource(d, Environment) for d in load_documents(Path(args.file))]
    if not environments:
        raise ValidationError(args.file, ["no resource in file"])
    applied = []
    async with vault() as client:
        store = EnvironmentStore(client, Layout.from_env())
        for environment in environments:
            applied.append({"name": environment.name,
                            "version": await store.apply(args.tenant, environment)})  # fmt: skip
    text = "\n".join(f"environment {a['name']} applied (version {a['version']})" for a in applied)
    emit({"applied": applied}, args.output, text)
    return 0


async def env_create(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.control.environments import EnvironmentStore
    from broker.model import API_VERSION, Environment, parse_resource

    names.tenant(args.tenant)
    names.environment_name(args.name)
    data = {k: {"value": v, "is_secret": s} for k, (v, s) in collect_values(args).items()}
    environment = parse_resource(
        {
            "api_version": API_VERSION,
            "kind": "Environment",
            "metadata": {"name": args.name},
            "spec": {"description": args.description or "", "data": data},
        },
        Environment,
    )
    async with vault() as client:
        version = await EnvironmentStore(client, Layout.from_env()).create(args.tenant, environment)
    emit({"name": args.name, "version": version}, args.output,
         f"environment {args.name} created (version {version})")  # fmt: skip
    return 0


async def env_get(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.control.environments import EnvironmentStore, masked

    async with vault() as client:
        store = EnvironmentStore(client, Layout.from_env())
        environment = await store.get(args.tenant, names.environment_name(args.name))
    emit(masked(environment), args.output)
    return 0


async def env_list(args: argparse.Namespace) -> int:
    from broker.config import Layout
    from broker.control.environments import EnvironmentStore

    async with vault() as client:
        found = await EnvironmentStore(client, Layout.from_env()).list(args.tenant)
    emit({"environments": found}, args.output, "\n".join(found) if found else None)
    return 0


async def env_delete(args: argparse.Namespace) -> int:
    from broker.config import Layout
    from broker.control.environments import EnvironmentStore

    async with vault() as client:
        await EnvironmentStore(client, Layout.from_env()).delete(args.tenant, args.name)
    emit({"name": args.name, "deleted": True}, args.output, f"environment {args.name} deleted")
    return 0


# --- execution --------------------------------------------------------------------------------


def _template(args: argparse.Namespace) -> Agent | Workflow:
    from broker.model import Agent, Workflow, load_resource

    if args.agent:
        return load_resource(Path(args.agent), Agent)
    return load_resource(Path(args.workflow), Workflow)


def _instance(args: argparse.Namespace) -> AgentInstance | WorkflowInstance | None:
    from broker.model import AgentInstance, WorkflowInstance, load_resource

    if not args.instance:
        return None
    return load_resource(Path(args.instance), (AgentInstance, WorkflowInstance))


def _execution(
    args: argparse.Namespace, template: Agent | Workflow
) -> AgentExecution | WorkflowExecution | None:
    """``--execution FILE``: an AgentExecution with ``--agent``, a WorkflowExecution with
    ``--workflow``."""
    from broker.model import Agent, AgentExecution, WorkflowExecution, load_resource

    if not args.execution:
        return None
    path = Path(args.execution)
    if isinstance(template, Agent):
        return load_resource(path, AgentExecution)
    return load_resource(path, WorkflowExecution)


def _mcp_servers(args: argparse.Namespace) -> list[McpServer]:
    from broker.model import McpServer, load_documents, parse_resource

    servers: list[McpServer] = []
    for file_name in args.mcp_server or []:
        servers += [parse_resource(d, McpServer) for d in load_documents(Path(file_name))]
    return servers


def _runtime_layer(
    args: argparse.Namespace, execution: AgentExecution | WorkflowExecution | None
) -> dict[str, RuntimeValue]:
    """The execution file's runtime_env, under the flags."""
    from broker.control.executions import RuntimeValue, runtime_env

    from_file: dict[str, RuntimeValue] = {}
    if execution is not None:
        from_file = {
            k: RuntimeValue(v.value, v.is_secret) for k, v in execution.spec.runtime_env.items()
        }
    flags = {k: RuntimeValue(v, s) for k, (v, s) in collect_values(args).items()}
    return runtime_env(from_file, flags)


async def execution_create(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.control.executions import ExecutionIssuer

    names.tenant(args.tenant)
    template = _template(args)
    instance = _instance(args)
    execution = _execution(args, template)
    runtime = _runtime_layer(args, execution)
    async with vault() as client:
        issued = await ExecutionIssuer(client, Layout.from_env()).create(
            args.tenant,
            template,
            instance,
            environments=args.environment or [],
            runtime_env=runtime,
            ttl=parse_duration(args.ttl),
            execution_id=args.id,
            allow_secret_in_args=args.allow_secret_in_args,
            allowed_env_names=args.allow_env_name or (),
            execution=execution,
            mcp_servers=_mcp_servers(args),
        )
    emit(issued.as_json(), args.output, issued.execution_id)
    return 0


async def execution_import(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.control.executions import ExecutionIssuer
    from broker.model import ExecutionContext, load_resource

    names.tenant(args.tenant)
    imported = load_resource(Path(args.file), ExecutionContext)  # read once, never copied
    async with vault() as client:
        issued = await ExecutionIssuer(client, Layout.from_env()).import_context(
            args.tenant,
            imported,
            ttl=parse_duration(args.ttl),
            allow_secret_in_args=args.allow_secret_in_args,
            allowed_env_names=args.allow_env_name or (),
        )
    emit(issued.as_json(), args.output, issued.execution_id)
    return 0


async def execution_show(args: argparse.Namespace) -> int:
    from broker.config import Layout
    from broker.control.executions import ExecutionIssuer

    async with vault() as client:
        shown = await ExecutionIssuer(client, Layout.from_env()).show(args.tenant, args.id)
    emit(shown, args.output)
    return 0


async def execution_list(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.control.executions import ExecutionIssuer

    async with vault() as client:
        listed = await ExecutionIssuer(client, Layout.from_env()).list(names.tenant(args.tenant))
    lines = []
    for item in listed:
        holder = item.claimed_by
        held = f"{holder['pod']} ({holder['mode']}) since {holder['claimed_at']}" if holder else "-"
        lines.append(
            f"{item.id}  {item.expires_at or '?'}  {'live' if item.live else 'expired'}  {held}"
        )
    emit({"executions": [i.as_json() for i in listed]}, args.output, "\n".join(lines) or None)
    return 0


async def execution_end(args: argparse.Namespace) -> int:
    from broker.config import Layout
    from broker.control.executions import ExecutionIssuer

    async with vault() as client:
        await ExecutionIssuer(client, Layout.from_env()).end(args.tenant, args.id)
    emit({"id": args.id, "context": "destroyed"}, args.output,
         f"execution {args.id} ended: context destroyed")  # fmt: skip
    return 0


# --- flags ------------------------------------------------------------------------------------


def _register_env(commands: Group) -> None:
    env = commands.add_parser("env", help="Environments").add_subparsers(
        dest="env_command", required=True, metavar="COMMAND")  # fmt: skip
    p = command(env, "apply", env_apply, "create or replace Environments from a YAML/JSON file",
                "stigmer-broker env apply -f environments.yaml --tenant acme")  # fmt: skip
    p.add_argument("-f", "--file", required=True)
    add_tenant(p)
    add_output(p)
    p = command(env, "create", env_create, "create an Environment from flags (never replaces)",
                "stigmer-broker env create prod --tenant acme --secret TOKEN")  # fmt: skip
    p.add_argument("name")
    add_tenant(p)
    add_value_flags(p)
    p.add_argument("--description")
    add_output(p)
    p = command(env, "get", env_get, "show an Environment (secrets masked)",
                "stigmer-broker env get prod --tenant acme -o json")  # fmt: skip
    p.add_argument("name")
    add_tenant(p)
    add_output(p, ("yaml", "json"))
    p = command(env, "list", env_list, "list a tenant's Environments",
                "stigmer-broker env list --tenant acme")  # fmt: skip
    add_tenant(p)
    add_output(p)
    p = command(env, "delete", env_delete, "delete an Environment (every version)",
                "stigmer-broker env delete prod --tenant acme")  # fmt: skip
    p.add_argument("name")
    add_tenant(p)
    add_output(p)


def _add_allowances(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-secret-in-args",
        action="store_true",
        help="let secrets reach argv and URLs (recorded in the context)",
    )
    p.add_argument(
        "--allow-env-name",
        action="append",
        metavar="NAME",
        help="let a refused variable name (PATH, LD_*, …) through for this execution",
    )


def _register_execution(commands: Group) -> None:
    execution = commands.add_parser("execution", help="executions").add_subparsers(
        dest="execution_command", required=True, metavar="COMMAND")  # fmt: skip
    p = command(execution, "create", execution_create,
                "resolve an execution and issue its context (prints its id)",
                "stigmer-broker execution create --tenant acme --agent agent.yaml "
                "--instance instance.yaml --runtime-env MODE=fast --secret TOKEN")  # fmt: skip
    add_tenant(p)
    template = p.add_mutually_exclusive_group(required=True)
    template.add_argument("--agent", metavar="FILE")
    template.add_argument("--workflow", metavar="FILE")
    p.add_argument("--instance", metavar="FILE", help="AgentInstance or WorkflowInstance")
    p.add_argument(
        "--execution",
        metavar="FILE",
        help="AgentExecution or WorkflowExecution whose runtime_env is the runtime layer",
    )
    p.add_argument("--environment", action="append", metavar="NAME",
                   help="an Environment layered after the instance's refs")  # fmt: skip
    p.add_argument("--mcp-server", action="append", metavar="FILE",
                   help="McpServer resources the agent uses (spec.mcp_server_usages); a file "
                   "may hold several")  # fmt: skip
    add_value_flags(p)
    p.add_argument("--runtime-env", action="append", metavar="[secret:]K=V")
    p.add_argument("--ttl", default="1h", help="lifetime of the context (at most 7d)")
    p.add_argument("--id", help="execution id (default: generated)")
    _add_allowances(p)
    add_output(p)  # fmt: skip
    p = command(
        execution, "import", execution_import,
        "issue an ExecutionContext produced elsewhere (plaintext values, is_secret)",
        "stigmer-broker execution import -f context.json --tenant acme --ttl 15m",
    )  # fmt: skip
    p.add_argument("-f", "--file", required=True, help="the ExecutionContext (YAML or JSON)")
    add_tenant(p)
    p.add_argument("--ttl", default="1h", help="lifetime of the context (at most 7d)")
    _add_allowances(p)
    add_output(p)
    p = command(execution, "show", execution_show, "show an execution context (secrets masked)",
                "stigmer-broker execution show exec-123 --tenant acme")  # fmt: skip
    p.add_argument("id")
    add_tenant(p)
    add_output(p, ("yaml", "json"))
    p = command(execution, "list", execution_list,
                "list a tenant's executions: id, expiry, holder (no values)",
                "stigmer-broker execution list --tenant acme -o json")  # fmt: skip
    add_tenant(p)
    add_output(p)
    p = command(execution, "end", execution_end, "end an execution: destroy its context",
                "stigmer-broker execution end exec-123 --tenant acme")  # fmt: skip
    p.add_argument("id")
    add_tenant(p)
    add_output(p)


COMMANDS = ("env", "execution")  # what register() adds


def register(commands: Group) -> None:
    _register_env(commands)
    _register_execution(commands)
