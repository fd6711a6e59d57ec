"""Hostile input: names that reach a shell or a loader, values no output can hold, documents of
any shape. Every refusal names the field and changes nothing; the broker runs as another uid."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker import names
from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer, RuntimeValue
from broker.errors import ValidationError
from broker.model import Environment, parse_resource
from broker.vault import KV, VaultClient
from tests.conftest import (
    BROKER_UID,
    Vault,
    as_uid,
    cli,
    context_paths,
    nonroot_environ,
    owned_dir,
)
from tests.factories import agent, environment, instance, resource, write_context

CANARY = "cnry-hostile-5d1e-do-not-leak"


# --- identifiers: the whole string, ASCII only -------------------------------------------------


def _variants(good: str) -> list[str]:
    return [
        good + "\n", good + "\r", good + "\0", good + "\r\n", good[:2] + "\n" + good[2:],
        good[:1] + "\u0430" + good[2:],  # Cyrillic a
        "\uff41" + good[1:],  # fullwidth a
        good + "\u200b",  # zero-width space
    ]  # fmt: skip


@pytest.mark.unit
@pytest.mark.parametrize(
    ("check", "good"),
    [(names.tenant, "acme"), (names.execution_id, "exec-1"), (names.environment_name, "prod")],
    ids=["tenant", "execution id", "environment name"],
)
def test_identifier_checks_match_the_whole_string(check: Callable[[str], str], good: str) -> None:
    assert check(good) == good
    for bad in _variants(good):
        with pytest.raises(ValidationError):
            check(bad)


def _env_with_key(key: str) -> dict[str, Any]:
    return resource("Environment", "e", {"data": {key: {"value": "1"}}})


def _agent_with_server(name: str) -> dict[str, Any]:
    spec = {
        "instructions": "Review pull requests.",
        "mcp_servers": [{"name": name, "stdio": {"command": "x"}}],
    }
    return resource("Agent", "a", spec)


def _instance_with_slug(slug: str) -> dict[str, Any]:
    spec = {"agent_id": "a", "environment_refs": [{"kind": 53, "slug": slug}]}
    return resource("AgentInstance", "i", spec)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("build", "good"),
    [(_env_with_key, "TOKEN"), (_agent_with_server, "github"), (_instance_with_slug, "prod"),
     (lambda name: resource("Environment", name, {}), "prod")],
    ids=["variable name", "mcp server name", "environment ref slug", "metadata.name"],
)  # fmt: skip
def test_resource_names_match_the_whole_string(build: Callable[[str], Any], good: str) -> None:
    parse_resource(build(good))
    for bad in _variants(good):
        with pytest.raises(ValidationError) as refused:
            parse_resource(build(bad))
        assert "\n" not in str(refused.value) and "\r" not in str(refused.value)  # one line


# --- raw contexts: what a broken or hostile control plane could write --------------------------


def run_as_broker(
    vault: Vault, python: str, home: Path, tenant: str, execution_id: str, child: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`run` as the broker's uid (not root), with its JWT and output root in ``home``."""
    jwt = home / "sa.jwt"
    if not jwt.exists():
        jwt.write_text(vault.jwt_for(tenant, home).read_text())
        os.chown(jwt, BROKER_UID, -1)
    return subprocess.run(
        [*as_uid(BROKER_UID), python, "-m", "broker.cli", "run", "--tenant", tenant,
         "--execution", execution_id, "--out", str(home / "out"), "--jwt-file", str(jwt), *extra,
         "--", python, "-c", child],
        env=nonroot_environ(vault.environ()), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture
def broker_home(user_dir: Path) -> Path:
    return owned_dir(user_dir, "broker", BROKER_UID)


async def test_a_newline_in_a_variable_name_never_reaches_the_env_file(
    vault: Vault, admin: VaultClient, tenant: str, broker_home: Path, python_for_users: str
) -> None:
    """`id\\n` would make `set -a; . ./env` run `id`: refused at run, nothing written."""
    marker = broker_home / "ran"
    await write_context(admin, vault, tenant, "nl-1",
                        data={f"touch {marker}\nX": {"value": "1", "is_secret": False}})  # fmt: skip
    result = run_as_broker(vault, python_for_users, broker_home, tenant, "nl-1", "pass")
    assert result.returncode == 2, result.stderr
    assert "is not a valid variable name" in result.stderr
    assert not marker.exists() and not (broker_home / "out" / "nl-1").exists()
    assert await context_paths(admin, vault, tenant) == ["nl-1"]  # kept: nothing was run


# --- variable names that change how programs start --------------------------------------------


@pytest.mark.parametrize(
    ("where", "name"),
    [("env_spec", "LD_PRELOAD"), ("environment", "PATH"), ("runtime", "PYTHONPATH"),
     ("runtime", "BASH_ENV"), ("environment", "VAULT_ADDR"), ("runtime", "STIGMER_MCP_CONFIG"),
     ("runtime", "NODE_OPTIONS"), ("server env", "LD_LIBRARY_PATH"), ("server env", "HOME")],
)  # fmt: skip
async def test_refused_variable_names_at_create(
    vault: Vault, admin: VaultClient, tenant: str, where: str, name: str
) -> None:
    spec: dict[str, Any] = {name: {"value": "x"}} if where == "env_spec" else {}
    servers = [{"name": "s", "stdio": {"command": "c", "env_placeholders": {name: "x"}}}] if (
        where == "server env") else []  # fmt: skip
    await EnvironmentStore(admin, vault.layout).create(
        tenant, environment("e", **({name: ("x", False)} if where == "environment" else {}))
    )
    runtime = {name: RuntimeValue("x")} if where == "runtime" else {}
    issuer = ExecutionIssuer(admin, vault.layout)
    with pytest.raises(ValidationError) as refused:
        await issuer.create(tenant, agent(spec, servers), instance("e"), runtime_env=runtime)
    assert f"{name}: refused: " in str(refused.value)
    assert f"--allow-env-name {name}" in str(refused.value)
    assert await context_paths(admin, vault, tenant) == []
    await issuer.create(tenant, agent(spec, servers), instance("e"), runtime_env=runtime,
                        execution_id="allowed", allowed_env_names=[name])  # fmt: skip
    stored, _ = await KV(admin, "stigmer").read_resource(f"execution-contexts/{tenant}/allowed")
    assert stored["spec"]["allowed_env_names"] == [name]


async def test_refused_names_are_checked_again_at_run(
    vault: Vault, admin: VaultClient, tenant: str, broker_home: Path, python_for_users: str
) -> None:
    path_value = "/usr/bin:/bin"
    await write_context(
        admin, vault, tenant, "path-1", data={"PATH": {"value": path_value, "is_secret": False}}
    )
    refused = run_as_broker(vault, python_for_users, broker_home, tenant, "path-1", "pass")
    assert refused.returncode == 2 and "PATH: refused" in refused.stderr
    await write_context(admin, vault, tenant, "path-2", allowed_env_names=["PATH"],
                        data={"PATH": {"value": path_value, "is_secret": False}})  # fmt: skip
    child = f"import os, sys; sys.exit(0 if os.environ['PATH'] == {path_value!r} else 4)"
    allowed = run_as_broker(vault, python_for_users, broker_home, tenant, "path-2", child)
    assert allowed.returncode == 0, allowed.stderr


def test_the_cli_takes_the_allowance(vault: Vault, tenant: str, tmp_path: Path) -> None:
    agent_file = tmp_path / "agent.json"
    agent_file.write_text(json.dumps(agent().model_dump(mode="json")))
    args = ["execution", "create", "--tenant", tenant, "--agent", str(agent_file),
            "--runtime-env", "HOME=/tmp", "-o", "json"]  # fmt: skip
    refused = cli(vault, *args)
    assert refused.returncode == 2 and "HOME: refused: it decides where shells" in refused.stderr
    allowed = cli(vault, *args, "--allow-env-name", "HOME")
    assert allowed.returncode == 0, allowed.stderr


# --- values no output can hold ---------------------------------------------------------------


async def test_a_nul_byte_is_refused_at_create_naming_the_key(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    created = cli(vault, "env", "create", "nul", "--tenant", tenant, "--secret", "NUL_SECRET",
                  input=f"{CANARY}\0tail\n")  # fmt: skip
    assert created.returncode == 2
    assert "spec.data.NUL_SECRET.value: value contains a NUL byte" in created.stderr
    assert CANARY not in created.stderr
    document = resource("Environment", "nul2", {"data": {"K": {"value": "a\u0000b"}}})
    (tmp_path / "env.json").write_text(json.dumps(document))
    applied = cli(vault, "env", "apply", "-f", str(tmp_path / "env.json"), "--tenant", tenant)
    assert applied.returncode == 2 and "spec.data.K.value: value contains a NUL" in applied.stderr
    assert await EnvironmentStore(admin, vault.layout).list(tenant) == []


async def test_a_nul_byte_in_a_context_is_refused_at_run(
    vault: Vault, admin: VaultClient, tenant: str, broker_home: Path, python_for_users: str
) -> None:
    await write_context(admin, vault, tenant, "nul-ctx",
                        data={"K": {"value": "a\u0000b", "is_secret": False}})  # fmt: skip
    result = run_as_broker(vault, python_for_users, broker_home, tenant, "nul-ctx", "pass")
    assert (
        result.returncode == 2 and "spec.data.K: needs a string value without NUL" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (broker_home / "out" / "nul-ctx").exists()


def test_values_are_not_echoed_when_the_flag_is_malformed(
    vault: Vault, tenant: str, tmp_path: Path
) -> None:
    agent_file = tmp_path / "agent.json"
    agent_file.write_text(json.dumps(agent().model_dump(mode="json")))
    result = cli(vault, "execution", "create", "--tenant", tenant, "--agent", str(agent_file),
                 "--runtime-env", f"secret:{CANARY}")  # fmt: skip
    assert result.returncode == 2 and CANARY not in result.stderr
    assert "--runtime-env: expected KEY=VALUE" in result.stderr


# --- documents of any shape ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_deeply_nested_file_is_one_line(
    vault: Vault, tenant: str, tmp_path: Path, suffix: str
) -> None:
    depth = 100_000
    text = "[" * depth + "]" * depth if suffix == ".json" else "- " * 2000 + "x\n"
    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    result = cli(vault, "env", "apply", "-f", str(path), "--tenant", tenant)
    assert result.returncode == 2, result.stderr
    assert "nested deeper than 64 levels" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_an_alias_bomb_is_refused(vault: Vault, tenant: str, tmp_path: Path) -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join('*' + chr(97 + i) for _ in range(10))}]"
              for i in range(8)]  # fmt: skip
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    result = cli(vault, "env", "apply", "-f", str(path), "--tenant", tenant)
    assert result.returncode == 2 and "more than 200000 items" in result.stderr


