"""The one retry policy for every Vault request: when to retry, how long to wait, when to stop.

- Full-jitter exponential backoff with a cap; a server's ``Retry-After`` is honoured and never
  shortened.
- Only safe requests are retried: reads, check-and-set writes, revocations, Transit and lookups
  (``Safety.IDEMPOTENT``) after any transient fault; requests that mint a token (logins, child
  tokens, unwraps: ``Safety.MINTS_TOKEN``) only when Vault surely processed nothing — the
  connection was refused, or Vault answered sealed, standby or rate-limited.
- Every call has a per-request timeout and an overall deadline; :func:`deadline` narrows the
  deadline for everything awaited inside it (e.g. one execution's whole preparation).
- A per-process :class:`RequestLimiter` caps the request rate, and retries get a small budget of
  their own, so no fault turns into a request storm.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

from broker.errors import Fault, VaultError, VaultUnavailable
from broker.records import record

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "vault_deadline", default=None
)
_single_attempt: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "vault_single_attempt", default=False
)


class Safety(Enum):
    IDEMPOTENT = "idempotent"
    MINTS_TOKEN = "mints-token"


# Faults where Vault rejected the request before doing anything with it.
_NOT_PROCESSED = {Fault.UNREACHABLE, Fault.SEALED, Fault.STANDBY, Fault.RATE_LIMITED}


@record(frozen=True)
class RetryPolicy:
    base_delay: float = 0.1
    max_delay: float = 5.0
    request_timeout: float = 10.0  # --vault-timeout
    operation_deadline: float = 30.0  # one call, retries included

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Full jitter: uniform(0, min(cap, base * 2**attempt)); never less than Retry-After."""
        import random  # here: ~4 ms of every start-up, where only a retry needs it

        ceiling = min(self.max_delay, self.base_delay * 2**attempt)
        pause = random.uniform(0, ceiling)  # noqa: S311 - jitter, not a secret
        return max(pause, retry_after or 0.0)

    def may_retry(self, error: VaultError, safety: Safety) -> bool:
        if not isinstance(error, VaultUnavailable):
            return False
        if safety is Safety.IDEMPOTENT:
            return True
        return error.kind in _NOT_PROCESSED or not error.sent


@contextmanager
def deadline(seconds: float) -> Iterator[float]:
    """Every Vault call awaited inside gives up ``seconds`` from now (or earlier if an outer
    deadline says so). Yields the monotonic deadline."""
    at = time.monotonic() + seconds
    outer = _deadline.get()
    token = _deadline.set(at if outer is None else min(at, outer))
    try:
        yield at
    finally:
        _deadline.reset(token)


@contextmanager
def single_attempt() -> Iterator[None]:
    """Vault calls awaited inside are tried once: the caller has its own, slower backoff
    (token renewal: a fleet of sidecars must not retry in step against a recovering Vault)."""
    token = _single_attempt.set(True)
    try:
        yield
    finally:
        _single_attempt.reset(token)


def retries_allowed() -> bool:
    return not _single_attempt.get()


def current_deadline(policy: RetryPolicy) -> float:
    """The monotonic time by which the call starting now must finish."""
    own = time.monotonic() + policy.operation_deadline
    outer = _deadline.get()
    return own if outer is None else min(own, outer)


class _Bucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, time.monotonic()

    def wait_time(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RequestLimiter:
    """Token buckets for this process: every request, and (tighter) every retry."""

    def __init__(self, requests_per_second: float = 2000, retries_per_second: float = 10) -> None:
        self._requests = _Bucket(requests_per_second, requests_per_second / 4)
        self._retries = _Bucket(retries_per_second, retries_per_second)

    async def acquire(self, retry: bool, until: float) -> bool:
        """Wait for a slot; False when the wait would pass ``until``."""
        for bucket in (self._retries, self._requests) if retry else (self._requests,):
            while (pause := bucket.wait_time()) > 0:
                if time.monotonic() + pause > until:
                    return False
                await asyncio.sleep(pause)
        return True


LIMITER = RequestLimiter()
