"""What every command group shares: help layout, output formats, durations, the Vault client,
and the value flags (``--env``, ``--secret``, ``--env-file``, ``--runtime-env``).

Heavy modules are imported where they are used, so ``--help`` and the commands that need no
Vault start fast.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.vault import VaultClient

PROG = "stigmer-broker"
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", re.ASCII)
Handler = Callable[[argparse.Namespace], Any]  # returns an exit code, or a coroutine of one
Group: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _translate_once() -> None:
    """argparse asks gettext for each of its messages as a parser is built (~100 for the whole
    CLI), and gettext looks for a catalogue on disk every time: ~90 µs each, ~9 ms of
    ``--help`` on a 2-core VM. The answer cannot change within a process: ask once a message."""
    namespace = vars(argparse)
    if not hasattr(namespace["_"], "cache_info"):
        namespace["_"] = functools.cache(namespace["_"])


_translate_once()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (where there is one), examples (the epilog) kept as written."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        # argparse builds one formatter per argument added, and would import shutil (with bz2
        # and lzma: ~5 ms of every start-up) for the terminal's width: the same width here.
        super().__init__(prog, indent_increment, max_help_position,
                         width if width is not None else terminal_columns() - 2)  # fmt: skip

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def command(
    group: Group,
    name: str,
    handler: Handler,
    summary: str,
    example: str,
) -> argparse.ArgumentParser:
    """Add one command with its summary and an example, and bind its handler."""
    parser: argparse.ArgumentParser = group.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"example:\n  {example}",
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def add_tenant(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", required=True, help="tenant id (the runner's namespace)")


def add_output(
    parser: argparse.ArgumentParser, choices: tuple[str, ...] = ("text", "json")
) -> None:
    parser.add_argument("-o", "--output", choices=choices, default=choices[0], help="output format")


def emit(document: Any, output: str, text: str | None = None) -> None:
    """Print ``document`` as JSON or YAML, or ``text`` (one line per item) for humans."""
    if output == "json":
        print(json.dumps(document, indent=2, sort_keys=True))
    elif output == "yaml":
        import yaml

        print(yaml.safe_dump(document, sort_keys=False), end="")
    elif text is not None:
        print(text)


def parse_duration(text: str) -> timedelta:
    """``90``, ``0.5``, ``90s``, ``15m``, ``1h``, ``1h30m``, ``2d``."""
    if re.fullmatch(r"\d+(\.\d+)?", text, re.ASCII):
        return timedelta(seconds=float(text))
    match = _DURATION.fullmatch(text)
    if not text or not match:
        raise ConfigError(f"duration {text!r}: use e.g. 90s, 15m, 1h or 1h30m")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def parse_size(text: str) -> int:
    """``1048576``, ``512K``, ``8M``, ``1G`` (powers of 1024)."""
    match = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip(), re.ASCII | re.IGNORECASE)
    if not match:
        raise ConfigError(f"size {text!r}: use e.g. 512K, 8M or 1G")
    power = " KMG".index(match.group(2).upper() or " ")
    return int(match.group(1)) << (10 * power)


def seconds(text: str) -> float:
    return parse_duration(text).total_seconds()


def positive_seconds(text: str, flag: str) -> float:
    """A duration that must be more than zero (an interval of 0 would spin, a timeout of 0
    would fail everything)."""
    value = seconds(text)
    if value <= 0:
        raise ConfigError(f"{flag} {text!r}: must be more than zero")
    return value


_VAULT_TIMING: dict[str, float] = {}


def configure_vault(args: argparse.Namespace) -> None:
    """Remember ``--vault-timeout`` and ``--vault-deadline`` for every client of this process."""
    _VAULT_TIMING.update(
        request_timeout=positive_seconds(args.vault_timeout, "--vault-timeout"),
        operation_deadline=positive_seconds(args.vault_deadline, "--vault-deadline"),
    )


def vault_client(need_token: bool = True) -> VaultClient:
    """A client for the Vault in ``VAULT_*``/``BAO_*`` with this process's timing."""
    from broker.config import VaultSettings
    from broker.vault import RetryPolicy, VaultClient

    return VaultClient(VaultSettings.from_env(need_token=need_token), RetryPolicy(**_VAULT_TIMING))


@asynccontextmanager
async def vault(need_token: bool = True) -> AsyncIterator[VaultClient]:
    """A client for the Vault in ``VAULT_*``/``BAO_*``, closed afterwards."""
    client = vault_client(need_token)
    try:
        yield client
    finally:
        await client.aclose()


def read_text(flag: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read ({exc.strerror})") from None


# --- values from flags ---------------------------------------------------------------------


def add_value_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", action="append", metavar="K=V", help="a plain variable")
    parser.add_argument(
        "--secret",
        action="append",
        metavar="K[=V]",
        help="a secret; without =V it is read from a no-echo prompt (or one line of stdin)",
    )
    parser.add_argument(
        "--env-file", metavar="F", help="plain variables in the env-file dialect (see README)"
    )


def _split_pair(flag: str, text: str) -> tuple[str, str]:
    if "=" not in text:  # never echo the text: it may be a value typed without its name
        raise ConfigError(f"{flag}: expected KEY=VALUE (the argument has no '=')")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{flag}: empty key")
    return key, value


def _read_secret(key: str) -> str:
    """A secret value from a no-echo prompt, or one line of stdin when it is not a terminal."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"value for secret {key}: ")
    line = sys.stdin.readline()
    if not line:
        raise ConfigError(f"--secret {key}: no value given and stdin is empty")
    return line.rstrip("\n").rstrip("\r")


def _env_file(path: str) -> dict[str, str]:
    from broker import envfile

    return envfile.read(read_text("--env-file", Path(path)), f"--env-file {path}")


def collect_values(args: argparse.Namespace) -> dict[str, tuple[str, bool]]:
    """--env-file, then --env/--secret/--runtime-env: name → (value, is_secret).

    A name given twice by the explicit flags is refused; the env file is the lowest layer.
    """
    values = {k: (v, False) for k, v in _env_file(args.env_file).items()} if args.env_file else {}
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
