"""Read-your-writes on OpenBao clusters whose standbys answer reads (the default since 2.7).

Every answer from an indexed storage backend (Raft) carries ``X-Vault-Index``, a marker of the
storage state the node had reached. A request that sends the newest marker back with
``X-Vault-Inconsistent: forward-active-node`` is served by a node that has reached that state,
or forwarded to the active node: a claim written a moment ago is seen by the read that checks
it, and a write never lands on a standby that has not yet seen the mount. Without it a standby
answers from whatever it has replicated so far. One marker per client pool (``with_token``
copies share it); a single server answers as before.
"""

from __future__ import annotations

import base64
import binascii
import json

INDEX_HEADER = "X-Vault-Index"
FALLBACK = ("X-Vault-Inconsistent", "forward-active-node")


def _position(marker: str) -> tuple[str, int] | None:
    """OpenBao's marker is base64 JSON ``{"cluster", "value"}``; None if it is anything else
    (the marker is documented as opaque: then the newest one received wins)."""
    try:
        decoded = json.loads(base64.b64decode(marker, validate=True))
        return str(decoded["cluster"]), int(decoded["value"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        return None


class StateIndex:
    """The newest storage state this client has seen answered."""

    def __init__(self) -> None:
        self._marker = ""
        self._position: tuple[str, int] | None = None

    def headers(self) -> list[tuple[str, str]]:
        return [(INDEX_HEADER, self._marker), FALLBACK] if self._marker else []

    def observe(self, marker: str) -> None:
        """Keep ``marker`` unless it is older than the one kept (answers can cross)."""
        if not marker or marker == self._marker:
            return
        position = _position(marker)
        kept = self._position
        if position and kept and position[0] == kept[0] and position[1] < kept[1]:
            return
        self._marker, self._position = marker, position
