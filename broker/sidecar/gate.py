"""The socket's front door: who may talk to the sidecar is decided at ``accept``.

A peer whose uid (``SO_PEERCRED``) is not allowed gets a canned 403 and a closed connection
before a single byte of its request is read: thousands of connections from a refused uid cost
one ``accept`` and one ``close`` each and hold nothing. An allowed uid may hold a bounded number
of connections at once. Refusals are logged as security events, at most once per uid every few
seconds with a count, so a flood cannot flood the log too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from broker import logs
from broker.errors import ConfigError
from broker.protocol import Problem
from broker.sidecar.metrics import Metrics
from broker.sidecar.peers import peer_uid

_BODY = json.dumps(Problem(403, "Refused", "peer not allowed").to_json()).encode()
REFUSAL = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/problem+json\r\n"
    + f"Content-Length: {len(_BODY)}\r\nConnection: close\r\n\r\n".encode()
    + _BODY
)
LOG_EVERY = 5.0  # seconds between two refusal log lines for one uid
CLOSE_GRACE = 0.2  # a refused socket stays open, unread, this long: the peer reads the 403
MAX_LINGERING = 256  # beyond this many, refused sockets are closed at once


class PeerGate:
    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        allowed: set[int],
        metrics: Metrics,
        max_connections_per_uid: int = 64,
    ) -> None:
        self._factory = protocol_factory
        self._allowed = allowed  # read on every connection: filled in once the socket exists
        self._metrics = metrics
        self._cap = max_connections_per_uid
        self._open: dict[int, list[asyncio.BaseTransport]] = defaultdict(list)
        self._logged: dict[int | None, tuple[float, int]] = {}
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._lingering = 0

    def listen(self, path: Path) -> None:
        """Bind the socket, born 0660 (no window where others could connect)."""
        if path.exists() or path.is_symlink():
            if not path.is_socket():
                raise ConfigError(f"--socket {path}: exists and is not a socket")
            path.unlink()  # a stale socket from a previous run
        path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o117)
        try:
            sock.bind(str(path))
        finally:
            os.umask(previous)
        os.chmod(path, 0o660)
        sock.listen(1024)
        sock.setblocking(False)
        self._socket = sock
        self._task = asyncio.create_task(self._accept_loop(), name="socket-gate")

    async def close(self) -> None:
        """Stop accepting; connections already admitted finish on their own."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._socket is not None:
            self._socket.close()

    async def _accept_loop(self) -> None:
        assert self._socket is not None
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(self._socket)
            try:
                await self._admit(loop, connection)
            except OSError:
                connection.close()

    async def _admit(self, loop: asyncio.AbstractEventLoop, connection: socket.socket) -> None:
        uid = peer_uid(connection)
        if uid is None or uid not in self._allowed:
            self._refuse(connection, uid, "peer not allowed")
            return
        open_ = self._open[uid] = [t for t in self._open[uid] if not t.is_closing()]
        if len(open_) >= self._cap:
            self._refuse(connection, uid, f"more than {self._cap} connections")
            return
        transport, _ = await loop.connect_accepted_socket(self._factory, connection)
        open_.append(transport)

    def _refuse(self, connection: socket.socket, uid: int | None, why: str) -> None:
        self._metrics.denied_peers.inc()
        with contextlib.suppress(OSError):
            connection.send(REFUSAL)
            connection.shutdown(socket.SHUT_WR)
        if self._lingering < MAX_LINGERING:
            self._lingering += 1
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self._close, connection)
        else:
            connection.close()
        self._log(uid, why)

    def _close(self, connection: socket.socket) -> None:
        self._lingering -= 1
        connection.close()

    def _log(self, uid: int | None, why: str) -> None:
        last, count = self._logged.get(uid, (0.0, 0))
        now = time.monotonic()
        if now - last >= LOG_EVERY:
            logs.security("security: socket peer refused", "peer-refused",
                          peer_uid=uid, reason=why, refused_since_last=count + 1)  # fmt: skip
            self._logged[uid] = (now, 0)
        else:
            self._logged[uid] = (last, count + 1)
