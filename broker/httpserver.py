"""A small HTTP/1.1 server on asyncio streams, parsed by h11: the sidecar's socket and probes.

Why not aiohttp's server: the sidecar must idle in under 40 MB, and importing ``aiohttp.web``
alone costs ~12 MB of it (and ~100 ms of start-up). The sidecar serves a handful of JSON
routes to a few local callers, which h11 does well.

What it does: routes ``(method, /path/{param}/…)`` to handlers; percent-decodes each path
segment after splitting (``%2F`` stays inside its segment); reads a whole body up to a size
limit (413) within a deadline (408); gives a request's headers a deadline too, which also
closes an idle keep-alive connection; answers 404/405 for unknown routes and 400 (or h11's
hint, e.g. 431) to a request it cannot parse; logs a handler's crash by type, answers 500 and
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote

import h11

from broker import logs
from broker.protocol import Problem
from broker.records import field, record

READ_SIZE = 65536
MAX_HEADER_BYTES = 16 * 1024
JSON = "application/json"
PROBLEM = "application/problem+json"


@record(frozen=True)
class Request:
    method: str
    path: str
    params: Mapping[str, str]  # the route's {names}, percent-decoded
    query: Mapping[str, str]  # the last value of each name
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    socket: socket.socket | None  # the connection's socket (its peer's credentials)


@record
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


def json_response(document: Any, status: int = 200, content_type: str = JSON) -> Response:
    return Response(status, json.dumps(document).encode(), content_type)


def problem_response(status: int, title: str, detail: str) -> Response:
    return json_response(Problem(status, title, detail).to_json(), status, PROBLEM)


class BadPath(ValueError):
    """A path segment that is not percent-encoded UTF-8."""


@record(frozen=True)
class _Route:
    method: str
    segments: tuple[str, ...]
    handler: Handler

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for pattern, raw in zip(self.segments, segments, strict=True):
            if pattern.startswith("{"):
                try:
                    params[pattern[1:-1]] = unquote(raw, errors="strict")
                except UnicodeDecodeError:
                    raise BadPath(raw) from None
            elif pattern != raw:
                return None
        return params


class Router:
    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._routes.append(_Route(method, tuple(path.strip("/").split("/")), handler))

    def find(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | Response:
        segments = path.strip("/").split("/")
        allowed: list[str] = []
        for route in self._routes:
            params = route.match(segments)
            if params is None:
                continue
            if route.method == method:
                return route.handler, params
            allowed.append(route.method)
        if allowed:
            response = problem_response(405, "Method Not Allowed", f"{method} is not allowed here")
            response.headers.append(("Allow", ", ".join(allowed)))
            return response
        return problem_response(404, "Not Found", "no such route")


class HttpServer:
    """Serves ``router`` on connections handed to ``handle`` (by a listener or a gate)."""

    def __init__(self, router: Router, *, max_body: int, header_timeout: float = 10.0) -> None:
        self.router = router
        self.max_body = max_body
        self.header_timeout = header_timeout
        self._connections: set[asyncio.Task[None]] = set()
        self._listeners: list[asyncio.Server] = []

    def protocol(self) -> asyncio.StreamReaderProtocol:
        """A protocol for one accepted socket (``loop.connect_accepted_socket``)."""
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(), self.handle)

    async def listen_tcp(self, address: str) -> None:
        """Also accept TCP connections on ``HOST:PORT`` (until ``close``)."""
        host, _, port = address.rpartition(":")
        server = await asyncio.start_server(self.handle, host or "127.0.0.1", int(port))
        self._listeners.append(server)

    async def close(self) -> None:
        """Stop listening and close every connection; a request in flight is cancelled."""
        for listener in self._listeners:
            listener.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await _Connection(self, reader, writer).serve()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # ``close``: end quietly. Python 3.11's StreamReaderProtocol asks a cancelled
            # connection task for its exception and logs the CancelledError it gets as an
            # "Unhandled exception in client_connected_cb".
            pass
        finally:
            self._connections.discard(task)
            writer.close()


class _Connection:
    def __init__(
        self, server: HttpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.socket: socket.socket | None = writer.get_extra_info("socket")

    async def serve(self) -> None:
        """Requests one after another until either side closes or a deadline passes."""
        while True:
            try:
                async with asyncio.timeout(self.server.header_timeout):
                    head = await self._next()
                if not isinstance(head, h11.Request):
                    return  # the peer closed
                response = await self._answer(head)
            except TimeoutError:
                if self.h11.their_state is h11.SEND_BODY:  # headers arrived, the body did not
                    detail = "the request body did not arrive in time"
                    await self._send(problem_response(408, "Request Timeout", detail))
                return
            except h11.RemoteProtocolError as exc:
                if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    await self._send(problem_response(status, "Bad Request", "malformed request"))
                return
            await self._send(response)
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return  # the body was not read (refused) or the peer asked to close
            self.h11.start_next_cycle()

    async def _next(self) -> Any:
        """The next h11 event that is not NEED_DATA (None once the peer has closed)."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return None if isinstance(event, h11.ConnectionClosed) else event
            if self.h11.they_are_waiting_for_100_continue:
                continue_ = h11.InformationalResponse(status_code=100, headers=[])
                self.writer.write(self.h11.send(continue_))
            self.h11.receive_data(await self.reader.read(READ_SIZE))

    async def _answer(self, head: h11.Request) -> Response:
        target = head.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        try:
            found = self.server.router.find(head.method.decode("ascii", "replace"), path)
        except BadPath:
            return problem_response(400, "Bad Request", "the path is not percent-encoded UTF-8")
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers}
        length = int(headers.get("content-length", "0"))
        body = None if length > self.server.max_body else await self._body()
        if body is None:  # refused unread: the connection closes after the answer
            detail = f"the body is larger than {self.server.max_body} bytes"
            return problem_response(413, "Payload Too Large", detail)
        if isinstance(found, Response):
            return found
        handler, params = found
        request = Request(
            method=head.method.decode("ascii"), path=path, params=params,
            query=dict(parse_qsl(query, keep_blank_values=True)), headers=headers, body=body,
            socket=self.socket,
        )  # fmt: skip
        try:
            return await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a handler: log its type, answer 500, keep serving
            logs.event("request failed", level=40, error=type(exc).__name__, path=path)
            return problem_response(500, "Internal Server Error", "the request failed")

    async def _body(self) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(self.server.header_timeout):
            while True:
                event = await self._next()
                if event is None:
                    raise ConnectionResetError("the peer closed during the body")
                if isinstance(event, h11.EndOfMessage):
                    return b"".join(chunks)
                size += len(event.data)
                if size > self.server.max_body:
                    return None
                chunks.append(event.data)

    async def _send(self, response: Response) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers,
        ]
        if self.h11.their_state is not h11.DONE:
            headers.append(("Connection", "close"))  # the rest of the request is not read
        with contextlib.suppress(h11.LocalProtocolError):
            head = h11.Response(status_code=response.status, headers=headers)
            parts = (head, h11.Data(data=response.body), h11.EndOfMessage())
            self.writer.write(b"".join(self.h11.send(part) or b"" for part in parts))  # one send
        await self.writer.drain()
