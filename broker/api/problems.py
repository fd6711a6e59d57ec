"""Errors as ``application/problem+json`` (RFC 9457): a status, a title, what to fix, and for
invalid input one entry per problem with a JSON pointer to the field. Never a Vault response
body, never a value: the broker's error messages name fields and paths only."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from broker import errors

PROBLEM_TYPE = "application/problem+json"

# Most specific first; the first class that matches gives the status.
STATUSES: list[tuple[type[errors.BrokerError], int]] = [
    (errors.ResourceNotFound, 404),
    (errors.ContextNotFound, 404),
    (errors.ContextExpired, 410),
    (errors.ValidationError, 422),
    (errors.ResolveError, 422),
    (errors.ConfigError, 400),
    (errors.PermissionDenied, 403),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.RequestTooLarge, 413),
    (errors.VaultConfigError, 502),
    (errors.VaultUnavailable, 503),
    (errors.OutcomeUnknown, 503),
    (errors.VaultError, 502),
]

# "spec.data.BAD NAME: reason", "spec.env_refs[0].slug: reason", "surprise: unknown field":
# a bare identifier, then .key (keys may hold spaces) or [index] steps, then ": ".
_FIELD = re.compile(r"^([A-Za-z_]\w*(?:\.[^:.\[]+|\[\d+\])*): (.+)$")
_STEP = re.compile(r"\.|\[(\d+)\]")


def pointer(location: str) -> str:
    """``spec.env_refs[0].slug`` → ``/spec/env_refs/0/slug`` (RFC 6901 escaping)."""
    parts = [p for p in _STEP.split(location) if p]
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def field_errors(problems: list[str], prefix: str = "") -> list[dict[str, str]]:
    """One ``{"pointer", "detail"}`` per problem line; a line naming no field points at the
    body (or at ``prefix``)."""
    out = []
    for line in problems:
        match = _FIELD.match(line)
        where, detail = (match.group(1), match.group(2)) if match else ("", line)
        out.append({"pointer": prefix + (pointer(where) if where else ""), "detail": detail})
    return out


def status_of(error: errors.BrokerError) -> int:
    return next((code for cls, code in STATUSES if isinstance(error, cls)), 500)


def from_error(error: errors.BrokerError, prefix: str = "") -> web.Response:
    """The problem document for a broker error (``prefix``: where in the body the resource
    sits, e.g. ``/template``)."""
    status = status_of(error)
    body: dict[str, Any] = {"type": "about:blank", "title": _title(status), "status": status,
                            "detail": str(error)}  # fmt: skip
    if error.hint:
        body["hint"] = error.hint
    if isinstance(error, errors.ValidationError) and status == 422:
        body["errors"] = field_errors(error.problems, prefix)
    if isinstance(error, errors.VaultError):
        body["operation"] = error.operation
    headers = {}
    retry_after = getattr(error, "retry_after", None)
    if status == 503:
        headers["Retry-After"] = str(int(retry_after or 1))
    return web.json_response(body, status=status, content_type=PROBLEM_TYPE, headers=headers)


def problem(status: int, detail: str, **extra: Any) -> web.Response:
    body = {"type": "about:blank", "title": _title(status), "status": status, "detail": detail,
            **extra}  # fmt: skip
    return web.json_response(body, status=status, content_type=PROBLEM_TYPE)


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
