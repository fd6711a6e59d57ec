"""The Vault client's HTTP/1.1 transport (``broker.vault.transport``) against raw HTTP servers
that answer in every framing a server may use: lengths, chunks, a close, trickled bytes, too
much, garbage, bytes after the answer, a kept-alive connection the server has closed. What is
sent is checked too: nothing may smuggle a line into a request."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import pytest

from broker.config import VaultSettings, plain_http_only
from broker.errors import VaultConfigError
from broker.vault import VaultClient
from broker.vault import transport as transport_module
from broker.vault.client import escape_path
from broker.vault.tls import ssl_context
from broker.vault.transport import (
    BadHeader,
    Dropped,
    Origin,
    TooLarge,
    Transport,
    request_head,
)

pytestmark = pytest.mark.unit

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


@dataclass
class RawServer:
    """Reads each request whole, then lets ``answer`` write bytes; counts connections."""

    answer: Answer
    connections: int = 0
    closed: int = 0  # connections the client closed (or this server ended)
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                self.requests.append(head + await reader.readexactly(length))
                if not await self.answer(reader, writer, len(self.requests)):
                    return
        finally:
            self.closed += 1
            writer.close()


Serve = Callable[[Answer], Awaitable[tuple[RawServer, Origin]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    listeners: list[asyncio.Server] = []

    async def start(answer: Answer) -> tuple[RawServer, Origin]:
        server = RawServer(answer)
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        listeners.append(listener)
        server.port = listener.sockets[0].getsockname()[1]
        return server, Origin("http", "127.0.0.1", server.port)

    yield start
    for listener in listeners:
        listener.close()


def canned(raw: bytes, keep: bool = True) -> Answer:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: int) -> bool:
        writer.write(raw)
        await writer.drain()
        return keep

    return answer


async def get(transport: Transport, origin: Origin, max_body: int = 1 << 20) -> tuple[int, bytes]:
    answer = await transport.request(origin, "GET", "/v1/x", [("X-Vault-Token", "t")], b"",
                                     5.0, max_body)  # fmt: skip
    return answer.status, answer.body


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def test_a_kept_alive_connection_carries_the_next_request(serve: Serve) -> None:
    server, origin = await serve(canned(OK))
    transport = Transport()
    assert await get(transport, origin) == (200, b"{}")
    assert await get(transport, origin) == (200, b"{}")
    assert server.connections == 1
    await transport.aclose()


async def test_an_idle_connection_is_closed_though_no_request_comes(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a burst, kept connections hold buffers (~0.6 MB each over TLS) and a server worker:
    they close after IDLE_TIMEOUT on their own, not only when a later request finds them."""
    monkeypatch.setattr(transport_module, "IDLE_TIMEOUT", 1.0)
    server, origin = await serve(canned(OK))
    transport = Transport()
    await asyncio.gather(*(get(transport, origin) for _ in range(3)))
    assert server.connections == 3 and server.closed == 0
    await asyncio.sleep(0.5)
    assert await get(transport, origin) == (200, b"{}")  # one stays in use a while longer
    await asyncio.sleep(0.75)  # the burst's idle for 1.25 s, the one used since for 0.75 s
    assert server.closed == 2
    await asyncio.sleep(0.75)
    assert server.closed == 3
    assert await get(transport, origin) == (200, b"{}")  # a new connection when needed
    assert server.connections == 4
    await transport.aclose()


