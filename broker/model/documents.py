"""Reading resources: files (YAML or JSON) → documents → validated models, errors as lines."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from broker.errors import ValidationError
from broker.limits import FILES, Limits, check_size, check_tree, parse_json
from broker.model.base import Resource
from broker.model.declarations import McpServer
from broker.model.environment import Environment
from broker.model.executions import AgentExecution, ExecutionContext, WorkflowExecution
from broker.model.templates import Agent, AgentInstance, Workflow, WorkflowInstance

RESOURCE_TYPES: dict[str, type[Resource]] = {
    cls.__name__: cls
    for cls in (
        Environment,
        Agent,
        Workflow,
        AgentInstance,
        WorkflowInstance,
        AgentExecution,
        WorkflowExecution,
        ExecutionContext,
        McpServer,
    )
}

T = TypeVar("T", bound=Resource)

_HINTS = {
    "ApiResourceReference": "a reference has scope, org, kind, slug and version (no id or name)",
}


def _describe(document: Mapping[str, Any]) -> str:
    """``Kind name`` for error messages; a name that is not printable is quoted (one line)."""
    kind = document.get("kind", "resource")
    metadata = document.get("metadata")
    name = ""
    if isinstance(metadata, Mapping):
        name = str(metadata.get("name") or metadata.get("slug") or metadata.get("id") or "")
    if not name.isprintable():
        name = repr(name)
    if not isinstance(kind, str) or not kind.isprintable():
        return "resource"
    return f"{kind} {name}".strip()


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in {"function-after", "function-before"} or "[" in str(part):
            continue
        elif not str(part).isprintable():  # a newline or NUL in a key: quoted, one line
            text += f"[{str(part)!r}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(document)"


def format_errors(error: pydantic.ValidationError) -> list[str]:
    """Turn pydantic's errors into 'field: reason' lines that never quote the input."""
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        where = _location(tuple(item["loc"]))
        kind = item["type"]
        if kind == "extra_forbidden":
            reason = "unknown field"
            if ".environment_refs[" in where or ".env_refs[" in where or "skill_refs[" in where:
                reason += f" ({_HINTS['ApiResourceReference']})"
        elif kind == "missing":
            reason = "is required"
        elif kind == "string_type":
            reason = "must be a string (quote numbers and booleans in YAML)"
        else:
            reason = str(item["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {reason}")
    return problems


def parse_resource(
    document: Any,
    expected: type[T] | tuple[type[Resource], ...] | None = None,
    stored: bool = False,
) -> T:
    """Validate one resource document (already parsed from YAML/JSON). ``stored``: it comes
    back from Vault, so secret values are ciphertext (longer than what a user may give)."""
    if not isinstance(document, Mapping):
        raise ValidationError("resource", ["(document): must be a mapping"])
    label = _describe(document)
    check_tree(document, FILES, label)
    kind = document.get("kind")
    cls = RESOURCE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValidationError(
            label, [f"kind: must be one of {', '.join(RESOURCE_TYPES)}, got {kind!r}"]
        )
    allowed = (expected,) if isinstance(expected, type) else expected
    if allowed and cls not in allowed:
        wanted = " or ".join(c.__name__ for c in allowed)
        raise ValidationError(label, [f"kind: expected {wanted}, got {kind}"])
    try:
        return cls.model_validate(document, context={"stored": stored})  # type: ignore[return-value]
    except pydantic.ValidationError as exc:
        raise ValidationError(label, format_errors(exc)) from None


def to_document(resource: Resource) -> dict[str, Any]:
    """The resource as a plain document for people: fields at their defaults left out."""
    dumped = resource.model_dump(mode="json", exclude_defaults=True)
    order = ("api_version", "kind", "metadata", "spec", "status")
    return {key: dumped[key] for key in order if key in dumped}


def _read_limited(path: Path, limits: Limits) -> str:
    """The file's text, never reading more than the limit allows (a FIFO or /dev/zero too)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limits.max_bytes + 1)
    except OSError as exc:
        raise ValidationError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    check_size(len(data), limits, str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError(str(path), ["not UTF-8 text"]) from None


def load_documents(path: Path, limits: Limits = FILES) -> list[Any]:
    """Read every document from a YAML (multi-document) or JSON file, within ``limits``."""
    text = _read_limited(path, limits)
    if path.suffix == ".json":
        loaded = parse_json(text, limits, str(path))
        return loaded if isinstance(loaded, list) else [loaded]
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except RecursionError:
        raise ValidationError(
            str(path), [f"nested deeper than {limits.max_depth} levels"]
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValidationError(str(path), [f"not valid YAML/JSON{where}"]) from None
    check_tree(documents, limits, str(path))
    return documents


def load_resource(path: Path, expected: type[T] | tuple[type[Resource], ...] | None = None) -> T:
    """Load exactly one resource from a file."""
    documents = load_documents(path)
    if len(documents) != 1:
        raise ValidationError(str(path), [f"expected one resource, found {len(documents)}"])
    return parse_resource(documents[0], expected)
