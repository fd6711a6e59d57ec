"""The ``stigmer-broker`` command: arguments in, one line and an exit code out on error.

Every :class:`BrokerError` becomes ``stigmer-broker: error: <message>`` on stderr with the
error's exit code; no traceback, and no secret value is ever printed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from broker import devserver, identity, ids, logs
from broker.config import Layout, VaultSettings
from broker.errors import BrokerError, ConfigError, ValidationError
from broker.model import (
    API_VERSION,
    Agent,
    AgentExecution,
    AgentInstance,
    Environment,
    Workflow,
    WorkflowExecution,
    WorkflowInstance,
    load_documents,
    load_resource,
    parse_resource,
)
from broker.vault import VaultClient

PROG = "stigmer-broker"
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


# --- small parsers ----------------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``1h``, ``1h30m``, ``2d``."""
    if text.isdigit():
        return timedelta(seconds=int(text))
    match = _DURATION.match(text)
    if not text or not match:
        raise ConfigError(f"duration {text!r}: use e.g. 90s, 15m, 1h or 1h30m")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def _split_pair(flag: str, text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"{flag} {text.split('=')[0]!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{flag}: empty key")
    return key, value


def _read_secret(key: str) -> str:
    """A secret value from a no-echo prompt, or one line of stdin when it is not a terminal."""
    if sys.stdin.isatty():
        return getpass.getpass(f"value for secret {key}: ")
    line = sys.stdin.readline()
    if not line:
        raise ConfigError(f"--secret {key}: no value given and stdin is empty")
    return line.rstrip("\n").rstrip("\r")


def _read_env_file(path: str) -> dict[str, str]:
    from dotenv import dotenv_values

    if not Path(path).is_file():
        raise ConfigError(f"--env-file {path}: no such file")
    values = dotenv_values(path, interpolate=False)
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ConfigError(f"--env-file {path}: {', '.join(missing)} has no '=' and no value")
    return {k: v for k, v in values.items() if v is not None}


def collect_values(args: argparse.Namespace) -> dict[str, tuple[str, bool]]:
    """--env-file, then --env/--secret/--runtime-env: name → (value, is_secret).

    A name given twice by the explicit flags is refused; the env file is the lowest layer.
    """
    values: dict[str, tuple[str, bool]] = (
        {k: (v, False) for k, v in _read_env_file(args.env_file).items()} if args.env_file else {}
    )
    explicit: set[str] = set()

    def put(flag: str, key: str, value: str, secret: bool) -> None:
        if key in explicit:
            raise ConfigError(f"{flag} {key}: {key} is given more than once")
        explicit.add(key)
        values[key] = (value, secret)

    for item in args.env or []:
        put("--env", *_split_pair("--env", item), False)
    for item in args.secret or []:
        key, value = item.split("=", 1) if "=" in item else (item, None)
        put("--secret", key.strip(), _read_secret(key.strip()) if value is None else value, True)
    for item in getattr(args, "runtime_env", None) or []:
        secret = item.startswith("secret:")
        key, value = _split_pair("--runtime-env", item.removeprefix("secret:"))
        put("--runtime-env", key, value, secret)
    return values


def _client(need_token: bool = True) -> VaultClient:
    return VaultClient(VaultSettings.from_env(need_token=need_token))


