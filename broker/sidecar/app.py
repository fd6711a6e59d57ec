"""Wires the sidecar: startup → serve → shutdown, each step with its own deadline.

Startup: check the output root (the broker's own, with ACL support for other callers), log in
(bounded by the startup timeout; nothing is rendered before it succeeds), open the socket
(0660; peers refused at ``accept``, see ``gate``) and the metrics port, serve.
Background work (token renewal, the lease watch) runs beside it; if one of those crashes, the
sidecar shuts down and exits non-zero. Shutdown on SIGTERM/SIGINT: stop accepting, cancel the
preparations in flight (each gives back its lease and claim; its caller gets 503), end every
active execution (shielded), revoke the logins, exit 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from broker import logs
from broker.config import Layout
from broker.errors import ConfigError
from broker.execution.core import CoreSettings, ExecutionCore, LeaseMode
from broker.execution.credentials import Credentials, login
from broker.execution.keeper import TokenKeeper
from broker.httpserver import HttpServer
from broker.limits import CONTEXTS, REQUESTS, Limits
from broker.records import field, record
from broker.render.outdir import OutputRoot
from broker.sidecar.api import build_metrics_router, build_router
from broker.sidecar.gate import PeerGate
from broker.sidecar.health import VaultHealth
from broker.sidecar.metrics import Metrics
from broker.sidecar.peers import default_allowed_uids
from broker.sidecar.registry import Registry, Retention
from broker.vault import Login, VaultClient


@record(frozen=True)
class SidecarSettings:
    tenant: str
    socket: Path
    out: OutputRoot
    credentials: Credentials
    metrics_addr: str = "127.0.0.1:9464"
    allow_uids: tuple[int, ...] = ()
    pod: str = ""
    allow_secret_in_args: bool = False
    mcp_formats: tuple[str, ...] = ()
    startup_timeout: float = 30.0
    lease_check_interval: float = 15.0
    vault_check_interval: float = 5.0
    shutdown_timeout: float = 10.0
    login_max_ttl: float = 2 * 3600
    deadline: float = 60.0
    retention: Retention = field(default_factory=Retention)
    share_executions: bool = False
    header_timeout: float = 10.0  # to deliver a request's headers, and again its body
    max_connections_per_uid: int = 64
    context_limits: Limits = CONTEXTS


def _core(
    client: VaultClient, layout: Layout, settings: SidecarSettings, metrics: Metrics
) -> ExecutionCore:
    async def login_once() -> Login:
        return await login(client, layout, settings.credentials, settings.tenant)

    keeper = TokenKeeper(client, login_once, settings.login_max_ttl, metrics.keeper_event)
    core_settings = CoreSettings(
        tenant=settings.tenant,
        out=settings.out,
        lease_mode=LeaseMode.CHILD,
        holder="sidecar",
        pod=settings.pod,
        allow_secret_in_args=settings.allow_secret_in_args,
        mcp_formats=settings.mcp_formats,
        deadline=settings.deadline,
        context_limits=settings.context_limits,
    )
    return ExecutionCore(client, layout, keeper, core_settings)


def _check_output(settings: SidecarSettings) -> None:
    """The output root is the broker's; callers of another uid need ACLs on it. Directories
    a killed broker left there are swept."""
    settings.out.check()
    swept = settings.out.sweep()
    if swept:
        logs.event("swept leftover execution directories", directories=swept)
    others = [uid for uid in settings.allow_uids if uid != os.geteuid()]
    if (others or not settings.allow_uids) and not settings.out.supports_acl():
        raise ConfigError(
            f"--out {settings.out.path}: the filesystem does not store POSIX ACLs, so files "
            "cannot be given to one caller only",
            hint="use a tmpfs with ACL support (Kubernetes emptyDir with medium: Memory)",
        )


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logs.event("second signal: exiting now", signal=signal.Signals(signum).name)
            os._exit(130)
        logs.event("shutting down", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def _watch(tasks: list[asyncio.Task[None]], stop: asyncio.Event, crashed: list[str]) -> None:
    def done(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        crashed.append(task.get_name())
        logs.event("background task crashed", level=50, task=task.get_name(), error=repr(error))
        stop.set()

    for task in tasks:
        task.add_done_callback(done)


async def serve(client: VaultClient, layout: Layout, settings: SidecarSettings) -> int:
    metrics = Metrics()
    core = _core(client, layout, settings, metrics)
    _check_output(settings)
    await core.keeper.start(settings.startup_timeout)
    registry = Registry(core, metrics, settings.retention, settings.share_executions)

    health = VaultHealth(core.keeper, settings.vault_check_interval, metrics.vault_ready.set)

    def ready() -> tuple[bool, str]:
        return health.ready(), health.state

    allowed: set[int] = set(settings.allow_uids)
    api = HttpServer(build_router(registry, metrics, ready), max_body=REQUESTS.max_bytes,
                     header_timeout=settings.header_timeout)  # fmt: skip
    gate = PeerGate(api.protocol, allowed, metrics, settings.max_connections_per_uid)
    gate.listen(settings.socket)
    if not settings.allow_uids:
        allowed |= default_allowed_uids(settings.socket.stat().st_gid)
    probes = HttpServer(build_metrics_router(metrics, registry, ready), max_body=0,
                        header_timeout=settings.header_timeout)  # fmt: skip
    if settings.metrics_addr:
        await probes.listen_tcp(settings.metrics_addr)
    stop = asyncio.Event()
    _install_signals(stop)
    crashed: list[str] = []
    background = [
        asyncio.create_task(core.keeper.run(), name="token-keeper"),
        asyncio.create_task(registry.watch_leases(settings.lease_check_interval), name="leases"),
        asyncio.create_task(health.run(), name="vault-health"),
    ]
    _watch(background, stop, crashed)
    logs.event("sidecar ready", socket=str(settings.socket), tenant=settings.tenant,
               allowed_uids=sorted(allowed), metrics=settings.metrics_addr or None)  # fmt: skip
    await stop.wait()
    await _shutdown(gate, registry, background, core, settings)
    await asyncio.gather(api.close(), probes.close())
    return 1 if crashed else 0


async def _shutdown(
    gate: PeerGate,
    registry: Registry,
    background: list[asyncio.Task[None]],
    core: ExecutionCore,
    settings: SidecarSettings,
) -> None:
    started = time.monotonic()
    await gate.close()  # stop accepting
    try:  # what waits on Vault is cancelled and gives back what it acquired
        await asyncio.wait_for(registry.stop_preparing(), settings.shutdown_timeout)
    except TimeoutError:
        logs.event("shutdown: some preparations did not give back in time", level=30)
    try:
        await asyncio.wait_for(registry.end_all("shutdown"), settings.shutdown_timeout)
    except TimeoutError:
        logs.event("shutdown: some executions did not end in time", level=30)
    await registry.stop_retries()
    await core.stop_giving_back()
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await asyncio.shield(core.keeper.close())
    with contextlib.suppress(FileNotFoundError):
        settings.socket.unlink()
    logs.event("sidecar stopped", seconds=round(time.monotonic() - started, 3))
