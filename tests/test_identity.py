"""Identities against a live server: JWT negatives, templates without claims, AppRole, leases."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker import identity
from broker.control.executions import ExecutionIssuer
from broker.errors import IdentityError, PermissionDenied, ValidationError
from broker.runner import ExecutionSession, RunOptions, run
from broker.vault import KV, Transit, VaultClient, create_child_token, jwt_login, lookup_self
from tests.conftest import Vault, cli
from tests.test_control import agent
from tests.tokenreview import TokenReviewer, self_signed_ca, serve


def claims(tenant: str = "acme", **override: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": identity.DEFAULT_ISSUER,
        "sub": f"system:serviceaccount:{tenant}:stigmer-runner",
        "aud": ["vault"],
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "kubernetes.io": {
            "namespace": tenant,
            "pod": {"name": "p", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": "stigmer-runner", "uid": str(uuid.uuid4())},
        },
    }
    base.update(override)
    return base


def sign(vault: Vault, payload: dict[str, Any]) -> str:
    key = identity._private_key(vault.identity_key)
    return pyjwt.encode(payload, key, algorithm="RS256")


def unsigned(payload: dict[str, Any]) -> str:
    return pyjwt.encode(payload, key=None, algorithm="none")  # type: ignore[arg-type]


def other_key_token(payload: dict[str, Any]) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return pyjwt.encode(payload, key, algorithm="RS256")


def no_namespace() -> dict[str, Any]:
    payload = claims()
    del payload["kubernetes.io"]["namespace"]
    return payload


NEGATIVES = {
    "wrong audience": lambda v: sign(v, claims(aud=["not-vault"])),
    "wrong issuer": lambda v: sign(v, claims(iss="https://evil.example")),
    "expired past the leeway": lambda v: sign(
        v,
        claims(iat=int(time.time()) - 900, nbf=int(time.time()) - 900, exp=int(time.time()) - 300),
    ),
    "not yet valid": lambda v: sign(
        v, claims(nbf=int(time.time()) + 900, exp=int(time.time()) + 1800)
    ),
    "alg none": lambda v: unsigned(claims()),
    "signed by another key": lambda v: other_key_token(claims()),
    "missing namespace claim": lambda v: sign(v, no_namespace()),
    "other service account": lambda v: sign(v, claims(sub="system:serviceaccount:acme:default")),
}


@pytest.mark.parametrize("case", list(NEGATIVES))
def test_jwt_negatives_are_refused_without_echoing_the_token(vault: Vault, case: str) -> None:
    token = NEGATIVES[case](vault)
    client = VaultClient(vault.server_settings())
    with pytest.raises(IdentityError) as caught:
        jwt_login(client, "jwt", "stigmer-runner", token)
    text = str(caught.value) + repr(caught.value)
    assert token not in text and token.split(".")[1] not in text
    assert "jwt login at auth/jwt with role 'stigmer-runner' failed" in text


def test_within_the_leeway_is_accepted(vault: Vault) -> None:
    now = int(time.time())
    token = sign(vault, claims(iat=now - 100, nbf=now - 100, exp=now - 20))
    login = jwt_login(VaultClient(vault.server_settings()), "jwt", "stigmer-runner", token)
    assert login.ttl <= 15 * 60  # short-lived runner tokens


def test_a_template_whose_claim_is_missing_grants_nothing(vault: Vault, tenant: str) -> None:
    """A role that does not map the namespace: the runner policy renders nothing for it."""
    admin = vault.admin
    admin.post(
        "auth/jwt/role/no-tenant-claim",
        {
            "role_type": "jwt", "bound_audiences": ["vault"], "user_claim": "sub",
            "token_policies": ["stigmer-runner"], "token_ttl": 300,
        },
    )  # fmt: skip
    ExecutionIssuer(admin, vault.layout).create(
        tenant, agent({"A": {"value": "1"}}), execution_id="nc-1"
    )
    ciphertext = Transit(admin, vault.layout.transit_mount).encrypt(
        vault.layout.transit_key(tenant), ["x"]
    )[0]
    login = jwt_login(
        VaultClient(vault.server_settings()), "jwt", "no-tenant-claim", sign(vault, claims(tenant))
    )
    runner = admin.with_token(login.token)
    assert "stigmer-runner" in login.policies
    with pytest.raises(PermissionDenied):
        KV(runner, "stigmer").read_resource(f"execution-contexts/{tenant}/nc-1")
    with pytest.raises(PermissionDenied):
        Transit(runner, vault.layout.transit_mount).decrypt(
            vault.layout.transit_key(tenant), [ciphertext]
        )
    with pytest.raises(PermissionDenied):
        KV(runner, "stigmer").write(f"execution-claims/{tenant}/nc-1", {"pod": "x"}, cas=0)


def test_child_tokens_carry_only_the_runner_policy(
    vault: Vault, tenant: str, tmp_path: Path
) -> None:
    ExecutionIssuer(vault.admin, vault.layout).create(
        tenant, agent({"A": {"value": "1"}}), execution_id="lease-1"
    )
    login = jwt_login(
        VaultClient(vault.server_settings()),
        "jwt",
        "stigmer-runner",
        vault.jwt_for(tenant, tmp_path).read_text(),
    )
    runner = vault.admin.with_token(login.token)
    lease = create_child_token(
        runner, 60, "lease-1", {"execution_id": "lease-1", "tenant": tenant},
        policies=["stigmer-runner"], no_default_policy=True,
    )  # fmt: skip
    assert lease.policies == ("stigmer-runner",)
    child = vault.admin.with_token(lease.token)
    assert (
        KV(child, "stigmer").read_resource(f"execution-contexts/{tenant}/lease-1")[0]["kind"]
        == "ExecutionContext"
    )
    assert lookup_self(child)["meta"] == {"execution_id": "lease-1", "tenant": tenant}
    with pytest.raises(IdentityError):  # a child with more than the runner policy
        create_child_token(runner, 60, "x", {}, policies=["stigmer-runner", "default"])
    with pytest.raises(IdentityError):  # or without saying exactly what it carries
        create_child_token(runner, 60, "x", {})


def _approle_credentials(vault: Vault, tenant: str, tmp_path: Path) -> tuple[Path, Path]:
    role_id = cli(vault, "approle", "role-id", "--tenant", tenant)
    wrapped = cli(vault, "approle", "secret-id", "--tenant", tenant, "--wrap-ttl", "2m")
    assert role_id.returncode == 0 and wrapped.returncode == 0, role_id.stderr + wrapped.stderr
    (tmp_path / "role-id").write_text(role_id.stdout)
    (tmp_path / "secret-id").write_text(wrapped.stdout)
    return tmp_path / "role-id", tmp_path / "secret-id"


def test_approle_with_a_wrapped_secret_id(vault: Vault, shm: Path, tmp_path: Path) -> None:
    ExecutionIssuer(vault.admin, vault.layout).create(
        "acme", agent({"A": {"value": "1"}}), execution_id="ar-1"
    )
    role_id, secret_id = _approle_credentials(vault, "acme", tmp_path)
    options = RunOptions(tenant="acme", execution_id="ar-1", out_dir=shm, auth="approle",
                         role_id_file=role_id, secret_id_file=secret_id)  # fmt: skip
    session = ExecutionSession(VaultClient(vault.server_settings()), vault.layout, options)
    assert run(session, ["true"]) == 0
    assert session.login is not None and "stigmer-runner" in session.login.policies
    # the wrapping token was single-use: a replay is refused
    replay = ExecutionSession(VaultClient(vault.server_settings()), vault.layout, options)
    with pytest.raises(IdentityError, match="wrapping token is not valid"):
        replay.authenticate()


def test_approle_entity_is_tenant_scoped(vault: Vault, tmp_path: Path) -> None:
    ExecutionIssuer(vault.admin, vault.layout).create(
        "beta", agent({"A": {"value": "1"}}), execution_id="ar-b"
    )
    role_id, secret_id = _approle_credentials(vault, "acme", tmp_path)
    options = RunOptions(tenant="acme", execution_id="ar-b", out_dir=Path("/dev/shm"), auth="approle",
                         role_id_file=role_id, secret_id_file=secret_id)  # fmt: skip
    session = ExecutionSession(VaultClient(vault.server_settings()), vault.layout, options)
    session.authenticate()
    assert session.vault is not None
    with pytest.raises(PermissionDenied):
        KV(session.vault, "stigmer").read_resource("execution-contexts/beta/ar-b")


def test_wrapping_token_from_elsewhere_is_refused_and_not_consumed(
    vault: Vault, tmp_path: Path
) -> None:
    role_id = cli(vault, "approle", "role-id", "--tenant", "acme").stdout
    forged = vault.admin.request(
        "POST", "sys/wrapping/wrap", {"secret_id": "forged"}, wrap_ttl="60s"
    )
    token = forged["wrap_info"]["token"]
    (tmp_path / "role-id").write_text(role_id)
    (tmp_path / "secret-id").write_text(token)
    options = RunOptions(tenant="acme", execution_id="x-1", out_dir=Path("/dev/shm"), auth="approle",
                         role_id_file=tmp_path / "role-id", secret_id_file=tmp_path / "secret-id")  # fmt: skip
    session = ExecutionSession(VaultClient(vault.server_settings()), vault.layout, options)
    with pytest.raises(
        IdentityError,
        match="created at 'sys/wrapping/wrap', not 'auth/approle/role/stigmer-runner-acme/secret-id'",
    ):
        session.authenticate()
    assert token not in str(session.login)
    # lookup does not consume it: the token is still there to be investigated
    assert (
        vault.admin.post("sys/wrapping/lookup", {"token": token})["data"]["creation_path"]
        == "sys/wrapping/wrap"
    )


@pytest.mark.parametrize("bad", ["a*", "a+b", "a/b", "..", "a%2Fb", "A", "-a", "a" * 64])
def test_bad_tenant_ids_never_reach_vault(vault: Vault, bad: str) -> None:
    with pytest.raises(ValidationError, match="tenant"):
        ExecutionIssuer(vault.admin, vault.layout).create(bad, agent())
    result = cli(vault, "env", "list", "--tenant", bad)
    assert result.returncode == 2 and "tenant" in result.stderr


@pytest.mark.parametrize("bad", ["e*", "e+1", "e/1", "..", "e%2F1", "-e", "e.1", "e" * 129])
def test_bad_execution_ids_never_reach_vault(vault: Vault, bad: str) -> None:
    with pytest.raises(ValidationError, match="execution id"):
        ExecutionIssuer(vault.admin, vault.layout).create("acme", agent(), execution_id=bad)
    with pytest.raises(ValidationError, match="execution id"):
        ExecutionSession(VaultClient(vault.server_settings()), vault.layout,
                         RunOptions(tenant="acme", execution_id=bad, out_dir=Path("/dev/shm")))  # fmt: skip


# --- Kubernetes auth: TokenReview instead of local validation --------------------------------


@pytest.fixture(scope="module")
def reviewer(vault: Vault) -> Iterator[TokenReviewer]:
    from broker.control.setup import Bootstrap, KubernetesSettings

    with serve(TokenReviewer(identity.public_pem(vault.identity_key))) as running:
        bootstrap = Bootstrap(vault.admin, vault.layout)
        bootstrap.kubernetes(KubernetesSettings(host=running.url, ca_cert=self_signed_ca()))
        bootstrap.policies(bootstrap.current_sources())
        yield running


def test_kubernetes_auth_logs_in_through_tokenreview(
    vault: Vault, reviewer: TokenReviewer, tenant: str, shm: Path, tmp_path: Path
) -> None:
    ExecutionIssuer(vault.admin, vault.layout).create(
        tenant, agent({"A": {"value": "1"}}), execution_id="k8s-1"
    )
    ExecutionIssuer(vault.admin, vault.layout).create(
        "beta", agent({"A": {"value": "1"}}), execution_id=f"k8s-b-{tenant}"
    )
    before = reviewer.reviews
    options = RunOptions(tenant=tenant, execution_id="k8s-1", out_dir=shm, auth="kubernetes",
                         jwt_file=vault.jwt_for(tenant, tmp_path))  # fmt: skip
    session = ExecutionSession(VaultClient(vault.server_settings()), vault.layout, options)
    session.authenticate()
    assert reviewer.reviews == before + 1  # Vault asked the API server
    assert session.vault is not None
    with pytest.raises(PermissionDenied):  # the namespace template isolates tenants here too
        KV(session.vault, "stigmer").read_resource(f"execution-contexts/beta/k8s-b-{tenant}")
    assert (
        run(ExecutionSession(VaultClient(vault.server_settings()), vault.layout, options), ["true"])
        == 0
    )
    assert lookup_self(vault.admin)  # sanity: admin still fine


def test_revoked_token_tradeoff(
    vault: Vault, reviewer: TokenReviewer, tenant: str, tmp_path: Path
) -> None:
    """A deleted pod's token: Kubernetes auth refuses it at once, JWT auth until it expires."""
    token = vault.jwt_for(tenant, tmp_path).read_text()
    reviewer.revoked.add(token)
    client = VaultClient(vault.server_settings())
    with pytest.raises(IdentityError, match="kubernetes login at auth/kubernetes"):
        jwt_login(client, "kubernetes", "stigmer-runner", token, method="kubernetes")
    assert jwt_login(client, "jwt", "stigmer-runner", token).policies  # JWT auth cannot know
