"""Wires the sidecar: startup → serve → shutdown, each step with its own deadline.

Startup: log in (bounded deadline; nothing is rendered before it succeeds), check the output
directory, open the socket (0660, peer uids checked) and the metrics port, then serve.
Shutdown on SIGTERM/SIGINT: stop accepting, end every active execution (wipe, destroy,
release, revoke — shielded from cancellation), revoke the login tokens, exit 0. A second signal
forces an immediate exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web

from broker import logs
from broker.config import Layout, VaultSettings
from broker.errors import ConfigError, RenderError
from broker.render import filesystem_type, is_memory_backed
from broker.runner import RunOptions
from broker.sidecar.api import build_app, build_metrics_app, default_allowed_uids
from broker.sidecar.executions import ExecutionManager
from broker.sidecar.identity import Identity
from broker.sidecar.metrics import Metrics
from broker.vault import VaultClient


@dataclass(frozen=True)
class SidecarOptions:
    run: RunOptions
    socket: Path
    metrics_addr: str = "127.0.0.1:9464"
    allow_uids: tuple[int, ...] = ()
    pod: str = ""
    startup_timeout: float = 30.0
    lease_check_interval: float = 15.0
    shutdown_timeout: float = 10.0
    login_max_ttl: float = 2 * 3600


def _check_out_dir(options: RunOptions) -> None:
    out = options.out_dir
    try:
        out.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise RenderError(f"--out {out}: cannot create ({exc.strerror})") from None
    if not options.allow_disk and not is_memory_backed(out):
        raise RenderError(
            f"--out {out}: {filesystem_type(out)} is disk-backed; secrets go only to tmpfs "
            "(use an emptyDir with medium: Memory, or --allow-disk)"
        )


async def _open_socket(runner: web.AppRunner, path: Path) -> web.UnixSite:
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ConfigError(f"--socket {path}: exists and is not a socket")
        path.unlink()  # a stale socket from a previous run
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = os.umask(0o117)  # the socket is born 0660: no window where others can connect
    try:
        site = web.UnixSite(runner, str(path))
        await site.start()
    finally:
        os.umask(previous)
    os.chmod(path, 0o660)
    return site


async def serve(settings: VaultSettings, layout: Layout, options: SidecarOptions) -> int:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=64, thread_name_prefix="vault"))
    metrics = Metrics()
    client = VaultClient(VaultSettings(addr=settings.addr, cacert=settings.cacert))
    identity = Identity(client, layout, options.run, metrics, options.login_max_ttl)
    _check_out_dir(options.run)
    await identity.login(deadline=time.monotonic() + options.startup_timeout)

    manager = ExecutionManager(identity, client, layout, options.run, metrics, options.pod)
    allowed: set[int] = set(options.allow_uids)
    app_runner = web.AppRunner(build_app(manager, identity, metrics, allowed), access_log=None)
    await app_runner.setup()
    site = await _open_socket(app_runner, options.socket)
    if not options.allow_uids:
        allowed |= default_allowed_uids(options.socket.stat().st_gid)
    metrics_runner: web.AppRunner | None = None
    if options.metrics_addr:
        host, _, port = options.metrics_addr.rpartition(":")
        metrics_runner = web.AppRunner(
            build_metrics_app(metrics, manager, identity), access_log=None
        )
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, host or "127.0.0.1", int(port)).start()

    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logs.event("second signal: exiting now", signal=signal.Signals(signum).name)
            os._exit(130)
        logs.event("shutting down", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    background = [
        asyncio.create_task(identity.keep_alive(), name="keep-alive"),
        asyncio.create_task(manager.watch_leases(options.lease_check_interval), name="leases"),
    ]
    for task in background:
        task.add_done_callback(lambda t: stop.set() if not t.cancelled() else None)
    logs.event(
        "sidecar ready",
        socket=str(options.socket),
        tenant=options.run.tenant,
        allowed_uids=sorted(allowed),
        metrics=options.metrics_addr or None,
    )
    await stop.wait()

    started = time.monotonic()
    await site.stop()  # stop accepting
    try:
        await asyncio.wait_for(manager.end_all("shutdown"), options.shutdown_timeout)
    except TimeoutError:
        logs.event("shutdown: some executions did not end in time", level=30)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await asyncio.shield(asyncio.to_thread(identity.revoke_all))
    await app_runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        options.socket.unlink()
    logs.event("sidecar stopped", seconds=round(time.monotonic() - started, 3))
    return 0


def run_sidecar(settings: VaultSettings, layout: Layout, options: SidecarOptions) -> int:
    options = replace(
        options,
        pod=options.pod or os.environ.get("POD_NAME") or os.uname().nodename,
        run=replace(options.run, group_readable=True),
    )
    return asyncio.run(serve(settings, layout, options))
