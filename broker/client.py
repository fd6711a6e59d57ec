"""A client for runners: prepare an execution, read its paths, end it.

::

    broker = BrokerClient("/run/stigmer/broker.sock")
    with broker.execution(execution_id) as execution:      # PUT, then DELETE on exit
        run_agent(mcp_config=execution.mcp_config, env_file=execution.env_file)

    async with AsyncBrokerClient("/run/stigmer/broker.sock") as broker:
        async with broker.execution(execution_id) as execution:
            ...

Answers carry paths, names and secret flags, never values.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from broker.errors import BrokerClientError
from broker.protocol import ExecutionAnswer

DEFAULT_SOCKET = "/run/stigmer/broker.sock"
PreparedExecution = ExecutionAnswer  # what `prepare` returns: paths, names, flags
__all__ = ["AsyncBrokerClient", "BrokerClient", "BrokerClientError", "PreparedExecution"]


def _path(execution_id: str, suffix: str = "") -> str:
    return f"/v1/executions/{quote(execution_id, safe='')}{suffix}"


def _check(status: int, body: bytes) -> Any:
    try:
        answer = json.loads(body) if body else {}
    except ValueError:
        answer = {}
    if status >= 400:
        detail = answer.get("detail") if isinstance(answer, dict) else None
        raise BrokerClientError(status, str(detail or "error"))
    return answer


CONNECT_PAUSE = 0.001  # seconds before a refused connect (a full backlog) is tried again
MAX_CONNECT_PAUSE = 0.05


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path
        self._connect_timeout = timeout
        self.idle_since = 0.0  # monotonic; when it went back to the pool

    def connect(self) -> None:
        # A Unix socket whose listen backlog is full refuses at once (EAGAIN), where TCP would
        # wait: a sidecar busy accepting a burst is waited for, within the timeout.
        deadline = time.monotonic() + self._connect_timeout
        pause = CONNECT_PAUSE
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self._socket_path)
            except BlockingIOError:
                sock.close()
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, MAX_CONNECT_PAUSE)
                continue
            except BaseException:
                sock.close()
                raise
            self.sock = sock
            return


# What a keep-alive connection the sidecar has closed meanwhile raises on reuse.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


def _close_all(connections: list[_UnixConnection]) -> None:
    while connections:
        connections.pop().close()


class BrokerClient:
    """Synchronous client (standard library only). Safe to share between threads: each request
    takes an idle keep-alive connection from a small pool, or opens one (connecting costs the
    sidecar an admission check per connection). Every request it makes is idempotent, so one
    that finds its reused connection closed by the sidecar is sent again on a new one."""

    MAX_IDLE = 4  # connections kept open between requests
    IDLE_SECONDS = 5.0  # under the sidecar's 10 s idle limit: a kept connection is rarely stale

    def __init__(self, socket_path: str | Path = DEFAULT_SOCKET, timeout: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._idle: list[_UnixConnection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        weakref.finalize(self, _close_all, self._idle)  # a client dropped unclosed leaks nothing

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections (one in use closes when its request is done)."""
        with self._lock:
            _close_all(self._idle)

    def _connection(self) -> tuple[_UnixConnection, bool]:
        """An idle connection young enough to reuse (and True), or a new one (and False)."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's connections are not ours
                _close_all(self._idle)  # (our copies of their descriptors only)
                self._pid = os.getpid()
            while self._idle:
                connection = self._idle.pop()
                if time.monotonic() - connection.idle_since < self.IDLE_SECONDS:
                    return connection, True
                connection.close()
        return _UnixConnection(self.socket_path, self.timeout), False

    def _release(self, connection: _UnixConnection) -> None:
        connection.idle_since = time.monotonic()
        with self._lock:
            if connection.sock is not None and len(self._idle) < self.MAX_IDLE:
                self._idle.append(connection)
                return
        connection.close()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        while True:
            connection, reused = self._connection()
            try:
                connection.request(method, path, body=payload, headers=headers)
                response = connection.getresponse()
                answer = response.read()
            except _STALE:
                connection.close()
                if reused:
                    continue  # closed by the sidecar while idle: again, on a new connection
                raise
            except BaseException:
                connection.close()
                raise
            self._release(connection)  # http.client drops the socket after Connection: close
            return _check(response.status, answer)

    def prepare(self, execution_id: str) -> PreparedExecution:
        return ExecutionAnswer.from_json(self._request("PUT", _path(execution_id)))

    def get(self, execution_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._request("GET", _path(execution_id))
        return answer

    def list(self) -> list[dict[str, str]]:
        """Every execution this caller may see, page by page."""
        found: list[dict[str, str]] = []
        after = ""
        while True:
            answer = self._request("GET", f"/v1/executions?limit=1000&after={quote(after)}")
            found += answer["executions"]
            if not answer.get("next"):
                return found
            after = answer["next"]

    def resolve(self, execution_id: str, document: Any, workflow: bool = False) -> Any:
        """``workflow``: a task config (``${.secrets.X}``, ``${.env_vars.X}``; jq left alone)."""
        suffix = "/resolve?syntax=workflow" if workflow else "/resolve"
        return self._request("POST", _path(execution_id, suffix), document)

    def task(self, execution_id: str, name: str) -> dict[str, Any]:
        """One workflow task's resolved config (and an agent-call's child ``runtime_env``)."""
        answer: dict[str, Any] = self._request(
            "GET", _path(execution_id, f"/tasks/{quote(name, safe='')}")
        )
        return answer

    def end(self, execution_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._request("DELETE", _path(execution_id))
        return answer

    def ready(self) -> bool:
        try:
            return bool(self._request("GET", "/readyz").get("ready"))
        except (BrokerClientError, OSError):
            return False

    @contextmanager
    def execution(self, execution_id: str) -> Iterator[PreparedExecution]:
        """Prepare on entry; end on exit, exceptions included."""
        prepared = self.prepare(execution_id)
        try:
            yield prepared
        finally:
            self.end(execution_id)


class AsyncBrokerClient:
    """asyncio client over aiohttp's Unix connector; use it as an async context manager."""

    def __init__(self, socket_path: str | Path = DEFAULT_SOCKET, timeout: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncBrokerClient:
        connector = aiohttp.UnixConnector(path=self.socket_path)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        if self._session is None:
            await self.__aenter__()
        assert self._session is not None
        async with self._session.request(method, f"http://localhost{path}", json=body) as response:
            return _check(response.status, await response.read())

    async def prepare(self, execution_id: str) -> PreparedExecution:
        return ExecutionAnswer.from_json(await self._request("PUT", _path(execution_id)))

    async def get(self, execution_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self._request("GET", _path(execution_id))
        return answer

    async def resolve(self, execution_id: str, document: Any, workflow: bool = False) -> Any:
        suffix = "/resolve?syntax=workflow" if workflow else "/resolve"
        return await self._request("POST", _path(execution_id, suffix), document)

    async def task(self, execution_id: str, name: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self._request(
            "GET", _path(execution_id, f"/tasks/{quote(name, safe='')}")
        )
        return answer

    async def end(self, execution_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self._request("DELETE", _path(execution_id))
        return answer

    @asynccontextmanager
    async def execution(self, execution_id: str) -> AsyncIterator[PreparedExecution]:
        """Prepare on entry; end on exit, exceptions and cancellation included."""
        prepared = await self.prepare(execution_id)
        try:
            yield prepared
        finally:
            await self.end(execution_id)
