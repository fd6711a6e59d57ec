"""CLI conventions: --version, help with defaults and an example, completion, a closed stdout,
one exit code per error class, hints printed."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import gc
import inspect
import os
import subprocess
import sys

import pytest

from broker import __version__, errors
from broker.cli import (
    EXIT_CODES,
    GROUPS,
    StartUp,
    _completion,
    _dispatch,
    build_parser,
    command_in,
    exit_code,
)


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                leaves = commands(sub, (*path, name))
                found += leaves or [(*path, name)]
    return found


def broker(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args], capture_output=True, text=True, timeout=60,
        check=False, **kwargs,  # type: ignore[call-overload]
    )  # fmt: skip


def test_version() -> None:
    result = broker("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"stigmer-broker {__version__}"


@pytest.mark.unit
@pytest.mark.parametrize("path", commands(build_parser()), ids=" ".join)
def test_every_command_has_an_example_and_shows_its_defaults(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*path, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "example:\n  stigmer-broker " in text
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    for action in parser._actions:
        shown = action.help and action.help != argparse.SUPPRESS
        if action.default not in (None, False, [], argparse.SUPPRESS) and shown:
            assert f"(default: {action.default})" in " ".join(text.split()), action.dest


@pytest.mark.unit
def test_every_reporting_command_speaks_json() -> None:
    quiet = {("dev", "token"), ("completion",), ("run",), ("sidecar",), ("control", "serve")}
    for path in commands(build_parser()):
        if path in quiet:
            continue
        parser = build_parser()
        for name in path:
            action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = action.choices[name]
        output = next(a for a in parser._actions if a.dest == "output")
        assert "json" in (output.choices or []), path


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts(shell: str) -> None:
    result = broker("completion", shell)
    assert result.returncode == 0
    assert "stigmer-broker" in result.stdout and "execution" in result.stdout
    if shell == "bash":
        check = subprocess.run(["bash", "-n"], input=result.stdout, text=True, check=False)
        assert check.returncode == 0


def test_a_closed_stdout_ends_quietly() -> None:
    """`stigmer-broker … | head -c 10`: the reader leaves early; no traceback, exit 0."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # smaller than the script: EPIPE follows
    writer = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "completion", "bash"],
        stdout=write_end, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    assert os.read(read_end, 10)
    os.close(read_end)  # the reader leaves
    _, stderr = writer.communicate(timeout=30)
    assert writer.returncode == 0, stderr
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr


@pytest.mark.unit
def test_every_error_class_has_an_exit_code() -> None:
    classes = [c for c in vars(errors).values() if inspect.isclass(c)
               and issubclass(c, errors.BrokerError)]  # fmt: skip
    mapped = {cls for cls, _ in EXIT_CODES}
    for cls in classes:
        assert any(issubclass(cls, m) for m in mapped), cls
    vault = errors.VaultUnavailable("read", "p", errors.Fault.SEALED, 503)
    assert exit_code(vault) == 3  # unreachable, sealed, 5xx: the Vault code
    assert exit_code(errors.IdentityError("login failed", "wrong audience")) == 4
    assert exit_code(errors.PermissionDenied("read", "p", errors.Fault.FORBIDDEN, 403)) == 8
    tls = errors.VaultConfigError("read", "p", errors.Fault.TLS, "bad ca", "set VAULT_CACERT")
    assert exit_code(tls) == 2 and tls.hint == "set VAULT_CACERT"
    assert exit_code(errors.ClaimConflict("x", "held")) == 9


def test_the_hint_is_printed(tmp_path: object) -> None:
    environ = {"PATH": "/usr/bin:/bin"}
    result = broker("env", "list", "--tenant", "acme", env=environ)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "stigmer-broker: error: VAULT_ADDR (or BAO_ADDR) is not set",
        "stigmer-broker: hint: `source .vault-dev/env` after `dev up`, or export the address "
        "of your Vault",
    ]


def leaf(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.unit
@pytest.mark.parametrize("path", commands(build_parser()), ids=" ".join)
def test_every_command_takes_the_global_options(path: tuple[str, ...]) -> None:
    flags = {flag for action in leaf(path)._actions for flag in action.option_strings}
    assert {"--log-level", "--vault-timeout", "--vault-deadline"} <= flags


@pytest.mark.unit
@pytest.mark.parametrize(
    "command",
    [["env", "list", "--tenant", "acme"],
     ["sidecar", "--tenant", "acme", "--socket", "s", "--out", "o"],
     ["run", "--tenant", "acme", "--execution", "e", "--out", "o"]],
    ids=lambda command: command[0],
)  # fmt: skip
def test_global_options_before_or_after_the_command(command: list[str]) -> None:
    parser, flags = build_parser(), ["--vault-timeout", "7s", "--log-level", "debug"]
    tail = ["--", "true"] if command[0] == "run" else []
    for argv in ([*flags, *command, *tail], [*command, *flags, *tail]):
        args = parser.parse_args(argv)
        assert (args.vault_timeout, args.log_level) == ("7s", "debug"), argv
    args = parser.parse_args([*command, *tail])
    assert (args.vault_timeout, args.vault_deadline, args.log_level) == ("10s", "30s", None)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["run", "--tenant", "a"], "run"),
     (["--log-level", "debug", "sidecar"], "sidecar"),
     (["--log-level=debug", "--vault-timeout", "3s", "env", "list"], "env"),
     (["--log", "debug", "--vault-d", "9s", "execution"], "execution"),  # abbreviations
     (["--vault-t", "run", "dev"], "dev"),  # "run" is the value of --vault-timeout
     (["completion", "bash"], "completion"),
     (["--v", "1", "run"], None),  # ambiguous: --version, --vault-timeout, --vault-deadline
     (["--help", "run"], None), (["-h"], None), (["--version"], None), (["--", "run"], None),
     (["--bogus", "run"], None), (["nosuch"], None), ([], None), (["--log-level"], None)],
)  # fmt: skip
def test_the_command_is_found_only_when_sure(argv: list[str], expected: str | None) -> None:
    assert command_in(argv) == expected


