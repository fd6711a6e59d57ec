"""One-shot runner mode, ``stigmer-broker run -- CMD``: a thin front end over the core.

log in → prepare (claim, decrypt, render) → run CMD with the execution's environment → when it
exits, or on SIGINT/SIGTERM: end the execution (wipe, destroy, release, revoke) and exit with
CMD's status. A signal before CMD starts cancels the preparation (what was acquired is given
back, the context is kept); after, it is forwarded to CMD, which gets ``kill_after`` seconds
before it is killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Sequence

from broker import logs
from broker.config import Layout
from broker.errors import CleanupError, ConfigError
from broker.execution.cleanup import Cleanup
from broker.execution.core import CoreSettings, Execution, ExecutionCore, LeaseMode
from broker.execution.credentials import Credentials, login
from broker.execution.keeper import TokenKeeper
from broker.limits import CONTEXTS, Limits
from broker.records import record
from broker.render.outdir import OutputRoot
from broker.vault import Login, VaultClient


@record(frozen=True)
class RunSettings:
    tenant: str
    execution_id: str
    out: OutputRoot
    credentials: Credentials
    allow_secret_in_args: bool = False
    mcp_formats: tuple[str, ...] = ()
    login_max_ttl: float = 2 * 3600
    login_timeout: float = 30.0
    deadline: float = 60.0
    kill_after: float = 10.0
    context_limits: Limits = CONTEXTS


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class _OneShot:
    """One execution around one command; signals are handled here."""

    def __init__(self, core: ExecutionCore, settings: RunSettings, command: Sequence[str]) -> None:
        self.core, self.settings, self.command = core, settings, command
        self.work: asyncio.Future[int] | None = None
        self.child: asyncio.subprocess.Process | None = None
        self.received: int | None = None
        self.forwarded = asyncio.Event()
        self.cleaning = False
        self.report: Cleanup | None = None

    def handle(self, signum: int) -> None:
        """Before CMD starts: cancel the work. While it runs: forward. While cleaning: ignore."""
        self.received = signum
        if self.cleaning:
            return
        if self.child is not None and self.child.returncode is None:
            self.child.send_signal(signum)
            self.forwarded.set()
        elif self.child is None and self.work is not None:
            self.work.cancel()

    async def execute(self) -> int:
        await self.core.keeper.start(self.settings.login_timeout)
        try:
            execution = await self.core.prepare(self.settings.execution_id)
        except BaseException:  # what Vault could not take back yet is retried before exit
            wait = 2.0 if self.received else self.settings.deadline
            await asyncio.shield(self.core.settle(wait))
            raise
        try:
            return await self._run_child(execution)
        finally:
            self.cleaning = True
            self.report = await asyncio.shield(self._end(execution))

    async def _end(self, execution: Execution) -> Cleanup:
        """End it; what Vault could not do is retried until the deadline, then reported."""
        report = await self.core.end(execution)
        if report.pending:
            until = time.monotonic() + self.settings.deadline
            await self.core.finish(execution, report, until)
        return report

    async def _run_child(self, execution: Execution) -> int:
        try:
            self.child = await asyncio.create_subprocess_exec(
                *self.command, env=execution.child_environment(os.environ)
            )
        except OSError as exc:
            command = self.command[0]
            raise ConfigError(f"command {command!r} cannot be started: {exc.strerror}") from None
        logs.event("command started", pid=self.child.pid, execution_id=execution.id)
        status = await self._wait(self.child)
        logs.event("command exited", status=status, execution_id=execution.id)
        return status

    async def _wait(self, child: asyncio.subprocess.Process) -> int:
        waiting = asyncio.ensure_future(child.wait())
        signalled = asyncio.ensure_future(self.forwarded.wait())
        await asyncio.wait([waiting, signalled], return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        if not waiting.done():
            try:
                await asyncio.wait_for(asyncio.shield(waiting), self.settings.kill_after)
            except TimeoutError:
                logs.event("command ignored the signal: killing it", pid=child.pid)
                child.kill()
        return exit_status(await waiting)


def _core(client: VaultClient, layout: Layout, settings: RunSettings) -> ExecutionCore:
    given = settings.credentials.method == "token"

    async def login_once() -> Login:
        return await login(client, layout, settings.credentials, settings.tenant)

    keeper = TokenKeeper(client, None if given else login_once, settings.login_max_ttl)
    core_settings = CoreSettings(
        tenant=settings.tenant,
        out=settings.out,
        lease_mode=LeaseMode.CHILD if given else LeaseMode.LOGIN,
        holder="run",
        pod=os.environ.get("POD_NAME") or os.uname().nodename,
        allow_secret_in_args=settings.allow_secret_in_args,
        mcp_formats=settings.mcp_formats,
        child_policies=None,  # a given token's child keeps the parent's policies
        deadline=settings.deadline,
        context_limits=settings.context_limits,
    )
    return ExecutionCore(client, layout, keeper, core_settings)


async def run_command(
    client: VaultClient, layout: Layout, settings: RunSettings, command: Sequence[str]
) -> int:
    """Prepare the execution, run ``command`` with it, clean up; the command's exit status."""
    if not command:
        raise ConfigError("no command given: stigmer-broker run ... -- CMD [ARGS...]")
    settings.out.check()
    swept = settings.out.sweep()
    if swept:
        logs.event("swept leftover execution directories", directories=swept)
    core = _core(client, layout, settings)
    one_shot = _OneShot(core, settings, command)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, one_shot.handle, signum)
    renewer = asyncio.ensure_future(core.keeper.run())
    one_shot.work = work = asyncio.ensure_future(one_shot.execute())
    try:
        status = await work
    except asyncio.CancelledError:
        if one_shot.received is None:
            raise
        name = signal.Signals(one_shot.received).name
        logs.event("interrupted before the command started", signal=name)
        status = 128 + one_shot.received
    finally:
        one_shot.cleaning = True
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)
        await core.keeper.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    report = one_shot.report
    if report is not None and report.errors and status == 0:
        raise CleanupError("; ".join(report.errors))
    return status
