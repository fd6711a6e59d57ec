"""Orgs, versions and ids, driven through the CLI as a user would: a resource or reference of
another org is refused (never resolved against the local tenant's namesake), a reference's
version selects that stored version, and ids that tie resources together must agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from broker.vault import VaultClient
from tests.conftest import Vault, cli, run_as_runner
from tests.factories import resource

EXAMPLES = Path(__file__).resolve().parent / "data" / "stigmer-examples.json"


def write(path: Path, *documents: dict[str, Any]) -> str:
    path.write_text("\n---\n".join(json.dumps(d) for d in documents))
    return str(path)


def stigmer_environments() -> list[dict[str, Any]]:
    """Stigmer's own example: three Environments of org acme-corp."""
    example = json.loads(EXAMPLES.read_text())["examples"][3]
    return [r for r in example["resources"] if r["kind"] == "Environment"]


def agent(**metadata: str) -> dict[str, Any]:
    document = resource("Agent", "reviewer", {
        "instructions": "Review pull requests.",
        "env_spec": {"data": {"MODE": {"value": "", "is_secret": False}}}})  # fmt: skip
    document["metadata"].update(metadata)
    return document


def instance(*refs: dict[str, Any], agent_id: str = "reviewer") -> dict[str, Any]:
    return resource("AgentInstance", "i", {"agent_id": agent_id, "environment_refs": list(refs)})


def ref(slug: str, **fields: str) -> dict[str, Any]:
    return {"kind": 53, "slug": slug, **fields}


async def contexts(admin: VaultClient, tenant: str) -> list[str]:
    return await admin.list(f"stigmer/metadata/execution-contexts/{tenant}")


async def test_an_environment_of_another_org_is_refused_unless_mapped(
    vault: Vault, tenant: str, tmp_path: Path
) -> None:
    environments = write(tmp_path / "envs.yaml", *stigmer_environments())
    refused = cli(vault, "env", "apply", "-f", environments, "--tenant", tenant)
    assert refused.returncode == 2
    assert "metadata.org: org 'acme-corp' is not tenant" in refused.stderr, refused.stderr
    assert cli(vault, "env", "list", "--tenant", tenant).stdout == ""  # nothing stored
    mapped = vault.environ(STIGMER_ORG_TENANTS=f"other=x,acme-corp={tenant}")
    applied = cli(vault, "env", "apply", "-f", environments, "--tenant", tenant, env=mapped)
    assert applied.returncode == 0, applied.stderr
    assert cli(vault, "env", "list", "--tenant", tenant).stdout.split() == [
        "aws-prod", "github-prod-secrets", "global-defaults"]  # fmt: skip
    broken = cli(vault, "env", "apply", "-f", environments, "--tenant", tenant,
                 env=vault.environ(STIGMER_ORG_TENANTS="no-equals-sign"))  # fmt: skip
    assert broken.returncode == 2
    assert "STIGMER_ORG_TENANTS: 'no-equals-sign' is not org=tenant" in broken.stderr


