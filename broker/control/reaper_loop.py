"""The reaper as a long-running process: a pass every interval, its login kept alive by the same
token keeper the runners use, its counts as Prometheus metrics, SIGTERM ends it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence
from datetime import timedelta

from prometheus_client import CollectorRegistry, Counter, generate_latest

from broker import logs
from broker.config import Layout
from broker.control.reaper import Reaper, ReapReport
from broker.execution.keeper import TokenKeeper
from broker.httpserver import HttpServer, Request, Response, Router, json_response
from broker.records import record


class ReaperMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.passes = Counter("stigmer_reaper_passes", "Reaper passes", registry=r)
        self.contexts = Counter(
            "stigmer_reaper_contexts_destroyed", "Contexts destroyed", registry=r
        )
        self.claims = Counter("stigmer_reaper_claims_released", "Claims released", registry=r)
        self.leases = Counter("stigmer_reaper_leases_revoked", "Leases revoked", registry=r)
        self.errors = Counter("stigmer_reaper_errors", "Errors during passes", registry=r)

    def count(self, report: ReapReport) -> None:
        self.passes.inc()
        self.contexts.inc(report.contexts_destroyed)
        self.claims.inc(report.claims_released)
        self.leases.inc(report.leases_revoked)
        self.errors.inc(len(report.errors))


@record(frozen=True)
class LoopSettings:
    tenants: tuple[str, ...]  # empty: every tenant found
    interval: float
    grace: timedelta
    metrics_addr: str = ""


def _metrics_server(metrics: ReaperMetrics) -> HttpServer:
    async def serve(request: Request) -> Response:
        return Response(200, generate_latest(metrics.registry), "text/plain; charset=utf-8")

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    router = Router()
    router.add("GET", "/metrics", serve)
    router.add("GET", "/healthz", healthz)
    return HttpServer(router, max_body=0)


async def one_pass(
    keeper: TokenKeeper, layout: Layout, tenants: Sequence[str], grace: timedelta
) -> ReapReport:
    assert keeper.current is not None
    reaper = Reaper(keeper.current.client, layout, grace)
    return await reaper.run_pass(await reaper.tenants(tenants))


async def run_forever(keeper: TokenKeeper, layout: Layout, settings: LoopSettings) -> int:
    """A pass every ``settings.interval`` until SIGTERM/SIGINT; 0 on a clean stop."""
    metrics = ReaperMetrics()
    server = _metrics_server(metrics)
    if settings.metrics_addr:
        await server.listen_tcp(settings.metrics_addr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    renewer = asyncio.create_task(keeper.run(), name="token-keeper")
    try:
        while not stop.is_set():
            report = await one_pass(keeper, layout, settings.tenants, settings.grace)
            metrics.count(report)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.interval)
    finally:
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)
        await server.close()
    logs.event("reaper stopped")
    return 0
