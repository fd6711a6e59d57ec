"""`stigmer-broker control serve` against the test server, driven over HTTP as Stigmer's
backend would: each request carries the caller's own Vault token; the server holds none."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.api import openapi
from broker.dev.server import free_port
from broker.vault import VaultClient
from tests.conftest import Vault, canary_hits, cli, run_as_runner, spawn, start_sidecar

ROOT = Path(__file__).resolve().parent.parent
CANARY = "cnry-api-7f3a-do-not-leak"


@dataclass
class Api:
    url: str
    process: subprocess.Popen[str]
    log: Path

    def call(self, method: str, path: str, token: str | None, body: Any = None,
             headers: dict[str, str] | None = None, raw: bytes | None = None,
             ) -> tuple[int, dict[str, str], Any]:  # fmt: skip
        sent = dict(headers or {})
        if token is not None:
            sent["X-Vault-Token"] = token
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.url + path, data, sent, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
                status, answer_headers, text = answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as refused:
            status, answer_headers, text = refused.code, dict(refused.headers), refused.read()
        return status, answer_headers, json.loads(text) if text else None


@pytest.fixture
def api(vault: Vault, tmp_path: Path) -> Iterator[Api]:
    environ = vault.environ()
    environ.pop("VAULT_TOKEN")
    port = free_port()
    log = tmp_path / "api.log"
    with log.open("w") as sink:
        process = spawn([sys.executable, "-m", "broker.cli", "control", "serve",
                         "--addr", f"127.0.0.1:{port}"], env=environ, stderr=sink, text=True)  # fmt: skip
    served = Api(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            if served.call("GET", "/healthz", None)[0] == 200:
                break
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    yield served
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0, log.read_text()[-2000:]


async def token_with(admin: VaultClient, *policies: str) -> str:
    answer = await admin.post("auth/token/create", {"policies": list(policies), "ttl": "10m"})
    return str(answer["auth"]["client_token"])


def environment(name: str, data: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    return {"api_version": "agentic.stigmer.ai/v1", "kind": "Environment",
            "metadata": {"name": name},
            "spec": {"data": {k: {"value": v, "is_secret": s} for k, (v, s) in data.items()}}}  # fmt: skip


def test_the_server_refuses_to_hold_a_token(vault: Vault) -> None:
    result = cli(vault, "control", "serve", "--addr", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "must not hold a Vault token" in result.stderr


async def test_environments_round_trip_with_versions(
    api: Api, admin: VaultClient, tenant: str
) -> None:
    token = await token_with(admin, "stigmer-control-plane")
    base = f"/v1/tenants/{tenant}/environments"
    body = environment("prod", {"TOKEN": (CANARY, True), "MODE": ("fast", False)})
    status, headers, created = api.call("PUT", f"{base}/prod", token, body)
    assert status == 201 and headers["ETag"] == '"1"', created
    assert created["spec"]["data"]["TOKEN"]["value"] == "<secret>"
    stored = await admin.get(f"stigmer/data/environments/{tenant}/prod")
    assert CANARY not in json.dumps(stored)  # encrypted on arrival
    status, headers, shown = api.call("GET", f"{base}/prod", token)
    assert status == 200 and headers["ETag"] == '"1"'
    assert shown["spec"]["data"]["MODE"]["value"] == "fast"
    assert shown["spec"]["data"]["TOKEN"]["value"] == "<secret>"
    # Without If-Match a PUT only creates.
    status, _, refused = api.call("PUT", f"{base}/prod", token, body)
    assert status == 409 and "already exists" in refused["detail"]
    changed = environment("prod", {"TOKEN": (CANARY, True), "MODE": ("slow", False)})
    status, headers, _ = api.call("PUT", f"{base}/prod", token, changed, {"If-Match": '"1"'})
    assert status == 200 and headers["ETag"] == '"2"'
    # A stale version: 412, nothing changed, the current ETag in the answer.
    stale = environment("prod", {"MODE": ("stale", False)})
    status, headers, problem = api.call("PUT", f"{base}/prod", token, stale, {"If-Match": '"1"'})
    assert status == 412 and headers["ETag"] == '"2"', problem
    assert headers["Content-Type"].startswith("application/problem+json")
    assert api.call("GET", f"{base}/prod", token)[2]["spec"]["data"]["MODE"]["value"] == "slow"
    for odd in ('"abc"', '"0"', 'W/"99999999999999999999"'):  # no such version: 412
        assert api.call("PUT", f"{base}/prod", token, stale, {"If-Match": odd})[0] == 412
    status, headers, _ = api.call("PUT", f"{base}/prod?replace=true", token, stale)
    assert status == 200 and headers["ETag"] == '"3"'
    # Listing, paged.
    for name in ("a1", "a2", "a3"):
        assert api.call("PUT", f"{base}/{name}", token, environment(name, {}))[0] == 201
    status, _, page = api.call("GET", f"{base}?limit=2", token)
    assert status == 200 and page == {"names": ["a1", "a2"], "next": "a2"}
    assert api.call("GET", f"{base}?limit=2&after=a2", token)[2] == {"names": ["a3", "prod"]}
    assert api.call("DELETE", f"{base}/prod", token)[0] == 204
    assert api.call("GET", f"{base}/prod", token)[0] == 404
    bare = {"kind": "Environment", "spec": {"data": {"A": {"value": "b"}}}}  # name from the path
    assert api.call("PUT", f"{base}/bare", token, bare)[0] == 201
    assert api.call("DELETE", f"{base}/prod", token)[0] == 404


async def test_concurrent_replaces_of_one_version_have_one_winner(
    api: Api, admin: VaultClient, tenant: str
) -> None:
    token = await token_with(admin, "stigmer-control-plane")
    path = f"/v1/tenants/{tenant}/environments/shared"
    assert api.call("PUT", path, token, environment("shared", {"N": ("0", False)}))[0] == 201

    def replace(n: int) -> int:
        body = environment("shared", {"N": (str(n), False)})
        return api.call("PUT", path, token, body, {"If-Match": '"1"'})[0]

    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(replace, range(1, 11)))
    assert sorted(statuses) == [200] + [412] * 9, statuses
    _, headers, shown = api.call("GET", path, token)
    assert headers["ETag"] == '"2"'
    assert shown["spec"]["data"]["N"]["value"] == str(statuses.index(200) + 1)


async def test_callers_get_what_their_policies_allow(
    api: Api, admin: VaultClient, tenant: str
) -> None:
    control = await token_with(admin, "stigmer-control-plane")
    runner = await token_with(admin, "stigmer-runner")
    reaper = await token_with(admin, "stigmer-reaper")
    base = f"/v1/tenants/{tenant}/environments"
    body = environment("prod", {"TOKEN": (CANARY, True)})
    status, _, problem = api.call("PUT", f"{base}/prod", None, body)
    assert status == 401 and "X-Vault-Token" in problem["detail"]
    for token in (runner, reaper):
        status, _, problem = api.call("PUT", f"{base}/prod", token, body)
        assert status == 403, problem
        assert problem["operation"] and CANARY not in json.dumps(problem)
    assert api.call("PUT", f"{base}/prod", control, body)[0] == 201
    for token in (runner, reaper):
        assert api.call("GET", f"{base}/prod", token)[0] == 403
        assert api.call("DELETE", f"{base}/prod", token)[0] == 403
    assert api.call("GET", f"{base}/prod", control)[0] == 200
    status, _, _ = api.call("GET", f"{base}/prod", "not-a-token")
    assert status == 403


AGENT = {"api_version": "agentic.stigmer.ai/v1", "kind": "Agent", "metadata": {"name": "m"},
         "spec": {"instructions": "Review the pull request.",
                  "env_spec": {"data": {"MODE": {"value": "", "is_secret": False}}}}}  # fmt: skip


async def test_every_route_answers_403_exactly_where_the_callers_policy_denies(
    api: Api, admin: VaultClient, tenant: str
) -> None:
    tokens = {name: await token_with(admin, f"stigmer-{name}")
              for name in ("control-plane", "runner", "reaper", "admin")}  # fmt: skip
    root = (await admin.post("auth/token/lookup-self"))["data"]["id"]
    env = f"/v1/tenants/{tenant}/environments"
    body = environment("m", {"MODE": ("fast", False)})
    assert api.call("PUT", f"{env}/m", root, body)[0] == 201
    request = {"template": AGENT, "environments": ["m"], "ttl": "10m"}
    executions = f"/v1/tenants/{tenant}/executions"
    issued = api.call("POST", executions, root, {**request, "id": "mx"})
    assert issued[0] == 201, issued
    routes = [  # method, path, body; then the status for control-plane, runner, reaper, admin
        ("GET", f"{env}/m", None, (200, 403, 403, 200)),
        ("GET", env, None, (200, 403, 403, 200)),
        ("PUT", f"{env}/m?replace=true", body, (200, 403, 403, 200)),  # admin: rewrap access
        ("GET", f"{executions}/mx", None, (200, 403, 403, 200)),
        ("POST", executions, {**request, "id": "my"}, (201, 403, 403, 403)),
        ("DELETE", f"{executions}/mx", None, (204, 403, 403, 403)),
        ("DELETE", f"{env}/m", None, (204, 403, 403, 403)),
    ]
    for index, name in reversed(list(enumerate(tokens))):  # control-plane, which deletes, last
        for method, path, sent, expected in routes:
            status, _, answer = api.call(method, path, tokens[name], sent)
            assert status == expected[index], (name, method, path, answer)
            if status == 403:
                assert answer["operation"] and "denied" in answer["detail"], answer


async def test_bad_input_gets_a_4xx_with_field_pointers_and_stores_nothing(
    api: Api, admin: VaultClient, tenant: str
) -> None:
    token = await token_with(admin, "stigmer-control-plane")
    base = f"/v1/tenants/{tenant}/environments"
    cases = [
        (b"{not json", 422, ""),
        (json.dumps(["a list"]).encode(), 422, ""),
        (json.dumps({**environment("x", {}), "kind": "Agent"}).encode(), 422, "/kind"),
        (json.dumps(environment("other", {})).encode(), 422, "/metadata/name"),
        (json.dumps(environment("x", {"BAD NAME": ("v", False)})).encode(), 422, "/spec/data"),
        (json.dumps(environment("x", {"NUL": ("a\u0000b", True)})).encode(), 422, ""),
        (b"[" * 200 + b"]" * 200, 422, ""),
        (b"x" * (2 * 1024 * 1024), 413, ""),
    ]
    for raw, expected, pointer in cases:
        status, headers, problem = api.call("PUT", f"{base}/x", token, raw=raw)
        assert status == expected, (raw[:60], problem)
        assert headers["Content-Type"].startswith("application/problem+json")
        if pointer:
            assert any(e["pointer"].startswith(pointer) for e in problem["errors"]), problem
    assert api.call("PUT", f"/v1/tenants/{tenant}/environments/bad..name", token,
                    environment("bad..name", {}))[0] == 422  # fmt: skip
    assert api.call("GET", "/v1/tenants/Not_A_Tenant/environments", token)[0] == 422
    status, _, problem = api.call("POST", f"/v1/tenants/{tenant}/executions", token,
                                  {"template": {"kind": "Agent"}, "surprise": 1})  # fmt: skip
    assert status == 422 and problem["errors"][0]["pointer"] == "/surprise", problem
    status, _, problem = api.call("POST", f"/v1/tenants/{tenant}/executions", token,
                                  {"template": {"kind": "Agent", "metadata": {"name": "a"}}})  # fmt: skip
    assert status == 422 and problem["errors"][0]["pointer"].startswith("/template"), problem
    assert api.call("GET", base, token)[2] == {"names": []}  # nothing stored
    assert await admin.list(f"stigmer/metadata/execution-contexts/{tenant}") == []


async def test_an_execution_issued_over_http_runs_like_one_from_the_cli(
    api: Api, vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    token = await token_with(admin, "stigmer-control-plane")
    body = environment("prod", {"TOKEN": (CANARY, True), "MODE": ("fast", False)})
    assert api.call("PUT", f"/v1/tenants/{tenant}/environments/prod", token, body)[0] == 201
    agent = {"api_version": "agentic.stigmer.ai/v1", "kind": "Agent",
             "metadata": {"name": "reviewer"},
             "spec": {"instructions": "Review the pull request.", "env_spec": {"data": {
                 "TOKEN": {"is_secret": True}, "MODE": {"value": "", "is_secret": False}}},
                      "mcpServers": [{"name": "review", "http": {
                          "url": "https://mcp.example.com/review",
                          "headers": {"Authorization": "Bearer ${TOKEN}"}}}]}}  # fmt: skip
    instance = {"api_version": "agentic.stigmer.ai/v1", "kind": "AgentInstance",
                "metadata": {"name": "i"},
                "spec": {"agentId": "reviewer", "environmentRefs": [{"kind": 53, "slug": "prod"}]}}  # fmt: skip
    request = {"template": agent, "instance": instance, "ttl": "10m", "id": "api-1",
               "runtimeEnv": {"EXTRA": {"value": CANARY + "-rt", "isSecret": True}}}  # fmt: skip
    status, headers, issued = api.call("POST", f"/v1/tenants/{tenant}/executions", token, request)
    assert status == 201, issued
    assert headers["Location"] == f"/v1/tenants/{tenant}/executions/api-1"
    assert issued["variables"] == {"EXTRA": {"secret": True}, "MODE": {"secret": False},
                                   "TOKEN": {"secret": True}}  # fmt: skip
    assert CANARY not in json.dumps(issued)
    status, _, shown = api.call("GET", f"/v1/tenants/{tenant}/executions/api-1", token)
    assert status == 200 and shown["spec"]["data"]["TOKEN"]["value"] == "<secret>"
    printed = run_as_runner(
        vault, tenant, "api-1", shm, vault.jwt_for(tenant, tmp_path),
        "import os; print(os.environ['TOKEN'] == " + repr(CANARY) +
        ", os.environ['MODE'], os.environ['EXTRA'] == " + repr(CANARY + "-rt") + ")",
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.split() == ["True", "fast", "True"]
    assert api.call("GET", f"/v1/tenants/{tenant}/executions/api-1", token)[0] == 404  # ended
    # The sidecar renders the same files for an execution from the API as from the CLI.
    request["id"] = "api-2"
    assert api.call("POST", f"/v1/tenants/{tenant}/executions", token, request)[0] == 201
    (tmp_path / "agent.json").write_text(json.dumps(agent))
    (tmp_path / "instance.json").write_text(json.dumps(instance))
    created = cli(vault, "execution", "create", "--tenant", tenant, "--agent",
                  str(tmp_path / "agent.json"), "--instance", str(tmp_path / "instance.json"),
                  "--id", "cli-2", "--ttl", "10m", "--secret", "EXTRA",
                  input=CANARY + "-rt\n")  # fmt: skip
    assert created.returncode == 0, created.stderr
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm)
    try:
        rendered = {}
        for execution_id in ("api-2", "cli-2"):
            prepared = await asyncio.to_thread(sidecar.client.prepare, execution_id)
            directory = prepared.env_file.parent
            rendered[execution_id] = {
                name: (directory / name).read_text() for name in ("env", "env.json", "mcp.json")
            }
            await asyncio.to_thread(sidecar.client.end, execution_id)
        assert rendered["api-2"] == rendered["cli-2"]
        assert CANARY in rendered["api-2"]["env"] and CANARY in rendered["api-2"]["mcp.json"]
    finally:
        assert sidecar.stop() == 0
    status, _, _ = api.call("POST", f"/v1/tenants/{tenant}/executions", token,
                            {**request, "id": "api-3"})  # fmt: skip
    assert status == 201
    assert api.call("DELETE", f"/v1/tenants/{tenant}/executions/api-3", token)[0] == 204
    assert api.call("DELETE", f"/v1/tenants/{tenant}/executions/api-3", token)[0] == 404
    # Nothing of the secret in the server's log or metrics.
    metrics = urllib.request.urlopen(api.url + "/metrics", timeout=10).read().decode()  # noqa: S310
    assert 'route="/v1/tenants/{tenant}/executions"' in metrics and CANARY not in metrics
    assert CANARY not in api.log.read_text()
    assert canary_hits(tmp_path) == []


def test_the_openapi_document_matches_the_routes_and_the_committed_file(api: Api) -> None:
    document = openapi.document()
    committed = json.loads((ROOT / "openapi.json").read_text())
    assert committed == json.loads(json.dumps(document)), "run `make openapi` and commit"
    served = api.call("GET", "/openapi.json", None)[2]
    assert served == committed
    from broker.api.routes import ROUTES

    documented = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    routed = {(method, path) for method, path, _ in ROUTES}
    assert routed <= documented
    assert {p for _, p in documented} - {p for _, p in routed} == {
        "/healthz", "/readyz", "/metrics", "/openapi.json"}  # fmt: skip
    for path, operations in document["paths"].items():
        for operation in operations.values():
            for status, answer in operation["responses"].items():
                if int(status) >= 400:  # every error has its schema
                    assert "Problem" in json.dumps(answer), (path, status)
    assert api.call("GET", "/readyz", None)[0] == 200


async def stored_keys(admin: VaultClient) -> set[str]:
    """Every Environment and context path in KV: what a rejected request must not add to."""
    keys = set()
    for folder in ("environments", "execution-contexts"):
        for tenant_dir in await admin.list(f"stigmer/metadata/{folder}"):
            for name in await admin.list(f"stigmer/metadata/{folder}/{tenant_dir}"):
                keys.add(f"{folder}/{tenant_dir}{name}")
    return keys


async def test_fuzzed_requests_from_the_openapi_document_never_get_a_5xx(
    api: Api, admin: VaultClient, tenant: str
) -> None:
    """Schemathesis generates valid and invalid requests for every operation from the
    document; none may answer 5xx, and nothing rejected may be stored."""
    import hypothesis
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    CONFORMANCE = [status_code_conformance, content_type_conformance,
                   response_schema_conformance]  # fmt: skip
    token = await token_with(admin, "stigmer-control-plane")
    schema = schemathesis.openapi.from_dict(openapi.document())
    before = await stored_keys(admin)
    accepted: set[str] = set()
    failures: list[str] = []
    statuses: Counter[int] = Counter()

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(max_examples=20, deadline=None, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def call(case: Any) -> None:
                if "tenant" in (case.path_parameters or {}) and hash(str(case.body)) % 2:
                    case.path_parameters["tenant"] = tenant  # half of them in a real tenant
                response = case.call(base_url=api.url, headers={"X-Vault-Token": token},
                                     timeout=30)  # fmt: skip
                statuses[response.status_code] += 1
                try:  # the document tells the truth: documented status, type and schema
                    case.validate_response(response, checks=CONFORMANCE)
                except AssertionError as failure:
                    failures.append(f"{case.method} {case.formatted_path}: {failure}"[:600])
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} -> "
                                    f"{response.status_code} {response.text[:200]}")  # fmt: skip
                if 200 <= response.status_code < 300 and case.method in ("PUT", "POST"):
                    params = case.path_parameters or {}
                    if case.method == "PUT":
                        accepted.add(f"environments/{params['tenant']}/{params['name']}")
                    else:
                        accepted.add(f"execution-contexts/{params['tenant']}/"
                                     f"{response.json()['id']}")  # fmt: skip

            try:
                await asyncio.to_thread(call)
            except hypothesis.errors.Unsatisfiable:
                # No invalid request exists for an operation without inputs (/healthz).
                assert mode is GenerationMode.NEGATIVE and not operation.path.startswith("/v1")
    assert failures == [], failures[:5]
    assert sum(statuses.values()) >= 200 and statuses[200] and statuses[422], statuses
    added = await stored_keys(admin) - before
    assert added <= accepted, sorted(added - accepted)


async def test_the_api_takes_the_declaration_model_with_its_mcp_servers(
    api: Api, admin: VaultClient, tenant: str
) -> None:
    token = await token_with(admin, "stigmer-control-plane")
    body = environment("prod", {"REVIEW_TOKEN": (CANARY, True), "UNDECLARED": ("x", False)})
    assert api.call("PUT", f"/v1/tenants/{tenant}/environments/prod", token, body)[0] == 201
    server = {
        "apiVersion": "agentic.stigmer.ai/v1",
        "kind": "McpServer",
        "metadata": {"name": "review"},
        "spec": {
            "env": {"REVIEW_TOKEN": {"isSecret": True}},
            "http": {
                "url": "https://mcp.example.com",
                "headers": {"Authorization": "Bearer ${REVIEW_TOKEN}"},
            },
        },
    }
    agent = {
        "apiVersion": "agentic.stigmer.ai/v1",
        "kind": "Agent",
        "metadata": {"name": "reviewer"},
        "spec": {
            "instructions": "Review the pull request.",
            "env": {"LOG_LEVEL": {"optional": True}},
            "mcpServerUsages": [{"mcpServerRef": {"kind": 44, "slug": "review"}}],
        },
    }
    request = {"template": agent, "environments": ["prod"], "mcpServers": [server]}
    status, _, issued = api.call("POST", f"/v1/tenants/{tenant}/executions", token, request)
    assert status == 201, issued
    assert issued["variables"] == {"REVIEW_TOKEN": {"secret": True}}
    request["mcpServers"] = []
    status, _, problem = api.call("POST", f"/v1/tenants/{tenant}/executions", token, request)
    assert status == 422 and "not given" in problem["detail"], problem
    request["mcpServers"] = [{**server, "spec": {"env": {}, "docker": {"image": "x"}}}]
    status, _, problem = api.call("POST", f"/v1/tenants/{tenant}/executions", token, request)
    assert status == 422 and problem["errors"][0]["pointer"].startswith("/mcp_servers/0"), problem
