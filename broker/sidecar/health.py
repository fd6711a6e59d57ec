"""Is Vault usable by this sidecar right now? ``/readyz`` answers from the last check.

Every ``--vault-check-interval`` the sidecar asks Vault about its own login (``lookup-self``):
sealed, unreachable, rate-limited or a refused token make it unready (and a refused login is
replaced); the first check that succeeds makes it ready again, so recovery shows within one
interval. A check never takes longer than the interval, retries included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from broker import logs
from broker.execution.keeper import TokenKeeper
from broker.vault import deadline

Observer = Callable[[bool], None]


class VaultHealth:
    def __init__(
        self, keeper: TokenKeeper, interval: float, observe: Observer | None = None
    ) -> None:
        self._keeper = keeper
        self.interval = interval
        self.state = "ok"  # the sidecar starts logged in
        self._observe = observe or (lambda ready: None)

    def ready(self) -> bool:
        token = self._keeper.current
        alive = token is not None and token.expires > time.monotonic()
        return self.state == "ok" and alive

    async def check(self) -> str:
        with deadline(max(0.5, min(self.interval, 5.0))):
            state = await self._keeper.check()
        if state != self.state:
            level = 20 if state == "ok" else 30
            logs.event("vault readiness changed", level=level, vault=state, was=self.state)
        self.state = state
        self._observe(self.ready())
        return state

    async def run(self) -> None:
        """Check forever, one interval apart (cancel the task to stop)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.check()
