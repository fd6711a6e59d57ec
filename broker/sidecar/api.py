"""The local API: HTTP over a Unix socket, each connection's peer uid checked (SO_PEERCRED).

Answers never carry a value: paths, names, secret flags, states and expiry only. The one
exception is ``POST /v1/executions/{id}/resolve``, whose answer is the caller's own document
resolved, for runners that build their own configs.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from broker import logs
from broker.errors import (
    BrokerError,
    DecryptError,
    IdentityError,
    NotFound,
    PermissionDenied,
    RenderError,
    ResolveError,
    ValidationError,
    VaultUnavailable,
)
from broker.sidecar.executions import ClaimConflict, ExecutionManager, Gone, NotActive
from broker.sidecar.identity import Identity
from broker.sidecar.metrics import Metrics

PEER_UID = web.RequestKey("peer_uid", int)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_STATUS: list[tuple[type[BrokerError], int]] = [
    (ClaimConflict, 409),
    (Gone, 410),
    (NotActive, 404),
    (ResolveError, 422),
    (NotFound, 404),
    (PermissionDenied, 403),
    (VaultUnavailable, 503),
    (IdentityError, 503),
    (DecryptError, 500),
    (RenderError, 500),
]


def peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def default_allowed_uids(socket_gid: int) -> set[int]:
    """The sidecar's own uid and every user whose primary or secondary group is the socket's."""
    allowed = {os.getuid()}
    try:
        members = set(grp.getgrgid(socket_gid).gr_mem)
    except KeyError:
        members = set()
    for entry in pwd.getpwall():
        if entry.pw_gid == socket_gid or entry.pw_name in members:
            allowed.add(entry.pw_uid)
    return allowed


def _status_for(error: BrokerError) -> int:
    if isinstance(error, ValidationError):
        missing = any("no context" in p or "not found" in p for p in error.problems)
        return 404 if missing else 400
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500


def _error(error: BrokerError) -> web.Response:
    body: dict[str, Any] = {"error": str(error), "type": type(error).__name__}
    if isinstance(error, ResolveError):
        body["problems"] = error.problems
    return web.json_response(body, status=_status_for(error))


def build_app(
    manager: ExecutionManager, identity: Identity, metrics: Metrics, allowed_uids: set[int]
) -> web.Application:
    """The API; ``allowed_uids`` is read on every connection (filled in once the socket exists)."""

    @web.middleware
    async def peer_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        uid = peer_uid(request)
        if uid is None or uid not in allowed_uids:
            metrics.denied_peers.inc()
            logs.event("security: socket peer refused", peer_uid=uid, path=request.path)
            return web.json_response({"error": "peer not allowed"}, status=403)
        request[PEER_UID] = uid
        try:
            return await handler(request)
        except BrokerError as exc:
            metrics.errors.labels(type(exc).__name__).inc()
            return _error(exc)

    async def put_execution(request: web.Request) -> web.Response:
        created, execution = await manager.prepare(request.match_info["id"], request[PEER_UID])
        return web.json_response(execution.describe(), status=201 if created else 200)

    async def get_execution(request: web.Request) -> web.Response:
        return web.json_response(manager.get(request.match_info["id"]).describe())

    async def list_executions(request: web.Request) -> web.Response:
        items = [{"id": e.id, "state": str(e.state)} for e in manager.executions.values()]
        return web.json_response({"executions": items})

    async def resolve(request: web.Request) -> web.Response:
        try:
            document: Any = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "the body must be a JSON document"}, status=400)
        execution = manager.get(request.match_info["id"])
        if execution.owner_uid != request[PEER_UID]:
            raise ClaimConflict(f"execution {execution.id} is held by another caller")
        return web.json_response(manager.resolve(execution.id, document))

    async def delete_execution(request: web.Request) -> web.Response:
        execution = await manager.end(request.match_info["id"], "deleted", request[PEER_UID])
        return web.json_response(execution.describe())

    app = web.Application(middlewares=[peer_check], client_max_size=8 * 1024 * 1024)
    app.router.add_put("/v1/executions/{id}", put_execution)
    app.router.add_get("/v1/executions/{id}", get_execution)
    app.router.add_get("/v1/executions", list_executions)
    app.router.add_post("/v1/executions/{id}/resolve", resolve)
    app.router.add_delete("/v1/executions/{id}", delete_execution)
    _add_probes(app, manager, identity)
    return app


def _add_probes(app: web.Application, manager: ExecutionManager, identity: Identity) -> None:
    """``/healthz`` (process alive) and ``/readyz`` (logged in with a live token)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready = identity.alive()
        body = {"ready": ready, "active_executions": len(manager.active())}
        return web.json_response(body, status=200 if ready else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def build_metrics_app(
    metrics: Metrics, manager: ExecutionManager, identity: Identity
) -> web.Application:
    """``/metrics`` for Prometheus, and the same probes as the socket for Kubernetes (kubelet
    probes cannot reach a Unix socket)."""

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", serve)
    _add_probes(app, manager, identity)
    return app
