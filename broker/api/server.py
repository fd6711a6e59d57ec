"""``stigmer-broker control serve``: the aiohttp application, its middleware (problems, limits,
access log, metrics), health probes and the OpenAPI document."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from broker import logs
from broker.api import openapi, problems, routes
from broker.api.bodies import BodyError
from broker.config import Layout
from broker.errors import BrokerError, VaultError
from broker.limits import REQUESTS
from broker.records import record
from broker.vault import VaultClient

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@record(frozen=True)
class ControlSettings:
    host: str = "127.0.0.1"
    port: int = 8300


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "stigmer_broker_api_requests", "Control API requests by route and status",
            ["method", "route", "status"], registry=self.registry,
        )  # fmt: skip
        self.seconds = Histogram(
            "stigmer_broker_api_request_seconds", "Control API request duration by route",
            ["method", "route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )  # fmt: skip


METRICS = web.AppKey("metrics", ApiMetrics)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes a problem document; nothing of a Vault answer or a body is echoed."""
    started = time.monotonic()
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "(none)"
    try:
        response = await handler(request)
    except routes.Unauthenticated:
        response = problems.problem(
            401, "no Vault token: send X-Vault-Token or Authorization: Bearer <token>"
        )
    except BodyError as error:
        response = problems.from_error(error, error.prefix)
    except BrokerError as error:
        response = problems.from_error(error)
    except web.HTTPException as error:
        if error.status == 413:
            response = problems.problem(413, f"body larger than {REQUESTS.max_bytes} bytes")
        else:
            response = problems.problem(error.status, error.reason)
    except Exception as error:  # a bug: no detail out, the class in the log
        logs.event("control api: internal error", level=40, error=type(error).__name__,
                   route=template)  # fmt: skip
        response = problems.problem(500, "internal error")
    metrics = request.app[METRICS]
    metrics.requests.labels(request.method, template, str(response.status)).inc()
    metrics.seconds.labels(request.method, template).observe(time.monotonic() - started)
    if isinstance(response, web.Response) and response.status >= 400:
        error_kind = getattr(response, "reason", "")
        logs.event("control api request", level=20, method=request.method, route=template,
                   status=response.status, reason=error_kind)  # fmt: skip
    return response


def build_app(client: VaultClient, layout: Layout) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=REQUESTS.max_bytes)
    app[routes.BASE_CLIENT] = client
    app[routes.LAYOUT] = layout
    app[METRICS] = ApiMetrics()
    for method, path, handler in routes.ROUTES:
        app.router.add_route(method, path, handler)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        try:  # unauthenticated: the server holds no token
            health = await client.with_token("").get("sys/health", operation="health")
        except VaultError as error:
            return web.json_response({"ready": False, "vault": str(error.kind)}, status=503)
        ready = not health.get("sealed", True)
        return web.json_response({"ready": ready, "vault": "ok" if ready else "sealed"},
                                 status=200 if ready else 503)  # fmt: skip

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(request.app[METRICS].registry)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    document = openapi.document()

    async def spec(request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", spec)
    return app


async def serve(client: VaultClient, layout: Layout, settings: ControlSettings) -> int:
    runner = web.AppRunner(build_app(client, layout), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logs.event("control api ready", addr=f"{settings.host}:{settings.port}")
    await stop.wait()
    await runner.cleanup()
    await client.aclose()
    logs.event("control api stopped")
    return 0
