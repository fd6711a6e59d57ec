"""The resources: Stigmer's examples load, and every validation rule has its bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest

from broker.errors import ValidationError
from broker.model import (
    Agent,
    AgentExecution,
    AgentInstance,
    Environment,
    ExecutionContext,
    Workflow,
    WorkflowExecution,
    WorkflowInstance,
    load_resource,
    parse_resource,
)

pytestmark = pytest.mark.unit

# A copy of shared/stigmer-examples.json, so the suite does not depend on the layout around it.
EXAMPLES = Path(__file__).resolve().parent / "data" / "stigmer-examples.json"


def _proto_shaped(value: Any) -> Any:
    """Use `_proto_shaped_guess` where the example offers one; drop annotation keys."""
    if isinstance(value, dict):
        if "_proto_shaped_guess" in value:
            return value["_proto_shaped_guess"]
        if "_as_documented" in value:
            return value["_as_documented"]
        return {k: _proto_shaped(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_proto_shaped(v) for v in value]
    return value


def _example_resources() -> list[tuple[str, dict[str, Any]]]:
    examples = json.loads(EXAMPLES.read_text())["examples"]
    out = []
    for example in examples:
        for index, resource in enumerate(example.get("resources") or [example["resource"]]):
            out.append((f"{example['id']}[{index}]", resource))
    return out


def _has_only_documented_form(resource: dict[str, Any]) -> bool:
    text = json.dumps(resource)
    return "_as_documented" in text and "_proto_shaped_guess" not in text


@pytest.mark.parametrize(
    ("label", "resource"),
    [r for r in _example_resources() if not _has_only_documented_form(r[1])],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_examples_load(label: str, resource: dict[str, Any]) -> None:
    loaded = parse_resource(_proto_shaped(resource))
    assert loaded.kind == resource["kind"]


def test_example_kinds_cover_the_flow() -> None:
    kinds = {parse_resource(_proto_shaped(r)).kind for _, r in _example_resources()[:-1]}
    assert {"Agent", "Environment", "AgentInstance", "AgentExecution"} <= kinds


@pytest.mark.parametrize(
    ("label", "resource"),
    [r for r in _example_resources() if _has_only_documented_form(r[1])],
)
def test_documented_mistakes_get_a_clear_error(label: str, resource: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_resource(_proto_shaped(resource))
    message = str(caught.value)
    assert "spec.environment_refs[0].id: unknown field" in message
    assert "slug" in message  # says what a reference does have


def _documented(value: Any) -> Any:
    if isinstance(value, dict):
        if "_as_documented" in value:
            return value["_as_documented"]
        return {k: _documented(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_documented(v) for v in value]
    return value


def test_plan_reference_as_documented_is_refused() -> None:
    """ex3 writes the ref as {id: env-github-prod}; ApiResourceReference has no id."""
    instance = next(r for label, r in _example_resources() if r["kind"] == "AgentInstance")
    with pytest.raises(ValidationError, match=r"environment_refs\[0\]\.id: unknown field"):
        parse_resource(_documented(instance))


def _agent(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"instructions": "Do useful things please."}
    base.update(spec)
    return {
        "api_version": "agentic.stigmer.ai/v1",
        "kind": "Agent",
        "metadata": {"name": "a"},
        "spec": base,
    }


def _environment(data: dict[str, Any], name: str = "env-a") -> dict[str, Any]:
    return {
        "api_version": "agentic.stigmer.ai/v1",
        "kind": "Environment",
        "metadata": {"name": name},
        "spec": {"data": data},
    }


def test_camel_case_and_enum_names_are_accepted() -> None:
    agent = parse_resource(
        {
            "apiVersion": "agentic.stigmer.ai/v1",
            "kind": "Agent",
            "metadata": {"name": "camel", "ownerScope": "organization"},
            "spec": {
                "instructions": "Be helpful and brief.",
                "envSpec": {"data": {"TOKEN": {"isSecret": True}}},
                "mcpServers": [
                    {"name": "s", "stdio": {"command": "x", "envPlaceholders": {"T": "${TOKEN}"}}}
                ],
                "skillRefs": [{"kind": "skill", "slug": "k"}],
            },
        },
        Agent,
    )
    assert agent.metadata.owner_scope == 2
    assert agent.spec.env_spec.data["TOKEN"].is_secret
    assert agent.spec.skill_refs[0].kind == 43


def test_yaml_and_json_files_load(tmp_path: Path) -> None:
    (tmp_path / "e.yaml").write_text(
        "api_version: agentic.stigmer.ai/v1\nkind: Environment\nmetadata: {name: e1}\n"
        "spec: {data: {A: {value: '1'}}}\n"
    )
    (tmp_path / "e.json").write_text(json.dumps(_environment({"B": {"value": "2"}}, "e2")))
    assert load_resource(tmp_path / "e.yaml", Environment).name == "e1"
    assert load_resource(tmp_path / "e.json", Environment).name == "e2"


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("api_version", {**_environment({}), "api_version": "ai.stigmer.agentic/v1"}, "api_version"),
    ("variable name", _environment({"1BAD": {"value": "x"}}), "variable name '1BAD' is invalid"),
    ("dash in name", _environment({"MY-VAR": {"value": "x"}}), "MY-VAR"),
    ("value too big", _environment({"BIG": {"value": "x" * 65537}}), "larger than 65536 bytes"),
    (
        "unknown field",
        _environment({"A": {"value": "x", "secret": True}}),
        "spec.data.A.secret: unknown field",
    ),
    (
        "unquoted number",
        _environment({"A": {"value": 30}}),
        "spec.data.A.value: must be a string (quote numbers and booleans in YAML)",
    ),
    ("env name", _environment({}, name="../etc"), "metadata.name"),
    (
        "platform scope env",
        {**_environment({}), "metadata": {"name": "e", "owner_scope": 1}},
        "owner_scope 1",
    ),
    ("instructions", _agent(instructions="short"), "spec.instructions"),
    (
        "duplicate servers",
        _agent(
            mcp_servers=[
                {"name": "s", "stdio": {"command": "a"}},
                {"name": "s", "http": {"url": "https://x"}},
            ]
        ),
        "'s' is used twice",
    ),
    (
        "unsafe server name",
        _agent(mcp_servers=[{"name": "../x", "stdio": {"command": "a"}}]),
        "file name",
    ),
    ("no server type", _agent(mcp_servers=[{"name": "s"}]), "exactly one of stdio, http, docker"),
    (
        "two server types",
        _agent(
            mcp_servers=[{"name": "s", "stdio": {"command": "a"}, "http": {"url": "https://x"}}]
        ),
        "got stdio, http",
    ),
    (
        "stdio command",
        _agent(mcp_servers=[{"name": "s", "stdio": {"command": ""}}]),
        "stdio.command",
    ),
    (
        "placeholder key",
        _agent(
            mcp_servers=[{"name": "s", "stdio": {"command": "a", "env_placeholders": {"A B": "x"}}}]
        ),
        "'A B'",
    ),
    (
        "port range",
        _agent(
            mcp_servers=[
                {
                    "name": "s",
                    "docker": {"image": "i", "ports": [{"host_port": 0, "container_port": 1}]},
                }
            ]
        ),
        "host_port",
    ),
    (
        "port protocol",
        _agent(
            mcp_servers=[
                {
                    "name": "s",
                    "docker": {
                        "image": "i",
                        "ports": [{"host_port": 1, "container_port": 1, "protocol": "sctp"}],
                    },
                }
            ]
        ),
        "protocol",
    ),
    (
        "volume path",
        _agent(
            mcp_servers=[
                {
                    "name": "s",
                    "docker": {
                        "image": "i",
                        "volumes": [{"host_path": "", "container_path": "/x"}],
                    },
                }
            ]
        ),
        "host_path",
    ),
    ("skill kind", _agent(skill_refs=[{"kind": 40, "slug": "x"}]), "skill_refs[0].kind must be 43"),
    (
        "sub-agent server",
        _agent(
            sub_agents=[
                {"name": "s", "instructions": "Ten chars at least", "mcp_servers": ["nope"]}
            ]
        ),
        "'nope'",
    ),
    (
        "ref kind 52",
        {
            "api_version": "agentic.stigmer.ai/v1",
            "kind": "AgentInstance",
            "metadata": {"name": "i"},
            "spec": {"agent_id": "a", "environment_refs": [{"kind": 52, "slug": "e"}]},
        },
        "kind must be 53 (environment), got 52 (workflow_execution)",
    ),
    (
        "ref without slug",
        {
            "api_version": "agentic.stigmer.ai/v1",
            "kind": "WorkflowInstance",
            "metadata": {"name": "i"},
            "spec": {"workflow_id": "w", "env_refs": [{"kind": 53}]},
        },
        "slug is required",
    ),
    (
        "empty runtime value",
        {
            "api_version": "agentic.stigmer.ai/v1",
            "kind": "AgentExecution",
            "metadata": {},
            "spec": {"agent_id": "a", "message": "hi", "runtime_env": {"A": {"value": ""}}},
        },
        "spec.runtime_env.A.value",
    ),
    (
        "execution scope",
        {
            "api_version": "agentic.stigmer.ai/v1",
            "kind": "AgentExecution",
            "metadata": {"owner_scope": 2},
            "spec": {"agent_id": "a", "message": "hi"},
        },
        "owner_scope 2",
    ),
    (
        "session or agent",
        {
            "api_version": "agentic.stigmer.ai/v1",
            "kind": "AgentExecution",
            "metadata": {},
            "spec": {"message": "hi"},
        },
        "one of session_id or agent_id",
    ),
    (
        "workflow tasks",
        {
            "api_version": "agentic.stigmer.ai/v1",
            "kind": "Workflow",
            "metadata": {"name": "w"},
            "spec": {"document": {"dsl": "1.0.0"}, "tasks": []},
        },
        "spec.tasks",
    ),
    (
        "workflow execution target",
        {
            "api_version": "agentic.stigmer.ai/v1",
            "kind": "WorkflowExecution",
            "metadata": {},
            "spec": {},
        },
        "one of workflow_instance_id or workflow_id",
    ),
    (
        "unknown kind",
        {"api_version": "agentic.stigmer.ai/v1", "kind": "Secret"},
        "kind: must be one of",
    ),
]


@pytest.mark.parametrize(
    ("case", "document", "expected"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_names_field_and_reason(
    case: str, document: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_resource(document)
    assert expected in str(caught.value)


def test_validation_errors_never_quote_values() -> None:
    canary = "CANARY-never-quote-me-1234"
    document = _environment({"BAD NAME": {"value": canary, "is_secret": True}})
    document["spec"]["data"]["OK"] = {"value": canary * 3000, "is_secret": True}
    with pytest.raises(ValidationError) as caught:
        parse_resource(document)
    assert canary not in str(caught.value)
    assert canary not in repr(caught.value)


def test_repr_never_shows_values() -> None:
    canary = "CANARY-repr-5678"
    environment = parse_resource(
        _environment({"A": {"value": canary, "is_secret": True}}), Environment
    )
    context = parse_resource(
        {
            "api_version": "agentic.stigmer.ai/v1",
            "kind": "ExecutionContext",
            "metadata": {},
            "spec": {"execution_id": "e1", "data": {"A": {"value": canary, "is_secret": True}}},
        },
        ExecutionContext,
    )
    for shown in (repr(environment), str(environment), repr(context), str(context.spec)):
        assert canary not in shown


def test_expected_kind_is_enforced() -> None:
    with pytest.raises(ValidationError, match="expected Agent, got Environment"):
        parse_resource(_environment({}), Agent)


def test_resources_are_frozen() -> None:
    environment = parse_resource(_environment({"A": {"value": "1"}}), Environment)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        environment.spec.data["A"].value = "2"  # type: ignore[misc]
    assert copy.deepcopy(environment) == environment


@pytest.mark.parametrize(
    "cls", [Workflow, WorkflowInstance, WorkflowExecution, AgentExecution, AgentInstance]
)
def test_every_resource_type_validates(cls: type) -> None:
    documents = {
        Workflow: {"spec": {"document": {"dsl": "1.0.0"}, "tasks": [{"t": {}}]}},
        WorkflowInstance: {"spec": {"workflow_id": "w"}},
        WorkflowExecution: {"spec": {"workflow_id": "w", "runtime_env": {"A": {"value": "1"}}}},
        AgentExecution: {"spec": {"agent_id": "a", "message": "m"}},
        AgentInstance: {"spec": {"agent_id": "a", "environment_refs": [{"kind": 53, "slug": "e"}]}},
    }
    document = {
        "api_version": "agentic.stigmer.ai/v1",
        "kind": cls.__name__,
        "metadata": {"name": "x"},
    }
    document.update(documents[cls])
    assert isinstance(parse_resource(document, cls), cls)
