"""The sidecar's executions: who asked for each, its state, its TTL timer, and how it ended.

The work itself (claim, lease, decrypt, render, end) is the execution core's; this module adds
what a long-lived process needs around it: one record per execution id, idempotent requests per
caller, an end at TTL, noticing leases revoked from outside, and forgetting. When an execution
ends its plaintext is dropped at once; only a value-free summary stays, for a bounded time and
count.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NoReturn

from broker import logs, names, tasks
from broker.errors import (
    BrokerError,
    ClaimConflict,
    ExecutionGone,
    ExecutionUnknown,
    ShuttingDown,
    VaultError,
)
from broker.execution.cleanup import Cleanup
from broker.execution.core import Execution, ExecutionCore
from broker.protocol import Ended, ExecutionAnswer
from broker.records import field, record
from broker.resolve import mask, resolve_document
from broker.sidecar.metrics import Metrics

EXPIRY_MARGIN = 2.0  # end this long before the deadline, while the lease can still clean up


_MISSING = object()


class State(StrEnum):
    PREPARING = "preparing"
    ACTIVE = "active"
    ENDING = "ending"
    ENDED = "ended"
    FAILED = "failed"


@record(eq=False)
class Record:
    id: str
    owner_uid: int
    tenant: str
    state: State = State.PREPARING
    execution: Execution | None = None  # holds plaintext; None once ended
    expires_at: datetime | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: asyncio.TimerHandle | None = None
    ended: Ended | None = None
    ended_at: float = 0.0

    def answer(self) -> ExecutionAnswer:
        expires = self.expires_at.isoformat().replace("+00:00", "Z") if self.expires_at else None
        execution = self.execution
        live = execution is not None and self.state is State.ACTIVE
        return ExecutionAnswer(
            id=self.id,
            state=str(self.state),
            tenant=self.tenant,
            expires_at=expires,
            files=execution.files if live and execution else None,
            variables=mask(execution.variables) if live and execution else None,
            ended=self.ended,
        )


@record(frozen=True)
class Retention:
    """How many ended executions' summaries are kept, and for how long."""

    count: int = 1000
    seconds: float = 3600.0


