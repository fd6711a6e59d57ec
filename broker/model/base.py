"""The base of every Stigmer resource model: proto names or lowerCamelCase in, unknown fields
refused, enums by number or name, values never in ``repr()`` or validation errors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)
from pydantic.alias_generators import to_camel

from broker import names

API_VERSION = "agentic.stigmer.ai/v1"
MAX_VALUE_BYTES = 64 * 1024  # what a user may give
# What may come back from storage: Transit ciphertext of a MAX_VALUE_BYTES value is longer
# ("vault:vN:" + base64 of nonce, value and tag), and a stored Environment must stay readable.
MAX_STORED_VALUE_BYTES = 96 * 1024

REF_VERSION = re.compile(r"^$|^latest$|^[a-zA-Z0-9._-]+$|^[a-f0-9]{64}$")

# ApiResourceKind numbers (api_resource_kind.proto).
RESOURCE_KINDS: dict[str, int] = {
    "agent": 40,
    "agent_execution": 41,
    "session": 42,
    "skill": 43,
    "mcp_server": 44,
    "agent_instance": 45,
    "workflow": 50,
    "workflow_instance": 51,
    "workflow_execution": 52,
    "environment": 53,
    "execution_context": 54,
}
KIND_NAMES = {number: name for name, number in RESOURCE_KINDS.items()}
OWNER_SCOPES: dict[str, int] = {
    "unspecified": 0,
    "platform": 1,
    "organization": 2,
    "identity_account": 3,
}


def _enum(choices: Mapping[str, int], prefix: str) -> Any:
    """Accept an enum's number or its name (bare or with the proto prefix, any case)."""

    def convert(value: Any) -> Any:
        if isinstance(value, str):
            key = value.strip().lower()
            key = key.removeprefix(prefix)
            if key in choices:
                return choices[key]
            if key.isdigit():
                return int(key)
            raise ValueError(f"unknown value {value!r}; expected one of {', '.join(choices)}")
        return value

    return BeforeValidator(convert)


ResourceKind = Annotated[int, _enum(RESOURCE_KINDS, "api_resource_kind_")]
OwnerScope = Annotated[int, _enum(OWNER_SCOPES, "api_resource_owner_scope_"), Field(ge=0, le=3)]


def _check_variable_name(name: str) -> str:
    if not names.matches(names.VARIABLE_NAME, name):
        raise ValueError(
            f"variable name {name!r} is invalid: it must match {names.VARIABLE_NAME.pattern}"
        )
    return name


def _check_value(value: str, info: ValidationInfo) -> str:
    """No NUL (no env file or process environment can hold one) and a bounded size."""
    if "\0" in value:
        raise ValueError("value contains a NUL byte, which no environment can hold")
    stored = bool(info.context and info.context.get("stored"))
    limit = MAX_STORED_VALUE_BYTES if stored else MAX_VALUE_BYTES
    if len(value.encode("utf-8")) > limit:
        raise ValueError(f"value is larger than {limit} bytes")
    return value


VariableName = Annotated[str, AfterValidator(_check_variable_name)]
Value = Annotated[str, AfterValidator(_check_value)]


class ProtoModel(pydantic.BaseModel):
    """Base for every message: proto names or lowerCamelCase in, unknown fields refused."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        frozen=True,
        hide_input_in_errors=True,
        validate_by_name=True,
        validate_by_alias=True,
    )


class ApiResourceReference(ProtoModel):
    scope: OwnerScope = 0
    org: str = ""
    kind: ResourceKind = 0
    slug: str = ""
    version: Annotated[str, Field(pattern=REF_VERSION.pattern)] = ""


class EnvironmentRef(ApiResourceReference):
    """A reference that must name an Environment (kind 53) by slug."""

    @model_validator(mode="after")
    def _is_environment(self) -> EnvironmentRef:
        if self.kind != RESOURCE_KINDS["environment"]:
            got = KIND_NAMES.get(self.kind, "unspecified" if self.kind == 0 else "unknown")
            raise ValueError(f"kind must be 53 (environment), got {self.kind} ({got})")
        if not self.slug:
            raise ValueError("slug is required: it names the Environment")
        if not names.matches(names.ENVIRONMENT_NAME, self.slug):
            raise ValueError(f"slug {self.slug!r} is not a valid Environment name")
        return self


class Metadata(ProtoModel):
    name: str = ""
    slug: str = ""
    id: str = ""
    org: str = ""
    owner_scope: OwnerScope = 0
    visibility: int | str = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    version: dict[str, Any] = Field(default_factory=dict)

    @property
    def display(self) -> str:
        return self.name or self.slug or self.id or "<unnamed>"


class Resource(ProtoModel):
    api_version: Literal["agentic.stigmer.ai/v1"]
    metadata: Metadata
    status: dict[str, Any] | None = None

    owner_scopes: ClassVar[tuple[int, ...] | None] = None

    @model_validator(mode="after")
    def _check_owner_scope(self) -> Resource:
        allowed = type(self).owner_scopes
        scope = self.metadata.owner_scope
        if allowed is not None and scope != 0 and scope not in allowed:
            raise ValueError(
                f"metadata.owner_scope {scope} is not allowed for {type(self).__name__}; "
                f"allowed: {', '.join(str(s) for s in allowed)}"
            )
        return self


def require_resource_name(name: str, field: str) -> None:
    if not name:
        raise ValueError(f"{field} is required")
    if not names.matches(names.ENVIRONMENT_NAME, name):
        raise ValueError(f"{field} {name!r} must match {names.ENVIRONMENT_NAME.pattern}")
