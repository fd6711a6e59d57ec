"""A fault proxy for the tests: a small HTTP proxy in front of the real Vault that misbehaves.

Per request (a path substring, perhaps a method, a number of times) or per time window it can: pass; delay;
accept and hang; trickle the response; reset mid-response; answer 503 sealed; 429 with or
without ``Retry-After``; 500; 400 "invalid request"; drop the response after the server processed the request; refuse
connections. It records every request with a timestamp, so tests can assert on backoff, rates
and counts. It runs its own event loop in a thread, so sync and async tests can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}


@dataclass
class Rule:
    action: str  # pass delay hang trickle reset sealed rate-limit error invalid drop refuse
    match: str = ""  # substring of the request path; "" matches every request
    times: int | None = None  # apply this many times, then the rule is spent
    seconds: float = 0.0  # delay, or the pause between trickled bytes
    retry_after: str | None = None
    until: float | None = None  # monotonic end of the rule's time window
    method: str = ""  # "GET", "POST", "DELETE"...; "" matches every method

    def applies(self, method: str, path: str, now: float) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.until is not None and now >= self.until:
            return False
        return self.match in path and self.method in ("", method)


@dataclass(frozen=True)
class Seen:
    at: float  # monotonic
    method: str
    path: str
    action: str


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    connections: int = 0  # client connections accepted so far

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()  # the connections accepted, until closed
        self._handlers: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        start = asyncio.start_server(self._accepted, "127.0.0.1", self.port)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._close_accepted()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def go_away(self) -> None:
        """Close the listening socket and every connection: clients see "connection refused"."""

        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()
            self._close_accepted()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)

    def come_back(self) -> None:
        """Listen again on the same port."""
        start = asyncio.start_server(self._accepted, "127.0.0.1", self.port)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def requests(self, match: str = "", since: float = 0.0) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if match in s.path and s.at >= since]

    def _choose(self, method: str, path: str) -> str:
        now = time.monotonic()
        with self._lock:
            for rule in self.rules:
                if rule.applies(method, path, now):
                    if rule.times is not None:
                        rule.times -= 1
                    self._current = rule
                    return rule.action
            self._current = Rule("pass")
            return "pass"

    # --- one client connection ----------------------------------------------------------------

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Known from the moment it is accepted: a handler task cancelled before its first step
        (go_away, stop) never runs its ``finally``, and its connection is closed here instead."""
        self._writers.add(writer)
        task = asyncio.get_running_loop().create_task(self._client(reader, writer))
        self._handlers.add(task)  # a strong reference while it runs
        task.add_done_callback(self._handlers.discard)

    def _close_accepted(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await _read_request(connection, reader)
                if request is None:
                    return
                method, target, headers, body = request
                action = self._choose(method, target)
                rule = self._current
                with self._lock:
                    self.seen.append(Seen(time.monotonic(), method, target, action))
                if not await self._answer(
                    action, rule, method, target, headers, body, connection, writer
                ):
                    return
                connection.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            self._writers.discard(writer)

    async def _answer(
        self,
        action: str,
        rule: Rule,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        connection: h11.Connection,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request as ``action`` says; False when the connection must end."""
        canned = {"sealed": (503, ["Vault is sealed"]), "rate-limit": (429, ["rate limit quota exceeded"]),
                  "error": (500, ["internal error"]), "invalid": (400, ["invalid request"])}  # fmt: skip
        if action == "refuse":
            writer.transport.abort()
            return False
        if action == "hang":
            await asyncio.sleep(3600)
            return False
        if action in canned:
            status, errors = canned[action]
            extra = [(b"Retry-After", rule.retry_after.encode())] if rule.retry_after else []
            await _respond(
                connection, writer, status, extra, json.dumps({"errors": errors}).encode()
            )
            return True
        if action == "delay":
            await asyncio.sleep(rule.seconds)
        status, answer_headers, answer = await self._forward(method, target, headers, body)
        if action == "drop":  # the server did the work; the client never hears about it
            writer.transport.abort()
            return False
        if action == "reset":
            head = _head(connection, status, answer_headers, len(answer))
            writer.write(head + answer[: len(answer) // 2])
            await writer.drain()
            writer.transport.abort()
            return False
        pause = rule.seconds if action == "trickle" else 0.0
        await _respond(connection, writer, status, answer_headers, answer, pause)
        return True

    async def _forward(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        upstream_socket = socket.socket()
        upstream_socket.setblocking(False)
        try:  # connect by hand: a connect cancelled at stop() must still close its socket
            await asyncio.get_running_loop().sock_connect(upstream_socket, self._upstream)
            reader, writer = await asyncio.open_connection(sock=upstream_socket)
        except BaseException:
            upstream_socket.close()
            raise
        upstream = h11.Connection(h11.CLIENT)
        sent = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        sent.append((b"Content-Length", str(len(body)).encode()))
        status, answer_headers, chunks = 0, [], []
        try:
            request = h11.Request(method=method, target=target, headers=sent)
            writer.write(upstream.send(request) or b"")
            if body:
                writer.write(upstream.send(h11.Data(data=body)) or b"")
            writer.write(upstream.send(h11.EndOfMessage()) or b"")
            while True:
                event = upstream.next_event()
                if event is h11.NEED_DATA:
                    upstream.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    answer_headers = [
                        (k, v) for k, v in event.headers if k.lower() not in HOP_BY_HOP
                    ]
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, answer_headers, b"".join(chunks)
        finally:
            writer.close()


async def _read_request(
    connection: h11.Connection, reader: asyncio.StreamReader
) -> tuple[str, str, list[tuple[bytes, bytes]], bytes] | None:
    method, target, headers, chunks = "", "", [], []
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            connection.receive_data(data)
            if not data and connection.their_state is h11.IDLE:
                return None
        elif isinstance(event, h11.Request):
            method, target = event.method.decode(), event.target.decode()
            headers = list(event.headers)
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return method, target, headers, b"".join(chunks)
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _head(
    connection: h11.Connection, status: int, headers: list[tuple[bytes, bytes]], length: int
) -> bytes:
    response = h11.Response(status_code=status,
                            headers=[*headers, (b"Content-Length", str(length).encode())])  # fmt: skip
    return connection.send(response) or b""


async def _respond(
    connection: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    pause: float = 0.0,
) -> None:
    writer.write(_head(connection, status, headers, len(body)))
    if pause:
        for index in range(len(body)):
            writer.write(connection.send(h11.Data(data=body[index : index + 1])) or b"")
            await writer.drain()
            await asyncio.sleep(pause)
    elif body:
        writer.write(connection.send(h11.Data(data=body)) or b"")
    writer.write(connection.send(h11.EndOfMessage()) or b"")
    with contextlib.suppress(ConnectionError):
        await writer.drain()