class Registry:
    """A caller sees and ends the executions it prepared and those the broker's own uid
    prepared; the broker's own uid sees all. ``shared``: every admitted caller sees all."""

    def __init__(
        self, core: ExecutionCore, metrics: Metrics, retention: Retention, shared: bool = False
    ) -> None:
        self._core = core
        self._metrics = metrics
        self._retention = retention
        self._shared = shared
        self._active: dict[str, Record] = {}
        self._ended: OrderedDict[str, Record] = OrderedDict()
        self._retries: dict[str, tuple[asyncio.Task[None], Execution, Cleanup]] = {}
        self._preparing: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    @property
    def tenant(self) -> str:
        return self._core.settings.tenant

    def active(self) -> list[Record]:
        return list(self._active.values())

    def _visible(self, record: Record, uid: int | None) -> bool:
        own = os.geteuid()
        return (
            uid is None
            or self._shared
            or uid in (record.owner_uid, own)
            or (record.owner_uid == own)
        )

    def records(self, uid: int | None = None) -> list[Record]:
        """Active executions and kept summaries that ``uid`` may see."""
        self._forget_old()
        every = [*self._ended.values(), *self._active.values()]
        return [record for record in every if self._visible(record, uid)]

    def get(self, execution_id: str, uid: int | None = None) -> Record:
        """The record, if ``uid`` may see it (another caller's execution looks unknown)."""
        names.execution_id(execution_id)
        self._forget_old()
        record = self._active.get(execution_id) or self._ended.get(execution_id)
        if record is None or not self._visible(record, uid):
            raise ExecutionUnknown(execution_id, "not known to this sidecar")
        return record

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - self._retention.seconds
        while self._ended and (
            len(self._ended) > self._retention.count
            or next(iter(self._ended.values())).ended_at < cutoff
        ):
            self._ended.popitem(last=False)

    # --- prepare ------------------------------------------------------------------------------

    async def prepare(self, execution_id: str, uid: int) -> tuple[bool, Record]:
        """Prepare for caller ``uid``; (created, record). Repeating it is idempotent."""
        names.execution_id(execution_id)
        if self._stopping:
            raise ShuttingDown(execution_id, "the sidecar is shutting down")
        if execution_id in self._ended:
            raise ExecutionGone(execution_id, "has ended here; its context is destroyed")
        existing = self._active.get(execution_id)
        if existing is not None:
            return False, await self._existing(existing, uid)
        record = Record(execution_id, uid, self.tenant)
        self._active[execution_id] = record
        started = time.perf_counter()
        # Its own task: a caller that goes away does not stop a preparation halfway.
        task = asyncio.ensure_future(self._prepare(record, uid))
        self._preparing[execution_id] = task
        task.add_done_callback(lambda done: self._prepared(record, started, done))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if self._stopping and task.cancelled():
                raise ShuttingDown(execution_id, "stopped: the sidecar is shutting down") from None
            raise
        return True, record

    async def stop_preparing(self) -> None:
        """At shutdown: refuse new preparations and cancel those in flight. Each gives back
        what it acquired (lease, claim, files); nothing is rendered after this returns."""
        self._stopping = True
        tasks = list(self._preparing.values())
        for task in tasks:
            task.cancel()
        if tasks:
            logs.event("shutdown: preparations cancelled", executions=sorted(self._preparing))
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _existing(self, record: Record, uid: int) -> Record:
        if record.owner_uid != uid:
            self._refused(record.id, uid, "held by another local caller")
        await record.ready.wait()
        if record.state is not State.ACTIVE:
            raise ExecutionGone(record.id, f"is {record.state}")
        return record

    async def _prepare(self, record: Record, uid: int) -> None:
        execution = await self._core.prepare(record.id, reader_uid=uid)
        record.execution, record.expires_at = execution, execution.expires_at
        record.state = State.ACTIVE
        if execution.expires_at is not None:
            left = (execution.expires_at - datetime.now(UTC)).total_seconds()
            record.timer = asyncio.get_running_loop().call_later(
                max(left - EXPIRY_MARGIN, 0.5),
                lambda: asyncio.ensure_future(self.end(record.id, "expired")),
            )

    def _prepared(self, record: Record, started: float, task: asyncio.Future[None]) -> None:
        self._preparing.pop(record.id, None)
        record.ready.set()
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            self._active.pop(record.id, None)
            name = "CancelledError" if error is None else type(error).__name__
            self._metrics.errors.labels(name).inc()
            if isinstance(error, ClaimConflict):
                self._metrics.claim_conflicts.inc()
            return
        self._metrics.prepare_seconds.observe(time.perf_counter() - started)
        self._metrics.started.inc()
        self._metrics.active.inc()

    def _refused(self, execution_id: str, uid: int, why: str) -> NoReturn:
        logs.security(
            "security: execution request refused", "caller-refused",
            execution_id=execution_id, peer_uid=uid, reason=why,
        )  # fmt: skip
        raise ClaimConflict(execution_id, "is held by another caller")

    # --- use ----------------------------------------------------------------------------------

    def _owned(self, execution_id: str, uid: int, what: str) -> Execution:
        """Only the caller that prepared it may see its values, whatever ``shared``."""
        record = self.get(execution_id, uid)
        if record.owner_uid != uid:
            self._refused(execution_id, uid, f"{what} by another local caller")
        if record.state is not State.ACTIVE or record.execution is None:
            raise ExecutionGone(execution_id, f"is {record.state}")
        return record.execution

    def resolve(self, execution_id: str, uid: int, document: Any, workflow: bool = False) -> Any:
        """The caller's document resolved against the execution's values; ``workflow``: with the
        task rules (``${.secrets.X}``, ``${.env_vars.X}``; jq expressions left alone)."""
        execution = self._owned(execution_id, uid, "resolve")
        if workflow:
            return tasks.resolve(document, execution.variables, execution.broker_placeholders)
        return resolve_document(document, execution.variables)

    def task(self, execution_id: str, uid: int, name: str) -> dict[str, Any]:
        """One workflow task's config, resolved; for an agent-call task also the child
        execution's ``runtime_env`` with each value's secret flag."""
        execution = self._owned(execution_id, uid, "task")
        config = next((c for n, c in execution.tasks if n == name), _MISSING)
        if config is _MISSING:
            raise ExecutionUnknown(execution_id, f"has no task {name!r} with placeholders")
        broker = execution.broker_placeholders
        answer = {
            "name": name,
            "config": tasks.resolve(config, execution.variables, broker, f"task {name}"),
        }
        child = tasks.child_runtime_env(config, execution.variables, broker)
        if child is not None:
            answer["runtime_env"] = child
        return answer

    # --- end ----------------------------------------------------------------------------------

    async def end(self, execution_id: str, reason: str, uid: int | None = None) -> Record:
        """End it (shielded from cancellation): wipe, destroy, release, revoke."""
        record = self.get(execution_id, uid)
        await record.ready.wait()
        await self._finish(record, reason, lease_gone=False)
        return record

    async def fail(self, record: Record, why: str) -> None:
        """The lease is gone from under us: clean up with the login token instead."""
        await self._finish(record, why, lease_gone=True)

    async def _finish(self, record: Record, reason: str, lease_gone: bool) -> None:
        async with record.lock:
            if record.state is not State.ACTIVE or record.execution is None:
                return
            record.state = State.ENDING
            if record.timer is not None:
                record.timer.cancel()
            if lease_gone:
                await self._core.keeper.check()  # the login may be gone too: log in again
            execution = record.execution
            cleanup = await asyncio.shield(self._core.end(execution, lease_gone))
            self._ended_as(record, cleanup, reason, State.FAILED if lease_gone else State.ENDED)
            if cleanup.pending:
                task = asyncio.create_task(self._retry(record, execution, cleanup, reason))
                self._retries[record.id] = (task, execution, cleanup)

    async def _retry(
        self, record: Record, execution: Execution, cleanup: Cleanup, reason: str
    ) -> None:
        """Retry what Vault could not do until done or the context would have expired."""
        left = 3600.0
        if execution.expires_at is not None:
            left = (execution.expires_at - datetime.now(UTC)).total_seconds()
        try:
            await self._core.finish(execution, cleanup, time.monotonic() + max(left, 0.0))
        finally:
            self._retries.pop(record.id, None)
        record.ended = Ended(reason=reason, **cleanup.as_json())

    def pending(self) -> dict[str, tuple[list[str], str]]:
        """Executions whose cleanup is still being retried: id → (steps, lease accessor)."""
        return {
            execution_id: (cleanup.pending, execution.lease.login.accessor)
            for execution_id, (_, execution, cleanup) in self._retries.items()
        }

    async def stop_retries(self) -> None:
        """At shutdown: stop retrying and say, with accessors only, what is still pending."""
        for execution_id, (steps, accessor) in self.pending().items():
            logs.event("cleanup still pending at shutdown", level=30, execution_id=execution_id,
                       pending=steps, lease_accessor=accessor)  # fmt: skip
        tasks = [task for task, _, _ in self._retries.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _ended_as(self, record: Record, cleanup: Cleanup, reason: str, state: State) -> None:
        record.execution, record.state = None, state
        record.ended = Ended(reason=reason, **cleanup.as_json())
        record.ended_at = time.monotonic()
        self._active.pop(record.id, None)
        self._ended[record.id] = record
        self._forget_old()
        self._metrics.ended.labels("failed" if state is State.FAILED else reason).inc()
        self._metrics.active.dec()

    async def watch_leases(self, interval: float) -> None:
        """Notice leases revoked from outside; fail their executions and wipe their files."""
        while True:
            await asyncio.sleep(interval)
            for entry in [r for r in self.active() if r.state is State.ACTIVE]:
                execution = entry.execution
                if execution is None:
                    continue
                try:
                    alive = await self._core.lease_alive(execution)
                except VaultError as exc:
                    logs.event("lease check failed", execution_id=entry.id, error=str(exc))
                    continue
                if not alive:
                    logs.security("lease revoked from outside", "lease-revoked",
                                  execution_id=entry.id)  # fmt: skip
                    await self.fail(entry, "lease revoked")

    async def end_all(self, reason: str) -> None:
        results = await asyncio.gather(
            *(self.end(r.id, reason) for r in self.active()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BrokerError):
                logs.event("ending an execution failed", level=40, error=str(result))
