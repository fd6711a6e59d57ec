"""TLS like the Vault CLI, against `bao server -dev-tls` (the CA it generates) and a second
listener that requires a client certificate (a PKI the tests create): VAULT_CACERT,
VAULT_CAPATH, VAULT_CLIENT_CERT/KEY, VAULT_TLS_SERVER_NAME and their BAO_* forms. A TLS problem
is a configuration error (exit 2, one line saying what to fix), never retried as an outage."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.config import Layout
from broker.dev import server
from tests import certs
from tests.conftest import Vault, _bootstrap, cli
from tests.factories import issue_secrets

CANARY = "cnry-tls-9a0c-do-not-leak"


@dataclass(frozen=True)
class Tls:
    vault: Vault
    ca: Path  # the -dev-tls server's generated CA
    mtls_addr: str  # the listener that requires a client certificate
    mtls_ca: Path  # its server certificate's CA (ours)
    client: certs.Pair


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    state = tmp_path_factory.mktemp("vault-tls")
    pki = state / "pki"
    pki.mkdir()
    ca, ca_cert, ca_key = certs.authority(pki, "server-ca")
    listener = certs.leaf(pki, "server", (ca_cert, ca_key), client=False)
    client_ca, client_ca_cert, client_ca_key = certs.authority(pki, "client-ca")
    client = certs.leaf(pki, "client", (client_ca_cert, client_ca_key), client=True)
    port = server.free_port()
    extra = f"""
listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_cert_file = "{listener.cert}"
  tls_key_file = "{listener.key}"
  tls_require_and_verify_client_cert = true
  tls_client_ca_file = "{client_ca.cert}"
}}
"""
    running = server.start(state, tls=True, extra_config=extra)
    try:
        asyncio.run(_bootstrap(running))
        yield Tls(Vault(running, Layout()), Path(running.cacert), f"https://127.0.0.1:{port}",
                  ca.cert, client)  # fmt: skip
    finally:
        server.stop(state)


def environ(tls: Tls, **settings: str) -> dict[str, str]:
    """The test server's environment without any TLS setting, plus ``settings``."""
    base = tls.vault.environ()
    base.pop("VAULT_CACERT", None)
    base.update(settings)
    return base


def env_list(tls: Tls, **settings: str) -> tuple[int, str, float]:
    started = time.monotonic()
    result = cli(tls.vault, "env", "list", "--tenant", "acme", env=environ(tls, **settings))
    return result.returncode, result.stderr, time.monotonic() - started


def test_dev_tls_serves_https_and_the_env_file_names_its_ca(tls: Tls) -> None:
    assert tls.vault.server.addr.startswith("https://127.0.0.1:")
    env_file = (tls.vault.server.state_dir / "env").read_text()
    assert f"export VAULT_CACERT={tls.ca}" in env_file
    assert env_list(tls, VAULT_CACERT=str(tls.ca))[0] == 0
    assert env_list(tls, BAO_CACERT=str(tls.ca))[0] == 0


def test_an_untrusted_server_is_a_configuration_error_not_retried(tls: Tls) -> None:
    code, stderr, took = env_list(tls)
    assert code == 2, stderr
    assert "certificate not trusted" in stderr and "VAULT_CACERT" in stderr
    assert "retrying" not in stderr and took < 5


def test_capath_loads_every_file_like_the_vault_cli(tls: Tls, tmp_path: Path) -> None:
    directory = tmp_path / "cas"
    directory.mkdir()
    shutil.copy(tls.ca, directory / "dev-ca.pem")  # no c_rehash name: the CLI does not need one
    assert env_list(tls, VAULT_CAPATH=str(directory))[0] == 0
    assert env_list(tls, BAO_CAPATH=str(directory))[0] == 0
    (directory / "notes.txt").write_text("not a certificate")
    code, stderr, _ = env_list(tls, VAULT_CAPATH=str(directory))
    assert code == 2 and "notes.txt is not a PEM certificate" in stderr


def test_tls_server_name_decides_the_name_checked(tls: Tls) -> None:
    ca = str(tls.ca)
    assert env_list(tls, VAULT_CACERT=ca, VAULT_TLS_SERVER_NAME="localhost")[0] == 0
    code, stderr, _ = env_list(tls, VAULT_CACERT=ca, VAULT_TLS_SERVER_NAME="vault.example.com")
    assert code == 2 and "wrong name" in stderr and "retrying" not in stderr
    code, _, _ = env_list(tls, VAULT_CACERT=ca, BAO_TLS_SERVER_NAME="vault.example.com")
    assert code == 2


def test_plain_http_to_an_https_server_says_so(tls: Tls) -> None:
    plain = tls.vault.server.addr.replace("https://", "http://")
    code, stderr, _ = env_list(tls, VAULT_ADDR=plain)
    assert code == 2, stderr
    assert "https" in stderr.lower()


def test_run_over_plain_http_to_an_https_server_says_so_without_loading_ssl(
    tls: Tls, tmp_path: Path, shm: Path
) -> None:
    """`run` keeps ssl out when every address is http://: a TLS server is still recognised
    from what it answers (exit 2, not a retry), and nothing is claimed."""
    env = environ(tls, VAULT_ADDR=tls.vault.server.addr.replace("https://", "http://"))
    env.pop("VAULT_TOKEN")
    jwt = tls.vault.jwt_for("acme", tmp_path)
    started = time.monotonic()
    result = cli(tls.vault, "run", "--tenant", "acme", "--execution", "plain-1", "--out",
                 str(shm), "--jwt-file", str(jwt), "--", "true", env=env)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "https://" in result.stderr and "retrying" not in result.stderr
    assert time.monotonic() - started < 5


def test_a_client_certificate_is_presented_when_configured(tls: Tls) -> None:
    base = {"VAULT_ADDR": tls.mtls_addr, "VAULT_CACERT": str(tls.mtls_ca)}
    code, stderr, took = env_list(tls, **base)
    assert code == 2 and "TLS" in stderr and took < 5, stderr  # refused without one
    pair = {"VAULT_CLIENT_CERT": str(tls.client.cert), "VAULT_CLIENT_KEY": str(tls.client.key)}
    assert env_list(tls, **base, **pair)[0] == 0
    bao = {"BAO_CLIENT_CERT": str(tls.client.cert), "BAO_CLIENT_KEY": str(tls.client.key)}
    assert env_list(tls, **base, **bao)[0] == 0
    code, stderr, _ = env_list(tls, **base, VAULT_CLIENT_CERT=str(tls.client.cert))
    assert code == 2 and "set together" in stderr


async def test_the_whole_flow_over_tls(tls: Tls, tmp_path: Path, shm: Path) -> None:
    """Control plane, `run` with a JWT login, the sidecar's flow: all through the CA setting."""
    vault = tls.vault
    admin = vault.client()
    try:
        await issue_secrets(admin, vault.layout, "acme", "tls-run", {"TOKEN_0": (CANARY, True)})
    finally:
        await admin.aclose()
    jwt = vault.jwt_for("acme", tmp_path)
    env = environ(tls, VAULT_CACERT=str(tls.ca))
    env.pop("VAULT_TOKEN")
    result = cli(vault, "run", "--tenant", "acme", "--execution", "tls-run", "--out", str(shm),
                 "--jwt-file", str(jwt), "--", sys.executable, "-c",
                 f"import os, sys; sys.exit(0 if os.environ['TOKEN_0'] == {CANARY!r} else 3)",
                 env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert CANARY not in result.stderr
