"""Logging in and out: JWT login, child tokens, lookup-self and revoke-self."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import ConfigError, IdentityError, VaultError, VaultUnavailable
from broker.vault.client import VaultClient

KUBERNETES_TOKEN_PATH = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


@dataclass(frozen=True)
class Login:
    """A token the broker obtained; ``token`` never shows in repr."""

    token: str = field(repr=False)
    accessor: str
    ttl: int
    policies: tuple[str, ...]
    renewable: bool = False


def _login_failed(message: str, cause: VaultError) -> IdentityError:
    """An IdentityError that is retryable only when Vault surely minted no token."""
    error = IdentityError(f"{message}: {cause.reason}")
    error.retryable = isinstance(cause, VaultUnavailable) and "Timeout" not in cause.reason
    return error


def _login_from(answer: Mapping[str, object]) -> Login:
    auth = answer.get("auth")
    if not isinstance(auth, Mapping) or not auth.get("client_token"):
        raise IdentityError("login answered without a token")
    policies = auth.get("policies") or []
    return Login(
        token=str(auth["client_token"]),
        accessor=str(auth.get("accessor", "")),
        ttl=int(str(auth.get("lease_duration", 0))),
        policies=tuple(str(p) for p in policies) if isinstance(policies, list) else (),
        renewable=bool(auth.get("renewable", False)),
    )


def read_credential_file(flag: str, path: Path) -> str:
    """Read a credential from a file (never from argv), stripped; empty is an error."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read ({exc.strerror})") from None
    if not text:
        raise ConfigError(f"{flag} {path}: the file is empty")
    return text


def read_jwt(path: Path) -> str:
    """Read a service-account JWT (re-read on every login: the kubelet rotates it)."""
    return read_credential_file("--jwt-file", path)


def jwt_login(client: VaultClient, mount: str, role: str, jwt: str, method: str = "jwt") -> Login:
    """Log in with a service-account JWT (JWT or Kubernetes auth). Exactly one attempt: every
    successful login mints a token."""
    try:
        answer = client.post(f"auth/{mount}/login", {"role": role, "jwt": jwt}, operation="login")
    except VaultError as exc:
        raise _login_failed(
            f"{method} login at auth/{mount} with role {role!r} failed", exc
        ) from None
    return _login_from(answer)


def approle_login(client: VaultClient, mount: str, role_id: str, secret_id: str) -> Login:
    """Log in with AppRole. Exactly one attempt: a secret_id may be single-use."""
    try:
        answer = client.post(
            f"auth/{mount}/login", {"role_id": role_id, "secret_id": secret_id}, operation="login"
        )
    except VaultError as exc:
        raise _login_failed(f"approle login at auth/{mount} failed", exc) from None
    return _login_from(answer)


def unwrap_secret_id(client: VaultClient, wrapping_token: str, mount: str, role: str) -> str:
    """Unwrap a response-wrapped secret_id, after checking where the wrapping token came from.

    A wrapping token whose creation path is not ``auth/<mount>/role/<role>/secret-id`` may have
    been swapped by someone in the middle: it is refused and left unused.
    """
    expected = f"auth/{mount}/role/{role}/secret-id"
    anonymous = client.with_token("")
    try:
        info = anonymous.post("sys/wrapping/lookup", {"token": wrapping_token}, operation="lookup")
    except VaultError as exc:
        raise IdentityError(f"the secret_id wrapping token is not valid: {exc.reason}") from None
    creation_path = str((info.get("data") or {}).get("creation_path", ""))
    if creation_path != expected:
        raise IdentityError(
            f"the secret_id wrapping token was created at {creation_path or 'an unknown path'!r}, "
            f"not {expected!r}: refusing to unwrap it"
        )
    try:
        answer = client.with_token(wrapping_token).post("sys/wrapping/unwrap", operation="unwrap")
    except VaultError as exc:
        raise IdentityError(f"unwrapping the secret_id failed: {exc.reason}") from None
    secret_id = (answer.get("data") or {}).get("secret_id")
    if not secret_id:
        raise IdentityError("the unwrapped response holds no secret_id")
    return str(secret_id)


def create_child_token(
    client: VaultClient,
    ttl_seconds: int,
    display_name: str,
    metadata: Mapping[str, str],
    policies: list[str] | None = None,
    no_default_policy: bool = False,
) -> Login:
    """A child of the client's token, bounded by ``ttl_seconds`` (also its explicit max)."""
    body: dict[str, object] = {
        "ttl": f"{ttl_seconds}s",
        "explicit_max_ttl": f"{ttl_seconds}s",
        "display_name": display_name,
        "meta": dict(metadata),
        "renewable": False,
    }
    if policies is not None:
        body["policies"] = policies
    if no_default_policy:
        body["no_default_policy"] = True
    try:
        answer = client.post("auth/token/create", body, operation="create-token")
    except VaultError as exc:
        raise IdentityError(f"creating a child token failed: {exc.reason}") from None
    return _login_from(answer)


def lookup_self(client: VaultClient) -> dict[str, object]:
    return dict(client.get("auth/token/lookup-self", operation="lookup-self").get("data") or {})


def revoke_self(client: VaultClient) -> None:
    client.post("auth/token/revoke-self", operation="revoke-self")
