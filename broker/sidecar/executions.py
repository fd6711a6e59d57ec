"""Per-execution work in the sidecar: claim, lease, decrypt, render; end on DELETE, TTL or shutdown.

Each execution gets its own lease: a child of the sidecar's login token, carrying only the
runner policy, with TTL and explicit max TTL equal to the context's remaining lifetime and
metadata naming the execution and tenant (so Vault's audit log ties every request to it). The
lease writes the exclusive claim (check-and-set 0, recording the pod and the lease accessor),
decrypts, and at the end destroys the context, releases the claim and revokes itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from broker import ids, logs
from broker.config import Layout
from broker.errors import BrokerError, Conflict, PermissionDenied, ValidationError
from broker.resolve import mask, resolve_document
from broker.runner import Cleanup, ExecutionSession, RunOptions
from broker.sidecar.identity import Identity
from broker.sidecar.metrics import Metrics
from broker.vault import KV, Login, VaultClient, create_child_token, lookup_self

EXPIRY_MARGIN = 2.0


class State(StrEnum):
    PREPARING = "preparing"
    ACTIVE = "active"
    ENDING = "ending"
    ENDED = "ended"
    FAILED = "failed"


class ClaimConflict(BrokerError):
    """Someone else holds this execution (another sidecar, or another local caller)."""

    exit_code = 9


class Gone(BrokerError):
    """The execution already ended here; its context is destroyed."""

    exit_code = 10


class NotActive(BrokerError):
    exit_code = 11


@dataclass
class Execution:
    id: str
    owner_uid: int
    session: ExecutionSession
    state: State = State.PREPARING
    lease: Login | None = None
    expires_at: datetime | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: asyncio.TimerHandle | None = None
    cleanup: Cleanup | None = None
    reason: str = ""

    def describe(self) -> dict[str, Any]:
        session = self.session
        answer: dict[str, Any] = {
            "id": self.id,
            "state": str(self.state),
            "tenant": session.options.tenant,
            "expires_at": self.expires_at.isoformat().replace("+00:00", "Z")
            if self.expires_at
            else None,
        }
        if self.state in (State.ACTIVE, State.PREPARING) and session.files is not None:
            answer["files"] = session.files.as_json()
            answer["variables"] = mask(session.variables)
        if self.cleanup is not None:
            answer["ended"] = {"reason": self.reason, **self.cleanup.as_json()}
        return answer


class ExecutionManager:
    def __init__(
        self,
        identity: Identity,
        client: VaultClient,
        layout: Layout,
        options: RunOptions,
        metrics: Metrics,
        pod: str,
    ) -> None:
        self._identity = identity
        self._client = client
        self._layout = layout
        self._options = options
        self._metrics = metrics
        self._pod = pod
        self.executions: dict[str, Execution] = {}

    def active(self) -> list[Execution]:
        return [e for e in self.executions.values() if e.state in (State.PREPARING, State.ACTIVE)]

    # --- prepare ------------------------------------------------------------------------------

    async def prepare(self, execution_id: str, uid: int) -> tuple[bool, Execution]:
        """Claim, lease, decrypt and render; (created, execution). Idempotent per caller."""
        ids.execution_id(execution_id)
        existing = self.executions.get(execution_id)
        if existing is not None:
            if existing.state in (State.ENDED, State.FAILED, State.ENDING):
                raise Gone(f"execution {execution_id} has ended here; its context is destroyed")
            if existing.owner_uid != uid:
                self._security_event(execution_id, uid, "held by another local caller")
                raise ClaimConflict(f"execution {execution_id} is held by another caller")
            await existing.ready.wait()
            if existing.state is not State.ACTIVE:
                raise Gone(f"execution {execution_id} failed to prepare")
            return False, existing
        options = replace(self._options, execution_id=execution_id)
        execution = Execution(
            execution_id, uid, ExecutionSession(self._client, self._layout, options)
        )
        self.executions[execution_id] = execution
        started = time.perf_counter()
        # The work runs as its own task: a caller that goes away (cancelled request) does not
        # stop it halfway; a finished execution stays registered and is ended later as usual.
        task = asyncio.ensure_future(self._prepare(execution))
        task.add_done_callback(lambda done: self._prepared(execution, started, done))
        await asyncio.shield(task)
        return True, execution

    def _prepared(self, execution: Execution, started: float, task: asyncio.Future[None]) -> None:
        execution.ready.set()
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            self.executions.pop(execution.id, None)
            name = "CancelledError" if error is None else type(error).__name__
            self._metrics.errors.labels(name).inc()
            return
        self._metrics.prepare_seconds.observe(time.perf_counter() - started)
        self._metrics.started.inc()
        self._metrics.active.inc()

    async def _prepare(self, execution: Execution) -> None:
        session = execution.session
        token = self._identity.current
        if token is None:
            raise BrokerError("the sidecar is not logged in")
        context = await asyncio.to_thread(session.read_context, token.client)
        expires_at = context.spec.expires_at
        left = (expires_at - datetime.now(UTC)).total_seconds() if expires_at else 3600.0
        remaining = math.ceil(left)
        if left <= 0:
            raise ValidationError(f"execution {execution.id}", ["context has expired"])
        token = await self._identity.ensure_lifetime(remaining + 5)
        lease = await asyncio.to_thread(
            create_child_token,
            token.client,
            remaining,
            f"stigmer-exec-{execution.id}",
            {"execution_id": execution.id, "tenant": session.options.tenant, "pod": self._pod},
            ["stigmer-runner"],
            True,
        )
        execution.lease, execution.expires_at = lease, expires_at
        session.use_token(lease)
        claimed = False
        try:
            await asyncio.to_thread(self._claim, session, lease)
            claimed = True
            await asyncio.to_thread(session.prepare, context)
        except BaseException:
            await asyncio.shield(
                asyncio.to_thread(session.end, destroy_context=False, release_claim=claimed)
            )
            raise
        execution.state = State.ACTIVE
        loop = asyncio.get_running_loop()
        # End a little before the deadline, while the lease (same deadline) can still clean up.
        execution.timer = loop.call_later(
            max(remaining - EXPIRY_MARGIN, 0.5),
            lambda: asyncio.ensure_future(self.end(execution.id, "expired")),
        )
        logs.event(
            "execution prepared",
            execution_id=execution.id,
            lease_accessor=lease.accessor,
            variables=len(session.variables),
        )

    def _claim(self, session: ExecutionSession, lease: Login) -> None:
        assert session.vault is not None
        path = self._layout.claim_path(session.options.tenant, session.options.execution_id)
        claim = {
            "pod": self._pod,
            "lease_accessor": lease.accessor,
            "claimed_at": datetime.now(UTC).isoformat(),
        }
        try:
            KV(session.vault, self._layout.kv_mount).write(path, claim, cas=0)
        except (Conflict, PermissionDenied):  # the runner policy may only create, never update
            self._metrics.claim_conflicts.inc()
            self._security_event(session.options.execution_id, None, "claimed by another sidecar")
            raise ClaimConflict(
                f"execution {session.options.execution_id} is already claimed"
            ) from None

    def _security_event(self, execution_id: str, uid: int | None, why: str) -> None:
        logs.event(
            "security: execution claim refused",
            execution_id=execution_id,
            peer_uid=uid,
            reason=why,
            pod=self._pod,
        )

    # --- use ----------------------------------------------------------------------------------

    def get(self, execution_id: str) -> Execution:
        ids.execution_id(execution_id)
        execution = self.executions.get(execution_id)
        if execution is None:
            raise NotActive(f"execution {execution_id} is not known to this sidecar")
        return execution

    def resolve(self, execution_id: str, document: Any) -> Any:
        execution = self.get(execution_id)
        if execution.state is not State.ACTIVE:
            raise NotActive(f"execution {execution_id} is {execution.state}")
        return resolve_document(document, execution.session.variables)

    # --- end ----------------------------------------------------------------------------------

    async def end(self, execution_id: str, reason: str, uid: int | None = None) -> Execution:
        """Wipe, destroy the context, release the claim, revoke the lease (shielded)."""
        execution = self.get(execution_id)
        if uid is not None and execution.owner_uid != uid:
            self._security_event(execution_id, uid, "end requested by another local caller")
            raise ClaimConflict(f"execution {execution_id} is held by another caller")
        await execution.ready.wait()
        async with execution.lock:
            if execution.state is not State.ACTIVE:
                return execution
            execution.state = State.ENDING
            if execution.timer is not None:
                execution.timer.cancel()
            session = execution.session
            cleanup = await asyncio.shield(
                asyncio.to_thread(session.end, destroy_context=True, release_claim=True)
            )
            if cleanup.context != "destroyed" or cleanup.claim != "released":
                cleanup = await self._finish_with_login(execution, cleanup)
            self._finish(execution, cleanup, reason, State.ENDED)
        return execution

    async def _finish_with_login(self, execution: Execution, first: Cleanup) -> Cleanup:
        """The lease could not finish (expired, revoked): destroy and release with the login."""
        token = self._identity.current
        if token is None:
            return first
        again = await asyncio.shield(
            asyncio.to_thread(
                execution.session.end,
                destroy_context=first.context != "destroyed",
                release_claim=first.claim != "released",
                via=token.client,
            )
        )
        first.context = "destroyed" if again.context == "destroyed" else first.context
        first.claim = "released" if again.claim == "released" else first.claim
        first.errors = again.errors
        return first

    async def fail(self, execution: Execution, why: str) -> None:
        """The lease is gone from under us: clean up with the login token instead."""
        async with execution.lock:
            if execution.state is not State.ACTIVE:
                return
            execution.state = State.ENDING
            if execution.timer is not None:
                execution.timer.cancel()
            token = self._identity.current
            assert token is not None
            try:
                await asyncio.to_thread(lookup_self, token.client)
            except PermissionDenied:
                token = await self._identity.relogin_if(token)
            cleanup = await asyncio.shield(
                asyncio.to_thread(
                    execution.session.end,
                    destroy_context=True,
                    release_claim=True,
                    via=token.client,
                )
            )
            self._finish(execution, cleanup, why, State.FAILED)

    def _finish(self, execution: Execution, cleanup: Cleanup, reason: str, state: State) -> None:
        execution.cleanup, execution.reason, execution.state = cleanup, reason, state
        outcome = "failed" if state is State.FAILED else reason
        self._metrics.ended.labels(outcome).inc()
        self._metrics.active.dec()
        revoked = "ok" if cleanup.token == "revoked" else "failed"
        if state is not State.FAILED:
            self._metrics.revocations.labels(revoked).inc()
        logs.event("execution ended", execution_id=execution.id, reason=reason, state=str(state),
                   cleanup=cleanup.as_json())  # fmt: skip

    async def watch_leases(self, interval: float) -> None:
        """Notice leases revoked from outside; fail their executions and wipe their files."""
        while True:
            await asyncio.sleep(interval)
            for execution in [e for e in self.executions.values() if e.state is State.ACTIVE]:
                vault = execution.session.vault
                if vault is None:
                    continue
                try:
                    await asyncio.to_thread(lookup_self, vault)
                except PermissionDenied:
                    logs.event("lease revoked from outside", execution_id=execution.id)
                    await self.fail(execution, "lease revoked")
                except BrokerError as exc:
                    logs.event("lease check failed", execution_id=execution.id, error=str(exc))

    async def end_all(self, reason: str) -> None:
        await asyncio.gather(
            *(self.end(e.id, reason) for e in self.active()), return_exceptions=True
        )
