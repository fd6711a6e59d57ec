"""Workflow tasks in the flow: their runtime placeholders are checked at create, recorded in the
context, resolved by `run` (tasks.json) and the sidecar (one task at a time), with Zigflow's jq
expressions left byte for byte, and an agent-call task's forwarded secrets staying secrets."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import tasks
from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer, RuntimeValue
from broker.errors import BrokerClientError
from broker.model import Environment, parse_resource
from broker.resolve import Variable
from broker.vault import VaultClient
from tests.conftest import Vault, cli, run_as_runner, start_sidecar
from tests.factories import agent, resource

CANARY = "cnry-tasks-2e9d-do-not-leak"
CHILD = "cnry-tasks-child-2e9d-do-not-leak"

FETCH = {
    "call": "http",
    "with": {
        "method": "get",
        "endpoint": "https://api.github.com/repos/${ .input.repo }",
        "headers": {
            "Authorization": "Bearer ${ .secrets.GITHUB_TOKEN }",
            "X-Mode": "${.env_vars.MODE}",
            "X-Dollar": "$${.secrets.GITHUB_TOKEN}",
        },
    },
    "export": {"as": "${ $context + {count: (.body | length)} }"},
}
COUNT = {"set": {"n": "${ .input | length }", "first": '${ .items[0] // "none" }'}}
REVIEW = {
    "call": "agent",
    "with": {
        "agent": "pr-reviewer",
        "message": '${ "Review " + $context.repo }',
        "env": {
            "GITHUB_TOKEN": "${.secrets.CHILD_TOKEN}",
            "MODE": "${.env_vars.MODE}",
            "NOTE": "mode=${.env_vars.MODE}",
            "LITERAL": "x",
        },
    },
}


def workflow(*task_list: dict[str, Any], opt_in: bool = False) -> dict[str, Any]:
    document: dict[str, Any] = {"dsl": "1.0.0", "namespace": "t", "name": "w", "version": "1"}
    if opt_in:
        document["metadata"] = {tasks.OPT_IN: True}
    return resource("Workflow", "w", {"document": document, "tasks": list(task_list)})


async def setup(admin: VaultClient, vault: Vault, tenant: str) -> None:
    env = resource("Environment", "wf-env", {"data": {
        "GITHUB_TOKEN": {"value": CANARY, "is_secret": True},
        "CHILD_TOKEN": {"value": CHILD, "is_secret": True},
        "MODE": {"value": "fast"}}})  # fmt: skip
    await EnvironmentStore(admin, vault.layout).apply(tenant, parse_resource(env, Environment))


def create(vault: Vault, tenant: str, tmp_path: Path, template: dict[str, Any],
           execution_id: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    (tmp_path / "w.json").write_text(json.dumps(template))
    bound = resource(
        "WorkflowInstance", "i", {"workflow_id": "w", "env_refs": [{"kind": 53, "slug": "wf-env"}]}
    )
    (tmp_path / "i.json").write_text(json.dumps(bound))
    return cli(vault, "execution", "create", "--tenant", tenant, "--workflow",
               str(tmp_path / "w.json"), "--instance", str(tmp_path / "i.json"),
               "--id", execution_id)  # fmt: skip


def expected_fetch() -> dict[str, Any]:
    done = copy.deepcopy(FETCH)
    done["with"]["headers"]["Authorization"] = f"Bearer {CANARY}"
    done["with"]["headers"]["X-Mode"] = "fast"
    done["with"]["headers"]["X-Dollar"] = f"${CANARY}"  # no escape here, as in Stigmer's runner
    return done  # every jq expression exactly as written


async def test_unknown_task_placeholders_are_refused_at_create(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    await setup(admin, vault, tenant)
    broken = copy.deepcopy(FETCH)
    broken["with"]["headers"]["X-Other"] = "${ .secrets.NOT_PROVIDED }"
    bad_review = copy.deepcopy(REVIEW)
    bad_review["with"]["env"]["X"] = "${.env_vars.MISSING}"
    created = create(vault, tenant, tmp_path, workflow({"fetch": broken}, {"count": COUNT},
                                                      {"review": bad_review}), "wf-bad")  # fmt: skip
    assert created.returncode == 2
    assert (
        "task fetch $.fetch.with.headers.X-Other: unknown variable NOT_PROVIDED" in created.stderr
    )
    assert "task review $.review.with.env.X: unknown variable MISSING" in created.stderr
    assert await admin.list(f"stigmer/metadata/execution-contexts/{tenant}") == []


async def test_run_writes_the_tasks_resolved_with_jq_untouched(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    await setup(admin, vault, tenant)
    template = workflow({"fetch": FETCH}, {"count": COUNT}, {"review": REVIEW})
    created = create(vault, tenant, tmp_path, template, "wf-run")
    assert created.returncode == 0, created.stderr
    shown = json.loads(cli(vault, "execution", "show", "wf-run", "--tenant", tenant,
                           "-o", "json").stdout)  # fmt: skip
    assert [t["name"] for t in shown["spec"]["tasks"]] == ["fetch", "review"]  # not count
    keep = (f"import os, shutil; shutil.copy(os.path.join(os.path.dirname(os.environ["
            f"'STIGMER_MANIFEST']), 'tasks.json'), {str(shm / 'tasks.json')!r})")  # fmt: skip
    ran = run_as_runner(vault, tenant, "wf-run", shm / "out", vault.jwt_for(tenant, tmp_path), keep)
    assert ran.returncode == 0, ran.stderr
    written = json.loads((shm / "tasks.json").read_text())["tasks"]
    assert written["fetch"] == expected_fetch()
    assert written["review"]["with"]["env"]["GITHUB_TOKEN"] == CHILD
    assert written["review"]["with"]["message"] == REVIEW["with"]["message"]


async def test_the_sidecar_gives_one_task_and_a_child_runtime_env_that_keeps_secrets(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    await setup(admin, vault, tenant)
    created = create(vault, tenant, tmp_path, workflow({"fetch": FETCH}, {"review": REVIEW}),
                     "wf-side")  # fmt: skip
    assert created.returncode == 0, created.stderr
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm)
    try:
        await asyncio.to_thread(sidecar.client.prepare, "wf-side")
        fetch = await asyncio.to_thread(sidecar.client.task, "wf-side", "fetch")
        assert fetch == {"name": "fetch", "config": expected_fetch()}
        review = await asyncio.to_thread(sidecar.client.task, "wf-side", "review")
        assert review["runtime_env"] == {
            "GITHUB_TOKEN": {"value": CHILD, "is_secret": True},
            "MODE": {"value": "fast", "is_secret": False},
            "NOTE": {"value": "mode=fast", "is_secret": False},
            "LITERAL": {"value": "x", "is_secret": False}}  # fmt: skip
        with pytest.raises(BrokerClientError) as missing:
            await asyncio.to_thread(sidecar.client.task, "wf-side", "count")
        assert missing.value.status == 404
        jq = {
            "x": "${ .a | map(.b) }",
            "y": "${.env_vars.MODE}-${ $context.z }",
            "z": "${ .secrets.lower_case }",
        }  # lower case: jq's, as in Stigmer's runner
        resolved = await asyncio.to_thread(sidecar.client.resolve, "wf-side", jq, True)
        assert resolved == {"x": "${ .a | map(.b) }", "y": "fast-${ $context.z }",
                            "z": "${ .secrets.lower_case }"}  # fmt: skip
        with pytest.raises(BrokerClientError) as refused:  # the MCP rules know no jq
            await asyncio.to_thread(sidecar.client.resolve, "wf-side", jq)
        assert refused.value.status == 422
        # The parent forwards the child's runtime_env as Stigmer's runner would: the child
        # context keeps the forwarded token a secret (ciphertext at rest).
        forwarded = {k: RuntimeValue(v["value"], v["is_secret"])
                     for k, v in review["runtime_env"].items()}  # fmt: skip
        await ExecutionIssuer(admin, vault.layout).create(
            tenant, agent(), runtime_env=forwarded, ttl=timedelta(minutes=5), execution_id="child"
        )
        stored = json.dumps(await admin.get(f"stigmer/data/execution-contexts/{tenant}/child"))
        assert CHILD not in stored and "vault:v1:" in stored
        await asyncio.to_thread(sidecar.client.end, "wf-side")
    finally:
        assert sidecar.stop() == 0
    assert CANARY not in sidecar.log.read_text() and CHILD not in sidecar.log.read_text()


async def test_the_broker_placeholder_resolves_only_when_the_workflow_opts_in(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    await setup(admin, vault, tenant)
    task = {"set": {"mode": "${MODE}", "jq": "${ .x }"}}
    plain = create(vault, tenant, tmp_path, workflow({"t": task}), "wf-plain")
    assert plain.returncode == 0, plain.stderr
    shown = json.loads(cli(vault, "execution", "show", "wf-plain", "--tenant", tenant,
                           "-o", "json").stdout)  # fmt: skip
    assert shown["spec"].get("tasks", []) == []  # ${MODE} is jq's business here
    opted = create(vault, tenant, tmp_path, workflow({"t": task}, opt_in=True), "wf-opted")
    assert opted.returncode == 0, opted.stderr
    shown = json.loads(cli(vault, "execution", "show", "wf-opted", "--tenant", tenant,
                           "-o", "json").stdout)  # fmt: skip
    assert shown["spec"]["tasks"] == [{"name": "t", "config": task}]
    assert shown["spec"]["broker_placeholders"] is True


# --- properties of the task resolution ---------------------------------------------------------

NAMES = ("TOKEN", "MODE", "REGION")
OURS = st.builds(lambda scope, name, pad: f"${{{pad}.{scope}.{name}{pad}}}",
                 st.sampled_from(["secrets", "env_vars"]), st.sampled_from(NAMES),
                 st.sampled_from(["", " ", "  "]))  # fmt: skip
JQ = st.sampled_from(
    [
        "${ .input | length }",
        "${ $context.x }",
        "${.a.b}",
        "${ .secrets }",
        "${ .env_vars.lower-case }",
        "${ $env.X }",
        "${}",
        "${ .secrets.X | f }",
    ]
)
TEXT = st.text(alphabet=st.sampled_from("abc {}|.-"), max_size=6)  # never forms one of ours
# A value may itself look like a placeholder: one pass never resolves it again.
VALUES = st.one_of(TEXT, OURS, JQ)


@given(values=st.fixed_dictionaries({n: VALUES for n in NAMES}),
       pieces=st.lists(st.one_of(JQ, OURS, TEXT), max_size=8))  # fmt: skip
def test_resolution_is_single_pass_and_leaves_everything_else(
    values: dict[str, str], pieces: list[str]
) -> None:
    variables = {n: Variable(v, n == "TOKEN", False, "t") for n, v in values.items()}
    expected = "".join(
        values[m.group("name")] if (m := tasks.RUNTIME.fullmatch(p)) else p for p in pieces
    )
    resolved = tasks.resolve({"k": ["".join(pieces)]}, variables)
    assert resolved == {"k": [expected]}  # ours replaced once, everything else byte for byte
    if tasks.RUNTIME.search(expected) is None:  # nothing of ours left: idempotent
        assert tasks.resolve(resolved, variables) == resolved
