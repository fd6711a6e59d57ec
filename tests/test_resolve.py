"""Resolution rules: layer order, sticky secrets, required variables, placeholders."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import ResolveError, ValidationError
from broker.model import McpServerDefinition
from broker.resolve import (
    Entry,
    Layer,
    Variable,
    mask,
    merge,
    resolve_document,
    resolve_servers,
    resolve_string,
)

pytestmark = pytest.mark.unit


def plain(value: str) -> Entry:
    return Entry(value)


def secret(value: str) -> Entry:
    return Entry(value, is_secret=True)


def variables(**values: str) -> dict[str, Variable]:
    return {
        k: Variable(v, k.endswith("SECRET") or k.endswith("TOKEN"), False, "t")
        for k, v in values.items()
    }


def test_plan_worked_example() -> None:
    """env-base → env-prod → env-team → runtime_env, as in the Stigmer plan."""
    merged = merge(
        Layer("env_spec", {}),
        [
            Layer("environment env-base", {"LOG_LEVEL": plain("info"), "TIMEOUT": plain("30s")}),
            Layer(
                "environment env-prod", {"LOG_LEVEL": plain("warn"), "GITHUB_TOKEN": secret("g")}
            ),
            Layer("environment env-team", {"SLACK_WEBHOOK": secret("s")}),
            Layer("runtime_env", {"LOG_LEVEL": plain("debug"), "SPECIAL_TOKEN": secret("x")}),
        ],
    )
    assert {k: v.value for k, v in merged.items()} == {
        "LOG_LEVEL": "debug",
        "TIMEOUT": "30s",
        "GITHUB_TOKEN": "g",
        "SLACK_WEBHOOK": "s",
        "SPECIAL_TOKEN": "x",
    }
    assert merged["LOG_LEVEL"].source == "runtime_env"
    assert mask(merged)["GITHUB_TOKEN"] == {"secret": True}
    assert mask(merged)["TIMEOUT"] == {"secret": False}


def test_secret_is_sticky_even_when_a_later_layer_says_plain() -> None:
    merged = merge(
        Layer("env_spec", {"TOKEN": Entry("", is_secret=True)}),
        [Layer("env", {"TOKEN": plain("abc")}), Layer("runtime_env", {"TOKEN": plain("def")})],
    )
    assert merged["TOKEN"].is_secret
    assert merged["TOKEN"].value == "def"


def test_required_variables_all_listed() -> None:
    with pytest.raises(ValidationError) as caught:
        merge(
            Layer("env_spec", {"A": plain(""), "B": secret(""), "C": plain("default")}),
            [Layer("env", {"A": plain("")})],
        )
    assert caught.value.problems == [
        "required variable A has no value in any layer",
        "required variable B has no value in any layer",
    ]


def test_template_default_is_used_and_overridable() -> None:
    merged = merge(Layer("env_spec", {"REGION": plain("us-east-1")}), [])
    assert merged["REGION"].value == "us-east-1"
    merged = merge(
        Layer("env_spec", {"REGION": plain("us-east-1")}), [Layer("r", {"REGION": plain("eu")})]
    )
    assert merged["REGION"].value == "eu"


def test_placeholder_forms() -> None:
    values = variables(NAME="world", API_TOKEN="t0k")
    assert resolve_string("hello ${NAME}!", values) == "hello world!"
    assert resolve_string("Bearer ${API_TOKEN}", values) == "Bearer t0k"
    assert resolve_string("${.secrets.API_TOKEN}/${.env_vars.NAME}", values) == "t0k/world"
    assert resolve_string("$${NAME} stays", values) == "${NAME} stays"
    assert resolve_string("no placeholders $NAME ${", values) == "no placeholders $NAME ${"


def test_unknown_and_malformed_placeholders_all_listed() -> None:
    with pytest.raises(ResolveError) as caught:
        resolve_document(
            {"a": "${MISSING}", "b": ["${.secrets.ALSO}", "${not valid}"]}, variables(X="1")
        )
    assert caught.value.problems == [
        "$.a: unknown variable MISSING",
        "$.b[0]: unknown variable ALSO",
        "$.b[1]: malformed placeholder ${not valid}",
    ]


def test_single_pass_inserted_values_are_not_expanded() -> None:
    values = variables(A="${B}", B="boom", C="$${B}")
    assert resolve_string("${A}", values) == "${B}"
    assert resolve_string("${C}", values) == "$${B}"


def test_document_keys_are_not_resolved() -> None:
    assert resolve_document({"${A}": "${A}"}, variables(A="x")) == {"${A}": "x"}


def _server(**config: Any) -> dict[str, Any]:
    """A server definition as the context stores it: validated by the model, then JSON."""
    return McpServerDefinition.model_validate(config).model_dump(mode="json")


def test_servers_resolve_everywhere_allowed() -> None:
    servers = [
        _server(
            name="gh",
            stdio={
                "command": "npx",
                "args": ["${REGION}"],
                "env_placeholders": {"GH": "${GITHUB_TOKEN}"},
            },
        ),
        _server(
            name="api",
            http={
                "url": "https://${HOST}/mcp",
                "headers": {"Authorization": "Bearer ${API_TOKEN}"},
            },
        ),
        _server(
            name="d", docker={"image": "img:${REGION}", "env_placeholders": {"K": "${API_TOKEN}"}}
        ),
    ]
    values = variables(REGION="eu", GITHUB_TOKEN="g", API_TOKEN="a", HOST="h.example")
    gh, api, docker = resolve_servers(servers, values)
    assert gh["stdio"]["args"] == ["eu"] and gh["stdio"]["env_placeholders"] == {"GH": "g"}
    assert api["http"]["url"] == "https://h.example/mcp"
    assert api["http"]["headers"] == {"Authorization": "Bearer a"}
    assert docker["docker"]["image"] == "img:eu"
    assert servers[0]["stdio"]["args"] == ["${REGION}"]  # input untouched


def test_secret_in_argv_or_url_refused_unless_allowed() -> None:
    servers = [
        _server(name="s", stdio={"command": "tool", "args": ["--token=${API_TOKEN}"]}),
        _server(
            name="h", http={"url": "https://x/${API_TOKEN}", "query_params": {"k": "${API_TOKEN}"}}
        ),
        _server(name="d", docker={"image": "i", "args": ["${API_TOKEN}"]}),
    ]
    with pytest.raises(ResolveError) as caught:
        resolve_servers(servers, variables(API_TOKEN="a"))
    assert caught.value.problems == [
        "mcp server s: stdio.args[0]: secret API_TOKEN would be exposed in argv "
        "(use --allow-secret-in-args to permit)",
        "mcp server h: http.url: secret API_TOKEN would be exposed in a URL "
        "(use --allow-secret-in-args to permit)",
        "mcp server h: http.query_params.k: secret API_TOKEN would be exposed in a URL "
        "(use --allow-secret-in-args to permit)",
        "mcp server d: docker.args[0]: secret API_TOKEN would be exposed in argv "
        "(use --allow-secret-in-args to permit)",
    ]
    resolved = resolve_servers(servers, variables(API_TOKEN="a"), allow_secret_in_args=True)
    assert resolved[0]["stdio"]["args"] == ["--token=a"]


def test_unknown_placeholders_name_server_and_field() -> None:
    servers = [_server(name="api", http={"url": "https://x", "headers": {"A": "${NOPE}"}})]
    with pytest.raises(
        ResolveError, match=r"mcp server api: http.headers.A: unknown variable NOPE"
    ):
        resolve_servers(servers, {})


def test_resolved_url_must_be_http() -> None:
    servers = [_server(name="api", http={"url": "${HOST}/mcp"})]
    with pytest.raises(ResolveError, match="not an http"):
        resolve_servers(servers, variables(HOST="ftp://x"))


# --- properties -------------------------------------------------------------------------------

names = st.text(alphabet=string.ascii_uppercase + "_", min_size=1, max_size=6)
values = st.text(min_size=1, max_size=20)
layers = st.lists(
    st.dictionaries(names, st.tuples(values, st.booleans()), max_size=6), min_size=1, max_size=5
)


def _layers(raw: list[dict[str, tuple[str, bool]]]) -> list[Layer]:
    return [
        Layer(f"l{i}", {k: Entry(v, s) for k, (v, s) in layer.items()})
        for i, layer in enumerate(raw)
    ]


@given(layers)
def test_property_override_order_and_no_key_lost(raw: list[dict[str, tuple[str, bool]]]) -> None:
    merged = merge(Layer("env_spec", {}), _layers(raw))
    assert set(merged) == set().union(*raw)
    for name, variable in merged.items():
        last = max(i for i, layer in enumerate(raw) if name in layer)
        assert variable.value == raw[last][name][0]
        assert variable.source == f"l{last}"


@given(layers)
def test_property_secret_is_sticky(raw: list[dict[str, tuple[str, bool]]]) -> None:
    merged = merge(Layer("env_spec", {}), _layers(raw))
    for name, variable in merged.items():
        assert variable.is_secret == any(layer[name][1] for layer in raw if name in layer)


@given(st.dictionaries(names, values, min_size=1, max_size=5), st.data())
def test_property_single_pass(table: dict[str, str], data: st.DataObject) -> None:
    """Resolving is one pass: the output is the template with each placeholder replaced once."""
    pieces = data.draw(
        st.lists(
            st.one_of(
                st.sampled_from(sorted(table)).map(lambda n: ("var", n)),
                st.text(alphabet="abc -", max_size=5).map(lambda t: ("text", t)),
            ),
            max_size=8,
        )
    )
    template = "".join("${" + p + "}" if kind == "var" else p for kind, p in pieces)
    expected = "".join(table[p] if kind == "var" else p for kind, p in pieces)
    resolved = resolve_string(
        template, {k: Variable(v, False, False, "t") for k, v in table.items()}
    )
    assert resolved == expected


@given(names, values)
def test_property_escape_is_literal(name: str, value: str) -> None:
    table = {name: Variable(value, False, False, "t")}
    assert resolve_string("$${" + name + "}", table) == "${" + name + "}"
    assert resolve_string("$${" + name + "}${" + name + "}", table) == "${" + name + "}" + value
