"""`policy render|apply|check` and `keys rotate|rewrap` against a live server."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from broker import policies
from broker.config import Layout
from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer, RuntimeValue
from broker.control.keys import KeyManager, key_version
from broker.errors import DecryptError, ValidationError
from broker.execution.credentials import Credentials
from broker.policies import IdentitySources
from broker.render.outdir import OutputRoot
from broker.runner import RunSettings, run_command
from broker.vault import KV, Transit, VaultClient
from tests.conftest import Vault, cli
from tests.factories import agent, environment, instance


async def run_true(vault: Vault, tenant: str, execution_id: str, out: Path, jwt: Path) -> int:
    client = vault.client(with_token=False)
    settings = RunSettings(tenant, execution_id, OutputRoot(out), Credentials(jwt_file=jwt))
    try:
        return await run_command(client, vault.layout, settings, ["true"])
    finally:
        await client.aclose()


def test_policy_check_passes_on_the_bootstrapped_server(vault: Vault) -> None:
    result = cli(vault, "policy", "check", "--tenant", "acme", "--other-tenant", "beta")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "policy check: every cell as expected" in result.stdout
    assert "decrypt             deny / deny    allow / deny" in result.stdout
    assert cli(vault, "env", "list", "--tenant", "acme").stdout == ""  # probes cleaned up


async def test_policy_check_catches_a_loosened_policy(vault: Vault, admin: VaultClient) -> None:
    original = (await admin.get("sys/policies/acl/stigmer-control-plane"))["data"]["policy"]
    loosened = original + '\npath "stigmer-transit/decrypt/*" {\n  capabilities = ["update"]\n}\n'
    await admin.post("sys/policies/acl/stigmer-control-plane", {"policy": loosened})
    try:
        result = cli(vault, "policy", "check", "--tenant", "acme", "--other-tenant", "beta")
        assert result.returncode == 1
        assert "MISMATCH control-plane decrypt (own): expected deny, got allow" in result.stderr
        assert "allow (!) / allow (!)" in result.stdout
    finally:
        applied = cli(vault, "policy", "apply")
    assert "updated    policy stigmer-control-plane" in applied.stdout
    assert (
        cli(vault, "policy", "check", "--tenant", "acme", "--other-tenant", "beta").returncode == 0
    )


async def test_policy_render_offline_and_online(vault: Vault, admin: VaultClient) -> None:
    offline = cli(vault, "policy", "render", "--jwt-accessor", "auth_jwt_1234", "--approle")
    assert offline.returncode == 0, offline.stderr
    text = offline.stdout
    assert "{{identity.entity.aliases.auth_jwt_1234.metadata.tenant}}" in text
    assert "stigmer-transit/decrypt/env-{{identity.entity.metadata.tenant}}" in text
    assert "# ===== policy stigmer-reaper =====" in text
    online = cli(vault, "policy", "render")
    accessor = (await admin.get("sys/auth"))["data"]["jwt/"]["accessor"]
    assert f"aliases.{accessor}.metadata.tenant" in online.stdout


def test_control_plane_policy_never_decrypts() -> None:
    rendered = policies.render(Layout(), IdentitySources(jwt="a"))
    assert "decrypt" not in rendered["stigmer-control-plane"].split("# Encrypt only")[1]
    assert "/decrypt/" not in "".join(
        line for line in rendered["stigmer-control-plane"].splitlines() if line.startswith("path")
    )
    for name in ("stigmer-reaper", "stigmer-admin"):
        assert not [
            line
            for line in rendered[name].splitlines()
            if line.startswith("path") and "decrypt" in line
        ]


async def test_rotate_then_old_context_still_decrypts(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    await EnvironmentStore(admin, vault.layout).create(
        tenant, environment("e", TOKEN=("before", True))
    )
    await ExecutionIssuer(admin, vault.layout).create(
        tenant, agent(), instance("e"), execution_id="pre-rot"
    )
    rotated = cli(vault, "keys", "rotate", "--tenant", tenant)
    assert rotated.returncode == 0 and "latest version 2" in rotated.stdout
    rewrapped = cli(vault, "keys", "rewrap", "--tenant", tenant)
    assert "rewrapped 1 secrets in 1 documents" in rewrapped.stdout
    stored = (await KV(admin, "stigmer").read_resource(f"environments/{tenant}/e"))[0]
    assert key_version(stored["spec"]["data"]["TOKEN"]["value"]) == 2
    assert await run_true(vault, tenant, "pre-rot", shm, vault.jwt_for(tenant, tmp_path)) == 0


async def test_raise_min_decryption_version_rewraps_live_contexts(
    vault: Vault, admin: VaultClient, tenant: str, shm: Path, tmp_path: Path
) -> None:
    await EnvironmentStore(admin, vault.layout).create(
        tenant, environment("e", TOKEN=("v1-secret", True))
    )
    await ExecutionIssuer(admin, vault.layout).create(
        tenant, agent(), instance("e"), runtime_env={"RT": RuntimeValue("rt", True)},
        ttl=timedelta(minutes=5), execution_id="live-1",
    )  # fmt: skip
    old = (
        await Transit(admin, "stigmer-transit").encrypt(
            vault.layout.transit_key(tenant), ["orphan"]
        )
    )[0]
    manager = KeyManager(admin, vault.layout)
    await manager.rotate(tenant)
    report = await manager.rewrap(tenant, raise_min_decryption_version=True)
    assert report.min_decryption_version == 2 and report.rewrapped == 3 and report.documents == 2
    with pytest.raises(DecryptError):  # ciphertext nobody rewrapped is now refused
        await Transit(admin, "stigmer-transit").decrypt(vault.layout.transit_key(tenant), [old])
    assert await run_true(vault, tenant, "live-1", shm, vault.jwt_for(tenant, tmp_path)) == 0


async def test_rewrap_keeps_a_concurrent_edit(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    """A writer edits between rewrap's read and write: the CAS write fails, rewrap retries."""
    store = EnvironmentStore(admin, vault.layout)
    await store.create(tenant, environment("e", A=("a", True)))
    manager = KeyManager(admin, vault.layout)
    await manager.rotate(tenant)
    edits = []

    async def concurrent_edit(path: str) -> None:
        if not edits:
            edits.append(path)
            await store.apply(tenant, environment("e", A=("a", True), B=("edited", True)))

    report = await manager.rewrap(tenant, before_write=concurrent_edit)
    assert report.retries == 1 and edits
    stored = (await store.get(tenant, "e")).spec.data
    assert set(stored) == {"A", "B"}
    transit = Transit(admin, "stigmer-transit")
    values = await transit.decrypt(
        vault.layout.transit_key(tenant), [stored["A"].value, stored["B"].value]
    )
    assert values == ["a", "edited"]
    assert {key_version(stored[k].value) for k in ("A", "B")} == {2}


