"""``control serve``: the control plane over HTTP (see ``broker.api``)."""

from __future__ import annotations

import argparse

from broker.cli.common import Group, command, vault_client
from broker.errors import ConfigError


async def control_serve(args: argparse.Namespace) -> int:
    from broker.api.server import ControlSettings, serve
    from broker.config import Layout

    host, _, port = args.addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--addr {args.addr!r}: expected HOST:PORT, e.g. 127.0.0.1:8300")
    client = vault_client(need_token=False)
    if client.token:
        await client.aclose()
        raise ConfigError(
            "the control API must not hold a Vault token: unset VAULT_TOKEN and BAO_TOKEN "
            "(each request carries its caller's token)"
        )
    settings = ControlSettings(host=host.strip("[]"), port=int(port))
    return await serve(client, Layout.from_env(), settings)


COMMANDS = ("control",)  # what register() adds


def register(commands: Group) -> None:
    control = commands.add_parser("control", help="the control plane's HTTP API").add_subparsers(
        dest="control_command", required=True, metavar="COMMAND")  # fmt: skip
    p = command(
        control, "serve", control_serve,
        "serve Environments and executions over HTTP with each caller's Vault token",
        "stigmer-broker control serve --addr 0.0.0.0:8300  # VAULT_ADDR set, no VAULT_TOKEN",
    )  # fmt: skip
    p.add_argument("--addr", default="127.0.0.1:8300", help="HOST:PORT to listen on")
