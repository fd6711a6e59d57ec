"""HTTP/1.1 to Vault on asyncio streams, answers parsed by httptools, with a keep-alive pool per
event loop.

Why not aiohttp or requests: a cold ``stigmer-broker run`` must start in the time OpenBao Agent
does, and those clients alone cost hundreds of milliseconds to import on our machines.
httptools (llhttp, the parser of Node.js; uvicorn's) imports in ~3 ms where h11 took 15-20 ms,
and parses in C. A request is a few lines this module writes itself, its header values checked
for what HTTP forbids. This module knows nothing of Vault: it sends one request and reports
what happened, including whether the request could have reached the server (``sent``), which
the retry policy needs for requests that mint tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import httptools

from broker import heap
from broker.records import record

if TYPE_CHECKING:
    import ssl

IDLE_TIMEOUT = 15.0  # seconds a pooled connection may sit unused (well under Vault's own)
RECENT = 1.0  # seconds: a connection used this recently is not closed for idleness (Vault: 5 min)
MAX_IDLE_PER_ORIGIN = 32
READ_SIZE = 65536
MAX_HEAD_BYTES = 65536  # status line and headers (and chunk framing, trailers): no more


@record(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class TransportError(Exception):
    """A request got no usable answer. ``sent`` is False only when it surely never left."""

    def __init__(self, detail: str, sent: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.sent = sent


class ConnectFailed(TransportError):
    def __init__(self, detail: str) -> None:
        super().__init__(detail, sent=False)


class TLSFailed(TransportError):
    def __init__(self, detail: str) -> None:
        super().__init__(detail, sent=False)


class TimedOut(TransportError):
    pass


class Dropped(TransportError):
    """The connection closed or broke before the whole answer arrived."""


class TooLarge(TransportError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"answer larger than {limit} bytes", sent=True)


class BadHeader(TransportError):
    """A header HTTP cannot carry (a line break, a control character): never sent. The value
    is not repeated: it may be a token."""

    def __init__(self, name: str) -> None:
        super().__init__(f"header {name!r} holds a character HTTP forbids", sent=False)


_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed, CR/LF/NUL not
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110's token)
_TARGET = re.compile(r"[\x21-\x7e]+")  # a request target: visible ASCII, no space


def request_head(method: str, target: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """The request line and headers, checked: nothing can smuggle a line into the request."""
    if not _TOKEN.fullmatch(method):
        raise BadHeader("method")
    if not _TARGET.fullmatch(target):
        raise BadHeader("target")
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise BadHeader("name")
        if _FORBIDDEN_IN_VALUE.search(value):
            raise BadHeader(name)
        lines.append(f"{name}: {value}")
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise BadHeader("value") from None


@record(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, address: str) -> Origin:
        parts = urlsplit(address)
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname or "", parts.port or default)

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"


class _Stale(Exception):
    """A pooled connection the server had closed: nothing of the request was answered."""


class _Answer:
    """One response, from the callbacks of httptools' parser."""

    def __init__(self, max_body: int) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.max_body = max_body
        self.headers: dict[str, str] = {}  # lower-case names; a repeated one: the last
        self.chunks: list[bytes] = []
        self.size = 0
        self.received = 0  # every byte of the answer, framing included
        self.too_large = False
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.messages = 0  # more than one: the server sent what we did not ask for

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            self.too_large = True
        else:
            self.chunks.append(bytes(body))

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:  # informational (100 Continue): skip it
            self.headers, self.head_done, self.messages = {}, False, self.messages - 1
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # only valid in the callbacks

    def feed(self, data: bytes) -> None:
        """Parse ``data``; an answer whose head, or whole, outgrows its limit is refused (the
        parser keeps an unfinished header in memory)."""
        self.received += len(data)
        if self.received > self.max_body + MAX_HEAD_BYTES:
            raise TooLarge(self.max_body)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self.complete:
                raise
            self.keep_alive = False  # bytes after the answer: do not reuse the connection
        if self.too_large:
            raise TooLarge(self.max_body)
        if not self.head_done and self.received > MAX_HEAD_BYTES:
            raise TooLarge(MAX_HEAD_BYTES)

    def ends_at_close(self) -> bool:
        """A body with neither a length nor chunks ends where the connection does."""
        encoding = self.headers.get("transfer-encoding", "").lower()
        return self.head_done and "content-length" not in self.headers and not encoding


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle = True  # between two exchanges, the last one whole and kept alive
        self.idle_since = time.monotonic()
        self.reused = False

    def reusable(self) -> bool:
        """Between two exchanges, open at both ends (a server's close may already be known)."""
        return self.idle and not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.idle = False
        self.writer.close()

    async def exchange(
        self, head: bytes, body: bytes, max_body: int
    ) -> tuple[int, dict[str, str], bytes]:
        self.idle = False
        answer = _Answer(max_body)
        try:
            self.writer.write(head + body)
            await self.writer.drain()
        except OSError:
            if self.reused:
                raise _Stale() from None
            raise
        answered = False
        while not answer.complete:
            data = await self._read()
            if not data:
                if not answered and self.reused:
                    raise _Stale()
                if answer.ends_at_close():
                    break  # whole; the connection is not reused
                raise Dropped("connection closed before the answer", sent=True)
            answered = True
            answer.feed(data)
        self.idle = answer.complete and answer.keep_alive and answer.messages == 1
        return answer.parser.get_status_code(), answer.headers, b"".join(answer.chunks)

    async def _read(self) -> bytes:
        try:
            return await self.reader.read(READ_SIZE)
        except ConnectionResetError:
            return b""  # a reset before any answer is the same as a close


