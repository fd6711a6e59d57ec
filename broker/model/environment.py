"""Environment: named sets of variables; secret values become Transit ciphertext when stored."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from broker.model.base import (
    ProtoModel,
    Resource,
    Value,
    VariableName,
    require_resource_name,
)


class EnvironmentValue(ProtoModel):
    value: Value = Field(default="", repr=False)
    is_secret: bool = False
    description: str = ""


class EnvironmentSpec(ProtoModel):
    description: str = ""
    data: dict[VariableName, EnvironmentValue] = Field(default_factory=dict)


class Environment(Resource):
    kind: Literal["Environment"]
    spec: EnvironmentSpec = Field(default_factory=EnvironmentSpec)
    owner_scopes: ClassVar[tuple[int, ...] | None] = (2, 3)

    @model_validator(mode="after")
    def _check_name(self) -> Environment:
        require_resource_name(self.metadata.slug or self.metadata.name, "metadata.name")
        return self

    @property
    def name(self) -> str:
        return self.metadata.slug or self.metadata.name
