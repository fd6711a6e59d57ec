"""Stigmer's newer declaration model (stigmer-model.md §8) through the CLI and the sidecar:
``spec.env`` declarations (optional, fixed values, secrets without values), McpServer resources
used through ``mcp_server_usages``, declared keys as a whitelist, and no mixing of models."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from broker.control.environments import EnvironmentStore
from broker.model import Environment, parse_resource
from broker.vault import VaultClient
from tests.conftest import Vault, cli, start_sidecar
from tests.factories import resource

CANARY = "cnry-decl-88c1-do-not-leak"


def write(path: Path, *documents: dict[str, Any]) -> str:
    path.write_text("\n---\n".join(json.dumps(d) for d in documents))
    return str(path)


def usage(slug: str, *tools: str) -> dict[str, Any]:
    return {"mcpServerRef": {"kind": 44, "slug": slug}, "enabledTools": list(tools)}


def agent(env: dict[str, Any], *usages: dict[str, Any]) -> dict[str, Any]:
    return resource("Agent", "reviewer", {"instructions": "Review pull requests.", "env": env,
                                          "mcpServerUsages": list(usages)})  # fmt: skip


GITHUB = resource(
    "McpServer",
    "github",
    {
        "env": {"GITHUB_TOKEN": {"isSecret": True}, "GITHUB_HOST": {"optional": True}},
        "stdio": {"command": "npx", "args": ["-y", "server-github", "--region", "${REGION}"]},
    },
)
REVIEW = resource(
    "McpServer",
    "review",
    {
        "env": {"REVIEW_TOKEN": {"isSecret": True}},
        "http": {
            "url": "https://mcp.example.com/review",
            "headers": {"Authorization": "Bearer ${REVIEW_TOKEN}"},
            "timeoutSeconds": 90,
        },
    },
)
GITHUB["spec"]["env"]["REGION"] = {"value": "eu-west-1"}  # a fixed, non-secret setting


async def apply_prod(admin: VaultClient, vault: Vault, tenant: str) -> None:
    """The Environment, through the Python API (a file would put the canary on disk)."""
    env = resource("Environment", "prod", {"data": {
        "GITHUB_TOKEN": {"value": CANARY, "is_secret": True},
        "REVIEW_TOKEN": {"value": CANARY + "-r", "is_secret": True},
        "EXTRA_UNDECLARED": {"value": "extra-value-7"}}})  # fmt: skip
    await EnvironmentStore(admin, vault.layout).apply(tenant, parse_resource(env, Environment))


def create(vault: Vault, tenant: str, tmp_path: Path, template: dict[str, Any],
           *servers: dict[str, Any], execution_id: str = "d-1") -> Any:  # fmt: skip
    bound = resource(
        "AgentInstance",
        "i",
        {"agent_id": "reviewer", "environment_refs": [{"kind": 53, "slug": "prod"}]},
    )
    args = ["execution", "create", "--tenant", tenant, "--id", execution_id, "-o", "json",
            "--agent", write(tmp_path / "agent.json", template),
            "--instance", write(tmp_path / "instance.json", bound)]  # fmt: skip
    if servers:
        args += ["--mcp-server", write(tmp_path / "servers.yaml", *servers)]
    return cli(vault, *args)


async def test_declarations_with_mcp_server_resources_end_to_end(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    await apply_prod(admin, vault, tenant)
    template = agent({"LOG_LEVEL": {"optional": True, "description": "as Stigmer's SDK has it"},
                      "MODE": {"value": "review"}},
                     usage("github", "create_issue"), usage("review"))  # fmt: skip
    created = create(vault, tenant, tmp_path, template, GITHUB, REVIEW)
    assert created.returncode == 0, created.stderr
    variables = json.loads(created.stdout)["variables"]
    assert variables == {"GITHUB_TOKEN": {"secret": True}, "MODE": {"secret": False},
                         "REGION": {"secret": False}, "REVIEW_TOKEN": {"secret": True}}  # fmt: skip
    assert "undeclared variables dropped" in created.stderr and "EXTRA_UNDECLARED" in created.stderr
    assert "extra-value-7" not in created.stderr and CANARY not in created.stderr  # names only
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, "--mcp-format", "stigmer")
    try:
        prepared = await asyncio.to_thread(sidecar.client.prepare, "d-1")
        directory = prepared.env_file.parent
        mcp = json.loads((directory / "mcp.json").read_text())["mcpServers"]
        # Only what it declares (GITHUB_HOST is optional and unset; MODE is the agent's).
        assert mcp["github"]["env"] == {"GITHUB_TOKEN": CANARY, "REGION": "eu-west-1"}
        assert mcp["github"]["args"] == ["-y", "server-github", "--region", "eu-west-1"]
        assert mcp["review"]["headers"] == {"Authorization": f"Bearer {CANARY}-r"}
        native = {
            s["name"]: s
            for s in json.loads((directory / "mcp.stigmer.json").read_text())["mcp_servers"]
        }
        assert native["github"]["enabled_tools"] == ["create_issue"]
        assert "PATH" in native["github"]["base_env"]
        assert native["review"]["http"]["timeout_seconds"] == 90
        env = json.loads((directory / "env.json").read_text())
        assert "EXTRA_UNDECLARED" not in env and "LOG_LEVEL" not in env
        await asyncio.to_thread(sidecar.client.end, "d-1")
    finally:
        assert sidecar.stop() == 0


async def test_what_the_declaration_model_refuses(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    await apply_prod(admin, vault, tenant)
    mixed = agent({"MODE": {"value": "x"}})
    mixed["spec"]["env_spec"] = {"data": {"OLD": {"value": "y"}}}
    secret_valued = agent({"TOKEN": {"isSecret": True, "value": "inline"}})
    undeclared = json.loads(json.dumps(REVIEW))
    undeclared["spec"]["http"]["headers"]["X-Other"] = "${GITHUB_TOKEN}"
    wrong_kind = agent({}, {"mcpServerRef": {"kind": 53, "slug": "github"}})
    cases = [
        (agent({"A": {}, "B": {"isSecret": True}}, usage("github")), [GITHUB],
         ["required variable A has no value", "required variable B has no value"]),
        (mixed, [], ["uses both declaration models (env_spec; env)"]),
        (secret_valued, [], ["env.TOKEN", "a secret declaration must not carry a value"]),
        (agent({}, usage("review")), [], ["McpServer 'review' not given"]),
        (agent({}, usage("review")), [undeclared],
         ["${GITHUB_TOKEN} is not declared in its spec.env"]),
        (wrong_kind, [GITHUB], ["kind must be 44 (mcp_server)"]),
    ]  # fmt: skip
    for index, (template, servers, problems) in enumerate(cases):
        result = create(vault, tenant, tmp_path, template, *servers, execution_id=f"bad-{index}")
        assert result.returncode == 2, (index, result.stderr)
        for problem in problems:
            assert problem in result.stderr, (index, problem, result.stderr)
    assert await admin.list(f"stigmer/metadata/execution-contexts/{tenant}") == []
    docker = resource("McpServer", "old", {"docker": {"image": "x"}})
    result = create(vault, tenant, tmp_path, agent({}, usage("old")), docker)
    assert result.returncode == 2 and "docker" in result.stderr  # removed from McpServer


async def test_a_template_without_declarations_gets_the_full_map(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    await apply_prod(admin, vault, tenant)
    created = create(vault, tenant, tmp_path, agent({}))
    assert created.returncode == 0, created.stderr
    assert "EXTRA_UNDECLARED" in json.loads(created.stdout)["variables"]


async def test_a_workflow_declares_its_env_too(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    await apply_prod(admin, vault, tenant)
    document = {"dsl": "1.0.0", "namespace": "t", "name": "w", "version": "1"}
    task = {"call": "http", "with": {"headers": {"A": "${.secrets.GITHUB_TOKEN}"}}}
    flow = resource("Workflow", "w", {"document": document, "tasks": [{"fetch": task}],
                                      "env": {"GITHUB_TOKEN": {"isSecret": True},
                                              "LOG_LEVEL": {"optional": True}}})  # fmt: skip
    bound = resource(
        "WorkflowInstance", "i", {"workflow_id": "w", "env_refs": [{"kind": 53, "slug": "prod"}]}
    )
    created = cli(vault, "execution", "create", "--tenant", tenant, "-o", "json",
                  "--workflow", write(tmp_path / "w.json", flow),
                  "--instance", write(tmp_path / "i.json", bound))  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["variables"] == {"GITHUB_TOKEN": {"secret": True}}
    flow["spec"]["env_spec"] = {"data": {"OLD": {"value": "x"}}}
    mixed = cli(vault, "execution", "create", "--tenant", tenant,
                "--workflow", write(tmp_path / "w.json", flow),
                "--instance", write(tmp_path / "i.json", bound))  # fmt: skip
    assert mixed.returncode == 2 and "uses both declaration models" in mixed.stderr
