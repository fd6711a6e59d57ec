"""Commands in the runner's pod: ``run -- CMD`` (one execution) and ``sidecar`` (many)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from broker.cli.common import (
    Group,
    add_tenant,
    command,
    parse_size,
    positive_seconds,
    seconds,
    vault_client,
)
from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.execution.credentials import Credentials
    from broker.limits import Limits


def _credentials(args: argparse.Namespace) -> Credentials:
    from broker.execution.credentials import Credentials

    return Credentials(
        method=args.auth,
        jwt_file=Path(args.jwt_file),
        role=args.role,
        role_id_file=Path(args.role_id_file) if args.role_id_file else None,
        secret_id_file=Path(args.secret_id_file) if args.secret_id_file else None,
    )


def _context_limits(args: argparse.Namespace) -> Limits:
    from broker.limits import CONTEXTS

    return replace(CONTEXTS, max_bytes=parse_size(args.max_context_size))


async def run(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.render.outdir import OutputRoot, default_out_dir
    from broker.runner import RunSettings, run_command

    command_line = list(args.command)
    if command_line and command_line[0] == "--":
        command_line = command_line[1:]
    if not command_line:
        raise ConfigError("no command given: stigmer-broker run ... -- CMD [ARGS...]")
    settings = RunSettings(
        tenant=names.tenant(args.tenant),
        execution_id=names.execution_id(args.execution),
        out=OutputRoot(Path(args.out) if args.out else default_out_dir(), args.allow_disk),
        credentials=_credentials(args),
        allow_secret_in_args=args.allow_secret_in_args,
        mcp_formats=tuple(args.mcp_format or ()),
        login_max_ttl=positive_seconds(args.login_max_ttl, "--login-max-ttl"),
        deadline=positive_seconds(args.deadline, "--deadline"),
        kill_after=seconds(args.kill_after),
        context_limits=_context_limits(args),
    )
    client = vault_client(need_token=args.auth == "token")
    try:
        return await run_command(client, Layout.from_env(), settings, command_line)
    finally:
        await client.aclose()


async def sidecar(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.render.outdir import OutputRoot
    from broker.sidecar.app import SidecarSettings, serve
    from broker.sidecar.registry import Retention

    if args.auth == "token":
        raise ConfigError("the sidecar logs in with --auth jwt, kubernetes or approle")
    client = vault_client(need_token=False)
    if client.token:
        raise ConfigError(
            "the sidecar must not have a Vault token in its environment: unset VAULT_TOKEN "
            "and BAO_TOKEN (it logs in with its own identity)"
        )
    settings = SidecarSettings(
        tenant=names.tenant(args.tenant),
        socket=Path(args.socket),
        out=OutputRoot(Path(args.out), args.allow_disk, mode=0o711),  # callers may traverse it
        credentials=_credentials(args),
        metrics_addr=args.metrics_addr,
        allow_uids=tuple(args.allow_uid or ()),
        pod=args.pod or os.environ.get("POD_NAME") or os.uname().nodename,
        allow_secret_in_args=args.allow_secret_in_args,
        mcp_formats=tuple(args.mcp_format or ()),
        startup_timeout=positive_seconds(args.startup_timeout, "--startup-timeout"),
        lease_check_interval=positive_seconds(args.lease_check_interval, "--lease-check-interval"),
        vault_check_interval=positive_seconds(args.vault_check_interval, "--vault-check-interval"),
        shutdown_timeout=positive_seconds(args.shutdown_timeout, "--shutdown-timeout"),
        login_max_ttl=positive_seconds(args.login_max_ttl, "--login-max-ttl"),
        deadline=positive_seconds(args.deadline, "--deadline"),
        retention=Retention(args.keep_ended, seconds(args.keep_ended_for)),
        share_executions=args.share_executions,
        header_timeout=positive_seconds(args.request_timeout, "--request-timeout"),
        context_limits=_context_limits(args),
    )
    try:
        return await serve(client, Layout.from_env(), settings)
    finally:
        await client.aclose()


def _runner_flags(parser: argparse.ArgumentParser, methods: list[str]) -> None:
    """Auth, output and Vault flags shared by `run` and `sidecar`."""
    p = parser
    p.add_argument("--auth", choices=methods, default="jwt", help="how to log in to Vault")
    p.add_argument(
        "--jwt-file",
        default="/var/run/secrets/kubernetes.io/serviceaccount/token",
        help="service-account JWT (jwt, kubernetes)",
    )
    p.add_argument(
        "--role",
        default="",
        help="default: stigmer-runner (jwt, kubernetes), stigmer-runner-<T> (approle)",
    )
    p.add_argument("--role-id-file", metavar="F", help="approle: file holding the role_id")
    p.add_argument(
        "--secret-id-file", metavar="F", help="approle: file holding the wrapped secret_id token"
    )
    p.add_argument("--allow-disk", action="store_true", help="allow a disk-backed --out")
    p.add_argument(
        "--allow-secret-in-args", action="store_true", help="allow secrets in argv and URLs"
    )
    p.add_argument(
        "--mcp-format", action="append", choices=["mcpservers", "vscode", "stigmer"],
        help="also write this MCP config shape: vscode → mcp.vscode.json, stigmer → "
        "mcp.stigmer.json (timeout_seconds, enabled_tools); mcp.json is always written",
    )  # fmt: skip
    p.add_argument(
        "--login-max-ttl",
        default="2h",
        help="the runner role's token_max_ttl: no execution may outlive it",
    )
    p.add_argument(
        "--deadline", default="60s", help="time allowed to prepare one execution, retries included"
    )
    p.add_argument(
        "--max-context-size",
        default="8M",
        help="a larger ExecutionContext is refused before anything is decrypted",
    )


RUNNER_COMMANDS = ("run", "sidecar")  # their default log level is info, the others' warning
COMMANDS = RUNNER_COMMANDS  # what register() adds


def register(commands: Group) -> None:
    p = command(
        commands,
        "run",
        run,
        "run CMD with an execution's environment, then clean up",
        "stigmer-broker run --tenant acme --execution exec-123 -- python agent.py",
    )
    add_tenant(p)
    p.add_argument("--execution", required=True, metavar="ID")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="memory-backed directory for the files (default: $XDG_RUNTIME_DIR or /dev/shm)",
    )
    _runner_flags(p, ["jwt", "kubernetes", "approle", "token"])
    p.add_argument(
        "--kill-after",
        default="10s",
        help="after forwarding SIGTERM/SIGINT, wait this long before killing CMD",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    p = command(
        commands,
        "sidecar",
        sidecar,
        "serve executions to a runner over a Unix socket",
        "stigmer-broker sidecar --tenant acme --socket /run/stigmer/broker.sock "
        "--out /run/stigmer/out --allow-uid 10001",
    )
    add_tenant(p)
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
    p.add_argument("--startup-timeout", default="30s", help="time allowed for the first login")
    p.add_argument(
        "--shutdown-timeout", default="10s", help="time allowed to end every execution at SIGTERM"
    )
    p.add_argument(
        "--lease-check-interval",
        default="15s",
        help="how often leases are checked for outside revocation",
    )
    p.add_argument(
        "--vault-check-interval",
        default="5s",
        help="how often /readyz's view of Vault is refreshed (sealed, unreachable, token refused)",
    )
    p.add_argument(
        "--keep-ended",
        type=int,
        default=1000,
        help="how many ended executions' summaries GET /v1/executions keeps",
    )
    p.add_argument("--keep-ended-for", default="1h", help="…and for how long")
    p.add_argument(
        "--request-timeout",
        default="10s",
        help="a connection must deliver a request (and its body) within this",
    )
    p.add_argument("--share-executions", action="store_true",
                   help="every allowed caller may see and end every execution (default: a caller "
                   "sees those it prepared)")  # fmt: skip
