"""The ``stigmer-broker`` command: arguments in, one line, a hint and an exit code out on error.

One module per command group (``dev``, ``admin``, ``control``, ``runner``), each holding its
flags beside its handlers and importing what it needs only when a handler runs. Every
:class:`~broker.errors.BrokerError` becomes ``stigmer-broker: error: <message>`` plus its
``hint`` on stderr, with the exit code from :data:`EXIT_CODES`; no traceback, no value.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn

from broker import __version__, errors
from broker.cli import admin, api, control, dev, reaper, runner
from broker.cli.common import PROG, HelpFormatter, configure_vault
from broker.hardening import harden

# The one table from error class to exit code; most specific first.
EXIT_CODES: list[tuple[type[errors.BrokerError], int]] = [
    (errors.ClaimConflict, 9),
    (errors.ExecutionGone, 10),
    (errors.ExecutionUnknown, 11),
    (errors.VaultConfigError, 2),
    (errors.PermissionDenied, 8),
    (errors.VaultError, 3),
    (errors.IdentityError, 4),
    (errors.DecryptError, 5),
    (errors.RenderError, 6),
    (errors.CleanupError, 7),
    (errors.ConfigError, 2),
    (errors.ValidationError, 2),
    (errors.ResolveError, 2),
    (errors.BrokerError, 1),
]


def exit_code(error: errors.BrokerError) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(error, cls))


GROUPS = (dev, admin, control, api, reaper, runner)
GLOBAL_VALUE_FLAGS = ("--log-level", "--vault-timeout", "--vault-deadline")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``command``) one with only the group that holds ``command``: the
    same parsing, help and errors for that command, without building the other ~30."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Vault-backed secrets broker for Stigmer agent and workflow runners",
        epilog="example:\n  stigmer-broker dev up && source .vault-dev/env && stigmer-broker env",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    for group in GROUPS:
        if command is None or command in group.COMMANDS:
            group.register(commands)
    if command is None or command == "completion":
        completion = commands.add_parser(
            "completion", help="print a shell completion script", formatter_class=HelpFormatter,
            epilog="example:\n  stigmer-broker completion bash"
            " > /etc/bash_completion.d/stigmer-broker",
        )  # fmt: skip
        completion.add_argument("shell", choices=["bash", "zsh"])
        completion.set_defaults(handler=_completion)
    _everywhere(commands)
    return parser


def command_in(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names, if it surely names one: the first word that is neither a
    global option nor its value (``--log-level debug``, ``--log-level=debug``, argparse's
    abbreviations). None when unsure (help, an unknown option or word): build everything."""
    words = iter(argv)
    for word in words:
        if not word.startswith("-") or word == "-":
            known = any(word in group.COMMANDS for group in GROUPS) or word == "completion"
            return word if known else None
        if "=" in word:
            continue
        flags = [flag for flag in GLOBAL_VALUE_FLAGS if flag.startswith(word) and len(word) > 2]
        if len(flags) != 1:
            return None  # --help, --version, "--", "--v" (ambiguous), an unknown option
        next(words, None)  # its value
    return None


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Options every command takes, before or after its name (like the Vault CLI's)."""
    group = parser.add_argument_group("global options")

    def add(flag: str, default: str | None, help_text: str, **extra: object) -> None:
        if defaults:
            group.add_argument(flag, default=default, help=help_text, **extra)  # type: ignore[arg-type]
        else:  # SUPPRESS: not given here, the top level's value stands
            shown = f" (default: {default})" if default else ""
            group.add_argument(flag, default=argparse.SUPPRESS, help=help_text + shown, **extra)  # type: ignore[arg-type]

    add("--log-level", None, "level of the JSON log lines on stderr (default: info for run, "
        "sidecar and reaper, warning for the others)",
        choices=["debug", "info", "warning", "error"])  # fmt: skip
    add("--vault-timeout", "10s", "timeout of one Vault request")
    add("--vault-deadline", "30s",
        "how long one Vault operation may take, retries of transient faults included")  # fmt: skip


def _everywhere(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Give every (sub)command the global options; given there, they win over the top level's."""
    for parser in set(commands.choices.values()):
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for action in nested:
                _everywhere(action)
        else:
            _global_options(parser, defaults=False)


def _completion(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


class StartUp:
    """While the installed command starts — imports, parsing, set-up — nothing it allocates is
    garbage yet, and the cyclic collector's passes over the growing heap only cost (~10 ms of
    a ``run`` here). :func:`entry` pauses the collector; it resumes, with everything from
    start-up frozen out of its view, once the command's first step is done."""

    paused = False

    @classmethod
    def pause(cls) -> None:
        gc.disable()
        cls.paused = True

    @classmethod
    def resume(cls) -> None:
        if cls.paused:
            cls.paused = False
            gc.freeze()
            gc.enable()


async def _started(command: Coroutine[Any, Any, Any]) -> Any:
    """Run ``command``; the collector resumes after its first step (up to its first wait)."""
    import asyncio

    asyncio.get_running_loop().call_soon(StartUp.resume)
    return await command


def _dispatch(args: argparse.Namespace) -> int:
    import inspect

    if not inspect.iscoroutinefunction(args.handler):
        StartUp.resume()
    result = args.handler(args)
    if inspect.iscoroutine(result):
        import asyncio  # here: ~50 ms that --help and the synchronous commands do without

        result = asyncio.run(_started(result))
    return int(result)


def _without_ssl_over_plain_http() -> None:
    """asyncio loads ssl (with OpenSSL: ~8-9 ms of a cold ``run``) only to offer TLS, which a
    Vault reached over plain http never needs. Python supports running without ssl (a build
    without OpenSSL): its import then fails, and asyncio and our transport do without."""
    from broker.config import plain_http_only

    if plain_http_only():
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:
        print(f"{PROG} {__version__}")  # without building every command's parser
        return 0
    harden()
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(command_in(words)).parse_args(words)
    from broker import logs

    quiet = args.command_name not in (*runner.RUNNER_COMMANDS, "reaper", "control")
    logs.setup(args.log_level or ("warning" if quiet else "info"))
    if args.command_name == "run":
        _without_ssl_over_plain_http()
    try:
        configure_vault(args)
        return _dispatch(args)
    except errors.BrokerError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"{PROG}: hint: {exc.hint}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `… | head`: the reader left; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def entry() -> NoReturn:
    """The installed command: :func:`main`, then a prompt exit.

    What CPython does at exit beyond the atexit handlers and the flush of stdout and stderr —
    freeing every module and object one by one — is 50-70 ms of a 300 ms ``run`` on a small
    VM and changes nothing a process exit does not (memory, descriptors and sockets go with
    the process). So those two are done here, then ``os._exit``.
    """
    StartUp.pause()
    try:
        code = main()
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        if not isinstance(exc.code, int | None):
            raise
        code = exc.code or 0
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)  # a thread still works: CPython's exit waits for it
    os._exit(_flushed(code))


def _flushed(code: int) -> int:
    """Run the atexit handlers (logging's flush among them) and flush stdout and stderr;
    the exit code CPython would give (120 when stdout cannot be flushed)."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except BrokenPipeError:  # `… | head`: the reader left, as in main()
            pass
        except (OSError, ValueError):
            code = code or 120
    return code
