"""Merge environment layers and resolve ``${PLACEHOLDERS}``: pure functions, no I/O.

The rules (DESIGN.md, "Resolution rules"):

* Layers, lowest first: the template's ``env_spec`` (a non-empty value is a default, an empty
  one only declares the variable and makes it required), each Environment in ref order, then
  ``runtime_env``. Key by key; an empty value in an Environment declares, it does not set.
* Secret-ness is sticky: a key is secret if any layer that mentions it says so.
* A required variable still missing after the merge is an error naming every missing one.
* ``${NAME}``, ``${.secrets.NAME}`` and ``${.env_vars.NAME}`` are replaced anywhere inside a
  string; ``$${NAME}`` is the literal ``${NAME}``. One pass over parsed values: an inserted value
  is never scanned again. Any unknown or malformed placeholder fails the whole resolution,
  listing each with the place it appears.

Values are opaque here: secret values may be Transit ciphertext (``sealed``) on the control side
and plaintext in the sidecar. Nothing in this module looks inside them. MCP servers are plain
JSON documents in the shape of Stigmer's ``McpServerDefinition`` (``name`` and one of ``stdio``,
``http``, ``docker``), so the runner side needs no model classes to resolve them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from broker.errors import ResolveError, ValidationError
from broker.records import field, record

ServerConfig = dict[str, Any]
SERVER_TYPES = ("stdio", "http", "docker")

PLACEHOLDER = re.compile(r"\$\$\{(?P<escaped>[^{}]*)\}|\$\{(?P<body>[^{}]*)\}")
_REFERENCE = re.compile(
    r"^\s*(?:\.(?P<scope>secrets|env_vars)\.)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*$"
)


def referenced_name(match: re.Match[str]) -> str:
    """The variable a ``PLACEHOLDER`` match names ('' for an escaped or malformed one)."""
    if match.group("escaped") is not None:
        return ""
    reference = _REFERENCE.match(match.group("body"))
    return reference.group("name") if reference else ""


@record(frozen=True)
class Entry:
    """One layer's word on one variable."""

    value: str = field(repr=False)
    is_secret: bool = False
    sealed: bool = False  # the value is Transit ciphertext


@record(frozen=True)
class Layer:
    """A named source of entries, e.g. ``environment env-prod`` or ``runtime_env``."""

    name: str
    entries: Mapping[str, Entry]


@record(frozen=True)
class Variable:
    """A merged variable: the winning value, sticky secret-ness, and where the value came from."""

    value: str = field(repr=False)
    is_secret: bool
    sealed: bool
    source: str


def merge(
    template: Layer, layers: Sequence[Layer], optional: Iterable[str] = ()
) -> dict[str, Variable]:
    """Merge the template's env_spec with the later layers; refuse if required ones are missing.

    ``template`` entries with an empty value are declarations (required unless named in
    ``optional``); the others are defaults. Raises :class:`ValidationError` listing every
    required variable left unset.
    """
    optional = frozenset(optional)
    merged: dict[str, Variable] = {}
    secret: set[str] = set()
    required: list[str] = []
    for layer in (template, *layers):
        for name, entry in layer.entries.items():
            if entry.is_secret:
                secret.add(name)
            if entry.value == "":
                if layer is template and name not in optional:
                    required.append(name)
                continue
            merged[name] = Variable(entry.value, False, entry.sealed, layer.name)
    missing = sorted(name for name in required if name not in merged)
    if missing:
        raise ValidationError(
            "execution",
            [f"required variable {name} has no value in any layer" for name in missing],
        )
    return {
        name: Variable(var.value, name in secret, var.sealed, var.source)
        for name, var in merged.items()
    }


# --- placeholders ---------------------------------------------------------------------------


@record
class _Substitution:
    """Collects problems and the names used while substituting one document."""

    variables: Mapping[str, Variable]
    problems: list[str] = field(default_factory=list)
    used: set[str] = field(default_factory=set)

    def string(self, text: str, where: str, secret_allowed: bool = True, exposure: str = "") -> str:
        def replace(match: re.Match[str]) -> str:
            if match.group("escaped") is not None:
                return "${" + match.group("escaped") + "}"
            body = match.group("body")
            reference = _REFERENCE.match(body)
            if reference is None:
                self.problems.append(f"{where}: malformed placeholder ${{{body}}}")
                return match.group(0)
            name = reference.group("name")
            variable = self.variables.get(name)
            if variable is None:
                self.problems.append(f"{where}: unknown variable {name}")
                return match.group(0)
            if variable.is_secret and not secret_allowed:
                self.problems.append(
                    f"{where}: secret {name} would be exposed in {exposure} "
                    "(use --allow-secret-in-args to permit)"
                )
            self.used.add(name)
            return variable.value

        return PLACEHOLDER.sub(replace, text)

    def document(self, value: Any, where: str) -> Any:
        return map_strings(value, where, self.string)


