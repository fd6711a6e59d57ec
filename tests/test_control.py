"""The control side against a real OpenBao: Environments and execution create."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer, RuntimeValue
from broker.errors import ResolveError, ValidationError
from broker.model import Workflow, WorkflowInstance, parse_resource
from broker.vault import KV, Transit, VaultClient
from tests.conftest import Vault, cli, context_paths
from tests.factories import agent, environment, instance


async def raw(admin: VaultClient, vault: Vault, path: str) -> dict[str, Any]:
    return (await KV(admin, vault.layout.kv_mount).read_resource(path))[0]


async def test_secret_values_are_stored_as_ciphertext(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    store = EnvironmentStore(admin, vault.layout)
    await store.create(
        tenant, environment("prod", TOKEN=("ghp_canary_value", True), REGION=("eu", False))
    )
    stored = (await raw(admin, vault, f"environments/{tenant}/prod"))["spec"]["data"]
    assert stored["TOKEN"]["value"].startswith("vault:v1:")
    assert "ghp_canary_value" not in json.dumps(stored)
    assert stored["REGION"]["value"] == "eu"
    assert await store.list(tenant) == ["prod"]


async def test_create_refuses_existing_and_apply_replaces(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    store = EnvironmentStore(admin, vault.layout)
    await store.create(tenant, environment("e", A=("1", False)))
    with pytest.raises(ValidationError, match="already exists"):
        await store.create(tenant, environment("e", A=("2", False)))
    assert (await raw(admin, vault, f"environments/{tenant}/e"))["spec"]["data"]["A"][
        "value"
    ] == "1"
    assert await store.apply(tenant, environment("e", A=("3", False))) == 2
    assert (await store.get(tenant, "e")).spec.data["A"].value == "3"
    await store.delete(tenant, "e")
    assert await store.list(tenant) == []
    with pytest.raises(ValidationError, match="not found"):
        await store.delete(tenant, "e")


async def test_execution_create_merges_on_ciphertext(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    store = EnvironmentStore(admin, vault.layout)
    await store.create(
        tenant, environment("base", LOG_LEVEL=("info", False), TIMEOUT=("30s", False))
    )
    await store.create(
        tenant, environment("prod", LOG_LEVEL=("warn", False), GITHUB_TOKEN=("ghp_x", True))
    )
    await store.create(tenant, environment("team", SLACK_WEBHOOK=("https://hooks/x", True)))
    issued = await ExecutionIssuer(admin, vault.layout).create(
        tenant,
        agent({"GITHUB_TOKEN": {"is_secret": True}, "LOG_LEVEL": {"value": "error"}}),
        instance("base", "prod"),
        environments=["team"],
        runtime_env={"LOG_LEVEL": RuntimeValue("debug"), "SPECIAL_TOKEN": RuntimeValue("sp", True)},
        ttl=timedelta(minutes=5),
        execution_id="exec-merge-1",
    )
    assert issued.variables == {
        "GITHUB_TOKEN": {"secret": True},
        "LOG_LEVEL": {"secret": False},
        "SLACK_WEBHOOK": {"secret": True},
        "SPECIAL_TOKEN": {"secret": True},
        "TIMEOUT": {"secret": False},
    }
    data = (await raw(admin, vault, f"execution-contexts/{tenant}/exec-merge-1"))["spec"]["data"]
    assert data["LOG_LEVEL"] == {"value": "debug", "is_secret": False}
    for name in ("GITHUB_TOKEN", "SLACK_WEBHOOK", "SPECIAL_TOKEN"):
        assert data[name]["value"].startswith("vault:v1:"), name
    metadata = (await admin.get(f"stigmer/metadata/execution-contexts/{tenant}/exec-merge-1"))[
        "data"
    ]
    assert metadata["delete_version_after"] == "5m1s"  # the TTL plus a second of slack


async def test_sticky_secret_plain_override_is_encrypted(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    await EnvironmentStore(admin, vault.layout).create(tenant, environment("e", TOKEN=("t1", True)))
    await ExecutionIssuer(admin, vault.layout).create(
        tenant,
        agent(),
        instance("e"),
        runtime_env={"TOKEN": RuntimeValue("plain-override")},
        execution_id="ex-s",
    )
    value = (await raw(admin, vault, f"execution-contexts/{tenant}/ex-s"))["spec"]["data"]["TOKEN"]
    assert value["is_secret"] and value["value"].startswith("vault:v1:")


@pytest.mark.parametrize(
    ("case", "kwargs", "message"),
    [
        ("missing required", {"template": agent({"NEED": {"is_secret": True}, "ALSO": {}})},
         "required variable ALSO has no value in any layer; required variable NEED"),
        ("unknown env", {"inst": instance("nope")}, "spec.environment_refs[0]: Environment 'nope' not found"),
        ("unknown placeholder", {"template": agent(servers=[{"name": "s", "http": {"url": "https://x", "headers": {"A": "${NOPE}"}}}])},
         "mcp server s: http.headers.A: unknown variable NOPE"),
        ("secret in argv", {"template": agent({"T": {"value": "x", "is_secret": True}}, [{"name": "s", "stdio": {"command": "c", "args": ["${T}"]}}])},
         "secret T would be exposed in argv"),
        ("ttl", {"ttl": timedelta(0)}, "ttl: must be more than 0s"),
        ("bad id", {"execution_id": "../x"}, "execution id"),
        ("empty runtime", {"runtime_env": {"A": RuntimeValue("")}}, "A: value must not be empty"),
        ("wrong instance kind", {"inst": parse_resource({"api_version": "agentic.stigmer.ai/v1", "kind": "WorkflowInstance", "metadata": {"name": "w"}, "spec": {"workflow_id": "w"}}, WorkflowInstance)},
         "a Agent needs a AgentInstance"),
    ],
)  # fmt: skip
async def test_bad_execution_input_writes_nothing(
    vault: Vault, admin: VaultClient, tenant: str, case: str, kwargs: dict[str, Any], message: str
) -> None:
    issuer = ExecutionIssuer(admin, vault.layout)
    template = kwargs.pop("template", agent())
    inst = kwargs.pop("inst", None)
    with pytest.raises((ValidationError, ResolveError)) as caught:
        await issuer.create(tenant, template, inst, **kwargs)
    assert message in str(caught.value)
    assert await context_paths(admin, vault, tenant) == []


async def test_duplicate_execution_id_refused_and_first_kept(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    issuer = ExecutionIssuer(admin, vault.layout)
    await issuer.create(tenant, agent({"A": {"value": "1"}}), execution_id="dup-1")
    with pytest.raises(ValidationError, match="already exists"):
        await issuer.create(tenant, agent({"A": {"value": "2"}}), execution_id="dup-1")
    assert (await raw(admin, vault, f"execution-contexts/{tenant}/dup-1"))["spec"]["data"]["A"][
        "value"
    ] == "1"


async def test_workflow_execution_uses_env_refs(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    await EnvironmentStore(admin, vault.layout).create(tenant, environment("wf", KEY=("k", True)))
    workflow = parse_resource(
        {"api_version": "agentic.stigmer.ai/v1", "kind": "Workflow", "metadata": {"name": "w"},
         "spec": {"document": {"dsl": "1.0.0"}, "tasks": [{"call": {}}], "env_spec": {"data": {"KEY": {}}}}},
        Workflow,
    )  # fmt: skip
    wf_instance = parse_resource(
        {"api_version": "agentic.stigmer.ai/v1", "kind": "WorkflowInstance", "metadata": {"name": "wi"},
         "spec": {"workflow_id": "w", "env_refs": [{"kind": "environment", "slug": "wf"}]}},
        WorkflowInstance,
    )  # fmt: skip
    issued = await ExecutionIssuer(admin, vault.layout).create(tenant, workflow, wf_instance)
    assert issued.variables == {"KEY": {"secret": True}}


# --- through the CLI -------------------------------------------------------------------------


async def test_cli_env_commands(vault: Vault, tenant: str, tmp_path: Path) -> None:
    env_file = tmp_path / "vars.env"
    env_file.write_text("FROM_FILE=1\nREGION=file\n")
    created = cli(
        vault, "env", "create", "cli-env", "--tenant", tenant, "--env", "REGION=eu",
        "--secret", "TOKEN=tok_canary_1", "--secret", "PROMPTED", "--env-file", str(env_file),
        "--description", "made by the CLI", input="prompted_canary_2\n",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    shown = cli(vault, "env", "get", "cli-env", "--tenant", tenant, "-o", "json")
    document = json.loads(shown.stdout)
    assert document["spec"]["data"]["TOKEN"]["value"] == "<secret>"
    assert document["spec"]["data"]["PROMPTED"] == {"value": "<secret>", "is_secret": True}
    assert document["spec"]["data"]["REGION"]["value"] == "eu"  # --env wins over --env-file
    assert document["spec"]["description"] == "made by the CLI"
    assert "canary" not in shown.stdout + created.stdout + created.stderr
    yaml_out = cli(vault, "env", "get", "cli-env", "--tenant", tenant)
    assert yaml.safe_load(yaml_out.stdout)["kind"] == "Environment"
    assert cli(vault, "env", "list", "--tenant", tenant).stdout.split() == ["cli-env"]
    assert cli(vault, "env", "delete", "cli-env", "--tenant", tenant).returncode == 0
    assert cli(vault, "env", "list", "--tenant", tenant).stdout == ""


async def test_cli_env_apply_multi_document(vault: Vault, admin: VaultClient, tenant: str) -> None:
    demo = Path(__file__).resolve().parents[1] / "vault-dev" / "demo" / "environments.yaml"
    applied = cli(vault, "env", "apply", "-f", str(demo), "--tenant", tenant)
    assert applied.returncode == 0, applied.stderr
    assert cli(vault, "env", "list", "--tenant", tenant).stdout.split() == [
        "env-base",
        "env-prod",
        "env-team",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["env", "create", "x", "--tenant", "Bad_Tenant"], "tenant: 'Bad_Tenant' is not valid"),
        (["env", "create", "../x", "--tenant", "acme"], "environment name: '../x' is not valid"),
        (["env", "create", "x", "--tenant", "acme", "--env", "NOEQUALS"], "--env: expected KEY=VALUE (the argument has no '=')"),
        (["env", "create", "x", "--tenant", "acme", "--env", "1X=1"], "variable name '1X' is invalid"),
        (["env", "create", "x", "--tenant", "acme", "--env", "A=1", "--secret", "A=2"], "A is given more than once"),
        (["env", "create", "x", "--tenant", "acme", "--secret", "EMPTYSTDIN"], "stdin is empty"),
        (["env", "get", "nope", "--tenant", "acme"], "Environment nope: not found in tenant acme"),
        (["env", "apply", "-f", "/nonexistent.yaml", "--tenant", "acme"], "cannot read file"),
        (["execution", "show", "nope", "--tenant", "acme"], "no context in tenant acme"),
        (["execution", "create", "--tenant", "acme", "--agent", "/nonexistent.yaml"], "cannot read file"),
    ],
)  # fmt: skip
async def test_cli_errors_are_one_line(vault: Vault, args: list[str], message: str) -> None:
    result = cli(vault, *args)
    assert result.returncode != 0
    assert message in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("stigmer-broker: error: ")  # one error line, maybe its fix
    assert all(line.startswith("stigmer-broker: hint: ") for line in lines[1:]) and len(lines) <= 2
    assert "NOEQUALS" not in result.stderr  # an argument without '=' may be a value
    assert "Traceback" not in result.stderr
    assert cli(vault, "env", "list", "--tenant", "acme").stdout == ""


async def test_cli_execution_create_json(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    agent_file = tmp_path / "agent.yaml"
    agent_file.write_text(
        yaml.safe_dump(agent({"TOKEN": {"is_secret": True}}).model_dump(mode="json"))
    )
    created = cli(
        vault, "execution", "create", "--tenant", tenant, "--agent", str(agent_file),
        "--runtime-env", "secret:TOKEN=rt_canary_3", "--runtime-env", "MODE=fast", "--ttl", "90s",
        "--id", "cli-exec-1", "-o", "json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    answer = json.loads(created.stdout)
    assert answer["id"] == "cli-exec-1" and answer["tenant"] == tenant
    assert answer["context_path"] == f"stigmer/data/execution-contexts/{tenant}/cli-exec-1"
    assert answer["variables"] == {"MODE": {"secret": False}, "TOKEN": {"secret": True}}
    assert answer["expires_at"].endswith("Z")
    shown = cli(vault, "execution", "show", "cli-exec-1", "--tenant", tenant)
    assert "rt_canary_3" not in shown.stdout and "<secret>" in shown.stdout
    assert cli(vault, "execution", "end", "cli-exec-1", "--tenant", tenant).returncode == 0
    assert await context_paths(admin, vault, tenant) == []


async def test_cli_env_apply_with_one_bad_document_stores_nothing(
    vault: Vault, tenant: str, tmp_path: Path
) -> None:
    path = tmp_path / "envs.yaml"
    path.write_text(
        "api_version: agentic.stigmer.ai/v1\nkind: Environment\nmetadata: {name: good}\n"
        "spec: {data: {A: {value: '1'}}}\n---\n"
        "api_version: agentic.stigmer.ai/v1\nkind: Environment\nmetadata: {name: bad}\n"
        "spec: {data: {'NOT OK': {value: '1'}}}\n"
    )
    result = cli(vault, "env", "apply", "-f", str(path), "--tenant", tenant)
    assert result.returncode == 2
    assert "Environment bad: spec.data.NOT OK" in result.stderr
    assert cli(vault, "env", "list", "--tenant", tenant).stdout == ""


async def test_secret_prompt_does_not_echo(vault: Vault, admin: VaultClient, tenant: str) -> None:
    import os
    import pty
    import sys

    canary = "cnry-prompt-8c1d-do-not-echo"
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a terminal
        os.execve(
            sys.executable,
            [
                sys.executable,
                "-m",
                "broker.cli",
                "env",
                "create",
                "tty-env",
                "--tenant",
                tenant,
                "--secret",
                "TTY_SECRET",
            ],
            vault.environ(),
        )
    transcript = b""
    while b"value for secret TTY_SECRET:" not in transcript:
        transcript += os.read(fd, 1024)
    os.write(fd, canary.encode() + b"\n")
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        transcript += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, transcript
    assert b"environment tty-env created" in transcript
    assert canary.encode() not in transcript
    stored = (await EnvironmentStore(admin, vault.layout).get(tenant, "tty-env")).spec.data[
        "TTY_SECRET"
    ]
    transit = Transit(admin, vault.layout.transit_mount)
    assert await transit.decrypt(vault.layout.transit_key(tenant), [stored.value]) == [canary]


async def test_cli_execution_file_is_the_runtime_layer(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    agent_file = tmp_path / "agent.yaml"
    agent_file.write_text(yaml.safe_dump(agent({"ORG": {}}).model_dump(mode="json")))
    execution_file = tmp_path / "execution.yaml"
    execution_file.write_text(
        "apiVersion: agentic.stigmer.ai/v1\nkind: AgentExecution\nmetadata: {}\n"
        "spec:\n  agentId: reviewer\n  message: Review PR 123\n"
        "  runtimeEnv:\n    ORG: {value: other-org}\n    KEY: {value: k, isSecret: true}\n"
    )
    created = cli(
        vault, "execution", "create", "--tenant", tenant, "--agent", str(agent_file),
        "--execution", str(execution_file), "--env", "KEY=flag-wins", "--id", "exf-1", "-o", "json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["variables"] == {
        "KEY": {"secret": True},
        "ORG": {"secret": False},
    }
    data = (await raw(admin, vault, f"execution-contexts/{tenant}/exf-1"))["spec"]["data"]
    assert data["ORG"]["value"] == "other-org"
    assert data["KEY"]["value"].startswith("vault:v1:")  # still secret: sticky
    wrong = cli(vault, "execution", "create", "--tenant", tenant, "--agent", str(agent_file),
                "--execution", str(agent_file))  # fmt: skip
    assert wrong.returncode == 2 and "expected AgentExecution, got Agent" in wrong.stderr