@pytest.mark.unit
def test_each_group_says_which_commands_it_registers() -> None:
    whole = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    declared = [name for group in GROUPS for name in group.COMMANDS]
    assert [*declared, "completion"] == list(whole.choices)
    for name in whole.choices:
        alone = build_parser(name)
        only = next(a for a in alone._actions if isinstance(a, argparse._SubParsersAction))
        assert name in only.choices and len(only.choices) < len(whole.choices)


@pytest.mark.unit
@pytest.mark.parametrize("path", commands(build_parser()), ids=" ".join)
def test_one_commands_parser_parses_and_helps_as_the_whole_one(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    helps = []
    for parser in (build_parser(), build_parser(path[0])):
        with pytest.raises(SystemExit):
            parser.parse_args(["--log-level", "debug", *path, "--help"])
        helps.append(capsys.readouterr().out)
        with pytest.raises(SystemExit):  # a usage error: same message
            parser.parse_args([*path, "--no-such-flag"])
        helps.append(capsys.readouterr().err)
    assert helps[0] == helps[2] and helps[1] == helps[3]
    argv = ["--vault-timeout", "7s", *path, "--log-level", "debug"]
    outcomes = []
    for parser in (build_parser(), build_parser(path[0])):
        try:
            outcomes.append({k: v for k, v in vars(parser.parse_args(argv)).items()
                             if k != "handler"})  # fmt: skip
        except SystemExit:  # a required option missing: the same message
            outcomes.append({"error": capsys.readouterr().err})
    assert outcomes[0] == outcomes[1]


def test_the_installed_command_flushes_everything_before_its_prompt_exit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``entry`` leaves with os._exit: whatever was printed still arrives, whole, and the exit
    codes are main()'s and argparse's."""
    script = broker("completion", "bash")
    completion = argparse.Namespace(shell="bash")  # noqa: S604 - the argument, not a shell
    assert _completion(completion) == 0  # not main(): main() sets up logging
    assert script.returncode == 0 and script.stdout == capsys.readouterr().out
    assert len(script.stdout) > 4096  # more than one pipe buffer's worth
    usage = broker("run", "--tenant", "a", "--execution", "e", "--no-such-flag")
    assert usage.returncode == 2 and "unrecognized arguments: --no-such-flag" in usage.stderr
    helped = broker("run", "--help")
    assert helped.returncode == 0 and "--execution" in helped.stdout
    hint = broker("env", "list", "--tenant", "acme", env={"PATH": "/usr/bin:/bin"})
    assert hint.returncode == 2 and "hint:" in hint.stderr


@pytest.mark.unit
def test_the_collector_pauses_only_while_a_command_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """entry() pauses the cyclic collector; an async command's first step (imports, set-up)
    runs without it, the rest with it; a synchronous command runs with it throughout."""
    seen: list[bool] = []
    frozen: list[bool] = []
    # Recorded, not done: freezing this worker's heap would move every test's leftovers into
    # the oldest generation, to be collected (and their warnings raised) in some later test.
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))

    async def serving(_: argparse.Namespace) -> int:
        seen.append(gc.isenabled())  # the first step: still starting
        await asyncio.sleep(0)
        seen.append(gc.isenabled())  # serving: collecting again
        return 0

    def printing(_: argparse.Namespace) -> int:
        seen.append(gc.isenabled())
        return 0

    try:
        for handler in (serving, printing):
            StartUp.pause()
            assert not gc.isenabled()
            assert _dispatch(argparse.Namespace(handler=handler)) == 0
            assert gc.isenabled() and not StartUp.paused
        assert seen == [False, True, True] and frozen == [True, True]
        assert _dispatch(argparse.Namespace(handler=printing)) == 0  # not paused: untouched
        assert gc.isenabled() and frozen == [True, True]
    finally:
        gc.enable()


def test_a_token_with_a_line_break_is_refused_without_showing_it() -> None:
    environ = {"PATH": "/usr/bin:/bin", "VAULT_ADDR": "http://127.0.0.1:9",
               "VAULT_TOKEN": "hvs.CANARY\n"}  # fmt: skip
    result = broker("env", "list", "--tenant", "acme", env=environ)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "VAULT_TOKEN (or BAO_TOKEN) holds a space, a line break" in result.stderr
    assert "CANARY" not in result.stderr + result.stdout


@pytest.mark.unit
def test_argparse_messages_are_translated_once_each() -> None:
    import gettext

    translate = vars(argparse)["_"]
    assert translate("usage: ") == gettext.gettext("usage: ")
    build_parser(None)
    before = translate.cache_info()
    build_parser(None)  # the same ~100 messages again: all remembered
    after = translate.cache_info()
    assert after.misses == before.misses and after.hits - before.hits >= 50