def test_a_huge_file_is_refused_without_reading_it_all(vault: Vault, tenant: str) -> None:
    result = cli(vault, "env", "apply", "-f", "/dev/zero", "--tenant", tenant)
    assert result.returncode == 2 and "larger than" in result.stderr


async def test_a_large_context_is_refused_before_decrypting(
    vault: Vault, admin: VaultClient, tenant: str, broker_home: Path, python_for_users: str
) -> None:
    big = {f"V{i}": {"value": "x" * 20_000, "is_secret": False} for i in range(1000)}  # ~20 MB
    await write_context(admin, vault, tenant, "big-ctx", data=big)
    result = run_as_broker(vault, python_for_users, broker_home, tenant, "big-ctx", "pass")
    assert result.returncode == 2, result.stderr
    assert "larger than 8388608 bytes" in result.stderr
    assert not any('"msg": "execution prepared"' in line for line in result.stderr.splitlines())
    medium = {f"V{i}": {"value": "x" * 20_000, "is_secret": False} for i in range(50)}  # ~1 MB
    await write_context(admin, vault, tenant, "medium-ctx", data=medium)
    tight = run_as_broker(vault, python_for_users, broker_home, tenant, "medium-ctx", "pass",
                          "--max-context-size", "512K")  # fmt: skip
    assert tight.returncode == 2 and "larger than 524288 bytes" in tight.stderr  # configurable
    default = run_as_broker(vault, python_for_users, broker_home, tenant, "medium-ctx", "pass")
    assert default.returncode == 0, default.stderr[-2000:]


