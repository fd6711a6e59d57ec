"""The one token keeper: the process's Vault login, kept alive exactly as long as it is needed.

- Renews each held token at about 2/3 of its TTL, on the monotonic clock.
- A renewal is one request; a transient failure backs off with full jitter (at least 1 s,
  growing to the policy's cap); a failed new login backs off too (at least 1 s). Nothing is
  retried at once, so an unreachable Vault costs no CPU; the process-wide request cap holds.
- An expired token is forgotten; an expired or unrenewable current login is replaced.
- A token Vault refuses (403: revoked or expired) is dropped; if it was the current login, the
  keeper logs in again.
- When renewal stops extending the current login (its max TTL is near), the keeper logs in
  again and retires the old login. Leases are child tokens and die with their parent, so a
  retired login is kept alive while it parents leases and revoked when its last lease ends.
- ``close()`` revokes every login the keeper obtained; a token it was given is left alone.

``run`` uses it for its one login (which is also the execution's lease); the sidecar for the
login that parents every execution's lease.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

from broker import logs
from broker.errors import BrokerError, PermissionDenied, VaultError
from broker.records import record
from broker.vault import Login, VaultClient, deadline, lookup_self, renew_self, revoke_self
from broker.vault.retry import single_attempt

RENEW_AT = 2 / 3
RENEWAL_BACKOFF_SHIFT = 3  # renewal retries start where a request's 4th retry would (≤ 0.8 s)
LoginFunction = Callable[[], Awaitable[Login]]
Observer = Callable[[str, str], None]  # (what, result): ("login", "ok"), ("renewal", "failed")


@record(eq=False)
class HeldToken:
    login: Login
    client: VaultClient
    issued: float  # monotonic time of the login
    expires: float  # monotonic end of the current TTL
    renewed: float  # monotonic time of the login or the last renewal
    leases: int = 0
    failures: int = 0
    retry_at: float | None = None
    given: bool = False  # handed to us (VAULT_TOKEN): never renewed or revoked by the keeper

    @property
    def accessor(self) -> str:
        return self.login.accessor

    def due(self) -> float:
        if self.retry_at is not None:
            return self.retry_at
        return self.renewed + (self.expires - self.renewed) * RENEW_AT

    def margin(self) -> float:
        """How long before its max TTL a login is replaced: a third of its TTL, at most 60 s."""
        return min(max(self.login.ttl, 1) / 3, 60.0)


class TokenKeeper:
    def __init__(
        self,
        client: VaultClient,
        login: LoginFunction | None,
        max_ttl: float,
        observer: Observer | None = None,
    ) -> None:
        """``login`` None means: use ``client``'s token as given (``run --auth token``)."""
        self._client = client
        self._login = login
        self.max_ttl = max_ttl
        self._observe = observer or (lambda what, result: None)
        self.current: HeldToken | None = None
        self._retired: list[HeldToken] = []
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._relogin_at = 0.0  # monotonic: no new login attempt before this (after failures)
        self._relogin_failures = 0

    # --- logins -------------------------------------------------------------------------------

    async def start(self, timeout: float) -> HeldToken:
        """The first login, retried where safe until ``timeout`` seconds have passed."""
        if self._login is None:
            forever = time.monotonic() + 10 * 365 * 86400.0
            given = Login(self._client.token, "", 0, ())
            self.current = HeldToken(given, self._client, 0.0, forever, 0.0, given=True)
            return self.current
        with deadline(timeout):
            return await self._new_login()

    async def _new_login(self) -> HeldToken:
        assert self._login is not None
        try:
            login = await self._login()
        except BrokerError:
            self._observe("login", "failed")
            raise
        self._observe("login", "ok")
        now = time.monotonic()
        token = HeldToken(login, self._client.with_token(login.token), now, now + login.ttl, now)
        previous, self.current = self.current, token
        logs.event("logged in", accessor=login.accessor, ttl=login.ttl)
        if previous is not None:
            await self._retire(previous)
        self._changed.set()
        return token

    async def relogin(self, stale: HeldToken) -> HeldToken:
        """Log in again unless someone already did since ``stale`` was current."""
        async with self._lock:
            if self.current is not None and self.current is not stale:
                return self.current
            return await self._new_login()

    def covers(self, token: HeldToken, lifetime: float) -> bool:
        """Can renewals keep ``token`` alive ``lifetime`` more seconds?"""
        if token.given:
            return True
        now = time.monotonic()
        return token.expires > now and token.issued + self.max_ttl >= now + lifetime

    async def token_for(self, lifetime: float) -> HeldToken:
        """The current login, if renewals can keep it alive ``lifetime`` more seconds; else a
        fresh one. The caller owns one lease on it until :meth:`detach`."""
        token = self.current
        assert token is not None, "start() first"
        if not self.covers(token, lifetime):
            token = await self.relogin(token)
        token.leases += 1
        return token

    async def detach(self, token: HeldToken) -> None:
        """One lease of ``token`` ended; a retired login with no lease left is revoked."""
        token.leases -= 1
        if token in self._retired and token.leases <= 0:
            self._retired.remove(token)
            await self._revoke(token)

    async def _retire(self, token: HeldToken) -> None:
        if token.leases > 0:
            self._retired.append(token)
        else:
            await self._revoke(token)

    # --- renewal ------------------------------------------------------------------------------

    def held(self) -> list[HeldToken]:
        return [*self._retired, *([self.current] if self.current else [])]

    def _end_of_life(self, token: HeldToken) -> float:
        """When the current login must be replaced: a margin before its max TTL."""
        return token.issued + self.max_ttl - token.margin()

    def _needs_login(self, token: HeldToken | None, now: float) -> bool:
        """Must the current login be replaced (it is gone, dying, or cannot be renewed in time)?

        No current login means it was revoked on purpose (``run`` at its end): nothing to do.
        """
        if self._login is None or token is None:
            return False
        if now >= token.expires or now >= self._end_of_life(token):
            return True
        return token.retry_at is not None and token.retry_at >= token.expires

    def _next_action(self) -> tuple[float, Callable[[], Awaitable[None]]] | None:
        """The next thing to do and when (monotonic): a renewal or a new login, or None.

        Expired retired tokens are forgotten here (Vault has already dropped them and their
        leases). Every action that fails pushes its own time forward, so the loop never spins.
        """
        now = time.monotonic()
        self._retired = [t for t in self._retired if t.expires > now]
        actions: list[tuple[float, Callable[[], Awaitable[None]]]] = []
        current = self.current
        if current is not None and self._needs_login(current, now):
            actions.append((self._relogin_at, functools.partial(self._relogin_step, current)))
        for token in self.held():
            if token.given or not token.login.renewable or token.expires <= now:
                continue
            if token is current and token.retry_at is not None and token.retry_at >= token.expires:
                continue  # it cannot be renewed before it ends: only the new login helps
            due = token.due()
            if token is current and self._login is not None and not self._needs_login(token, now):
                due = min(due, self._end_of_life(token))
            actions.append((due, functools.partial(self._renew, token)))
        return min(actions, key=lambda action: action[0]) if actions else None

    async def run(self) -> None:
        """Renew every held token when due and log in again when needed (cancel to stop)."""
        while True:
            self._changed.clear()
            action = self._next_action()
            if action is None:
                await self._changed.wait()
                continue
            when, step = action
            pause = when - time.monotonic()
            if pause > 0:
                try:
                    await asyncio.wait_for(self._changed.wait(), pause)
                    continue  # something changed: recompute
                except TimeoutError:
                    pass
            await step()

    async def _renew(self, token: HeldToken) -> None:
        try:
            # One attempt; the keeper's own backoff (below) spaces the next ones out.
            with deadline(max(0.5, token.expires - time.monotonic())), single_attempt():
                ttl = await renew_self(token.client)
        except PermissionDenied:
            self._observe("renewal", "refused")
            logs.event("token refused by Vault: dropped", level=30, accessor=token.accessor)
            self._drop(token)
            return
        except VaultError as exc:
            self._observe("renewal", "failed")
            token.failures += 1
            pause = max(self._client.policy.backoff(token.failures + RENEWAL_BACKOFF_SHIFT), 1.0)
            token.retry_at = time.monotonic() + pause  # never in the past: no spinning
            logs.event("token renewal failed", accessor=token.accessor, error=str(exc))
            return
        self._observe("renewal", "ok")
        now = time.monotonic()
        expires = min(now + ttl, token.issued + self.max_ttl)  # it cannot outlive its max TTL
        extended = expires > token.expires + 1
        logs.event("token renewed", level=10, accessor=token.accessor, ttl=ttl, extended=extended)
        token.renewed, token.expires, token.failures, token.retry_at = now, expires, 0, None
        if not extended and token is self.current and self._login is not None:
            logs.event("token reached its max TTL: logging in again", accessor=token.accessor)
            await self._relogin_step(token)

    def _drop(self, token: HeldToken) -> None:
        """Vault refused ``token``: forget it; a refused current login is replaced by run()."""
        if token in self._retired:
            self._retired.remove(token)
        token.expires = min(token.expires, time.monotonic())
        self._changed.set()

    async def _relogin_step(self, stale: HeldToken) -> None:
        """Log in again; a failure backs off (at least 1 s) instead of retrying at once."""
        try:
            await self.relogin(stale)
        except BrokerError as exc:
            self._relogin_failures += 1
            pause = max(self._client.policy.backoff(self._relogin_failures), 1.0)
            self._relogin_at = time.monotonic() + pause
            logs.event("re-login failed", level=40, error=str(exc), retry_in=round(pause, 2))
        else:
            self._relogin_failures, self._relogin_at = 0, 0.0

    # --- checks and the end -------------------------------------------------------------------

    async def check(self) -> str:
        """``"ok"`` if Vault accepts the current login now; else why not: a fault's kind
        (``sealed``, ``unreachable``, ``timeout``, …) or ``token refused``. A refused login is
        replaced first if it can be."""
        token = self.current
        if token is None:
            return "not logged in"
        try:
            await lookup_self(token.client)
        except PermissionDenied:
            if token.given or self._login is None:
                return "token refused"
            logs.event(
                "login refused by Vault: logging in again", level=30, accessor=token.accessor
            )
            self._drop(token)
            await self._relogin_step(token)
            return (
                "ok" if self.current is not None and self.current is not token else "token refused"
            )
        except VaultError as exc:
            return str(exc.kind)
        return "ok"

    async def revoke(self, token: HeldToken) -> bool:
        """Revoke ``token`` now (``run``: the login is the execution's lease) and forget it."""
        if token is self.current:
            self.current = None
        elif token in self._retired:
            self._retired.remove(token)
        return await self._revoke(token)

    async def _revoke(self, token: HeldToken) -> bool:
        if token.given:
            return True
        try:
            await revoke_self(token.client)
        except PermissionDenied:  # Vault no longer knows it (expired or revoked): it is gone
            logs.event("login already gone", accessor=token.accessor)
            return True
        except VaultError as exc:
            self._observe("revocation", "failed")
            logs.event("login revoke failed", level=40, accessor=token.accessor, error=str(exc))
            return False
        self._observe("revocation", "ok")
        logs.event("login revoked", accessor=token.accessor)
        return True

    async def close(self) -> None:
        """Revoke every login this keeper obtained (and so every lease they parent)."""
        for token in self.held():
            await self._revoke(token)
        self._retired.clear()
        self.current = None
