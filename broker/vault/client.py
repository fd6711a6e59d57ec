"""The one place that speaks HTTP to Vault: requests in, typed errors out.

hvac's adapter does the HTTP; this module maps every failure to the broker's error tree once,
naming the method and the path, never a response body (bodies can carry values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import hvac
import hvac.exceptions
import requests
import requests.adapters

from broker.config import VaultSettings
from broker.errors import (
    Conflict,
    NotFound,
    PermissionDenied,
    RequestTooLarge,
    VaultError,
    VaultUnavailable,
)

_CAS_MISMATCH = ("check-and-set", "cas")
RequestObserver = Callable[[str, str], None]
_observers: list[RequestObserver] = []


def observe_requests(observer: RequestObserver) -> None:
    """Call ``observer(operation, status_class)`` after every Vault request (for metrics)."""
    _observers.append(observer)


def _status_class(error: VaultError | None) -> str:
    if error is None:
        return "2xx"
    if isinstance(error, VaultUnavailable):
        return "unreachable" if "cannot reach" in error.reason else "5xx"
    return "4xx"


def _notify(operation: str, error: VaultError | None) -> None:
    status = _status_class(error)
    for observer in _observers:
        observer(operation, status)


def escape_path(path: str) -> str:
    """URL-escape every segment of a Vault path."""
    return "/".join(quote(segment, safe="") for segment in path.split("/"))


@contextmanager
def translate(operation: str, path: str) -> Iterator[None]:
    """Map hvac/requests failures to VaultError subclasses without keeping response bodies."""
    try:
        yield
    except hvac.exceptions.Forbidden:
        raise PermissionDenied(operation, path, "permission denied") from None
    except hvac.exceptions.InvalidPath:
        raise NotFound(operation, path, "not found") from None
    except hvac.exceptions.InvalidRequest as exc:
        text = " ".join(str(e) for e in (exc.errors or [])).lower()
        if any(marker in text for marker in _CAS_MISMATCH):
            raise Conflict(operation, path, "check-and-set failed (it exists or changed)") from None
        if "json input" in text or "maximum number of strings" in text:
            reason = "request too large for the server's JSON limits (max_request_json_*)"
            raise RequestTooLarge(operation, path, reason) from None
        raise VaultError(operation, path, "invalid request") from None
    except hvac.exceptions.Unauthorized:
        raise PermissionDenied(operation, path, "unauthorized (missing or invalid token)") from None
    except (
        hvac.exceptions.VaultDown,
        hvac.exceptions.InternalServerError,
        hvac.exceptions.BadGateway,
        hvac.exceptions.RateLimitExceeded,
    ) as exc:
        raise VaultUnavailable(operation, path, type(exc).__name__) from None
    except hvac.exceptions.VaultError as exc:
        raise VaultError(operation, path, type(exc).__name__) from None
    except requests.exceptions.RequestException as exc:
        reason = f"cannot reach Vault ({type(exc).__name__})"
        raise VaultUnavailable(operation, path, reason) from None


class VaultClient:
    """A thin, typed wrapper over hvac's adapter with error translation."""

    def __init__(
        self,
        settings: VaultSettings,
        timeout: int = 10,
        session: requests.Session | None = None,
    ) -> None:
        self.addr = settings.addr
        self._settings = settings
        self._timeout = timeout
        # One connection pool for every token of this server (see with_token).
        if session is None:
            session = requests.Session()
            for scheme in ("http://", "https://"):
                session.mount(scheme, requests.adapters.HTTPAdapter(pool_maxsize=64))
        self._session = session
        verify: bool | str = settings.cacert or True
        self._hvac = hvac.Client(
            url=settings.addr,
            token=settings.token or None,
            timeout=timeout,
            verify=verify,
            session=self._session,
        )

    def __repr__(self) -> str:
        return f"VaultClient(addr={self.addr!r})"

    @property
    def token(self) -> str:
        return str(self._hvac.token or "")

    @token.setter
    def token(self, value: str) -> None:
        self._hvac.token = value

    def with_token(self, token: str) -> VaultClient:
        """A client for the same server that uses another token."""
        settings = VaultSettings(addr=self.addr, token=token, cacert=self._settings.cacert)
        return VaultClient(settings, timeout=self._timeout, session=self._session)

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        operation: str | None = None,
        wrap_ttl: str | None = None,
    ) -> dict[str, Any]:
        """Send one request to ``/v1/<path>``; an empty answer comes back as ``{}``."""
        op = operation or method.lower()
        url = f"/v1/{escape_path(path)}"
        payload = dict(body) if body is not None else None
        try:
            with translate(op, path):
                if wrap_ttl:
                    response = self._hvac.adapter.request(
                        method, url, json=payload, wrap_ttl=wrap_ttl
                    )
                else:
                    response = self._hvac.adapter.request(method, url, json=payload)
        except VaultError as exc:
            _notify(op, exc)
            raise
        _notify(op, None)
        if isinstance(response, dict):
            return response
        return {}

    def get(self, path: str, operation: str = "read") -> dict[str, Any]:
        return self.request("GET", path, operation=operation)

    def post(
        self, path: str, body: Mapping[str, Any] | None = None, operation: str = "write"
    ) -> dict[str, Any]:
        return self.request("POST", path, body or {}, operation=operation)

    def delete(self, path: str, operation: str = "delete") -> dict[str, Any]:
        return self.request("DELETE", path, operation=operation)

    def list(self, path: str) -> list[str]:
        try:
            answer = self.request("LIST", path, operation="list")
        except NotFound:
            return []
        keys = answer.get("data", {}).get("keys", [])
        return [str(key) for key in keys]

    def health(self) -> bool:
        """True once the server answers /v1/sys/health as initialized and unsealed."""
        try:
            response = requests.get(f"{self.addr}/v1/sys/health", timeout=2)
        except requests.exceptions.RequestException:
            return False
        return response.status_code == 200
