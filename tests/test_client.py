"""``broker.client.BrokerClient``'s keep-alive pool against a small HTTP/1.1 server on a Unix
socket that counts its connections and can close them behind the client's back."""

from __future__ import annotations

import gc
import http.server
import json
import os
import socket
import socketserver
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from broker.client import BrokerClient

pytestmark = pytest.mark.unit


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    connections = 0
    close_after_answer = False  # the server closes each connection once it has answered
    connection_close_header = False  # the server answers with "Connection: close"
    lock = threading.Lock()

    def count(self) -> None:
        with self.lock:
            self.connections += 1


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.count()

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length else b""
        payload = json.dumps({"method": self.command, "path": self.path,
                              "body": body.decode()}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if self.server.connection_close_header:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        if self.server.close_after_answer:
            self.close_connection = True  # closed without telling the client

    do_GET = do_PUT = do_DELETE = do_POST = answer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(str(tmp_path / "broker.sock"), Handler)
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    yield running
    running.shutdown()
    running.server_close()


def test_requests_one_after_another_share_one_connection(server: Server) -> None:
    with BrokerClient(server.server_address) as client:
        assert client.get("a")["path"] == "/v1/executions/a"
        assert client.end("a")["method"] == "DELETE"
        assert client.resolve("a", {"x": 1})["body"] == '{"x": 1}'
    assert server.connections == 1


def test_a_connection_the_server_closed_while_idle_is_replaced(server: Server) -> None:
    server.close_after_answer = True
    client = BrokerClient(server.server_address)
    answers = [client.get(f"e{i}")["path"] for i in range(3)]
    assert answers == [f"/v1/executions/e{i}" for i in range(3)]
    assert server.connections == 3  # each request found its kept connection closed: a new one
    client.close()


def test_an_answer_with_connection_close_is_not_kept(server: Server) -> None:
    server.connection_close_header = True
    with BrokerClient(server.server_address) as client:
        client.get("a")
        client.get("b")
        assert client._idle == []
    assert server.connections == 2


def test_a_connection_idle_too_long_is_not_reused(server: Server) -> None:
    with BrokerClient(server.server_address) as client:
        client.IDLE_SECONDS = 0.0
        client.get("a")
        client.get("b")
    assert server.connections == 2


def test_a_new_connection_that_fails_raises_instead_of_retrying(tmp_path: Path) -> None:
    """Only a reused connection is retried: a sidecar that closes every new connection at once
    gives an error, not a loop."""
    path = tmp_path / "closing.sock"

    class Closing(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.close()

    closing = socketserver.ThreadingUnixStreamServer(str(path), Closing)
    threading.Thread(target=closing.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConnectionError), BrokerClient(path) as client:
            client.get("a")
    finally:
        closing.shutdown()
        closing.server_close()


def test_threads_share_the_client_and_at_most_a_few_connections_stay(server: Server) -> None:
    client = BrokerClient(server.server_address)
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda i: client.get(f"t{i}")["path"], range(64)))
    assert paths == [f"/v1/executions/t{i}" for i in range(64)]
    assert 1 <= server.connections <= 64
    assert len(client._idle) <= BrokerClient.MAX_IDLE
    client.close()
    assert client._idle == []


def test_a_sidecar_whose_backlog_is_full_is_waited_for(tmp_path: Path) -> None:
    """A Unix socket with a full listen backlog refuses a connect at once (EAGAIN), where TCP
    would wait: the client waits too, within its timeout, instead of failing a burst."""
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    with pytest.raises(BlockingIOError):  # fill the backlog until the kernel refuses
        for _ in range(16):
            waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            queued.append(waiting)
            waiting.setblocking(False)
            waiting.connect(path)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"

    def accept_later() -> None:
        threading.Event().wait(0.3)  # the client's first tries find the backlog full
        for waiting in queued:
            waiting.close()  # accepted below, they read as closed at once
        while True:
            connection, _ = listener.accept()
            connection.settimeout(5)
            request = connection.recv(65536)
            if request.startswith(b"GET"):
                connection.sendall(answer)
            connection.close()
            if request:
                return

    started = time.monotonic()
    with pytest.raises(BlockingIOError), BrokerClient(path, timeout=0.3) as impatient:
        impatient.get("a")  # nobody accepts: it gives up once its timeout is spent
    assert 0.25 < time.monotonic() - started < 2
    serving = threading.Thread(target=accept_later, daemon=True)
    serving.start()
    try:
        with BrokerClient(path, timeout=5) as client:
            assert client.get("a") == {}
    finally:
        serving.join(5)
        listener.close()


def test_a_client_dropped_without_close_leaves_no_socket_open(server: Server) -> None:
    client = BrokerClient(server.server_address)
    client.get("a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del client
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_a_forked_child_opens_its_own_connection(server: Server) -> None:
    client = BrokerClient(server.server_address)
    client.get("parent")
    pid = os.fork()
    if pid == 0:  # the child: must not speak on the parent's connection
        try:
            ok = client.get("child")["path"] == "/v1/executions/child"
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.get("parent-again")["path"] == "/v1/executions/parent-again"
    assert server.connections == 2  # the parent's, still in use; the child's own
    client.close()
