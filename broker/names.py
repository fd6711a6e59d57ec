"""Every identifier rule, in one place: what may become a path segment, a file name or a variable.

A tenant becomes a Vault path segment and a Transit key name (``env-<tenant>``) and is
substituted into templated policies, so it must be a DNS label (it is a Kubernetes namespace).
Execution ids and Environment names are path segments; MCP server names are file names;
variable names reach a shell (``set -a; . ./env``) and a process environment.

Every check matches the *whole* string (``fullmatch``, ASCII only): a trailing newline, a NUL
or a Unicode look-alike never passes.
"""

from __future__ import annotations

import re

from broker.errors import ValidationError

TENANT = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
EXECUTION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}", re.ASCII)
ENVIRONMENT_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?", re.ASCII)
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", re.ASCII)


def matches(pattern: re.Pattern[str], value: object) -> bool:
    """True when ``value`` is a string that ``pattern`` matches as a whole, without ``..``."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None and ".." not in value


def _check(kind: str, value: str, pattern: re.Pattern[str]) -> str:
    if not matches(pattern, value):
        raise ValidationError(kind, [f"{value!r} is not valid: it must match {pattern.pattern}"])
    return value


def tenant(value: str) -> str:
    """A tenant id: a DNS label (the runner's Kubernetes namespace)."""
    return _check("tenant", value, TENANT)


def execution_id(value: str) -> str:
    """An execution id: letters, digits, '-' and '_', at most 128 characters."""
    return _check("execution id", value, EXECUTION_ID)


def environment_name(value: str) -> str:
    """An Environment name (its slug): letters, digits, '.', '-', '_'; no '..'."""
    return _check("environment name", value, ENVIRONMENT_NAME)


def variable_name(value: str) -> str:
    """An environment variable's name: a letter or '_', then letters, digits and '_'."""
    return _check("variable name", value, VARIABLE_NAME)


def new_execution_id() -> str:
    """A fresh execution id, ``exec-`` plus 20 random base-32 characters."""
    import secrets  # here: random and hmac cost every start-up ~4 ms, only ids need them

    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "exec-" + "".join(secrets.choice(alphabet) for _ in range(20))


# --- variable names that change how the runner's programs start --------------------------------

_REFUSED_NAMES: dict[str, str] = {
    "PATH": "it decides which program every command name runs",
    "HOME": "it decides where shells and tools read their start-up files",
    "IFS": "it changes how a shell splits words",
    "ENV": "a POSIX shell runs the file it names at start-up",
    "BASH_ENV": "bash runs the file it names at start-up",
    "PS4": "bash expands it (and runs command substitutions in it) when tracing",
    "PROMPT_COMMAND": "bash runs it before every prompt",
    "SHELLOPTS": "it turns on bash options at start-up",
    "BASHOPTS": "it turns on bash options at start-up",
    "CDPATH": "it changes where cd goes",
    "GLOBIGNORE": "it changes how a shell expands globs",
    "PYTHONPATH": "Python imports from the directories it names first",
    "PYTHONSTARTUP": "Python runs the file it names",
    "PYTHONHOME": "it replaces Python's standard library",
    "PYTHONINSPECT": "it keeps Python interactive after the program ends",
    "PYTHONBREAKPOINT": "Python calls the function it names at breakpoint()",
    "PYTHONUSERBASE": "Python imports from the directory it names",
    "NODE_OPTIONS": "Node.js takes command-line options from it (--require runs code)",
    "NODE_PATH": "Node.js resolves modules from the directories it names",
    "PERL5LIB": "Perl loads modules from the directories it names first",
    "PERLLIB": "Perl loads modules from the directories it names first",
    "PERL5OPT": "Perl takes command-line options from it (-M loads code)",
    "PERL5DB": "Perl runs it as its debugger",
    "RUBYOPT": "Ruby takes command-line options from it (-r loads code)",
    "RUBYLIB": "Ruby loads libraries from the directories it names first",
    "JAVA_TOOL_OPTIONS": "every JVM takes options from it (-javaagent runs code)",
    "_JAVA_OPTIONS": "every JVM takes options from it",
    "JDK_JAVA_OPTIONS": "the java launcher takes options from it",
    "CLASSPATH": "the JVM loads classes from it",
    "GLIBC_TUNABLES": "it tunes the C library of every program (and has been exploited)",
    "GCONV_PATH": "the C library loads conversion modules from it",
}
_REFUSED_PREFIXES: dict[str, str] = {
    "LD_": "the dynamic loader reads it (LD_PRELOAD loads code into every program)",
    "DYLD_": "the macOS dynamic loader reads it",
    "BASH_FUNC_": "bash imports it as a function definition",
    "VAULT_": "it is the broker's own configuration (Vault address, token, TLS)",
    "BAO_": "it is the broker's own configuration (OpenBao address, token, TLS)",
    "STIGMER_": "it is the broker's own (STIGMER_* variables describe the execution)",
}

_PREFIXES = tuple(_REFUSED_PREFIXES)


def refused_variable(name: str) -> str:
    """Why ``name`` may not reach a runner's environment unasked, or '' if it may."""
    if name in _REFUSED_NAMES:
        return _REFUSED_NAMES[name]
    if not name.startswith(_PREFIXES):  # the common case, in C
        return ""
    return next((why for prefix, why in _REFUSED_PREFIXES.items() if name.startswith(prefix)), "")


def refused_variables(
    found: dict[str, str], allowed: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """One problem line per refused name in ``found`` (name → where it appears)."""
    problems = []
    for name, where in sorted(found.items()):
        why = refused_variable(name)
        if why and name not in allowed:
            problems.append(
                f"{where}{name}: refused: {why} (allow it for one execution with "
                f"--allow-env-name {name})"
            )
    return problems
