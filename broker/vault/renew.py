"""Keep a token alive while a long execution runs: renew at about 2/3 of its TTL."""

from __future__ import annotations

import threading

from broker import logs
from broker.errors import BrokerError
from broker.vault.client import VaultClient

RENEW_AT = 2 / 3


class TokenRenewer:
    """A daemon thread that renews ``client``'s token until stopped or no longer extended."""

    def __init__(self, client: VaultClient, ttl_seconds: int, accessor: str = "") -> None:
        self._client = client
        self._ttl = ttl_seconds
        self._accessor = accessor
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="token-renewer", daemon=True)
        self.renewals = 0

    def start(self) -> TokenRenewer:
        if self._ttl > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _loop(self) -> None:
        ttl = self._ttl
        while not self._stop.wait(max(ttl * RENEW_AT, 0.5)):
            try:
                answer = self._client.post("auth/token/renew-self", operation="renew-self")
            except BrokerError as exc:
                logs.event("token renewal failed", accessor=self._accessor, error=str(exc))
                return
            new_ttl = int((answer.get("auth") or {}).get("lease_duration", 0))
            self.renewals += 1
            logs.event("token renewed", accessor=self._accessor, ttl=new_ttl)
            if new_ttl <= ttl * (1 - RENEW_AT):  # capped by its max TTL: renewing no longer helps
                logs.event("token reached its max TTL", accessor=self._accessor, ttl=new_ttl)
                return
            ttl = new_ttl
