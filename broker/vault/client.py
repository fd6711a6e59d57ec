"""The one place that speaks HTTP to Vault: requests in, typed errors out, retried by one policy.

Every failure is classified once, here (:class:`~broker.errors.Fault`), naming the operation and
the path and never carrying a response body: bodies can hold values. Where Vault's own error
text matters (check-and-set lost, a login refused for an expired token) it is matched against an
allow-list and only the list's own words reach the error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from broker import logs
from broker.config import VaultSettings
from broker.errors import (
    Conflict,
    Fault,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    RequestTooLarge,
    VaultConfigError,
    VaultError,
    VaultUnavailable,
)
from broker.records import field, record
from broker.vault import transport as wire
from broker.vault.consistency import StateIndex
from broker.vault.retry import (
    LIMITER,
    RequestLimiter,
    RetryPolicy,
    Safety,
    current_deadline,
    retries_allowed,
)
from broker.vault.tls import ssl_context

MAX_ANSWER_BYTES = 32 * 1024 * 1024
RequestObserver = Callable[[str, str], None]
_observers: list[RequestObserver] = []
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~/-]*")  # what quote(segment, safe="") keeps as is

# Vault error texts that mean something to the broker → the words it may repeat.
KNOWN_ERRORS: tuple[tuple[str, str], ...] = (
    ("check-and-set parameter did not match", "check-and-set mismatch"),
    ("refused JSON input", "too large"),
    ("token is expired", "the token has expired"),
    ("token not yet valid", "the token is not valid yet"),
    ("audience claim does not match", "wrong audience"),
    ("invalid issuer", "wrong issuer"),
    ("invalid subject", "a claim is not allowed by the role"),
    ("no known key successfully validated", "signed by a key Vault does not know"),
    ("failed to verify id token signature", "signed by a key Vault does not know"),
    ("is missing", "a required claim is missing"),
    ("does not match any associated bound claim values", "a claim is not allowed by the role"),
    ("could not be found", "the role does not exist"),
    ("invalid secret id", "invalid secret_id"),
    ("invalid role or secret id", "invalid role_id or secret_id"),
    ("error validating token", "the token is invalid"),
    ("error checking jwks URL", "Vault could not fetch or use the JWKS URL"),
    ("error checking oidc discovery URL", "Vault could not fetch the OIDC discovery document"),
    ("Vault is sealed", "sealed"),
    ("permission denied", "permission denied"),
)


def observe_requests(observer: RequestObserver) -> None:
    """Call ``observer(operation, outcome)`` after every request; outcome is ``ok`` or a Fault."""
    _observers.append(observer)


def _notify(operation: str, outcome: str) -> None:
    for observer in _observers:
        observer(operation, outcome)


def escape_path(path: str) -> str:
    """URL-escape every segment of a Vault path (most need nothing: checked first)."""
    if _UNRESERVED.fullmatch(path):
        return path
    return "/".join(quote(segment, safe="") for segment in path.split("/"))


def known_error(errors: Sequence[str]) -> str:
    """The allow-listed words for the first recognised Vault error text, else ''."""
    for text in errors:
        for marker, words in KNOWN_ERRORS:
            if marker.lower() in text.lower():
                return words
    return ""


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime  # here: ~5 ms of start-up, rarely needed

    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@record
class _Addresses:
    """The configured servers; requests go to the preferred one, which moves on faults."""

    origins: list[wire.Origin]
    preferred: int = 0

    def current(self) -> wire.Origin:
        return self.origins[self.preferred % len(self.origins)]

    def move_on(self) -> None:
        self.preferred = (self.preferred + 1) % len(self.origins)


@record
class _Shared:
    """What every client of one server shares, whatever its token."""

    settings: VaultSettings
    transport: wire.Transport
    addresses: _Addresses
    policy: RetryPolicy
    limiter: RequestLimiter
    namespace_headers: list[tuple[str, str]] = field(default_factory=list)
    index: StateIndex = field(default_factory=StateIndex)  # read-your-writes (consistency.py)


class VaultClient:
    """An async Vault client for one token; ``with_token`` shares its connections."""

    def __init__(
        self,
        settings: VaultSettings,
        policy: RetryPolicy | None = None,
        limiter: RequestLimiter | None = None,
        token: str | None = None,
    ) -> None:
        namespace = [("X-Vault-Namespace", settings.namespace)] if settings.namespace else []
        self._shared = _Shared(
            settings=settings,
            transport=wire.Transport(ssl_context(settings), settings.tls_server_name),
            addresses=_Addresses([wire.Origin.parse(a) for a in settings.addresses]),
            policy=policy or RetryPolicy(),
            limiter=limiter or LIMITER,
            namespace_headers=namespace,
        )
        self.token = settings.token if token is None else token

    def __repr__(self) -> str:
        return f"VaultClient(addr={self.addr!r})"

    @property
    def addr(self) -> str:
        return self._shared.settings.addr

    @property
    def settings(self) -> VaultSettings:
        return self._shared.settings

    @property
    def policy(self) -> RetryPolicy:
        return self._shared.policy

    def with_token(self, token: str) -> VaultClient:
        """A client for the same servers and connection pool that uses another token."""
        clone = object.__new__(VaultClient)
        clone._shared = self._shared
        clone.token = token
        return clone

    async def aclose(self) -> None:
        """Close the pooled connections of the running event loop."""
        await self._shared.transport.aclose()

    # --- requests -----------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        operation: str | None = None,
        safety: Safety = Safety.IDEMPOTENT,
        headers: Sequence[tuple[str, str]] = (),
        authenticated: bool = True,
        query: str = "",
    ) -> dict[str, Any]:
        """Send ``method /v1/<path>`` under the retry policy; an empty answer is ``{}``."""
        op = operation or method.lower()
        payload = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
        sent_headers = [*self._headers(authenticated), *headers]
        if payload:
            sent_headers.append(("Content-Type", "application/json"))
        shared = self._shared
        until = current_deadline(shared.policy)
        attempt = 0
        started = time.monotonic()
        while True:
            try:
                target = f"/v1/{escape_path(path)}" + (f"?{query}" if query else "")
                answer = await self._once(
                    method, target, op, sent_headers, payload, until, attempt, safety
                )
            except VaultError as error:
                _notify(op, str(error.kind))
                if not self._should_retry(error, safety, attempt, until):
                    raise _final(error, safety) from None
                attempt += 1
                await self._pause(error, attempt, until)
                if time.monotonic() >= until:
                    raise _final(error, safety) from None
                continue
            _notify(op, "ok")
            if _debugging():
                logs.event("vault request", level=10, operation=op, path=path,
                           ms=round((time.monotonic() - started) * 1000, 2))  # fmt: skip
            return answer

    def _headers(self, authenticated: bool) -> list[tuple[str, str]]:
        headers = [("X-Vault-Request", "true"), *self._shared.namespace_headers]
        if authenticated and self.token:
            headers.append(("X-Vault-Token", self.token))
        return headers

    def _should_retry(self, error: VaultError, safety: Safety, attempt: int, until: float) -> bool:
        if not retries_allowed():
            return False
        return self._shared.policy.may_retry(error, safety) and time.monotonic() < until

    async def _pause(self, error: VaultError, attempt: int, until: float) -> None:
        shared = self._shared
        if isinstance(error, VaultUnavailable) and error.kind in (
            Fault.UNREACHABLE,
            Fault.SEALED,
            Fault.STANDBY,
        ):
            shared.addresses.move_on()
        retry_after = error.retry_after if isinstance(error, VaultUnavailable) else None
        pause = shared.policy.backoff(attempt - 1, retry_after)
        pause = min(pause, max(0.0, until - time.monotonic()))
        logs.event(
            "vault request failed, retrying",
            operation=error.operation, fault=str(error.kind), attempt=attempt,
            retry_in=round(pause, 3),
        )  # fmt: skip
        await asyncio.sleep(pause)

    async def _once(
        self,
        method: str,
        target: str,
        op: str,
        headers: list[tuple[str, str]],
        payload: bytes,
        until: float,
        attempt: int,
        safety: Safety = Safety.IDEMPOTENT,
    ) -> dict[str, Any]:
        shared = self._shared
        path = target.removeprefix("/v1/").split("?", 1)[0]
        if not await shared.limiter.acquire(retry=attempt > 0, until=until):
            raise VaultUnavailable(op, path, Fault.RATE_LIMITED, detail="local request cap")
        timeout = min(shared.policy.request_timeout, until - time.monotonic())
        if timeout <= 0:
            raise VaultUnavailable(op, path, Fault.TIMEOUT, detail="deadline passed", sent=False)
        origin = shared.addresses.current()
        for _ in range(3):  # at most two redirects, only to configured servers
            try:
                response = await shared.transport.request(
                    origin, method, target, [*headers, *shared.index.headers()], payload,
                    timeout, MAX_ANSWER_BYTES, fresh=safety is Safety.MINTS_TOKEN,
                )  # fmt: skip
            except wire.TransportError as exc:
                if isinstance(exc, wire.Dropped) and await self._speaks_https(origin):
                    raise _https_port(op, path) from None
                raise _transport_error(op, path, exc, origin) from None
            shared.index.observe(response.headers.get("x-vault-index", ""))
            if response.status != 307:
                return _answer(op, path, response)
            origin = self._redirect_target(op, path, response)
        raise VaultUnavailable(op, path, Fault.STANDBY, detail="too many redirects")

    async def _speaks_https(self, origin: wire.Origin) -> bool:
        """Does an http:// address lead to an HTTPS port? (It closes the connection on a LIST or
        DELETE; a GET gets a 400 that says so.) Asked only after a dropped connection."""
        if origin.scheme != "http":
            return False
        try:
            answer = await self._shared.transport.request(
                origin, "GET", "/v1/sys/health", [], b"", 2.0, 4096
            )
        except wire.TransportError:
            return False
        return answer.status == 400 and _HTTPS_PORT in answer.body

    def _redirect_target(self, op: str, path: str, response: wire.Response) -> wire.Origin:
        target = wire.Origin.parse(response.headers.get("location", ""))
        if target not in self._shared.addresses.origins:
            raise VaultUnavailable(
                op, path, Fault.STANDBY, 307, detail="redirected to a server not in VAULT_ADDR"
            )
        return target

    async def get(self, path: str, operation: str = "read") -> dict[str, Any]:
        return await self.request("GET", path, operation=operation)

    async def post(
        self,
        path: str,
        body: Mapping[str, Any] | None = None,
        operation: str = "write",
        safety: Safety = Safety.IDEMPOTENT,
    ) -> dict[str, Any]:
        return await self.request("POST", path, body or {}, operation=operation, safety=safety)

    async def delete(self, path: str, operation: str = "delete") -> dict[str, Any]:
        return await self.request("DELETE", path, operation=operation)

    async def list(self, path: str) -> list[str]:
        """The keys under ``path``; an absent folder is empty."""
        try:
            answer = await self.request("LIST", path, operation="list")
        except NotFound:
            return []
        keys = (answer.get("data") or {}).get("keys") or []
        return [str(key) for key in keys]

    async def health(self) -> dict[str, Any]:
        """``sys/health`` of the preferred server: initialized, sealed, standby (no token)."""
        return await self.request(
            "GET", "sys/health", operation="health", authenticated=False,
            query="standbyok=true&sealedcode=200&uninitcode=200",
        )  # fmt: skip


def _final(error: VaultError, safety: Safety) -> VaultError:
    """A token-minting request that got no answer is reported as such, never retried."""
    if (
        safety is Safety.MINTS_TOKEN
        and isinstance(error, VaultUnavailable)
        and error.sent
        and error.kind in (Fault.TIMEOUT, Fault.UNKNOWN_OUTCOME)
    ):
        return OutcomeUnknown(error.operation, error.path, Fault.UNKNOWN_OUTCOME)
    return error


def _transport_error(
    op: str, path: str, exc: wire.TransportError, origin: wire.Origin
) -> VaultError:
    if isinstance(exc, wire.TLSFailed):
        hint = (
            "set VAULT_CACERT to the CA that signed the server's certificate, or "
            "VAULT_TLS_SERVER_NAME to a name the certificate carries; is VAULT_ADDR's scheme right?"
        )
        return VaultConfigError(op, path, Fault.TLS, exc.detail, hint)
    if isinstance(exc, wire.ConnectFailed):
        return VaultUnavailable(op, path, Fault.UNREACHABLE, detail=exc.detail, sent=False)
    if isinstance(exc, wire.TimedOut):
        return VaultUnavailable(op, path, Fault.TIMEOUT, detail=exc.detail, sent=exc.sent)
    if isinstance(exc, wire.TooLarge):
        return VaultError(op, path, Fault.BAD_ANSWER, detail=exc.detail)
    if isinstance(exc, wire.BadHeader):
        hint = "check VAULT_TOKEN and VAULT_NAMESPACE (or the token file) for a stray line break"
        return VaultConfigError(op, path, Fault.INVALID, exc.detail, hint)
    return VaultUnavailable(op, path, Fault.UNKNOWN_OUTCOME, detail=exc.detail, sent=exc.sent)


_HTTPS_PORT = b"HTTP request to an HTTPS server"


def _https_port(op: str, path: str) -> VaultConfigError:
    hint = "the server speaks HTTPS: use https:// in VAULT_ADDR"
    return VaultConfigError(op, path, Fault.ADDRESS, "plain HTTP sent to an HTTPS port", hint)


def _decode(op: str, path: str, response: wire.Response) -> dict[str, Any]:
    if not response.body:
        return {}
    if response.status == 400 and _HTTPS_PORT in response.body:  # Go's answer, not JSON
        raise _https_port(op, path)
    try:
        answer = json.loads(response.body)
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict):
        if response.status >= 500:
            return {}
        raise VaultError(op, path, Fault.BAD_ANSWER, response.status, "not a JSON object")
    return answer


def _answer(op: str, path: str, response: wire.Response) -> dict[str, Any]:
    status = response.status
    answer = _decode(op, path, response)
    if 200 <= status < 300:
        return answer
    errors = [str(e) for e in answer.get("errors") or [] if isinstance(e, str)]
    raise _status_error(op, path, status, known_error(errors), _retry_after(response.headers))


def _status_error(
    op: str, path: str, status: int, known: str, retry_after: float | None
) -> VaultError:
    if status == 400 and known == "check-and-set mismatch":
        return Conflict(op, path, Fault.CONFLICT, status)
    if status == 400 and known == "too large":
        return RequestTooLarge(op, path, Fault.TOO_LARGE, status)
    if status in (401, 403):
        return PermissionDenied(op, path, Fault.FORBIDDEN, status, known)
    if status == 404:
        return NotFound(op, path, Fault.NOT_FOUND, status)
    if status == 429:
        return VaultUnavailable(op, path, Fault.RATE_LIMITED, status, retry_after=retry_after)
    if status == 412:  # a standby behind our X-Vault-Index that could not forward (yet)
        return VaultUnavailable(op, path, Fault.STANDBY, status, retry_after=retry_after)
    if status == 503:
        kind = Fault.SEALED if known == "sealed" else Fault.STANDBY
        return VaultUnavailable(op, path, kind, status, retry_after=retry_after)
    if status in (412, 472, 473):
        return VaultUnavailable(op, path, Fault.STANDBY, status, retry_after=retry_after)
    if status >= 500:
        return VaultUnavailable(op, path, Fault.SERVER_ERROR, status, retry_after=retry_after)
    return VaultError(op, path, Fault.INVALID, status, known)


def _debugging() -> bool:
    """--log-level debug: each Vault request's duration is logged (for profiling)."""
    return logging.getLogger(logs.LOGGER_NAME).isEnabledFor(logging.DEBUG)
