"""The sidecar's own Vault identity: log in, keep the token renewed, log in again when needed.

- Startup login has a deadline; retryable failures back off with full jitter. Only failures
  where Vault surely minted nothing are retried (connection refused, 5xx, sealed): every
  successful login mints a token, so a login is never retried blindly.
- The JWT file is re-read on every login (the kubelet rotates projected tokens).
- Renewal happens at about 2/3 of the TTL, measured on the monotonic clock; when renewal stops
  extending the TTL (max TTL reached), the sidecar logs in again.
- Per-execution leases are children of the login token, so a retired login token is kept (not
  revoked) until shutdown: revoking it would revoke the leases it parented.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from broker import logs
from broker.config import Layout
from broker.errors import BrokerError, IdentityError
from broker.runner import RunOptions, login_as_runner
from broker.sidecar.metrics import Metrics
from broker.vault import Login, VaultClient, revoke_self

RENEW_AT = 2 / 3


@dataclass
class Token:
    login: Login
    client: VaultClient
    issued: float  # monotonic time of the login
    expires: float  # monotonic deadline of the current TTL
    renewed: float  # monotonic time of the last login or renewal


class Identity:
    def __init__(
        self,
        client: VaultClient,
        layout: Layout,
        options: RunOptions,
        metrics: Metrics,
        max_ttl: float = 2 * 3600,
    ) -> None:
        self._client = client
        self._max_ttl = max_ttl
        self._layout = layout
        self._options = options
        self._metrics = metrics
        self.current: Token | None = None
        self._retired: list[Token] = []
        self._lock = asyncio.Lock()
        self.logins = 0

    # --- login --------------------------------------------------------------------------------

    async def login(self, deadline: float | None = None) -> Token:
        """Log in; with a deadline, retry retryable failures with full-jitter backoff."""
        attempt = 0
        while True:
            try:
                login = await asyncio.to_thread(
                    login_as_runner, self._client, self._layout, self._options
                )
            except IdentityError as exc:
                self._metrics.logins.labels("failed").inc()
                if deadline is None or not exc.retryable or time.monotonic() >= deadline:
                    raise
                attempt += 1
                pause = random.uniform(0, min(5.0, 0.1 * 2**attempt))  # noqa: S311 - jitter
                pause = min(pause, max(0.0, deadline - time.monotonic()))
                logs.event("login failed, retrying", error=str(exc), retry_in=round(pause, 3))
                await asyncio.sleep(pause)
                continue
            self._metrics.logins.labels("ok").inc()
            self.logins += 1
            now = time.monotonic()
            token = Token(login, self._client.with_token(login.token), now, now + login.ttl, now)
            if self.current is not None:
                self._retired.append(self.current)
            self.current = token
            logs.event("logged in", auth=self._options.auth, accessor=login.accessor, ttl=login.ttl)
            return token

    async def relogin_if(self, stale: Token) -> Token:
        """Log in again unless someone already did since ``stale`` was current (at most once)."""
        async with self._lock:
            if self.current is not None and self.current is not stale:
                return self.current
            return await self.login()

    async def ensure_lifetime(self, seconds: float) -> Token:
        """A login token that can be renewed for ``seconds`` more (leases die with their
        parent): log in again first when the current one would reach its max TTL sooner."""
        token = self.current
        assert token is not None
        if token.issued + self._max_ttl - 30 >= time.monotonic() + seconds:
            return token
        return await self.relogin_if(token)

    def alive(self) -> bool:
        token = self.current
        return token is not None and token.expires > time.monotonic()

    # --- renewal ------------------------------------------------------------------------------

    async def _renew(self, token: Token) -> bool:
        """Renew; True if the TTL was extended."""
        try:
            answer = await asyncio.to_thread(token.client.post, "auth/token/renew-self")
        except BrokerError as exc:
            self._metrics.renewals.labels("failed").inc()
            logs.event("token renewal failed", accessor=token.login.accessor, error=str(exc))
            return False
        ttl = int((answer.get("auth") or {}).get("lease_duration", 0))
        self._metrics.renewals.labels("ok").inc()
        before = token.expires
        token.renewed = time.monotonic()
        token.expires = token.renewed + ttl
        return token.expires > before + 1

    def _held(self) -> list[Token]:
        return [*self._retired, *([self.current] if self.current else [])]

    async def keep_alive(self) -> None:
        """Renew every held token at ~2/3 of its TTL (retired ones still parent leases); log in
        again when the current token's renewal no longer extends it."""
        while True:
            tokens = [t for t in self._held() if t.login.renewable]
            if not tokens:
                await asyncio.sleep(1)
                continue
            due = min(t.renewed + (t.expires - t.renewed) * RENEW_AT for t in tokens)
            await asyncio.sleep(max(0.2, due - time.monotonic()))
            now = time.monotonic()
            for token in tokens:
                if token.renewed + (token.expires - token.renewed) * RENEW_AT > now:
                    continue
                extended = await self._renew(token)
                if extended:
                    continue
                if token is self.current:
                    try:
                        await self.relogin_if(token)
                    except BrokerError as exc:
                        self._metrics.errors.labels("IdentityError").inc()
                        logs.event("re-login failed", error=str(exc))
                elif token.expires <= time.monotonic():
                    self._retired.remove(token)  # expired at its max TTL

    # --- shutdown -----------------------------------------------------------------------------

    def revoke_all(self) -> None:
        """Revoke every login token this sidecar holds (and so any lease they parented)."""
        for token in self._held():
            try:
                revoke_self(token.client)
                self._metrics.revocations.labels("ok").inc()
            except BrokerError as exc:
                self._metrics.revocations.labels("failed").inc()
                logs.event("login revoke failed", accessor=token.login.accessor, error=str(exc))
        self._retired.clear()
        self.current = None
