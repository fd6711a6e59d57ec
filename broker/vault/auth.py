"""Logins and tokens: JWT, Kubernetes and AppRole logins, child tokens, lookups, revocation.

A login that Vault refuses is an :class:`~broker.errors.IdentityError` whose reason comes from
an allow-list (expired, wrong audience, unknown key, …), never the server's text or the JWT. A
Vault that cannot be reached or is sealed stays a :class:`~broker.errors.VaultError`: that is not
an identity problem. Every request that mints a token is sent once unless Vault surely minted
nothing (see ``retry.Safety``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.errors import Fault, IdentityError, NotFound, PermissionDenied, VaultError
from broker.records import field, record
from broker.vault.client import VaultClient
from broker.vault.retry import Safety

_REFUSED = (Fault.INVALID, Fault.FORBIDDEN)


@record(frozen=True)
class Login:
    """A token the broker obtained; ``token`` never shows in repr."""

    token: str = field(repr=False)
    accessor: str
    ttl: int
    policies: tuple[str, ...]
    renewable: bool = False


def _login_from(answer: Mapping[str, Any]) -> Login:
    auth = answer.get("auth")
    if not isinstance(auth, Mapping) or not auth.get("client_token"):
        raise IdentityError("login answered without a token")
    policies = auth.get("policies") or []
    return Login(
        token=str(auth["client_token"]),
        accessor=str(auth.get("accessor", "")),
        ttl=int(auth.get("lease_duration") or 0),
        policies=tuple(str(p) for p in policies) if isinstance(policies, list) else (),
        renewable=bool(auth.get("renewable", False)),
    )


async def _login(client: VaultClient, path: str, body: Mapping[str, str], what: str) -> Login:
    try:
        answer = await client.request(
            "POST", path, body, operation="login", safety=Safety.MINTS_TOKEN, authenticated=False
        )
    except VaultError as exc:
        if exc.kind in _REFUSED:
            raise IdentityError(f"{what} failed", exc.detail or "refused") from None
        raise
    return _login_from(answer)


async def jwt_login(
    client: VaultClient, mount: str, role: str, jwt: str, method: str = "jwt"
) -> Login:
    """Log in with a service-account JWT (JWT or Kubernetes auth)."""
    what = f"{method} login at auth/{mount} with role {role!r}"
    return await _login(client, f"auth/{mount}/login", {"role": role, "jwt": jwt}, what)


async def approle_login(client: VaultClient, mount: str, role_id: str, secret_id: str) -> Login:
    """Log in with AppRole (a secret_id may be single-use)."""
    body = {"role_id": role_id, "secret_id": secret_id}
    return await _login(client, f"auth/{mount}/login", body, f"approle login at auth/{mount}")


async def unwrap_secret_id(client: VaultClient, wrapping_token: str, mount: str, role: str) -> str:
    """Unwrap a response-wrapped secret_id, after checking where the wrapping token came from.

    A wrapping token whose creation path is not ``auth/<mount>/role/<role>/secret-id`` may have
    been swapped by someone in the middle: it is refused and left unused.
    """
    expected = f"auth/{mount}/role/{role}/secret-id"
    anonymous = client.with_token("")
    try:
        info = await anonymous.post(
            "sys/wrapping/lookup", {"token": wrapping_token}, operation="lookup-wrapping"
        )
    except VaultError as exc:
        if exc.kind not in _REFUSED:
            raise
        raise IdentityError(
            "the secret_id wrapping token is not valid", "unknown or used"
        ) from None
    creation_path = str((info.get("data") or {}).get("creation_path", ""))
    if creation_path != expected:
        raise IdentityError(
            f"the secret_id wrapping token was created at {creation_path or 'an unknown path'!r}, "
            f"not {expected!r}: refusing to unwrap it"
        )
    try:
        answer = await client.with_token(wrapping_token).request(
            "POST", "sys/wrapping/unwrap", {}, operation="unwrap", safety=Safety.MINTS_TOKEN
        )
    except VaultError as exc:
        if exc.kind not in _REFUSED:
            raise
        raise IdentityError("unwrapping the secret_id failed", exc.detail or "refused") from None
    secret_id = (answer.get("data") or {}).get("secret_id")
    if not secret_id:
        raise IdentityError("the unwrapped response holds no secret_id")
    return str(secret_id)


async def create_child_token(
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
        answer = await client.request(
            "POST", "auth/token/create", body, "create-token", Safety.MINTS_TOKEN
        )
    except VaultError as exc:
        if exc.kind not in _REFUSED:
            raise
        raise IdentityError("creating a child token failed", exc.detail or "refused") from None
    return _login_from(answer)


async def lookup_self(client: VaultClient) -> dict[str, Any]:
    answer = await client.get("auth/token/lookup-self", operation="lookup-self")
    return dict(answer.get("data") or {})


async def renew_self(client: VaultClient) -> int:
    """Renew the client's token; the TTL it now has."""
    answer = await client.post("auth/token/renew-self", operation="renew-self")
    return int((answer.get("auth") or {}).get("lease_duration") or 0)


async def revoke_self(client: VaultClient) -> None:
    await client.post("auth/token/revoke-self", operation="revoke-self")


async def lookup_accessor(client: VaultClient, accessor: str) -> dict[str, Any] | None:
    """The token behind ``accessor``, or None when it no longer exists."""
    try:
        answer = await client.post(
            "auth/token/lookup-accessor", {"accessor": accessor}, operation="lookup-accessor"
        )
    except (NotFound, PermissionDenied):
        return None
    except VaultError as exc:
        if exc.kind is Fault.INVALID:  # "invalid accessor": it is gone
            return None
        raise
    return dict(answer.get("data") or {})


async def revoke_accessor(client: VaultClient, accessor: str) -> bool:
    """Revoke the token behind ``accessor``: True, or False when it was gone already.

    A gone token is answered 200 with the warning "No token found with this accessor"; one
    whose TTL ends while it is being revoked, 400 "invalid request" — gone as well once a
    lookup no longer finds it."""
    try:
        answer = await client.post(
            "auth/token/revoke-accessor", {"accessor": accessor}, operation="revoke-accessor"
        )
    except VaultError as exc:
        if exc.kind is Fault.INVALID and await lookup_accessor(client, accessor) is None:
            return False
        raise
    return not any("No token found" in str(w) for w in answer.get("warnings") or ())
