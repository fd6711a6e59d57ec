"""The local API: HTTP over a Unix socket, each connection's peer uid checked (SO_PEERCRED).

Answers never carry a value: paths, names, secret flags, states and expiry only. The one
exception is ``POST /v1/executions/{id}/resolve``, whose answer is the caller's own document
resolved, for runners that build their own configs. Errors are problem details (RFC 9457).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

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
from broker.httpserver import PROBLEM, Request, Response, Router, json_response
from broker.limits import REQUESTS, parse_json
from broker.protocol import Problem
from broker.sidecar.metrics import Metrics
from broker.sidecar.peers import peer_uid
from broker.sidecar.registry import Registry

CallerHandler = Callable[[Request, int], Awaitable[Response]]
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


def problem(status: int, detail: str, error: BrokerError | None = None) -> Response:
    body = Problem(
        status=status,
        title=type(error).__name__ if error else "Refused",
        detail=detail,
        problems=list(getattr(error, "problems", []) or []),
    )
    return json_response(body.to_json(), status, PROBLEM)


def build_router(registry: Registry, metrics: Metrics, ready: Readiness) -> Router:
    """The API. Peers are checked before this sees a request (``gate``); here each request
    learns its caller's uid, which decides what it may see."""

    def caller(handler: CallerHandler) -> Callable[[Request], Awaitable[Response]]:
        async def with_caller(request: Request) -> Response:
            uid = peer_uid(request.socket)
            if uid is None:
                return problem(403, "peer not allowed")
            try:
                return await handler(request, uid)
            except BrokerError as exc:
                metrics.errors.labels(type(exc).__name__).inc()
                return problem(status_for(exc), str(exc), exc)

        return with_caller

    async def put_execution(request: Request, uid: int) -> Response:
        created, record = await registry.prepare(request.params["id"], uid)
        return json_response(record.answer().to_json(), 201 if created else 200)

    async def get_execution(request: Request, uid: int) -> Response:
        return json_response(registry.get(request.params["id"], uid).answer().to_json())

    async def list_executions(request: Request, uid: int) -> Response:
        """A page of ``{"id", "state"}`` in id order: ``?limit=`` (≤ 1000), ``?after=ID``."""
        try:
            limit = max(min(int(request.query.get("limit", "100")), 1000), 1)
        except ValueError:
            return problem(400, "limit must be a number")
        after = request.query.get("after", "")
        records = sorted(registry.records(uid), key=lambda r: r.id)
        page = [r for r in records if r.id > after][:limit]
        items = [{"id": r.id, "state": str(r.state)} for r in page]
        more = len(page) == limit and page[-1].id != records[-1].id
        return json_response({"executions": items, "next": page[-1].id if more else None})

    async def resolve(request: Request, uid: int) -> Response:
        document: Any = parse_json(request.body, REQUESTS, "the request body")
        workflow = request.query.get("syntax") == "workflow"  # task rules: jq left alone
        return json_response(registry.resolve(request.params["id"], uid, document, workflow))

    async def get_task(request: Request, uid: int) -> Response:
        execution_id, name = request.params["id"], request.params["name"]
        return json_response(registry.task(execution_id, uid, name))

    async def delete_execution(request: Request, uid: int) -> Response:
        record = await registry.end(request.params["id"], "deleted", uid)
        return json_response(record.answer().to_json())

    router = Router()
    router.add("PUT", "/v1/executions/{id}", caller(put_execution))
    router.add("GET", "/v1/executions/{id}", caller(get_execution))
    router.add("GET", "/v1/executions", caller(list_executions))
    router.add("POST", "/v1/executions/{id}/resolve", caller(resolve))
    router.add("GET", "/v1/executions/{id}/tasks/{name}", caller(get_task))
    router.add("DELETE", "/v1/executions/{id}", caller(delete_execution))
    add_probes(router, registry, ready)
    return router


def add_probes(router: Router, registry: Registry, ready: Readiness) -> None:
    """``/healthz`` (process alive) and ``/readyz`` (Vault accepts the sidecar's login, as of
    the last check: see ``health``)."""

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        is_ready, vault = ready()
        body = {"ready": is_ready, "vault": vault, "active_executions": len(registry.active())}
        return json_response(body, 200 if is_ready else 503)

    router.add("GET", "/healthz", healthz)
    router.add("GET", "/readyz", readyz)


def build_metrics_router(metrics: Metrics, registry: Registry, ready: Readiness) -> Router:
    """``/metrics`` for Prometheus, and the same probes as the socket for Kubernetes (kubelet
    probes cannot reach a Unix socket)."""

    async def serve(request: Request) -> Response:
        return Response(200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    router = Router()
    router.add("GET", "/metrics", serve)
    add_probes(router, registry, ready)
    return router
