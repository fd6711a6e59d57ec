"""`setup`'s sources for the service-account issuer's keys, against a fresh dev server and a
local issuer endpoint (tests/issuer.py): a JWKS file (`kubectl get --raw /openid/v1/jwks`), a
JWKS URL and an OIDC discovery URL that Vault fetches itself. A runner logs in with a token
from that issuer after each. Bad sources are refused with the flag and the reason."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config import Layout
from broker.dev import server
from tests.conftest import Vault, cli
from tests.factories import issue_secrets
from tests.issuer import Issuer

CANARY = "cnry-issuer-6d3a-do-not-leak"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    """A dev server nobody has set up yet."""
    state = tmp_path_factory.mktemp("vault-fresh")
    running = server.start(state)
    try:
        yield Vault(running, Layout())
    finally:
        server.stop(state)


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Issuer]:
    running = Issuer(tmp_path_factory.mktemp("issuer")).start()
    running.add_key("k1")
    try:
        yield running
    finally:
        running.stop()


def setup(vault: Vault, issuer: Issuer, *flags: str) -> tuple[int, str]:
    result = cli(vault, "setup", "--tenant", "acme", "--jwt-issuer", issuer.url, *flags)
    return result.returncode, result.stderr


async def runner_logs_in(vault: Vault, token: str, tmp_path: Path, shm: Path) -> tuple[int, str]:
    execution_id = f"k-{tmp_path.name[-20:].strip('_-')}-{len(list(tmp_path.iterdir()))}"
    admin = vault.client()
    try:
        await issue_secrets(admin, vault.layout, "acme", execution_id, {"TOKEN_0": (CANARY, True)})
    finally:
        await admin.aclose()
    jwt_file = tmp_path / f"{execution_id}.jwt"
    jwt_file.write_text(token)
    environ = vault.environ()
    environ.pop("VAULT_TOKEN")
    result = cli(vault, "run", "--tenant", "acme", "--execution", execution_id, "--out", str(shm),
                 "--jwt-file", str(jwt_file), "--", sys.executable, "-c",
                 f"import os, sys; sys.exit(0 if os.environ['TOKEN_0'] == {CANARY!r} else 3)",
                 env=environ)  # fmt: skip
    return result.returncode, result.stderr


async def test_a_jwks_file(fresh: Vault, issuer: Issuer, tmp_path: Path, shm: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    code, stderr = await asyncio.to_thread(setup, fresh, issuer, "--jwks-file", str(jwks))
    assert code == 0, stderr
    assert (await runner_logs_in(fresh, issuer.token("k1", "acme"), tmp_path, shm))[0] == 0


async def test_a_jwks_url_follows_key_rotation(
    fresh: Vault, issuer: Issuer, tmp_path: Path, shm: Path
) -> None:
    url = f"{issuer.url}/openid/v1/jwks"
    code, stderr = await asyncio.to_thread(setup, fresh, issuer, "--jwks-url", url)
    assert code == 0, stderr
    assert (await runner_logs_in(fresh, issuer.token("k1", "acme"), tmp_path, shm))[0] == 0
    issuer.add_key("k2")  # the cluster rotates its signing key: no setup run needed
    code, stderr = await runner_logs_in(fresh, issuer.token("k2", "acme"), tmp_path, shm)
    assert code == 0, stderr


async def test_an_oidc_discovery_url(
    fresh: Vault, issuer: Issuer, tmp_path: Path, shm: Path
) -> None:
    code, stderr = await asyncio.to_thread(setup, fresh, issuer, "--oidc-discovery-url", issuer.url)
    assert code == 0, stderr
    assert (await runner_logs_in(fresh, issuer.token("k1", "acme"), tmp_path, shm))[0] == 0
    stranger = Issuer(tmp_path)  # a key the issuer never published
    stranger.url = issuer.url
    stranger.add_key("k1")
    code, stderr = await runner_logs_in(fresh, stranger.token("k1", "acme"), tmp_path, shm)
    assert code == 4 and "signed by a key Vault does not know" in stderr, stderr


def test_bad_key_sources_are_refused_by_name(fresh: Vault, issuer: Issuer, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, stderr = setup(fresh, issuer, "--jwks-file", str(broken))
    assert code == 2 and f"--jwks-file {broken}" in stderr and "not JSON" in stderr
    private = tmp_path / "private.json"
    with_private = issuer.jwks()
    with_private["keys"][0]["d"] = "AQAB"
    private.write_text(json.dumps(with_private))
    code, stderr = setup(fresh, issuer, "--jwks-file", str(private))
    assert code == 2 and "holds a private key" in stderr and "AQAB" not in stderr
    code, stderr = setup(fresh, issuer, "--jwks-url", "http://127.0.0.1:1/openid/v1/jwks")
    assert code == 2 and "Vault could not fetch or use the JWKS URL" in stderr, stderr
    assert "127.0.0.1:1/openid/v1/jwks" in stderr
    code, stderr = setup(fresh, issuer, "--jwks-url", "ftp://example.com/jwks")
    assert code == 2 and "not an http(s) URL" in stderr
    code, stderr = setup(fresh, issuer, "--jwks-ca-cert", str(broken))
    assert code == 2 and "--jwks-ca-cert goes with" in stderr
    code, stderr = setup(fresh, issuer, "--jwks-file", str(broken), "--jwks-url", issuer.url)
    assert code == 2 and "not allowed with" in stderr
