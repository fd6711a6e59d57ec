"""The local API: HTTP over a Unix socket, each connection's peer uid checked (SO_PEERCRED).

Answers never carry a value: paths, names, secret flags, states and expiry only. The one
exception is ``POST /v1/executions/{id}/resolve``, whose answer is the caller's own document
resolved, for runners that build their own configs. Errors are problem details (RFC 9457).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from broker.errors import (
    BrokerError,
    ClaimConflict,
    ContextExpired,
    ContextNotFound,
    DecryptError,
    ExecutionGone,
    ExecutionUnknown,
    IdentityError,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    RenderError,
    ResolveError,
    ShuttingDown,
    ValidationError,
    VaultUnavailable,
)
from broker.limits import REQUESTS, parse_json
from broker.protocol import Problem
from broker.sidecar.metrics import Metrics
from broker.sidecar.peers import peer_uid
from broker.sidecar.registry import Registry

PEER_UID = web.RequestKey("peer_uid", int)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Readiness = Callable[[], tuple[bool, str]]  # (ready, Vault's state: ok, sealed, …)
STATUS: list[tuple[type[BrokerError], int]] = [  # most specific first
    (ClaimConflict, 409),
    (ExecutionGone, 410),
    (ContextExpired, 410),
    (ExecutionUnknown, 404),
    (ShuttingDown, 503),
    (ContextNotFound, 404),
    (ResolveError, 422),
    (ValidationError, 400),
    (NotFound, 404),
    (PermissionDenied, 403),
    (VaultUnavailable, 503),
    (OutcomeUnknown, 503),
    (IdentityError, 503),
    (DecryptError, 500),
    (RenderError, 500),
]


def status_for(error: BrokerError) -> int:
    return next((status for cls, status in STATUS if isinstance(error, cls)), 500)


def problem(status: int, detail: str, error: BrokerError | None = None) -> web.Response:
    body = Problem(
        status=status,
        title=type(error).__name__ if error else "Refused",
        detail=detail,
        problems=list(getattr(error, "problems", []) or []),
    )
    return web.json_response(body.to_json(), status=status, content_type="application/problem+json")


def build_app(
    registry: Registry, metrics: Metrics, ready: Readiness, body_timeout: float = 10.0
) -> web.Application:
    """The API. Peers are checked before this sees a request (``gate``); here each request
    learns its caller's uid, which decides what it may see."""

    @web.middleware
    async def caller(request: web.Request, handler: Handler) -> web.StreamResponse:
        uid = peer_uid(request.transport.get_extra_info("socket") if request.transport else None)
        if uid is None:
            return problem(403, "peer not allowed")
        request[PEER_UID] = uid
        try:
            return await handler(request)
        except BrokerError as exc:
            metrics.errors.labels(type(exc).__name__).inc()
            return problem(status_for(exc), str(exc), exc)

    async def put_execution(request: web.Request) -> web.Response:
        created, record = await registry.prepare(request.match_info["id"], request[PEER_UID])
        return web.json_response(record.answer().to_json(), status=201 if created else 200)

    async def get_execution(request: web.Request) -> web.Response:
        record = registry.get(request.match_info["id"], request[PEER_UID])
        return web.json_response(record.answer().to_json())

    async def list_executions(request: web.Request) -> web.Response:
        """A page of ``{"id", "state"}`` in id order: ``?limit=`` (≤ 1000), ``?after=ID``."""
        try:
            limit = min(int(request.query.get("limit", "100")), 1000)
        except ValueError:
            return problem(400, "limit must be a number")
        after = request.query.get("after", "")
        records = sorted(registry.records(request[PEER_UID]), key=lambda r: r.id)
        page = [r for r in records if r.id > after][: max(limit, 1)]
        items = [{"id": r.id, "state": str(r.state)} for r in page]
        more = len(page) == max(limit, 1) and page[-1].id != records[-1].id
        return web.json_response({"executions": items, "next": page[-1].id if more else None})

    async def resolve(request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(body_timeout):
                body = await request.read()
        except TimeoutError:
            return problem(408, "the request body did not arrive in time")
        document: Any = parse_json(body, REQUESTS, "the request body")
        uid = request[PEER_UID]
        workflow = request.query.get("syntax") == "workflow"  # task rules: jq left alone
        resolved = registry.resolve(request.match_info["id"], uid, document, workflow)
        return web.json_response(resolved)

    async def get_task(request: web.Request) -> web.Response:
        execution_id, name = request.match_info["id"], request.match_info["name"]
        return web.json_response(registry.task(execution_id, request[PEER_UID], name))

    async def delete_execution(request: web.Request) -> web.Response:
        record = await registry.end(request.match_info["id"], "deleted", request[PEER_UID])
        return web.json_response(record.answer().to_json())

    app = web.Application(middlewares=[caller], client_max_size=REQUESTS.max_bytes)
    app.router.add_put("/v1/executions/{id}", put_execution)
    app.router.add_get("/v1/executions/{id}", get_execution)
    app.router.add_get("/v1/executions", list_executions)
    app.router.add_post("/v1/executions/{id}/resolve", resolve)
    app.router.add_get("/v1/executions/{id}/tasks/{name}", get_task)
    app.router.add_delete("/v1/executions/{id}", delete_execution)
    add_probes(app, registry, ready)
    return app


def add_probes(app: web.Application, registry: Registry, ready: Readiness) -> None:
    """``/healthz`` (process alive) and ``/readyz`` (Vault accepts the sidecar's login, as of
    the last check: see ``health``)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        is_ready, vault = ready()
        body = {"ready": is_ready, "vault": vault, "active_executions": len(registry.active())}
        return web.json_response(body, status=200 if is_ready else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def build_metrics_app(metrics: Metrics, registry: Registry, ready: Readiness) -> web.Application:
    """``/metrics`` for Prometheus, and the same probes as the socket for Kubernetes (kubelet
    probes cannot reach a Unix socket)."""

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", serve)
    add_probes(app, registry, ready)
    return app