async def test_references_and_templates_of_another_org_are_refused(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    env = resource("Environment", "prod", {"data": {"MODE": {"value": "fast"}}})
    assert cli(vault, "env", "apply", "-f", write(tmp_path / "e.json", env),
               "--tenant", tenant).returncode == 0  # fmt: skip
    cases = [
        (agent(), instance(ref("prod", org="someone-else")), "environment_refs[0].org"),
        (agent(org="someone-else"), instance(ref("prod")), "template metadata.org"),
    ]
    for template, bound, where in cases:
        created = cli(vault, "execution", "create", "--tenant", tenant,
                      "--agent", write(tmp_path / "a.json", template),
                      "--instance", write(tmp_path / "i.json", bound))  # fmt: skip
        assert created.returncode == 2 and where in created.stderr, created.stderr
        assert "'someone-else'" in created.stderr
    assert await contexts(admin, tenant) == []
    same_org = cli(vault, "execution", "create", "--tenant", tenant, "--agent",
                   write(tmp_path / "a.json", agent(org=tenant)), "--instance",
                   write(tmp_path / "i.json", instance(ref("prod", org=tenant))))  # fmt: skip
    assert same_org.returncode == 0, same_org.stderr


async def test_a_reference_version_selects_that_stored_version(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    for mode in ("one", "two", "three"):
        env = resource("Environment", "prod", {"data": {"MODE": {"value": mode}}})
        applied = cli(vault, "env", "apply", "-f", write(tmp_path / "e.json", env),
                      "--tenant", tenant)  # fmt: skip
        assert applied.returncode == 0, applied.stderr
    template = write(tmp_path / "a.json", agent())

    def create(version: str, execution_id: str) -> tuple[int, str]:
        bound = write(tmp_path / "i.json", instance(ref("prod", version=version)))
        result = cli(vault, "execution", "create", "--tenant", tenant, "--agent", template,
                     "--instance", bound, "--id", execution_id)  # fmt: skip
        return result.returncode, result.stderr

    for version, expected in (("1", "one"), ("2", "two"), ("latest", "three"), ("", "three")):
        execution_id = f"v-{version or 'none'}"
        assert create(version, execution_id) == (0, "")
        shown = json.loads(cli(vault, "execution", "show", execution_id, "--tenant", tenant,
                               "-o", "json").stdout)  # fmt: skip
        assert shown["spec"]["data"]["MODE"]["value"] == expected, version
    code, stderr = create("7", "v-7")
    assert code == 2 and "version 7 not found" in stderr and "last 10" in stderr, stderr
    code, stderr = create("abc", "v-abc")
    assert code == 2 and "'abc' is not a stored version" in stderr, stderr
    assert sorted(await contexts(admin, tenant)) == ["v-1", "v-2", "v-latest", "v-none"]


async def test_ids_that_tie_resources_together_must_agree(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    template = write(tmp_path / "a.json", agent(id="agt-123"))
    execution = resource("AgentExecution", "x", {"agent_id": "agt-999", "message": "hi"})
    created = cli(vault, "execution", "create", "--tenant", tenant, "--agent", template,
                  "--execution", write(tmp_path / "x.json", execution),
                  "--env", "MODE=fast")  # fmt: skip
    assert created.returncode == 2, created.stderr
    assert "'agt-999'" in created.stderr and "'agt-123'" in created.stderr
    bound = write(tmp_path / "i.json", instance(agent_id="agt-555"))
    created = cli(vault, "execution", "create", "--tenant", tenant, "--agent", template,
                  "--instance", bound, "--env", "MODE=fast")  # fmt: skip
    assert created.returncode == 2 and "'agt-555'" in created.stderr, created.stderr
    assert await contexts(admin, tenant) == []
    execution["spec"]["agent_id"] = "agt-123"
    created = cli(vault, "execution", "create", "--tenant", tenant, "--agent", template,
                  "--execution", write(tmp_path / "x.json", execution),
                  "--env", "MODE=fast")  # fmt: skip
    assert created.returncode == 0, created.stderr


def stigmer_context(execution_id: str, data: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """An ExecutionContext as Stigmer's backend writes it: protobuf JSON, plaintext values."""
    return {"apiVersion": "agentic.stigmer.ai/v1", "kind": "ExecutionContext",
            "metadata": {"name": execution_id},
            "spec": {"executionId": execution_id, "data": data, **spec}}  # fmt: skip


async def test_an_imported_context_is_encrypted_checked_and_runs(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    secret = "imported-secret-value-42"
    document = stigmer_context("imp-1", {"TOKEN": {"value": secret, "isSecret": True},
                                         "MODE": {"value": "fast"}})  # fmt: skip
    source = write(tmp_path / "context.json", document)
    imported = cli(vault, "execution", "import", "-f", source, "--tenant", tenant,
                   "--ttl", "10m", "-o", "json")  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    answer = json.loads(imported.stdout)
    assert answer["id"] == "imp-1" and secret not in imported.stdout
    assert answer["variables"] == {"MODE": {"secret": False}, "TOKEN": {"secret": True}}
    stored = await admin.get(f"stigmer/data/execution-contexts/{tenant}/imp-1")
    assert secret not in json.dumps(stored) and "vault:v1:" in json.dumps(stored)
    ran = run_as_runner(vault, tenant, "imp-1", shm, vault.jwt_for(tenant, tmp_path),
                        f"import os; print(os.environ['TOKEN'] == {secret!r})")  # fmt: skip
    assert ran.returncode == 0 and ran.stdout.strip() == "True", ran.stderr
    holding = [p for root in (tmp_path, shm) for p in root.rglob("*")
               if p.is_file() and secret.encode() in p.read_bytes()]  # fmt: skip
    assert holding == [tmp_path / "context.json"]  # read, never copied


async def test_a_bad_import_is_refused_by_name_and_writes_nothing(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    value = {"value": "v"}
    cases = [
        (stigmer_context("imp-2", {"LD_PRELOAD": value}), "LD_PRELOAD: refused"),
        (stigmer_context("imp-2", {"A": {"value": "a\u0000b", "isSecret": True}}), "spec.data.A"),
        (stigmer_context("imp-2", {"A": value}, tenant="other"), "spec.tenant: 'other'"),
        (stigmer_context("bad id!", {"A": value}), "execution id"),
        ({**stigmer_context("imp-2", {"A": value}), "kind": "Environment"}, "kind"),
        (stigmer_context("imp-2", {"A": {"value": ""}}), "spec.data.A.value"),
    ]
    for document, problem in cases:
        result = cli(vault, "execution", "import", "-f", write(tmp_path / "c.json", document),
                     "--tenant", tenant)  # fmt: skip
        assert result.returncode == 2 and problem in result.stderr, (problem, result.stderr)
        assert "Traceback" not in result.stderr
    assert await contexts(admin, tenant) == []
    good = write(tmp_path / "c.json", stigmer_context("imp-3", {"A": value}))
    assert cli(vault, "execution", "import", "-f", good, "--tenant", tenant).returncode == 0
    again = cli(vault, "execution", "import", "-f", good, "--tenant", tenant)
    assert again.returncode == 2 and "already exists" in again.stderr
    allowed = write(tmp_path / "c.json", stigmer_context("imp-4", {"LD_PRELOAD": value}))
    assert cli(vault, "execution", "import", "-f", allowed, "--tenant", tenant,
               "--allow-env-name", "LD_PRELOAD").returncode == 0  # fmt: skip