class Transport:
    """Sends requests over pooled keep-alive connections; one pool per event loop."""

    def __init__(
        self, ssl_context: ssl.SSLContext | None = None, server_hostname: str = ""
    ) -> None:
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._pools: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[Origin, list[_Connection]]
        ] = weakref.WeakKeyDictionary()
        self._sweeping: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

    def _pool(self, origin: Origin) -> list[_Connection]:
        pools = self._pools.setdefault(asyncio.get_running_loop(), {})
        return pools.setdefault(origin, [])

    async def _connect(self, origin: Origin) -> _Connection:
        context = self._ssl if origin.scheme == "https" else None
        if origin.scheme == "https" and context is None:
            import ssl

            context = ssl.create_default_context()
        hostname = (self._server_hostname or origin.host) if context else None
        try:
            reader, writer = await asyncio.open_connection(
                origin.host, origin.port, ssl=context, server_hostname=hostname
            )
        except _tls_error() as exc:
            raise TLSFailed(_ssl_detail(exc)) from None
        except OSError as exc:
            raise ConnectFailed(exc.strerror or type(exc).__name__) from None
        return _Connection(reader, writer)

    def _checkout(self, origin: Origin, recent_only: bool = False) -> _Connection | None:
        """A pooled connection (the most recently used first). ``recent_only``: one used in the
        last ``RECENT`` seconds or none, and never re-sent as stale (see ``request``)."""
        pool = self._pool(origin)
        while pool:
            idle = time.monotonic() - pool[-1].idle_since
            if recent_only and idle >= RECENT:
                return None  # the others are older still
            connection = pool.pop()
            if idle < IDLE_TIMEOUT and connection.reusable():
                connection.reused = not recent_only
                return connection
            connection.close()
        return None

    def _checkin(self, origin: Origin, connection: _Connection) -> None:
        pool = self._pool(origin)
        if connection.reusable() and len(pool) < MAX_IDLE_PER_ORIGIN:
            connection.idle_since = time.monotonic()
            pool.append(connection)  # the pool runs from the longest idle to the latest
            self._sweep_in(IDLE_TIMEOUT)
        else:
            connection.close()

    def _sweep_in(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        if loop not in self._sweeping:
            self._sweeping.add(loop)
            loop.call_later(delay, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for ``IDLE_TIMEOUT``, though no request comes to find
        them: after a burst, each kept connection holds buffers (~0.6 MB over TLS) and a
        worker on the server."""
        loop = asyncio.get_running_loop()
        self._sweeping.discard(loop)
        now, next_due, closed = time.monotonic(), None, 0
        for pool in self._pools.get(loop, {}).values():
            while pool and now - pool[0].idle_since >= IDLE_TIMEOUT:
                pool.pop(0).close()
                closed += 1
            if pool:
                due = pool[0].idle_since + IDLE_TIMEOUT
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self._sweep_in(max(0.0, next_due - now))
        if closed:
            loop.call_later(1.0, heap.trim)  # once their buffers are freed (TLS closes later)

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        timeout: float,
        max_body: int,
        fresh: bool = False,
    ) -> Response:
        """One request; raises a TransportError subclass when there is no usable answer.

        A pooled connection that turns out closed by the server (nothing answered) is replaced
        once by a new one. ``fresh``: for requests that must not be sent twice (a login, a
        token), where a server's close of an idle connection would be indistinguishable from a
        lost answer: only a connection used in the last ``RECENT`` seconds, which no server
        closes for idleness, or a new one; either way a broken exchange is a lost answer."""
        head = request_head(
            method, target, [("Host", origin.authority), ("Content-Length", str(len(body))),
                             *headers],
        )  # fmt: skip
        connection: _Connection | None = None
        connected = False
        try:
            async with asyncio.timeout(timeout):
                connection = self._checkout(origin, recent_only=fresh) or await self._connect(
                    origin
                )
                connected = True
                try:
                    status, answer_headers, data = await connection.exchange(head, body, max_body)
                except _Stale:
                    connection.close()
                    connection = await self._connect(origin)
                    status, answer_headers, data = await connection.exchange(head, body, max_body)
        except TimeoutError:
            _discard(connection)
            raise TimedOut("no complete answer in time", sent=connected) from None
        except TransportError:
            _discard(connection)
            raise
        except _tls_error() as exc:
            _discard(connection)
            if "ALERT" in (exc.reason or ""):  # the server refused us in the handshake
                raise TLSFailed(_ssl_detail(exc)) from None
            raise Dropped(f"connection broke ({type(exc).__name__})", sent=True) from None
        except (OSError, httptools.HttpParserError, asyncio.IncompleteReadError) as exc:
            _discard(connection)
            raise Dropped(f"connection broke ({type(exc).__name__})", sent=True) from None
        except BaseException:  # cancelled mid-exchange: the connection's state is unknown
            _discard(connection)
            raise
        self._checkin(origin, connection)
        return Response(status, answer_headers, data)

    async def aclose(self) -> None:
        """Close this loop's idle connections."""
        pools = self._pools.pop(asyncio.get_running_loop(), {})
        writers = [c.writer for pool in pools.values() for c in pool]
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(OSError):  # ssl.SSLError is one
                await writer.wait_closed()


def _discard(connection: _Connection | None) -> None:
    if connection is not None:
        connection.close()


class _NeverRaised(Exception):
    """What ``_tls_error`` names in a process that never loaded ssl: nothing raises it."""


def _tls_error() -> type[ssl.SSLError]:
    """``ssl.SSLError``, if this process loaded ssl. A ``run`` whose Vault addresses are all
    plain http keeps ssl out (~8-9 ms of its start, see ``broker.cli``): no TLS error can
    happen there, so nothing needs catching."""
    module = sys.modules.get("ssl")
    return module.SSLError if module is not None else cast("type[ssl.SSLError]", _NeverRaised)


def _ssl_detail(error: ssl.SSLError) -> str:
    import ssl  # loaded: a TLS error happened

    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate not trusted or wrong name ({error.verify_message})"
    reason = error.reason or type(error).__name__
    if "CERTIFICATE_REQUIRED" in reason:
        return "the server requires a client certificate (VAULT_CLIENT_CERT, VAULT_CLIENT_KEY)"
    if any(word in reason for word in ("BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")):
        return f"the server refused the client certificate ({reason})"
    return f"TLS error ({reason})"
