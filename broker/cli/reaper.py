"""``reaper``: end what killed runners and sidecars left behind (contexts, claims, leases)."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

from broker.cli.common import (
    Group,
    add_output,
    command,
    emit,
    positive_seconds,
    seconds,
    vault_client,
)
from broker.errors import ConfigError


async def reaper(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.control.reaper_loop import LoopSettings, one_pass, run_forever
    from broker.execution.credentials import Credentials, login
    from broker.execution.keeper import TokenKeeper
    from broker.vault import Login

    if bool(args.tenant) == args.all_tenants:
        raise ConfigError("give --tenant T (repeatable) or --all-tenants")
    tenants = tuple(names.tenant(t) for t in args.tenant or ())
    layout = Layout.from_env()
    credentials = Credentials(
        method=args.auth,
        jwt_file=Path(args.jwt_file),
        role=args.role or layout.reaper_role,
        role_id_file=Path(args.role_id_file) if args.role_id_file else None,
        secret_id_file=Path(args.secret_id_file) if args.secret_id_file else None,
    )
    client = vault_client(need_token=args.auth == "token")

    async def login_once() -> Login:
        return await login(client, layout, credentials, "")

    keeper = TokenKeeper(client, None if args.auth == "token" else login_once, 2 * 3600)
    grace = timedelta(seconds=seconds(args.grace))
    try:
        await keeper.start(positive_seconds(args.startup_timeout, "--startup-timeout"))
        if not args.once:
            settings = LoopSettings(
                tenants, positive_seconds(args.interval, "--interval"), grace, args.metrics_addr
            )
            return await run_forever(keeper, layout, settings)
        report = await one_pass(keeper, layout, tenants, grace)
    finally:
        await keeper.close()
        await client.aclose()
    text = (f"reaper: {report.contexts_destroyed} contexts destroyed, {report.claims_released} "
            f"claims released, {report.leases_revoked} leases revoked, "
            f"{len(report.errors)} errors in {report.tenants} tenants")  # fmt: skip
    emit(report.as_json(), args.output, "\n".join([*report.errors, text]))
    return 7 if report.errors else 0


COMMANDS = ("reaper",)  # what register() adds


def register(commands: Group) -> None:
    p = command(commands, "reaper", reaper,
                "destroy expired contexts, free dead claims, revoke their leases (metadata only)",
                "stigmer-broker reaper --all-tenants --once --auth token -o json")  # fmt: skip
    p.add_argument("--tenant", action="append", help="a tenant to reap (repeatable)")
    p.add_argument(
        "--all-tenants", action="store_true", help="every tenant with contexts or claims"
    )
    p.add_argument("--once", action="store_true", help="one pass, then exit (a CronJob)")
    p.add_argument("--interval", default="60s", help="time between passes (without --once)")
    p.add_argument(
        "--grace", default="30s", help="how long past its expiry a context is left to its holder"
    )
    p.add_argument(
        "--auth",
        choices=["jwt", "kubernetes", "approle", "token"],
        default="jwt",
        help="how to log in (token: VAULT_TOKEN with the stigmer-reaper policy)",
    )
    p.add_argument(
        "--jwt-file",
        default="/var/run/secrets/kubernetes.io/serviceaccount/token",
        help="service-account JWT (jwt, kubernetes)",
    )
    p.add_argument("--role", default="", help="default: stigmer-reaper")
    p.add_argument("--role-id-file", metavar="F", help="approle: file holding the role_id")
    p.add_argument(
        "--secret-id-file", metavar="F", help="approle: file holding the wrapped secret_id token"
    )
    p.add_argument("--startup-timeout", default="30s", help="time allowed for the first login")
    p.add_argument(
        "--metrics-addr",
        default="",
        help="host:port for /metrics and /healthz while looping ('' to disable)",
    )
    add_output(p)  # fmt: skip
