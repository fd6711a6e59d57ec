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
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from broker.errors import BrokerError

DEFAULT_SOCKET = "/run/stigmer/broker.sock"


class BrokerClientError(BrokerError):
    """The sidecar answered with an error; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"sidecar answered {status}: {message}")


@dataclass(frozen=True)
class PreparedExecution:
    id: str
    state: str
    expires_at: str | None
    files: dict[str, str]
    variables: dict[str, dict[str, bool]]

    @property
    def mcp_config(self) -> Path:
        return Path(self.files["mcp_json"])

    @property
    def env_file(self) -> Path:
        return Path(self.files["env"])

    @property
    def env_json(self) -> Path:
        return Path(self.files["env_json"])

    @property
    def directory(self) -> Path:
        return Path(self.files["directory"])

    def environ(self) -> dict[str, str]:
        """The variables as an environment for a child process (read from ``env.json``)."""
        values: dict[str, str] = json.loads(self.env_json.read_text(encoding="utf-8"))
        return {
            **values,
            "STIGMER_EXECUTION_ID": self.id,
            "STIGMER_MCP_CONFIG": str(self.mcp_config),
            "STIGMER_ENV_FILE": str(self.env_file),
        }

    @classmethod
    def from_answer(cls, answer: dict[str, Any]) -> PreparedExecution:
        return cls(
            id=answer["id"],
            state=answer["state"],
            expires_at=answer.get("expires_at"),
            files=answer.get("files") or {},
            variables=answer.get("variables") or {},
        )


def _path(execution_id: str, suffix: str = "") -> str:
    return f"/v1/executions/{quote(execution_id, safe='')}{suffix}"


def _check(status: int, body: bytes) -> Any:
    try:
        answer = json.loads(body) if body else {}
    except ValueError:
        answer = {"error": body.decode(errors="replace")[:200]}
    if status >= 400:
        raise BrokerClientError(status, str(answer.get("error", "error")))
    return answer


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._socket_path)
        self.sock = sock


class BrokerClient:
    """Synchronous client (standard library only), one connection per request."""

    def __init__(self, socket_path: str | Path = DEFAULT_SOCKET, timeout: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        connection = _UnixConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return _check(response.status, response.read())
        finally:
            connection.close()

    def prepare(self, execution_id: str) -> PreparedExecution:
        return PreparedExecution.from_answer(self._request("PUT", _path(execution_id)))

    def get(self, execution_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._request("GET", _path(execution_id))
        return answer

    def list(self) -> list[dict[str, str]]:
        answer: list[dict[str, str]] = self._request("GET", "/v1/executions")["executions"]
        return answer

    def resolve(self, execution_id: str, document: Any) -> Any:
        return self._request("POST", _path(execution_id, "/resolve"), document)

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
        return PreparedExecution.from_answer(await self._request("PUT", _path(execution_id)))

    async def get(self, execution_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self._request("GET", _path(execution_id))
        return answer

    async def resolve(self, execution_id: str, document: Any) -> Any:
        return await self._request("POST", _path(execution_id, "/resolve"), document)

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
