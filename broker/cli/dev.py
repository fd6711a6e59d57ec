"""``dev up|down|token``: a throwaway local dev server and dev service-account tokens."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from broker.cli.common import Group, add_output, add_tenant, command, emit, parse_duration
from broker.dev import DEFAULT_STATE_DIR, IDENTITY_KEY
from broker.errors import ConfigError


def identity_key(args: argparse.Namespace) -> Path:
    """The dev identity key: --identity-key, $STIGMER_DEV_IDENTITY_KEY, or the state dir's."""
    explicit = getattr(args, "identity_key", None)
    if explicit:
        return Path(explicit)
    if os.environ.get("STIGMER_DEV_IDENTITY_KEY"):
        return Path(os.environ["STIGMER_DEV_IDENTITY_KEY"])
    return Path(getattr(args, "state_dir", None) or DEFAULT_STATE_DIR) / IDENTITY_KEY


async def up(args: argparse.Namespace) -> int:
    from broker.config import Layout
    from broker.control.setup import Bootstrap, JwtSettings
    from broker.dev import identity, server
    from broker.vault import VaultClient

    running = server.start(Path(args.state_dir), args.addr, tls=args.tls)
    client = VaultClient(running.settings())
    try:
        identity.create_key(running.identity_key)
        jwt = JwtSettings(public_keys=(identity.public_pem(running.identity_key),))
        await Bootstrap(client, Layout.from_env()).run(args.tenant or ["demo"], jwt)
    except BaseException:
        server.stop(Path(args.state_dir))
        raise
    finally:
        await client.aclose()
    env_file = running.state_dir / "env"
    text = f"dev server up at {running.addr} (pid {running.pid})\nrun: source {env_file}"
    emit({"addr": running.addr, "pid": running.pid, "env_file": str(env_file)}, args.output, text)
    return 0


def down(args: argparse.Namespace) -> int:
    from broker.dev import server

    stopped = server.stop(Path(args.state_dir))
    text = "dev server stopped" if stopped else f"no dev server running from {args.state_dir}"
    emit({"stopped": stopped}, args.output, text)
    return 0


def token(args: argparse.Namespace) -> int:
    from broker import names
    from broker.dev import identity

    names.tenant(args.tenant)
    key = identity_key(args)
    if not key.is_file():
        raise ConfigError(f"dev identity key {key} not found; run `stigmer-broker dev up` first")
    ttl = int(parse_duration(args.ttl).total_seconds())
    print(identity.mint_token(key, args.tenant, pod=args.pod, ttl_seconds=ttl,
                              service_account=args.service_account))  # fmt: skip
    return 0


COMMANDS = ("dev",)  # what register() adds


def register(commands: Group) -> None:
    dev = commands.add_parser("dev", help="a throwaway local dev server").add_subparsers(
        dest="dev_command", required=True, metavar="COMMAND"
    )
    p = command(dev, "up", up, "start an in-memory dev server and bootstrap it",
                "stigmer-broker dev up --tenant demo && source .vault-dev/env")  # fmt: skip
    p.add_argument("--addr", help="listen address (default: 127.0.0.1 and a free port)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="server state and env file")
    p.add_argument("--tenant", action="append", help="tenants to create keys for (default: demo)")
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve https with a CA the server generates (the env file sets VAULT_CACERT)",
    )
    add_output(p)
    p = command(dev, "down", down, "stop the dev server started from --state-dir",
                "stigmer-broker dev down")  # fmt: skip
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the server's state directory")
    add_output(p)
    p = command(dev, "token", token, "print a dev service-account JWT for run --jwt-file",
                "stigmer-broker dev token --tenant demo > /dev/shm/sa.jwt")  # fmt: skip
    add_tenant(p)
    p.add_argument("--pod", default="stigmer-runner-0", help="pod name claim")
    p.add_argument(
        "--service-account",
        default="stigmer-runner",
        help="stigmer-reaper (with --tenant stigmer-system) for the reaper",
    )
    p.add_argument("--ttl", default="10m", help="token lifetime")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="where `dev up` keeps its key")
    p.add_argument("--identity-key", help="dev identity private key (default: the state dir's)")
