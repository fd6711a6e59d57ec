"""`policy render|apply|check` and `keys rotate|rewrap` against a live server."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from broker import policies
from broker.control.environments import EnvironmentStore
from broker.control.executions import ExecutionIssuer, RuntimeValue
from broker.control.keys import KeyManager, key_version
from broker.errors import DecryptError, ValidationError
from broker.policies import IdentitySources
from broker.runner import run
from broker.vault import KV, Transit
from tests.conftest import Vault, cli
from tests.test_control import agent, environment, instance
from tests.test_run import session


def test_policy_check_passes_on_the_bootstrapped_server(vault: Vault) -> None:
    result = cli(vault, "policy", "check", "--tenant", "acme", "--other-tenant", "beta")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "policy check: every cell as expected" in result.stdout
    assert "decrypt             deny / deny    allow / deny" in result.stdout
    assert cli(vault, "env", "list", "--tenant", "acme").stdout == ""  # probes cleaned up


def test_policy_check_catches_a_loosened_policy(vault: Vault) -> None:
    original = vault.admin.get("sys/policies/acl/stigmer-control-plane")["data"]["policy"]
    loosened = original + '\npath "stigmer-transit/decrypt/*" {\n  capabilities = ["update"]\n}\n'
    vault.admin.post("sys/policies/acl/stigmer-control-plane", {"policy": loosened})
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


def test_policy_render_offline_and_online(vault: Vault) -> None:
    offline = cli(vault, "policy", "render", "--jwt-accessor", "auth_jwt_1234", "--approle")
    assert offline.returncode == 0, offline.stderr
    text = offline.stdout
    assert "{{identity.entity.aliases.auth_jwt_1234.metadata.tenant}}" in text
    assert "stigmer-transit/decrypt/env-{{identity.entity.metadata.tenant}}" in text
    assert "# ===== policy stigmer-reaper =====" in text
    online = cli(vault, "policy", "render")
    accessor = vault.admin.get("sys/auth")["data"]["jwt/"]["accessor"]
    assert f"aliases.{accessor}.metadata.tenant" in online.stdout


def test_control_plane_policy_never_decrypts() -> None:
    rendered = policies.render(
        __import__("broker.config").config.Layout(), IdentitySources(jwt="a")
    )
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


def test_rotate_then_old_context_still_decrypts(
    vault: Vault, tenant: str, shm: Path, tmp_path: Path
) -> None:
    EnvironmentStore(vault.admin, vault.layout).create(
        tenant, environment("e", TOKEN=("before", True))
    )
    ExecutionIssuer(vault.admin, vault.layout).create(
        tenant, agent(), instance("e"), execution_id="pre-rot"
    )
    rotated = cli(vault, "keys", "rotate", "--tenant", tenant)
    assert rotated.returncode == 0 and "latest version 2" in rotated.stdout
    rewrapped = cli(vault, "keys", "rewrap", "--tenant", tenant)
    assert "rewrapped 1 secrets in 1 documents" in rewrapped.stdout
    stored = KV(vault.admin, "stigmer").read_resource(f"environments/{tenant}/e")[0]
    assert key_version(stored["spec"]["data"]["TOKEN"]["value"]) == 2
    assert (
        run(session(vault, tenant, "pre-rot", shm, vault.jwt_for(tenant, tmp_path)), ["true"]) == 0
    )


def test_raise_min_decryption_version_rewraps_live_contexts(
    vault: Vault, tenant: str, shm: Path, tmp_path: Path
) -> None:
    EnvironmentStore(vault.admin, vault.layout).create(
        tenant, environment("e", TOKEN=("v1-secret", True))
    )
    ExecutionIssuer(vault.admin, vault.layout).create(
        tenant, agent(), instance("e"), runtime_env={"RT": RuntimeValue("rt", True)},
        ttl=timedelta(minutes=5), execution_id="live-1",
    )  # fmt: skip
    old = Transit(vault.admin, "stigmer-transit").encrypt(
        vault.layout.transit_key(tenant), ["orphan"]
    )[0]
    manager = KeyManager(vault.admin, vault.layout)
    manager.rotate(tenant)
    report = manager.rewrap(tenant, raise_min_decryption_version=True)
    assert report.min_decryption_version == 2 and report.rewrapped == 3 and report.documents == 2
    with pytest.raises(DecryptError):  # ciphertext nobody rewrapped is now refused
        Transit(vault.admin, "stigmer-transit").decrypt(vault.layout.transit_key(tenant), [old])
    assert (
        run(session(vault, tenant, "live-1", shm, vault.jwt_for(tenant, tmp_path)), ["true"]) == 0
    )


def test_rewrap_keeps_a_concurrent_edit(vault: Vault, tenant: str) -> None:
    """A writer edits between rewrap's read and write: the CAS write fails, rewrap retries."""
    store = EnvironmentStore(vault.admin, vault.layout)
    store.create(tenant, environment("e", A=("a", True)))
    manager = KeyManager(vault.admin, vault.layout)
    manager.rotate(tenant)
    edits = []

    def concurrent_edit(path: str) -> None:
        if not edits:
            edits.append(path)
            store.apply(tenant, environment("e", A=("a", True), B=("edited", True)))

    report = manager.rewrap(tenant, before_write=concurrent_edit)
    assert report.retries == 1 and edits
    stored = store.get(tenant, "e").spec.data
    assert set(stored) == {"A", "B"}
    transit = Transit(vault.admin, "stigmer-transit")
    values = transit.decrypt(
        vault.layout.transit_key(tenant), [stored["A"].value, stored["B"].value]
    )
    assert values == ["a", "edited"]
    assert {key_version(stored[k].value) for k in ("A", "B")} == {2}