def map_strings(value: Any, where: str, apply: Callable[[str, str], str]) -> Any:
    """A copy of a parsed JSON document with ``apply(text, where)`` on every string value (not
    key); ``where`` grows as ``$.key[0]`` for error messages."""
    if isinstance(value, str):
        return apply(value, where)
    if isinstance(value, Mapping):
        return {key: map_strings(item, f"{where}.{key}", apply) for key, item in value.items()}
    if isinstance(value, list):
        return [map_strings(item, f"{where}[{i}]", apply) for i, item in enumerate(value)]
    return value


def resolve_string(text: str, variables: Mapping[str, Variable], where: str = "value") -> str:
    """Resolve the placeholders of one string, failing closed."""
    sub = _Substitution(variables)
    result = sub.string(text, where)
    if sub.problems:
        raise ResolveError(sub.problems)
    return result


def resolve_document(document: Any, variables: Mapping[str, Variable]) -> Any:
    """Resolve every string value (not key) of a parsed JSON document, failing closed."""
    sub = _Substitution(variables)
    result = sub.document(document, "$")
    if sub.problems:
        raise ResolveError(sub.problems)
    return result


# Per server type: which string fields are resolved, and where a secret would end up.
# A field not listed keeps its text as is (name, enabled_tools).
_ARGV = "argv"
_URL = "a URL"
_SECRET_OK = ""
_FIELD_EXPOSURE: dict[str, dict[str, str]] = {
    "stdio": {
        "command": _ARGV,
        "args": _ARGV,
        "working_dir": "the working directory",
        "env_placeholders": _SECRET_OK,
    },
    "http": {"url": _URL, "query_params": _URL, "headers": _SECRET_OK},
    "docker": {
        "image": _ARGV,
        "args": _ARGV,
        "volumes": _ARGV,
        "network": _ARGV,
        "container_name": _ARGV,
        "env_placeholders": _SECRET_OK,
    },
}


def _resolve_field(sub: _Substitution, value: Any, where: str, exposure: str, allow: bool) -> Any:
    def one(text: str, at: str) -> str:
        return sub.string(text, at, secret_allowed=allow or not exposure, exposure=exposure)

    return map_strings(value, where, one)


def environment_names(variables: Iterable[str], servers: Iterable[ServerConfig]) -> dict[str, str]:
    """Every name that becomes a process's environment variable — the execution's variables
    and the env keys of stdio and docker servers — with where it appears (for errors)."""
    found = {name: "" for name in variables}
    for server in servers:
        for kind in ("stdio", "docker"):
            for key in (server.get(kind) or {}).get("env_placeholders") or {}:
                found.setdefault(key, f"mcp server {server.get('name')}: {kind}.env_placeholders.")
    return found


def server_type(server: ServerConfig) -> str:
    """Which of stdio, http and docker the server is ('' if none)."""
    return next((kind for kind in SERVER_TYPES if server.get(kind) is not None), "")


def resolve_servers(
    servers: Iterable[ServerConfig],
    variables: Mapping[str, Variable],
    allow_secret_in_args: bool = False,
) -> list[ServerConfig]:
    """Resolve every placeholder of the MCP server definitions, failing closed.

    Raises :class:`ResolveError` listing every unknown or malformed placeholder and every
    secret headed for argv or a URL, each with the server and field where it appears.
    """
    sub = _Substitution(variables)
    resolved: list[ServerConfig] = []
    for server in servers:
        kind = server_type(server)
        config = dict(server[kind])
        for name, exposure in _FIELD_EXPOSURE[kind].items():
            if name in config:
                where = f"mcp server {server['name']}: {kind}.{name}"
                config[name] = _resolve_field(
                    sub, config[name], where, exposure, allow_secret_in_args
                )
        if kind == "http":
            _check_url(sub, str(config.get("url", "")), f"mcp server {server['name']}: http.url")
        resolved.append({**server, kind: config})
    if sub.problems:
        raise ResolveError(sub.problems)
    return resolved


def _check_url(sub: _Substitution, url: str, where: str) -> None:
    if PLACEHOLDER.search(url):
        return  # already reported as a placeholder problem
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        sub.problems.append(f"{where}: not an http(s) URL")


def mask(variables: Mapping[str, Variable]) -> dict[str, dict[str, bool]]:
    """The shape the CLI and API may show: names and secret flags, never values."""
    return {name: {"secret": var.is_secret} for name, var in sorted(variables.items())}
