"""The sidecar's HTTP/1.1 server (``broker.httpserver``) against raw sockets: routing, limits,
deadlines, keep-alive and a handler's crash, each answered the way an HTTP client expects."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest

from broker import logs
from broker.httpserver import HttpServer, Request, Response, Router, json_response

pytestmark = pytest.mark.unit


async def echo(request: Request) -> Response:
    return json_response({"params": dict(request.params), "query": dict(request.query),
                          "body": request.body.decode(), "method": request.method})  # fmt: skip


async def crash(request: Request) -> Response:
    raise RuntimeError("a bug")


@pytest.fixture
async def address() -> AsyncIterator[tuple[str, int]]:
    router = Router()
    router.add("GET", "/v1/things/{id}", echo)
    router.add("POST", "/v1/things/{id}/do", echo)
    router.add("GET", "/crash", crash)
    server = HttpServer(router, max_body=1000, header_timeout=0.5)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    host, port = listener.sockets[0].getsockname()[:2]
    yield host, port
    listener.close()
    await server.close()


async def exchange(address: tuple[str, int], *raw: bytes, pause: float = 0.0) -> bytes:
    """Send ``raw`` pieces (``pause`` apart), then read until the server closes."""
    reader, writer = await asyncio.open_connection(*address)
    for piece in raw:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(pause)
    try:
        return await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()


def answers(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a stream of responses (each with a Content-Length) into (status, headers, body)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        pairs = (line.split(": ", 1) for line in lines[1:])
        headers = {name.lower(): value for name, value in pairs}
        length = int(headers["content-length"])
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return out


async def test_keep_alive_serves_requests_one_after_another(address: tuple[str, int]) -> None:
    raw = (
        b"GET /v1/things/a%2Fb%20c?x=1&y= HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /v1/things/t/do HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /v1/things/%C3%A9 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    (s1, h1, b1), (s2, _, b2), (s3, h3, b3) = answers(await exchange(address, raw))
    assert (s1, s2, s3) == (200, 200, 200)
    assert json.loads(b1)["params"] == {"id": "a/b c"}  # decoded after the split
    assert json.loads(b1)["query"] == {"x": "1", "y": ""}
    assert json.loads(b2) == {"params": {"id": "t"}, "query": {}, "body": "hello",
                              "method": "POST"}  # fmt: skip
    assert json.loads(b3)["params"] == {"id": "é"}
    assert h1["content-type"] == "application/json" and h3["connection"] == "close"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n", 404),
        (b"DELETE /v1/things/x HTTP/1.1\r\nHost: h\r\n\r\n", 405),
        (b"GET /v1/things/%FF HTTP/1.1\r\nHost: h\r\n\r\n", 400),  # not UTF-8
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"y" * 100_000 + b"\r\n\r\n", 431),
        (b"POST /v1/things/x/do HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n", 413),
        (b"GET /crash HTTP/1.1\r\nHost: h\r\n\r\n", 500),
    ],
)
async def test_bad_requests_get_a_problem_and_a_status(
    address: tuple[str, int], raw: bytes, status: int
) -> None:
    (got, headers, body), *_ = answers(await exchange(address, raw))
    assert got == status
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["status"] == status
    if status == 405:
        assert headers["allow"] == "GET"


async def test_a_chunked_body_over_the_limit_is_refused_and_the_connection_closed(
    address: tuple[str, int],
) -> None:
    chunk = b"3e8\r\n" + b"x" * 1000 + b"\r\n"
    raw = b"POST /v1/things/x/do HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    (status, headers, _), *more = answers(await exchange(address, raw + chunk + chunk))
    assert status == 413 and headers["connection"] == "close" and more == []


async def test_a_crash_is_logged_by_type_and_the_connection_keeps_serving(
    address: tuple[str, int],
) -> None:
    caught: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = caught.append  # type: ignore[method-assign]
    logging.getLogger(logs.LOGGER_NAME).addHandler(handler)  # whether it propagates or not
    raw = b"GET /crash HTTP/1.1\r\nHost: h\r\n\r\nGET /v1/things/y HTTP/1.1\r\nHost: h\r\n\r\n"
    statuses = [status for status, _, _ in answers(await exchange(address, raw))]
    assert statuses == [500, 200]
    logging.getLogger(logs.LOGGER_NAME).removeHandler(handler)
    (record,) = [r for r in caught if r.getMessage() == "request failed"]
    assert record.fields["error"] == "RuntimeError"  # type: ignore[attr-defined]
    assert "a bug" not in repr(record.__dict__)  # the type, never the message


async def test_deadlines_close_silent_and_slow_connections(address: tuple[str, int]) -> None:
    started = asyncio.get_running_loop().time()
    assert await exchange(address) == b""  # nothing sent: closed at the header deadline
    assert asyncio.get_running_loop().time() - started < 2
    slow_headers = [b"GET /v1/things/x HTTP/1.1\r\n", b"X: 1\r\n", b"Y: 2\r\n", b"Z: 3\r\n"]
    assert await exchange(address, *slow_headers, pause=0.2) == b""  # 0.5 s for all of them
    head = b"POST /v1/things/x/do HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n"
    (status, _, _), *_ = answers(await exchange(address, head, b"abc", pause=0.7))
    assert status == 408


async def test_expect_100_continue_is_answered(address: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"POST /v1/things/x/do HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 2\r\n\r\n")  # fmt: skip
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 100")
    writer.write(b"ok")
    await reader.readline()  # the blank line after the 100
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_closing_the_server_under_an_idle_connection_reports_no_error() -> None:
    """``close`` cancels a connection waiting for its next request: the connection closes and
    the event loop hears of no unhandled exception."""
    reported: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))
    server = HttpServer(Router(), max_body=10)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname()[:2])
    writer.write(b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n")  # answered; then it idles
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 404")
    listener.close()
    await server.close()
    await asyncio.sleep(0.05)  # the connection tasks' done callbacks
    try:
        rest = await asyncio.wait_for(reader.read(-1), 5)  # the 404's body, then closed
        assert rest.endswith(b"}")
        assert reported == []
    finally:
        writer.close()