def test_rotate_and_rewrap_while_another_writer_edits(vault: Vault, tenant: str) -> None:
    store = EnvironmentStore(vault.admin, vault.layout)
    for n in range(4):
        store.create(
            tenant, environment(f"env{n}", **{f"S{i}": (f"s{n}-{i}", True) for i in range(30)})
        )
    stop = threading.Event()
    written: dict[str, dict[str, str]] = {f"env{n}": {} for n in range(4)}
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 200:
            name = f"env{i % 4}"
            current = store.get(tenant, name)
            data = {k: ("", True) for k in current.spec.data}  # placeholders, replaced below
            data.update(
                {k: (f"s{name[3:]}-{k[1:]}", True) for k in current.spec.data if k.startswith("S")}
            )
            written[name][f"W{i}"] = f"edit-{i}"
            data.update({k: (v, True) for k, v in written[name].items()})
            try:
                store.apply(tenant, environment(name, **data))
            except ValidationError:
                del written[name][f"W{i}"]  # lost the race to rewrap: not applied, retry later
            except BaseException as exc:
                errors.append(exc)
                return
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    manager = KeyManager(vault.admin, vault.layout)
    try:
        for _ in range(3):
            manager.rotate(tenant)
            manager.rewrap(tenant)
    finally:
        stop.set()
        thread.join(60)
    assert not errors
    final = manager.rewrap(tenant)  # anything the writer encrypted before the last rotation
    transit = Transit(vault.admin, "stigmer-transit")
    for name, edits in written.items():
        stored = store.get(tenant, name).spec.data
        assert {k for k in stored if k.startswith("W")} == set(edits)  # no edit lost
        keys = sorted(stored)
        plain = transit.decrypt(vault.layout.transit_key(tenant), [stored[k].value for k in keys])
        expected = {**{f"S{i}": f"s{name[3:]}-{i}" for i in range(30)}, **edits}
        assert dict(zip(keys, plain, strict=True)) == expected
        assert {key_version(stored[k].value) for k in keys} == {final.latest_version}