@pytest.mark.parametrize(
    ("raw", "keep"),
    [(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", False),
     (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: close\r\n"
      b"Content-Length: 2\r\n\r\n{}", False),  # an informational answer first: skipped
     (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", False),
     (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{}", False),  # the close ends the body
     (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 200 OK\r\n", True)],  # extra
    ids=["connection-close", "continue-first", "http-1.0", "body-to-close", "bytes-after"],
)  # fmt: skip
async def test_an_answer_the_server_ends_is_whole_and_its_connection_not_reused(
    serve: Serve, raw: bytes, keep: bool
) -> None:
    server, origin = await serve(canned(raw, keep))
    transport = Transport()
    assert await get(transport, origin) == (200, b"{}")
    assert await get(transport, origin) == (200, b"{}")
    assert server.connections == 2
    await transport.aclose()


async def test_chunks_and_headers_trickled_byte_by_byte_are_put_together(serve: Serve) -> None:
    raw = (b"HTTP/1.1 200 OK\r\nX-Vault-Index: abc\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\n{\"a\r\n5\r\n\": 1}\r\n0\r\n\r\n")  # fmt: skip

    async def trickle(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: int) -> bool:
        for byte in raw:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0)
        return True

    server, origin = await serve(trickle)
    transport = Transport()
    answer = await transport.request(origin, "GET", "/v1/x", [], b"", 5.0, 1000)
    assert (answer.status, answer.body) == (200, b'{"a": 1}')
    assert answer.headers["x-vault-index"] == "abc"
    assert await get(transport, origin) == (200, b'{"a": 1}') and server.connections == 1
    await transport.aclose()


async def test_an_answer_over_the_limit_is_refused(serve: Serve) -> None:
    _, origin = await serve(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100))
    transport = Transport()
    with pytest.raises(TooLarge):
        await get(transport, origin, max_body=99)
    assert await get(transport, origin, max_body=100) == (200, b"x" * 100)
    await transport.aclose()


async def test_endless_headers_are_refused_without_growing(serve: Serve) -> None:
    async def endless(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 4 MiB of one header value, never ended
                writer.write(b"a" * 65536)
                await writer.drain()
        return False

    _, origin = await serve(endless)
    transport = Transport()
    with pytest.raises(TooLarge) as refused:
        await get(transport, origin, max_body=1 << 30)
    assert "65536" in str(refused.value)
    await transport.aclose()


@pytest.mark.parametrize(
    "raw",
    [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x"],
    ids=["not-http", "closed-mid-body", "two-lengths"],
)  # fmt: skip
async def test_a_broken_answer_is_dropped_and_said_to_have_been_sent(
    serve: Serve, raw: bytes
) -> None:
    _, origin = await serve(canned(raw, keep=False))
    transport = Transport()
    with pytest.raises(Dropped) as dropped:
        await get(transport, origin)
    assert dropped.value.sent
    await transport.aclose()


async def test_a_connection_the_server_closed_while_idle_is_replaced_once(serve: Serve) -> None:
    server, origin = await serve(canned(OK, keep=False))  # answers, then closes
    transport = Transport()
    assert await get(transport, origin) == (200, b"{}")
    await asyncio.sleep(0.05)
    assert await get(transport, origin) == (200, b"{}")
    assert server.connections == 2 and len(server.requests) == 2  # sent once per connection
    await transport.aclose()


async def test_what_is_sent_is_exactly_the_request(serve: Serve) -> None:
    server, origin = await serve(canned(OK))
    transport = Transport()
    await transport.request(origin, "POST", "/v1/secret/data/a%2Fb?x=1",
                            [("X-Vault-Token", "hvs.t"), ("Content-Type", "application/json")],
                            b'{"k": "v"}', 5.0, 1000)  # fmt: skip
    assert server.requests == [
        b"POST /v1/secret/data/a%2Fb?x=1 HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{server.port}\r\n".encode()
        + b"Content-Length: 10\r\nX-Vault-Token: hvs.t\r\nContent-Type: application/json\r\n"
        b'\r\n{"k": "v"}'
    ]
    await transport.aclose()


@pytest.mark.parametrize(
    ("method", "target", "header"),
    [("GET", "/v1/x", ("X-Vault-Token", "hvs.a\r\nX-Evil: 1")),
     ("GET", "/v1/x", ("X-Vault-Token", "hvs.a\nb")),
     ("GET", "/v1/x", ("X-Vault-Token", "nul\x00")),
     ("GET", "/v1/x", ("X-Vault-Token", "\u20ac")),
     ("GET", "/v1/x", ("Bad Name", "v")),
     ("GET", "/v1/x HTTP/1.1\r\nX-Evil: 1\r\n", ("A", "b")),
     ("GET", "/v1/a b", ("A", "b")),
     ("G ET", "/v1/x", ("A", "b"))],
)  # fmt: skip
async def test_nothing_can_smuggle_a_line_into_a_request(
    serve: Serve, method: str, target: str, header: tuple[str, str]
) -> None:
    with pytest.raises(BadHeader) as refused:
        request_head(method, target, [header])
    assert header[1] not in str(refused.value) or header[1] in ("v", "b")  # a token is not shown
    server, origin = await serve(canned(OK))
    transport = Transport()
    with pytest.raises(BadHeader) as never_sent:
        await transport.request(origin, method, target, [header], b"", 5.0, 1000)
    assert not never_sent.value.sent and server.requests == []
    await transport.aclose()


async def test_a_token_with_a_line_break_is_a_configuration_error_that_does_not_show_it(
    serve: Serve,
) -> None:
    server, _ = await serve(canned(OK))
    client = VaultClient(VaultSettings.local(f"http://127.0.0.1:{server.port}", "hvs.CANARY\nX"))
    with pytest.raises(VaultConfigError) as refused:
        await client.get("sys/health")
    assert "X-Vault-Token" in str(refused.value) and "CANARY" not in str(refused.value)
    assert refused.value.hint and server.requests == []
    await client.aclose()


@pytest.mark.parametrize(
    ("path", "sent"),
    [
        (
            "stigmer/data/execution-contexts/acme/run-1.a_b~c",
            "stigmer/data/execution-contexts/acme/run-1.a_b~c",
        ),
        ("kv/data/a b/c?d#e", "kv/data/a%20b/c%3Fd%23e"),
        ("kv/data/%2F/é", "kv/data/%252F/%C3%A9"),
        ("kv/data/x\r\nHost: evil", "kv/data/x%0D%0AHost%3A%20evil"),
    ],
)
def test_paths_are_escaped_segment_by_segment(path: str, sent: str) -> None:
    assert escape_path(path) == sent


@pytest.mark.parametrize(
    ("environ", "plain"),
    [
        ({"VAULT_ADDR": "http://127.0.0.1:8200"}, True),
        ({"BAO_ADDR": "http://vault:8200,http://vault-2:8200"}, True),
        ({"VAULT_ADDR": "HTTP://vault:8200"}, True),
        ({"VAULT_ADDR": "http://vault:8200,https://vault-2:8200"}, False),
        ({"VAULT_ADDR": "http://vault:8200,HTTPS://vault-2:8200"}, False),
        ({"VAULT_ADDR": "https://vault:8200", "BAO_ADDR": "http://vault:8200"}, False),
        ({"VAULT_ADDR": "ftp://vault"}, False),
        ({}, False),
    ],
)
def test_only_all_plain_http_addresses_let_run_leave_ssl_out(
    environ: dict[str, str], plain: bool
) -> None:
    assert plain_http_only(environ) is plain


def test_an_https_address_in_capitals_gets_the_tls_settings_too() -> None:
    """The transport takes ``HTTPS://`` for https (URL schemes ignore case): so must the TLS
    settings, or such an address would skip VAULT_CACERT and the client certificate."""
    settings = replace(VaultSettings.local("HTTPS://127.0.0.1:8200"), skip_verify=True)
    context = ssl_context(settings)
    assert context is not None and context.verify_mode == ssl.CERT_NONE
    assert ssl_context(VaultSettings.local("http://127.0.0.1:8200")) is None
