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
import secrets

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


def new_execution_id() -> str:
    """A fresh execution id, ``exec-`` plus 20 random base-32 characters."""
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "exec-" + "".join(secrets.choice(alphabet) for _ in range(20))
