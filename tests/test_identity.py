"""Identities against a live server: JWT negatives, templates without claims, AppRole, leases."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.control.executions import ExecutionIssuer
from broker.dev import identity
from broker.errors import IdentityError, PermissionDenied, ValidationError
from broker.execution.credentials import Credentials, login
from broker.render.outdir import OutputRoot
from broker.runner import RunSettings, run_command
from broker.vault import KV, Login, Transit, VaultClient, create_child_token, jwt_login, lookup_self
from tests.conftest import Vault, cli
from tests.factories import agent
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


NEGATIVES = {  # case → (token, the allow-listed reason the error must give)
    "wrong audience": (lambda v: sign(v, claims(aud=["not-vault"])), "wrong audience"),
    "wrong issuer": (lambda v: sign(v, claims(iss="https://evil.example")), "wrong issuer"),
    "expired past the leeway": (
        lambda v: sign(
            v,
            claims(
                iat=int(time.time()) - 900, nbf=int(time.time()) - 900, exp=int(time.time()) - 300
            ),
        ),
        "the token has expired",
    ),
    "not yet valid": (
        lambda v: sign(v, claims(nbf=int(time.time()) + 900, exp=int(time.time()) + 1800)),
        "the token is not valid yet",
    ),
    "alg none": (lambda v: unsigned(claims()), "signed by a key Vault does not know"),
    "signed by another key": (
        lambda v: other_key_token(claims()),
        "signed by a key Vault does not know",
    ),
    "missing namespace claim": (lambda v: sign(v, no_namespace()), "a required claim is missing"),
    "other service account": (
        lambda v: sign(v, claims(sub="system:serviceaccount:acme:default")),
        "a claim is not allowed by the role",
    ),
}


@pytest.mark.parametrize("case", list(NEGATIVES))
async def test_jwt_negatives_are_refused_with_a_reason_and_no_token(
    vault: Vault, admin: VaultClient, case: str
) -> None:
    make, reason = NEGATIVES[case]
    token = make(vault)
    with pytest.raises(IdentityError) as caught:
        await jwt_login(admin.with_token(""), "jwt", "stigmer-runner", token)
    text = str(caught.value) + repr(caught.value)
    assert token not in text and token.split(".")[1] not in text
    assert str(caught.value) == f"jwt login at auth/jwt with role 'stigmer-runner' failed: {reason}"


async def test_within_the_leeway_is_accepted(vault: Vault, admin: VaultClient) -> None:
    now = int(time.time())
    token = sign(vault, claims(iat=now - 100, nbf=now - 100, exp=now - 20))
    login = await jwt_login(admin.with_token(""), "jwt", "stigmer-runner", token)
    assert login.ttl <= 15 * 60  # short-lived runner tokens


async def test_a_template_whose_claim_is_missing_grants_nothing(
    vault: Vault, admin: VaultClient, tenant: str
) -> None:
    """A role that does not map the namespace: the runner policy renders nothing for it."""
    await admin.post(
        "auth/jwt/role/no-tenant-claim",
        {
            "role_type": "jwt", "bound_audiences": ["vault"], "user_claim": "sub",
            "token_policies": ["stigmer-runner"], "token_ttl": 300,
        },
    )  # fmt: skip
    await ExecutionIssuer(admin, vault.layout).create(
        tenant, agent({"A": {"value": "1"}}), execution_id="nc-1"
    )
    transit_key = vault.layout.transit_key(tenant)
    ciphertext = (await Transit(admin, vault.layout.transit_mount).encrypt(transit_key, ["x"]))[0]
    login = await jwt_login(
        admin.with_token(""), "jwt", "no-tenant-claim", sign(vault, claims(tenant))
    )
    runner = admin.with_token(login.token)
    assert "stigmer-runner" in login.policies
    with pytest.raises(PermissionDenied):
        await KV(runner, "stigmer").read_resource(f"execution-contexts/{tenant}/nc-1")
    with pytest.raises(PermissionDenied):
        await Transit(runner, vault.layout.transit_mount).decrypt(transit_key, [ciphertext])
    with pytest.raises(PermissionDenied):
        await KV(runner, "stigmer").write(f"execution-claims/{tenant}/nc-1", {"pod": "x"}, cas=0)


async def test_child_tokens_carry_only_the_runner_policy(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path
) -> None:
    await ExecutionIssuer(admin, vault.layout).create(
        tenant, agent({"A": {"value": "1"}}), execution_id="lease-1"
    )
    jwt = vault.jwt_for(tenant, tmp_path).read_text()
    login = await jwt_login(admin.with_token(""), "jwt", "stigmer-runner", jwt)
    runner = admin.with_token(login.token)
    lease = await create_child_token(
        runner, 60, "lease-1", {"execution_id": "lease-1", "tenant": tenant},
        policies=["stigmer-runner"], no_default_policy=True,
    )  # fmt: skip
    assert lease.policies == ("stigmer-runner",)
    child = admin.with_token(lease.token)
    document, _ = await KV(child, "stigmer").read_resource(f"execution-contexts/{tenant}/lease-1")
    assert document["kind"] == "ExecutionContext"
    assert (await lookup_self(child))["meta"] == {"execution_id": "lease-1", "tenant": tenant}
    with pytest.raises(IdentityError):  # a child with more than the runner policy
        await create_child_token(runner, 60, "x", {}, policies=["stigmer-runner", "default"])
    with pytest.raises(IdentityError):  # or without saying exactly what it carries
        await create_child_token(runner, 60, "x", {})


def _approle_credentials(vault: Vault, tenant: str, tmp_path: Path) -> Credentials:
    role_id = cli(vault, "approle", "role-id", "--tenant", tenant)
    wrapped = cli(vault, "approle", "secret-id", "--tenant", tenant, "--wrap-ttl", "2m")
    assert role_id.returncode == 0 and wrapped.returncode == 0, role_id.stderr + wrapped.stderr
    (tmp_path / "role-id").write_text(role_id.stdout)
    (tmp_path / "secret-id").write_text(wrapped.stdout)
    return Credentials("approle", role_id_file=tmp_path / "role-id",
                       secret_id_file=tmp_path / "secret-id")  # fmt: skip


async def _login(vault: Vault, credentials: Credentials, tenant: str) -> Login:
    client = vault.client(with_token=False)
    try:
        return await login(client, vault.layout, credentials, tenant)
    finally:
        await client.aclose()


async def _run(
    vault: Vault, credentials: Credentials, tenant: str, execution_id: str, out: Path
) -> int:
    client = vault.client(with_token=False)
    settings = RunSettings(tenant, execution_id, OutputRoot(out), credentials)
    try:
        return await run_command(client, vault.layout, settings, ["true"])
    finally:
        await client.aclose()


async def test_approle_with_a_wrapped_secret_id(
    vault: Vault, admin: VaultClient, shm: Path, tmp_path: Path
) -> None:
    await ExecutionIssuer(admin, vault.layout).create(
        "acme", agent({"A": {"value": "1"}}), execution_id=f"ar-{tmp_path.name}"
    )
    credentials = _approle_credentials(vault, "acme", tmp_path)
    assert await _run(vault, credentials, "acme", f"ar-{tmp_path.name}", shm) == 0
    # the wrapping token was single-use: a replay is refused
    with pytest.raises(IdentityError, match="wrapping token is not valid"):
        await _login(vault, credentials, "acme")


async def test_approle_entity_is_tenant_scoped(
    vault: Vault, admin: VaultClient, tmp_path: Path
) -> None:
    await ExecutionIssuer(admin, vault.layout).create(
        "beta", agent({"A": {"value": "1"}}), execution_id=f"ar-b-{tmp_path.name}"
    )
    login_ = await _login(vault, _approle_credentials(vault, "acme", tmp_path), "acme")
    with pytest.raises(PermissionDenied):
        await KV(admin.with_token(login_.token), "stigmer").read_resource(
            f"execution-contexts/beta/ar-b-{tmp_path.name}"
        )


async def test_wrapping_token_from_elsewhere_is_refused_and_not_consumed(
    vault: Vault, admin: VaultClient, tmp_path: Path
) -> None:
    role_id = cli(vault, "approle", "role-id", "--tenant", "acme").stdout
    forged = await admin.request(
        "POST", "sys/wrapping/wrap", {"secret_id": "forged"}, headers=[("X-Vault-Wrap-TTL", "60s")]
    )
    token = forged["wrap_info"]["token"]
    (tmp_path / "role-id").write_text(role_id)
    (tmp_path / "secret-id").write_text(token)
    credentials = Credentials("approle", role_id_file=tmp_path / "role-id",
                              secret_id_file=tmp_path / "secret-id")  # fmt: skip
    with pytest.raises(IdentityError) as refused:
        await _login(vault, credentials, "acme")
    assert (
        "created at 'sys/wrapping/wrap', not 'auth/approle/role/stigmer-runner-acme/secret-id'"
        in (str(refused.value))
    )
    assert token not in str(refused.value)
    # lookup does not consume it: the token is still there to be investigated
    lookup = await admin.post("sys/wrapping/lookup", {"token": token})
    assert lookup["data"]["creation_path"] == "sys/wrapping/wrap"


@pytest.mark.parametrize(
    "bad", ["a*", "a+b", "a/b", "..", "a%2Fb", "A", "-a", "a" * 64, "a\n", "a\x00"]
)
async def test_bad_tenant_ids_never_reach_vault(vault: Vault, admin: VaultClient, bad: str) -> None:
    bad = bad.replace("\\n", "\n").replace("\\x00", "\x00")
    with pytest.raises(ValidationError, match="tenant"):
        await ExecutionIssuer(admin, vault.layout).create(bad, agent())
    if "\x00" not in bad:  # a NUL cannot be passed in argv at all
        result = cli(vault, "env", "list", "--tenant", bad)
        assert result.returncode == 2 and "tenant" in result.stderr


@pytest.mark.parametrize("bad", ["e*", "e+1", "e/1", "..", "e%2F1", "-e", "e.1", "e" * 129, "e\n"])
async def test_bad_execution_ids_never_reach_vault(
    vault: Vault, admin: VaultClient, shm: Path, bad: str
) -> None:
    bad = bad.replace("\\n", "\n")
    with pytest.raises(ValidationError, match="execution id"):
        await ExecutionIssuer(admin, vault.layout).create("acme", agent(), execution_id=bad)
    result = cli(
        vault, "run", "--tenant", "acme", f"--execution={bad}", "--out", str(shm), "--", "true"
    )
    assert result.returncode == 2 and "execution id" in result.stderr


# --- Kubernetes auth: TokenReview instead of local validation --------------------------------


@pytest.fixture(scope="module")
def reviewer(vault: Vault) -> Iterator[TokenReviewer]:
    from broker.control.setup import Bootstrap, KubernetesSettings

    async def enable(url: str) -> None:
        client = vault.client()
        try:
            bootstrap = Bootstrap(client, vault.layout)
            await bootstrap.kubernetes(KubernetesSettings(host=url, ca_cert=self_signed_ca()))
            await bootstrap.policies(await bootstrap.current_sources())
        finally:
            await client.aclose()

    with serve(TokenReviewer(identity.public_pem(vault.identity_key))) as running:
        asyncio.run(enable(running.url))
        yield running


async def test_kubernetes_auth_logs_in_through_tokenreview(
    vault: Vault,
    admin: VaultClient,
    reviewer: TokenReviewer,
    tenant: str,
    shm: Path,
    tmp_path: Path,
) -> None:
    issuer = ExecutionIssuer(admin, vault.layout)
    await issuer.create(tenant, agent({"A": {"value": "1"}}), execution_id="k8s-1")
    await issuer.create("beta", agent({"A": {"value": "1"}}), execution_id=f"k8s-b-{tenant}")
    before = reviewer.reviews
    credentials = Credentials("kubernetes", jwt_file=vault.jwt_for(tenant, tmp_path))
    login_ = await _login(vault, credentials, tenant)
    assert reviewer.reviews == before + 1  # Vault asked the API server
    with pytest.raises(PermissionDenied):  # the namespace template isolates tenants here too
        await KV(admin.with_token(login_.token), "stigmer").read_resource(
            f"execution-contexts/beta/k8s-b-{tenant}"
        )
    assert await _run(vault, credentials, tenant, "k8s-1", shm) == 0


async def test_revoked_token_tradeoff(
    vault: Vault, admin: VaultClient, reviewer: TokenReviewer, tenant: str, tmp_path: Path
) -> None:
    """A deleted pod's token: Kubernetes auth refuses it at once, JWT auth until it expires."""
    token = vault.jwt_for(tenant, tmp_path).read_text()
    reviewer.revoked.add(token)
    anonymous = admin.with_token("")
    with pytest.raises(IdentityError, match="kubernetes login at auth/kubernetes"):
        await jwt_login(anonymous, "kubernetes", "stigmer-runner", token, method="kubernetes")
    assert (await jwt_login(anonymous, "jwt", "stigmer-runner", token)).policies  # JWT cannot know