def _print(document: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(yaml.safe_dump(document, sort_keys=False), end="")


# --- dev --------------------------------------------------------------------------------------


def _identity_key(args: argparse.Namespace) -> Path:
    explicit = getattr(args, "identity_key", None)
    if explicit:
        return Path(explicit)
    if os.environ.get("STIGMER_DEV_IDENTITY_KEY"):
        return Path(os.environ["STIGMER_DEV_IDENTITY_KEY"])
    return (
        Path(getattr(args, "state_dir", None) or devserver.DEFAULT_STATE_DIR)
        / devserver.IDENTITY_KEY
    )


def cmd_dev_up(args: argparse.Namespace) -> int:
    from broker.control.setup import Bootstrap, JwtSettings

    server = devserver.start(Path(args.state_dir), args.addr)
    try:
        identity.create_key(server.identity_key)
        client = VaultClient(VaultSettings(addr=server.addr, token=server.token))
        jwt = JwtSettings(public_keys=(identity.public_pem(server.identity_key),))
        Bootstrap(client, Layout.from_env()).run(args.tenant or ["demo"], jwt)
    except BaseException:
        devserver.stop(Path(args.state_dir))
        raise
    print(f"dev server up at {server.addr} (pid {server.pid})")
    print(f"run: source {server.state_dir / 'env'}")
    return 0


def cmd_dev_down(args: argparse.Namespace) -> int:
    stopped = devserver.stop(Path(args.state_dir))
    print("dev server stopped" if stopped else f"no dev server running from {args.state_dir}")
    return 0


def cmd_dev_token(args: argparse.Namespace) -> int:
    ids.tenant(args.tenant)
    key = _identity_key(args)
    if not key.is_file():
        raise ConfigError(f"dev identity key {key} not found; run `{PROG} dev up` first")
    ttl = int(parse_duration(args.ttl).total_seconds())
    print(identity.mint_token(key, args.tenant, pod=args.pod, ttl_seconds=ttl))
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    from broker.control.setup import (
        AppRoleSettings,
        Bootstrap,
        JwtSettings,
        KubernetesSettings,
    )

    client = _client()  # settings first: a bad invocation creates nothing
    if args.jwt_public_key:
        keys = tuple(_read_text("--jwt-public-key", Path(p)) for p in args.jwt_public_key)
    else:
        key = _identity_key(args)
        if not key.exists():
            identity.create_key(key)
            print(f"created    dev identity key {key}")
        keys = (identity.public_pem(key),)
    jwt = JwtSettings(public_keys=keys, issuer=args.jwt_issuer, audience=args.jwt_audience)
    kubernetes = None
    if args.kubernetes_host:
        ca = (
            _read_text("--kubernetes-ca-cert", Path(args.kubernetes_ca_cert))
            if args.kubernetes_ca_cert
            else ""
        )
        kubernetes = KubernetesSettings(
            host=args.kubernetes_host, ca_cert=ca, audience=args.jwt_audience
        )
    approle = None
    if args.approle_tenant:
        approle = AppRoleSettings(
            tenants=tuple(args.approle_tenant),
            secret_id_ttl=int(parse_duration(args.secret_id_ttl).total_seconds()),
            secret_id_num_uses=args.secret_id_num_uses,
        )
    changes = Bootstrap(client, Layout.from_env()).run(args.tenant or [], jwt, kubernetes, approle)
    for change in changes:
        print(f"{change.action:9}  {change.item}")
    changed = [c for c in changes if c.action != "unchanged"]
    print(f"setup: {len(changed)} changed" if changed else "setup: nothing to change")
    return 0


def _read_text(flag: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read ({exc.strerror})") from None


# --- policy ---------------------------------------------------------------------------------


def _sources(args: argparse.Namespace) -> Any:
    from broker.control.setup import Bootstrap
    from broker.policies import IdentitySources

    if args.jwt_accessor or args.kubernetes_accessor or args.approle:
        return IdentitySources(
            jwt=args.jwt_accessor or "",
            kubernetes=args.kubernetes_accessor or "",
            approle="approle" if args.approle else "",
        )
    return Bootstrap(_client(), Layout.from_env()).current_sources()


def cmd_policy_render(args: argparse.Namespace) -> int:
    from broker import policies

    for name, text in policies.render(Layout.from_env(), _sources(args)).items():
        print(f"# ===== policy {name} =====")
        print(text.rstrip() + "\n")
    return 0


def cmd_policy_apply(args: argparse.Namespace) -> int:
    from broker.control.setup import Bootstrap

    bootstrap = Bootstrap(_client(), Layout.from_env())
    bootstrap.policies(bootstrap.current_sources())
    for change in bootstrap.changes:
        print(f"{change.action:9}  {change.item}")
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    from broker.control.policy_check import PolicyCheck

    ids.tenant(args.tenant)
    ids.tenant(args.other_tenant)
    if args.tenant == args.other_tenant:
        raise ConfigError("--other-tenant must differ from --tenant")
    if args.runner_jwt:
        runner_jwt = _read_text("--runner-jwt", Path(args.runner_jwt)).strip()
    else:
        key = _identity_key(args)
        if not key.is_file():
            raise ConfigError(
                f"no --runner-jwt and no dev identity key at {key}: pass a service-account "
                f"token from a runner pod in namespace {args.tenant}"
            )
        runner_jwt = identity.mint_token(key, args.tenant, pod="policy-check", ttl_seconds=300)
    report = PolicyCheck(_client(), Layout.from_env()).run(
        args.tenant, args.other_tenant, runner_jwt
    )
    print(report.table())
    if not report.ok:
        wrong = [c for c in report.cells if not c.ok]
        for cell in wrong:
            print(
                f"MISMATCH {cell.identity} {cell.operation} ({cell.scope}): expected "
                f"{cell.expected}, got {cell.got}",
                file=sys.stderr,
            )
        return 1
    print("policy check: every cell as expected")
    return 0


# --- approle --------------------------------------------------------------------------------


def cmd_approle_role_id(args: argparse.Namespace) -> int:
    layout = Layout.from_env()
    role = layout.approle_role(ids.tenant(args.tenant))
    answer = _client().get(f"auth/{layout.approle_mount}/role/{role}/role-id")
    print(answer["data"]["role_id"])
    return 0


def cmd_approle_secret_id(args: argparse.Namespace) -> int:
    """A response-wrapped secret_id: only the wrapping token is printed, never the secret_id."""
    layout = Layout.from_env()
    role = layout.approle_role(ids.tenant(args.tenant))
    wrap_ttl = f"{int(parse_duration(args.wrap_ttl).total_seconds())}s"
    answer = _client().request(
        "POST", f"auth/{layout.approle_mount}/role/{role}/secret-id", {}, wrap_ttl=wrap_ttl
    )
    print(answer["wrap_info"]["token"])
    return 0


# --- keys -----------------------------------------------------------------------------------


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from broker.control.keys import KeyManager

    version = KeyManager(_client(), Layout.from_env()).rotate(ids.tenant(args.tenant))
    print(f"rotated {Layout.from_env().transit_key(args.tenant)}: latest version {version}")
    return 0


def cmd_keys_rewrap(args: argparse.Namespace) -> int:
    from broker.control.keys import KeyManager

    manager = KeyManager(_client(), Layout.from_env())
    report = manager.rewrap(ids.tenant(args.tenant), args.min_decryption_version)
    print(
        f"rewrapped {report.rewrapped} secrets in {report.documents} documents of tenant "
        f"{report.tenant} to key version {report.latest_version} "
        f"({report.retries} concurrent edits retried)"
    )
    if report.min_decryption_version is not None:
        print(f"min_decryption_version raised to {report.min_decryption_version}")
    return 0


# --- env --------------------------------------------------------------------------------------


def _store() -> Any:
    from broker.control.environments import EnvironmentStore

    return EnvironmentStore(_client(), Layout.from_env())


def cmd_env_apply(args: argparse.Namespace) -> int:
    ids.tenant(args.tenant)
    environments = [parse_resource(d, Environment) for d in load_documents(Path(args.file))]
    if not environments:
        raise ValidationError(args.file, ["no resource in file"])
    store = _store()
    for environment in environments:
        version = store.apply(args.tenant, environment)
        print(f"environment {environment.name} applied (version {version})")
    return 0


def cmd_env_create(args: argparse.Namespace) -> int:
    ids.tenant(args.tenant)
    ids.environment_name(args.name)
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
    version = _store().create(args.tenant, environment)
    print(f"environment {args.name} created (version {version})")
    return 0


def cmd_env_get(args: argparse.Namespace) -> int:
    from broker.control.environments import masked

    _print(masked(_store().get(args.tenant, ids.environment_name(args.name))), args.output)
    return 0


def cmd_env_list(args: argparse.Namespace) -> int:
    for name in _store().list(args.tenant):
        print(name)
    return 0


def cmd_env_delete(args: argparse.Namespace) -> int:
    _store().delete(args.tenant, args.name)
    print(f"environment {args.name} deleted")
    return 0


# --- execution --------------------------------------------------------------------------------


def _issuer() -> Any:
    from broker.control.executions import ExecutionIssuer

    return ExecutionIssuer(_client(), Layout.from_env())


def cmd_execution_create(args: argparse.Namespace) -> int:
    from broker.control.executions import RuntimeValue

    ids.tenant(args.tenant)
    template: Agent | Workflow = (
        load_resource(Path(args.agent), Agent)
        if args.agent
        else load_resource(Path(args.workflow), Workflow)
    )
    instance = (
        load_resource(Path(args.instance), (AgentInstance, WorkflowInstance))
        if args.instance
        else None
    )
    runtime: dict[str, RuntimeValue] = {}
    if args.execution:
        execution: AgentExecution | WorkflowExecution = (
            load_resource(Path(args.execution), AgentExecution)
            if isinstance(template, Agent)
            else load_resource(Path(args.execution), WorkflowExecution)
        )
        runtime = {
            k: RuntimeValue(v.value, v.is_secret) for k, v in execution.spec.runtime_env.items()
        }
    # The flags override the execution file's runtime_env; secret-ness stays sticky.
    for key, (value, secret) in collect_values(args).items():
        earlier = runtime.get(key)
        runtime[key] = RuntimeValue(value, secret or (earlier is not None and earlier.is_secret))
    issued = _issuer().create(
        args.tenant,
        template,
        instance,
        environments=args.environment or [],
        runtime_env=runtime,
        ttl=parse_duration(args.ttl),
        execution_id=args.id,
        allow_secret_in_args=args.allow_secret_in_args,
    )
    if args.output == "json":
        print(json.dumps(issued.as_json(), indent=2, sort_keys=True))
    else:
        print(issued.execution_id)
    return 0


def cmd_execution_show(args: argparse.Namespace) -> int:
    _print(_issuer().show(args.tenant, args.id), args.output)
    return 0


def cmd_execution_end(args: argparse.Namespace) -> int:
    _issuer().end(args.tenant, args.id)
    print(f"execution {args.id} ended: context destroyed")
    return 0


# --- run --------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from broker.render import default_out_dir
    from broker.runner import ExecutionSession, run

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    out = Path(args.out) if args.out else default_out_dir()
    options = _run_options(args, ids.execution_id(args.execution), out)
    if not command:
        raise ConfigError("no command given: stigmer-broker run ... -- CMD [ARGS...]")
    session = ExecutionSession(_client(need_token=args.auth == "token"), Layout.from_env(), options)
    return run(session, command)


def _run_options(args: argparse.Namespace, execution_id: str, out: Path) -> Any:
    """The runner-side options `run` and `sidecar` share (auth and output flags)."""
    from broker.runner import RunOptions

    return RunOptions(
        tenant=ids.tenant(args.tenant),
        execution_id=execution_id,
        out_dir=out,
        auth=args.auth,
        jwt_file=Path(args.jwt_file),
        role=args.role,
        role_id_file=Path(args.role_id_file) if args.role_id_file else None,
        secret_id_file=Path(args.secret_id_file) if args.secret_id_file else None,
        allow_disk=args.allow_disk,
        allow_secret_in_args=args.allow_secret_in_args,
    )


# --- sidecar --------------------------------------------------------------------------------


def cmd_sidecar(args: argparse.Namespace) -> int:
    from broker.sidecar.app import SidecarOptions, run_sidecar

    if args.auth == "token":
        raise ConfigError("the sidecar logs in with --auth jwt, kubernetes or approle")
    settings = VaultSettings.from_env(need_token=False)
    if settings.token:
        raise ConfigError(
            "the sidecar must not have a Vault token in its environment: unset VAULT_TOKEN "
            "and BAO_TOKEN (it logs in with its own identity)"
        )
    options = SidecarOptions(
        run=_run_options(args, "sidecar", Path(args.out)),
        socket=Path(args.socket),
        metrics_addr=args.metrics_addr,
        allow_uids=tuple(args.allow_uid or ()),
        pod=args.pod or "",
        startup_timeout=parse_duration(args.startup_timeout).total_seconds(),
        lease_check_interval=float(args.lease_check_interval),
        shutdown_timeout=parse_duration(args.shutdown_timeout).total_seconds(),
        login_max_ttl=parse_duration(args.login_max_ttl).total_seconds(),
    )
    return run_sidecar(settings, Layout.from_env(), options)


# --- argument parser --------------------------------------------------------------------------


def _tenant(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", required=True, help="tenant id (the runner's namespace)")


def _value_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", action="append", metavar="K=V", help="a plain variable")
    parser.add_argument(
        "--secret",
        action="append",
        metavar="K[=V]",
        help="a secret; without =V it is read from a no-echo prompt (or stdin)",
    )
    parser.add_argument("--env-file", metavar="F", help="dotenv file of plain variables")


def _runner_flags(parser: argparse.ArgumentParser, methods: list[str]) -> None:
    """Auth and output flags shared by `run` and `sidecar`."""
    parser.add_argument("--auth", choices=methods, default="jwt")
    parser.add_argument("--jwt-file", default="/var/run/secrets/kubernetes.io/serviceaccount/token")
    parser.add_argument(
        "--role", default="", help="jwt/kubernetes: stigmer-runner; approle: stigmer-runner-<T>"
    )
    parser.add_argument("--role-id-file", metavar="F", help="approle: file holding the role_id")
    parser.add_argument(
        "--secret-id-file", metavar="F", help="approle: file holding the wrapped secret_id token"
    )
    parser.add_argument("--allow-disk", action="store_true", help="allow a disk-backed --out")
    parser.add_argument(
        "--allow-secret-in-args", action="store_true", help="allow secrets in argv and URLs"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Vault-backed secrets broker for Stigmer runners"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")

    def sub(
        group: Any, name: str, handler: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    dev = commands.add_parser("dev", help="a throwaway local dev server").add_subparsers(
        dest="dev_command", required=True, metavar="COMMAND"
    )
    p = sub(dev, "up", cmd_dev_up, "start an in-memory dev server and bootstrap it")
    p.add_argument("--addr", help="listen address, default 127.0.0.1:<free port>")
    p.add_argument("--state-dir", default=str(devserver.DEFAULT_STATE_DIR))
    p.add_argument("--tenant", action="append", help="tenants to create keys for (default: demo)")
    p = sub(dev, "down", cmd_dev_down, "stop the dev server started from --state-dir")
    p.add_argument("--state-dir", default=str(devserver.DEFAULT_STATE_DIR))
    p = sub(dev, "token", cmd_dev_token, "print a dev service-account JWT for run --jwt-file")
    _tenant(p)
    p.add_argument("--pod", default="stigmer-runner-0")
    p.add_argument("--ttl", default="10m")
    p.add_argument("--state-dir", default=str(devserver.DEFAULT_STATE_DIR))
    p.add_argument("--identity-key", help="dev identity private key (default from the state dir)")

    p = sub(commands, "setup", cmd_setup, "configure a Vault for the broker (idempotent)")
    p.add_argument("--tenant", action="append", help="create the tenant's Transit key")
    p.add_argument(
        "--jwt-public-key",
        action="append",
        metavar="PEM_FILE",
        help="service-account issuer public key (default: the dev identity)",
    )
    p.add_argument("--jwt-issuer", default=identity.DEFAULT_ISSUER)
    p.add_argument("--jwt-audience", default=identity.DEFAULT_AUDIENCE)
    p.add_argument(
        "--identity-key", help="dev identity private key to use when no --jwt-public-key"
    )
    p.add_argument(
        "--kubernetes-host", metavar="URL", help="also enable Kubernetes auth (API server URL)"
    )
    p.add_argument("--kubernetes-ca-cert", metavar="PEM_FILE")
    p.add_argument(
        "--approle-tenant",
        action="append",
        metavar="T",
        help="also enable AppRole with a runner role for tenant T (runners outside Kubernetes)",
    )
    p.add_argument("--secret-id-ttl", default="10m", help="AppRole secret_id TTL")
    p.add_argument("--secret-id-num-uses", type=int, default=1, help="AppRole secret_id uses")

    policy = commands.add_parser("policy", help="Vault policies").add_subparsers(
        dest="policy_command", required=True, metavar="COMMAND"
    )
    p = sub(policy, "render", cmd_policy_render, "print the policies for this layout")
    p.add_argument("--jwt-accessor", help="render offline with this JWT auth mount accessor")
    p.add_argument("--kubernetes-accessor", help="…and this Kubernetes auth mount accessor")
    p.add_argument("--approle", action="store_true", help="…and the AppRole block")
    sub(policy, "apply", cmd_policy_apply, "write the policies to Vault")
    p = sub(policy, "check", cmd_policy_check, "prove the allowed/denied matrix on a live Vault")
    p.add_argument("--tenant", required=True, help="the runner identity's tenant")
    p.add_argument("--other-tenant", required=True, help="a second tenant it must not reach")
    p.add_argument("--runner-jwt", metavar="FILE", help="service-account JWT from --tenant")
    p.add_argument("--state-dir", default=str(devserver.DEFAULT_STATE_DIR))
    p.add_argument("--identity-key", help="dev identity key to mint the runner JWT")

    approle = commands.add_parser("approle", help="AppRole credentials for runners").add_subparsers(
        dest="approle_command", required=True, metavar="COMMAND"
    )
    p = sub(approle, "role-id", cmd_approle_role_id, "print a tenant's runner role_id")
    _tenant(p)
    p = sub(
        approle, "secret-id", cmd_approle_secret_id, "print a wrapping token for a new secret_id"
    )
    _tenant(p)
    p.add_argument("--wrap-ttl", default="5m")

    keys = commands.add_parser("keys", help="Transit keys").add_subparsers(
        dest="keys_command", required=True, metavar="COMMAND"
    )
    p = sub(keys, "rotate", cmd_keys_rotate, "add a new version to a tenant's Transit key")
    _tenant(p)
    p = sub(keys, "rewrap", cmd_keys_rewrap, "re-encrypt stored secrets to the newest key version")
    _tenant(p)
    p.add_argument(
        "--min-decryption-version",
        action="store_true",
        help="also rewrap live contexts, then refuse older key versions",
    )

    env = commands.add_parser("env", help="Environments").add_subparsers(
        dest="env_command", required=True, metavar="COMMAND"
    )
    p = sub(env, "apply", cmd_env_apply, "create or replace Environments from a YAML/JSON file")
    p.add_argument("-f", "--file", required=True)
    _tenant(p)
    p = sub(env, "create", cmd_env_create, "create an Environment from flags")
    p.add_argument("name")
    _tenant(p)
    _value_flags(p)
    p.add_argument("--description")
    p = sub(env, "get", cmd_env_get, "show an Environment (secrets masked)")
    p.add_argument("name")
    _tenant(p)
    p.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    p = sub(env, "list", cmd_env_list, "list a tenant's Environments")
    _tenant(p)
    p = sub(env, "delete", cmd_env_delete, "delete an Environment (every version)")
    p.add_argument("name")
    _tenant(p)

    execution = commands.add_parser("execution", help="executions").add_subparsers(
        dest="execution_command", required=True, metavar="COMMAND"
    )
    p = sub(execution, "create", cmd_execution_create, "resolve an execution and issue its context")
    _tenant(p)
    template = p.add_mutually_exclusive_group(required=True)
    template.add_argument("--agent", metavar="FILE")
    template.add_argument("--workflow", metavar="FILE")
    p.add_argument("--instance", metavar="FILE", help="AgentInstance or WorkflowInstance")
    p.add_argument(
        "--execution",
        metavar="FILE",
        help="AgentExecution or WorkflowExecution whose runtime_env is the runtime layer",
    )
    p.add_argument(
        "--environment",
        action="append",
        metavar="NAME",
        help="an Environment layered after the instance's refs",
    )
    _value_flags(p)
    p.add_argument("--runtime-env", action="append", metavar="[secret:]K=V")
    p.add_argument("--ttl", default="1h")
    p.add_argument("--id", help="execution id (default: generated)")
    p.add_argument("--allow-secret-in-args", action="store_true")
    p.add_argument("-o", "--output", choices=["id", "json"], default="id")
    p = sub(execution, "show", cmd_execution_show, "show an execution context (secrets masked)")
    p.add_argument("id")
    _tenant(p)
    p.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    p = sub(execution, "end", cmd_execution_end, "end an execution: destroy its context")
    p.add_argument("id")
    _tenant(p)

    p = sub(commands, "sidecar", cmd_sidecar, "serve executions to a runner over a Unix socket")
    _tenant(p)
    p.add_argument("--socket", required=True, metavar="PATH")
    p.add_argument("--out", required=True, metavar="DIR", help="memory-backed directory")
    _runner_flags(p, ["jwt", "kubernetes", "approle"])
    p.add_argument("--metrics-addr", default="127.0.0.1:9464", help="host:port, '' to disable")
    p.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        metavar="UID",
        help="peer uid allowed on the socket (default: own uid + socket group members)",
    )
    p.add_argument("--pod", help="pod name recorded in claims (default: $POD_NAME or hostname)")
    p.add_argument("--startup-timeout", default="30s")
    p.add_argument("--shutdown-timeout", default="10s")
    p.add_argument("--login-max-ttl", default="2h", help="the runner role's token_max_ttl")
    p.add_argument(
        "--lease-check-interval",
        default="15",
        metavar="SECONDS",
        help="how often leases are checked for outside revocation",
    )

    p = sub(commands, "run", cmd_run, "run CMD with an execution's environment, then clean up")
    _tenant(p)
    p.add_argument("--execution", required=True, metavar="ID")
    p.add_argument("--out", metavar="DIR", help="memory-backed directory for the files")
    _runner_flags(p, ["jwt", "kubernetes", "approle", "token"])
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.log_level)
    try:
        return int(args.handler(args))
    except BrokerError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