async def test_a_60k_secret_stays_readable_and_deletable(
    vault: Vault, admin: VaultClient, tenant: str, broker_home: Path, python_for_users: str
) -> None:
    value = CANARY + "x" * 60_000
    store = EnvironmentStore(admin, vault.layout)
    await store.create(tenant, environment("big", BIG=(value, True)))
    stored = (await store.get(tenant, "big")).spec.data["BIG"].value
    assert stored.startswith("vault:v1:") and len(stored) > 64 * 1024  # longer than the input
    await ExecutionIssuer(admin, vault.layout).create(tenant, agent(), instance("big"),
                                                      execution_id="big-secret")  # fmt: skip
    child = f"import os, sys; sys.exit(0 if os.environ['BIG'] == {value!r} else 4)"
    assert (
        run_as_broker(vault, python_for_users, broker_home, tenant, "big-secret", child).returncode
        == 0
    )
    await store.delete(tenant, "big")
    assert await store.list(tenant) == []


@pytest.mark.unit
def test_resource_parse_checks_depth_before_the_models() -> None:
    deep: Any = "x"
    for _ in range(200):
        deep = {"k": deep}
    document = resource("Environment", "e", {"description": "", "data": {}})
    document["metadata"]["labels"] = deep
    with pytest.raises(ValidationError, match="nested deeper than 64 levels"):
        parse_resource(document, Environment)
