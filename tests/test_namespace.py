"""The broker inside a Vault/OpenBao namespace (VAULT_NAMESPACE / BAO_NAMESPACE): setup,
the control plane and `run` all work in it, and nothing of it is visible from the root."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from broker.control.setup import Bootstrap, JwtSettings
from broker.dev import identity
from broker.vault import VaultClient
from tests.conftest import Vault, cli, context_paths
from tests.factories import issue_secrets

CANARY = "cnry-namespace-2b7e-do-not-leak"


async def test_setup_and_run_inside_a_namespace(
    vault: Vault, admin: VaultClient, tmp_path: Path, shm: Path
) -> None:
    namespace = f"team-{tmp_path.name[-12:].replace('_', '-').strip('-')}"
    await admin.post(f"sys/namespaces/{namespace}", {})
    inside = VaultClient(dataclasses.replace(vault.settings(), namespace=namespace))
    try:
        jwt = JwtSettings(public_keys=(identity.public_pem(vault.identity_key),))
        await Bootstrap(inside, vault.layout).run(["acme"], jwt)
        await issue_secrets(inside, vault.layout, "acme", "ns-1", {"TOKEN_0": (CANARY, True)})
        assert await context_paths(inside, vault, "acme") == ["ns-1"]
        assert "ns-1" not in await context_paths(admin, vault, "acme")  # not at the root
    finally:
        await inside.aclose()
    token = vault.jwt_for("acme", tmp_path)
    child = f"import os, sys; sys.exit(0 if os.environ['TOKEN_0'] == {CANARY!r} else 3)"

    def run(**extra: str) -> tuple[int, str]:
        environ = vault.environ(**extra)
        environ.pop("VAULT_TOKEN")
        result = cli(vault, "run", "--tenant", "acme", "--execution", "ns-1", "--out", str(shm),
                     "--jwt-file", str(token), "--", sys.executable, "-c", child, env=environ)  # fmt: skip
        return result.returncode, result.stderr

    code, stderr = run()  # the root's runner role cannot see the namespace's context
    assert code == 2 and "no context" in stderr
    code, stderr = run(BAO_NAMESPACE=namespace)
    assert code == 0, stderr
    assert CANARY not in stderr
    environ = vault.environ(VAULT_NAMESPACE=f"{namespace}/")
    listed = cli(vault, "execution", "list", "--tenant", "acme", "-o", "json", env=environ)
    assert listed.returncode == 0 and '"executions": []' in listed.stdout, listed.stderr