async def test_rotate_and_rewrap_while_another_writer_edits(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    store = EnvironmentStore(admin, vault.layout)
    for n in range(4):
        await store.create(
            tenant, environment(f"env{n}", **{f"S{i}": (f"s{n}-{i}", True) for i in range(30)})
        )
    stop = asyncio.Event()
    written: dict[str, dict[str, str]] = {f"env{n}": {} for n in range(4)}

    async def writer() -> None:
        i = 0
        while not stop.is_set() and i < 200:
            name = f"env{i % 4}"
            current = await store.get(tenant, name)
            data = {
                k: (f"s{name[3:]}-{k[1:]}", True) for k in current.spec.data if k.startswith("S")
            }
            written[name][f"W{i}"] = f"edit-{i}"
            data.update({k: (v, True) for k, v in written[name].items()})
            try:
                await store.apply(tenant, environment(name, **data))
            except ValidationError:
                del written[name][f"W{i}"]  # lost the race to rewrap: not applied, retry later
            i += 1

    async def rotations() -> None:
        manager = KeyManager(admin, vault.layout)
        try:
            for _ in range(3):
                await manager.rotate(tenant)
                await manager.rewrap(tenant)
        finally:
            stop.set()

    await asyncio.gather(writer(), rotations())
    final = await KeyManager(admin, vault.layout).rewrap(tenant)  # whatever the writer left old
    transit = Transit(admin, "stigmer-transit")
    for name, edits in written.items():
        stored = (await store.get(tenant, name)).spec.data
        assert {k for k in stored if k.startswith("W")} == set(edits)  # no edit lost
        keys = sorted(stored)
        plain = await transit.decrypt(
            vault.layout.transit_key(tenant), [stored[k].value for k in keys]
        )
        expected = {**{f"S{i}": f"s{name[3:]}-{i}" for i in range(30)}, **edits}
        assert dict(zip(keys, plain, strict=True)) == expected
        assert {key_version(stored[k].value) for k in keys} == {final.latest_version}
