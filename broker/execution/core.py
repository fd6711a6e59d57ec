"""Prepare one execution and end it, the same way for every front end.

prepare: (read the context ‖ the login writes the claim) → lease (``LeaseMode``) → (decrypt,
one batch ‖ the lease records itself in the claim's metadata) → resolve → render; a token given
without its accessor claims with its lease, after the read. No file is written before
decryption and resolution succeeded; whatever was acquired is given back if anything fails or
the caller is cancelled, and the context is kept so the execution can be retried.

end: drop the plaintext (memory, log redactor) → destroy the context, release the claim,
revoke the lease ‖ wipe the files (in a worker thread if the runner added any). Every step is
attempted; when the lease is already gone the login token does the Vault steps.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextlib import nullcontext
from dataclasses import replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from broker import logs, names, tasks
from broker.concurrency import KeyedLocks, cancel_all
from broker.config import Layout
from broker.errors import BrokerError, ClaimConflict, PermissionDenied, ValidationError, VaultError
from broker.execution import claims
from broker.execution import context as contexts
from broker.execution.cleanup import Cleanup
from broker.execution.keeper import HeldToken, TokenKeeper
from broker.limits import CONTEXTS, Limits
from broker.logs import REDACTOR, Registration
from broker.protocol import FilePaths, runner_variables
from broker.records import field, record
from broker.render.files import contents, render
from broker.render.outdir import ExecutionDirectory, OutputRoot
from broker.render.wipe import wipe_and_release
from broker.resolve import ServerConfig, Variable, resolve_servers
from broker.vault import (
    KV,
    Login,
    Transit,
    VaultClient,
    create_child_token,
    deadline,
    lookup_self,
    revoke_self,
)
from broker.vault.retry import single_attempt

STRIPPED_FROM_CHILD = ("VAULT_", "BAO_", "STIGMER_DEV_IDENTITY_KEY")
FIRST_CLEANUP_DEADLINE = 5.0  # seconds for the first try at the Vault steps of an end
# Event-loop turns an end's Vault requests take to reach their sockets (two here, four to be
# safe): the wipe starts after them (a worker thread's would take the GIL from the event loop).
# Only a matter of speed: a request still unsent then goes out after or beside the wipe.
SEND_TURNS = 4


def _discard(execution: Execution) -> None:
    """An execution that will not be delivered after all: its plaintext and files go."""
    execution.drop_plaintext()
    wipe_and_release(execution.directory)


def _only_ours(execution: Execution) -> bool:
    """Does the directory hold only the files the broker wrote (a wipe of a few files)?"""
    try:
        return set(os.listdir(execution.directory.path)) <= execution.written
    except OSError:
        return False  # gone, or not ours to list: the wipe finds out, off the event loop


class LeaseMode(Enum):
    LOGIN = "login"  # the login is the execution's lease (run: one execution per login)
    CHILD = "child"  # a child token per execution (sidecar; run with a given token)


@record(frozen=True)
class CoreSettings:
    tenant: str
    out: OutputRoot
    lease_mode: LeaseMode
    holder: str  # recorded in claims: "run" or "sidecar"
    pod: str = ""
    allow_secret_in_args: bool = False
    mcp_formats: tuple[str, ...] = ()  # MCP config shapes beside mcp.json (--mcp-format)
    child_policies: tuple[str, ...] | None = ("stigmer-runner",)  # None: the parent's
    deadline: float = 60.0  # seconds for one whole preparation
    context_limits: Limits = CONTEXTS  # a larger context is refused before decrypting


@record(eq=False)
class Lease:
    held: HeldToken  # the login it depends on (LeaseMode.LOGIN: the lease itself)
    login: Login
    client: VaultClient


@record(eq=False)
class _GiveBack:
    """What a failed preparation still has to give back."""

    execution_id: str
    lease: Lease | None  # None: it failed before its lease existed
    claim_by: tuple[VaultClient, claims.Claimant] | None  # who releases it; who wrote it
    claim: bool  # release the claim
    child: bool  # revoke the child lease
    login: bool  # LeaseMode.LOGIN: revoke the login that was the lease

    @property
    def lease_accessor(self) -> str:
        return self.lease.login.accessor if self.lease else ""

    @property
    def claim_accessor(self) -> str:
        return self.claim_by[1].lease_accessor if self.claim_by else ""

    @property
    def given_up(self) -> frozenset[str]:
        """The accessors a claim left behind may name: takeovers allowed until released."""
        return frozenset(a for a in (self.lease_accessor, self.claim_accessor) if a)

    @property
    def pending(self) -> list[str]:
        return [name for name in ("claim", "child", "login") if getattr(self, name)]


@record(eq=False)
class Execution:
    """A prepared execution: its plaintext lives here until ``end`` drops it."""

    id: str
    tenant: str
    expires_at: datetime | None
    variables: dict[str, Variable] = field(repr=False)
    directory: ExecutionDirectory
    lease: Lease
    registration: Registration
    detached: bool = False  # the lease no longer counts against its login
    tasks: list[tuple[str, Any]] = field(default_factory=list)  # unresolved, for /tasks/{name}
    broker_placeholders: bool = False
    written: frozenset[str] = frozenset()  # the names of the files the broker wrote

    @property
    def files(self) -> FilePaths:
        return FilePaths.of(self.directory.path)

    def drop_plaintext(self) -> None:
        """The values leave memory and the log redactor (the files are the wipe's)."""
        self.registration.release()
        self.variables.clear()

    def child_environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """The runner's environment: ``base`` minus Vault credentials, plus the variables."""
        environ = {k: v for k, v in base.items() if not k.startswith(STRIPPED_FROM_CHILD)}
        environ.update({name: var.value for name, var in self.variables.items()})
        environ.update(runner_variables(self.id, self.files))
        return environ


class ExecutionCore:
    def __init__(
        self, client: VaultClient, layout: Layout, keeper: TokenKeeper, settings: CoreSettings
    ) -> None:
        self._client = client
        self._layout = layout
        self.keeper = keeper
        self.settings = settings
        # Per execution id, what the give-backs whose claim may still stand gave up (accessors,
        # counted per give-back): a new preparation of that id may take such a claim over.
        self._unreleased: dict[str, Counter[frozenset[str]]] = {}
        # A claim's take (and takeover) and a give-back's release of it, one at a time: else a
        # release could destroy the claim a takeover had just written.
        self._claim_locks = KeyedLocks()
        self._leftovers: set[asyncio.Task[None]] = set()  # give-backs still being retried

    # --- prepare ------------------------------------------------------------------------------

    async def prepare(self, execution_id: str, reader_uid: int | None = None) -> Execution:
        """Claim, decrypt, resolve and render ``execution_id`` (files readable by
        ``reader_uid`` when that is another uid)."""
        names.execution_id(execution_id)
        with deadline(self.settings.deadline):
            held = self.keeper.current
            if held is None:
                raise BrokerError("not logged in to Vault")
            path = self._layout.context_path(self.settings.tenant, execution_id)
            kv = KV(held.client, self._layout.kv_mount)
            reading = contexts.read(
                kv, path, execution_id, self.settings.tenant, self.settings.context_limits
            )
            if held.accessor:  # a login of ours (not a token given without its accessor)
                return await self._claim_while_reading(reading, execution_id, reader_uid)
            context = await reading
            lease = await self._lease(context)
            return await self._claim_and_deliver(context, lease, reader_uid)

    async def _claim_while_reading(
        self,
        reading: Awaitable[contexts.StoredContext],
        execution_id: str,
        reader_uid: int | None,
    ) -> Execution:
        """The login writes the claim while the context is read (one round trip less): the
        claim's data names the login, its metadata the lease once there is one.

        LeaseMode.LOGIN: the login is the lease. A context that cannot be delivered gives the
        claim back; one living about as long as the login can (``--login-max-ttl``) gives it
        back too and takes the sequential way, with a fresh login. LeaseMode.CHILD: the
        child lease is created once the context's lifetime is known."""
        held = await self.keeper.token_for(0)
        writer = Lease(held, held.login, held.client)
        login_is_lease = self.settings.lease_mode is LeaseMode.LOGIN
        lease = writer if login_is_lease else None
        claimant, now = self._claimant(writer, execution_id), datetime.now(UTC)
        taking = self._take(held.client, execution_id, claimant, now)
        claimed = True  # until the claim answers: perhaps ours
        try:
            context, took = await asyncio.gather(reading, taking, return_exceptions=True)
            claimed = not isinstance(took, ClaimConflict)  # an error: perhaps ours
            if isinstance(context, BaseException):
                raise context  # the context's error first, as when it was read first
            remaining = self._remaining(context)
            if isinstance(took, BaseException):
                raise took
            if not login_is_lease:
                lease = await self._lease(context)
                holder = replace(claimant, lease_accessor=lease.login.accessor)
                return await self._decrypt_and_deliver(context, lease, holder, now, reader_uid)
            if self.keeper.covers(held, remaining + self._slack):
                return await self._decrypt_and_deliver(context, writer, claimant, now, reader_uid)
            await claims.release_if_ours(held.client, self._layout, self.settings.tenant,
                                         execution_id, claimant)  # fmt: skip
            claimed = False
        except BaseException:
            claim = ((lease or writer).client, claimant) if claimed else None
            await asyncio.shield(self._give_back(execution_id, lease, claim))
            raise
        finally:
            if not login_is_lease:
                await self.keeper.detach(held)  # the claim's writer: the lease has its own
        await self.keeper.detach(held)
        return await self._claim_and_deliver(context, await self._lease(context), reader_uid)

    @property
    def _slack(self) -> float:
        """How much longer than its lease a login must live."""
        return min(5.0, self.keeper.max_ttl / 10)

    def _remaining(self, context: contexts.StoredContext) -> int:
        """Whole seconds the context lives on; refused when not even a fresh login (and so no
        lease) can outlive it."""
        remaining = math.ceil(context.remaining())
        if remaining + self._slack > self.keeper.max_ttl:
            raise ValidationError(
                f"execution {context.execution_id}",
                [
                    f"the context lives {remaining}s more, longer than a lease can "
                    f"({int(self.keeper.max_ttl)}s, the runner role's token_max_ttl): issue it "
                    "with a shorter --ttl or raise token_max_ttl and --login-max-ttl"
                ],
            )
        return remaining

    async def _lease(self, context: contexts.StoredContext) -> Lease:
        remaining = self._remaining(context)
        held = await self.keeper.token_for(remaining + self._slack)
        if self.settings.lease_mode is LeaseMode.LOGIN:
            return Lease(held, held.login, held.client)
        try:
            login = await create_child_token(
                held.client,
                remaining,
                f"stigmer-exec-{context.execution_id}",
                {"execution_id": context.execution_id, "tenant": context.tenant,
                 **({"pod": self.settings.pod} if self.settings.pod else {})},
                list(self.settings.child_policies) if self.settings.child_policies else None,
                no_default_policy=self.settings.child_policies is not None,
            )  # fmt: skip
        except BaseException:
            await self.keeper.detach(held)
            raise
        return Lease(held, login, held.client.with_token(login.token))

    def _claimant(self, lease: Lease, execution_id: str) -> claims.Claimant:
        settings = self.settings
        given_up = frozenset[str]().union(*self._unreleased.get(execution_id, ()))
        return claims.Claimant(settings.pod, settings.holder, lease.login.accessor, given_up)

    async def _take(
        self, writer: VaultClient, execution_id: str, claimant: claims.Claimant, now: datetime
    ) -> None:
        async with self._claim_locks.hold(execution_id):
            await claims.take(
                writer, self._layout, self.settings.tenant, execution_id, claimant, now
            )

    async def _claim_and_deliver(
        self, context: contexts.StoredContext, lease: Lease, reader_uid: int | None
    ) -> Execution:
        claimant, now = self._claimant(lease, context.execution_id), datetime.now(UTC)
        try:
            await self._take(lease.client, context.execution_id, claimant, now)
            return await self._decrypt_and_deliver(context, lease, claimant, now, reader_uid)
        except BaseException as exc:
            claimed = not isinstance(exc, ClaimConflict)  # perhaps ours, perhaps half-done
            claim = (lease.client, claimant) if claimed else None
            await asyncio.shield(self._give_back(context.execution_id, lease, claim))
            raise

    async def _decrypt_and_deliver(
        self,
        context: contexts.StoredContext,
        lease: Lease,
        claimant: claims.Claimant,
        now: datetime,
        reader_uid: int | None,
    ) -> Execution:
        """The claim is ours: decrypt, and record the holder in the claim's metadata meanwhile.
        The decryption's request goes first (the files wait for it); the files are written
        while the metadata's answer may still be on its way, and wiped if it is a failure."""
        secret_names = [name for name, value in context.data.items() if value.is_secret]
        decrypting = asyncio.ensure_future(
            Transit(lease.client, self._layout.transit_mount).decrypt(
                self._layout.transit_key(context.tenant),
                [context.data[name].value for name in secret_names],
            )
        )
        where = (lease.client, self._layout, context.tenant, context.execution_id, claimant)
        recording = asyncio.ensure_future(claims.attribute(*where, now, context.expires_at))
        try:
            plaintexts = await decrypting
            execution = self._deliver(context, lease, reader_uid, secret_names, plaintexts)
        except BaseException:
            await cancel_all((decrypting, recording))
            raise
        try:
            await recording
        except BaseException:
            _discard(execution)
            raise
        return execution

    def _deliver(
        self,
        context: contexts.StoredContext,
        lease: Lease,
        reader_uid: int | None,
        secret_names: list[str],
        plaintexts: list[str],
    ) -> Execution:
        registration = REDACTOR.register(plaintexts)
        decrypted = dict(zip(secret_names, plaintexts, strict=True))
        variables = {
            name: Variable(decrypted.get(name, value.value), value.is_secret, False, "context")
            for name, value in context.data.items()
        }
        try:
            directory, written = self._render(context, variables, reader_uid)
        except BaseException:
            registration.release()
            raise
        logs.event(
            "execution prepared",
            execution_id=context.execution_id,
            lease_accessor=lease.login.accessor,
            variables=len(variables),
            secrets=len(secret_names),
            directory=str(directory.path),
        )
        return Execution(
            context.execution_id, context.tenant, context.expires_at, variables, directory,
            lease, registration, tasks=context.tasks,
            broker_placeholders=context.broker_placeholders, written=written,
        )  # fmt: skip

    def _render(
        self,
        context: contexts.StoredContext,
        variables: dict[str, Variable],
        reader_uid: int | None,
    ) -> tuple[ExecutionDirectory, frozenset[str]]:
        allow = self.settings.allow_secret_in_args or context.allow_secret_in_args
        servers: list[ServerConfig] = resolve_servers(context.mcp_servers, variables, allow)
        resolved_tasks = {
            name: tasks.resolve(config, variables, context.broker_placeholders, f"task {name}")
            for name, config in context.tasks
        }
        files = contents(
            context.execution_id, context.tenant, variables, servers, context.expires_at,
            self.settings.mcp_formats, resolved_tasks,
        )  # fmt: skip
        directory = self.settings.out.create(context.execution_id, reader_uid)
        try:
            render(directory, files, reader_uid)
        except BaseException:
            wipe_and_release(directory)
            raise
        return directory, frozenset(files)

    async def _give_back(
        self,
        execution_id: str,
        lease: Lease | None,
        claim: tuple[VaultClient, claims.Claimant] | None,
    ) -> None:
        """A preparation failed: its claim (``claim``: who can release it, and who wrote it)
        and its lease go. One request each now, in a context of its own (the
        preparation's deadline may be spent), so the caller hears of the failure at once;
        what Vault could not do is retried in the background until done or until the lease
        would have expired anyway."""
        login_is_lease = self.settings.lease_mode is LeaseMode.LOGIN
        steps = _GiveBack(execution_id, lease, claim, claim is not None,
                          child=bool(lease and not login_is_lease),
                          login=bool(lease and login_is_lease))  # fmt: skip
        if steps.claim:
            self._unreleased.setdefault(execution_id, Counter())[steps.given_up] += 1
        attempt = asyncio.create_task(self._give_back_steps(steps, once=True),
                                      context=contextvars.Context())  # fmt: skip
        await attempt
        if lease is not None:
            await self.keeper.detach(lease.held)
        if steps.pending:
            retry = asyncio.create_task(self._give_back_later(steps),
                                        context=contextvars.Context())  # fmt: skip
            self._leftovers.add(retry)
            retry.add_done_callback(self._leftovers.discard)

    async def _give_back_steps(self, steps: _GiveBack, *, once: bool = False) -> None:
        with deadline(FIRST_CLEANUP_DEADLINE), single_attempt() if once else nullcontext():
            if steps.claim and steps.claim_by:
                client, writer = steps.claim_by
                async with self._claim_locks.hold(steps.execution_id):
                    steps.claim = not await self._vault_step(
                        claims.release_if_ours(client, self._layout, self.settings.tenant,
                                               steps.execution_id, writer),
                        "claim release failed", steps.execution_id,
                    )  # fmt: skip
                if not steps.claim:
                    self._released(steps)
            if steps.claim:
                return  # the lease stays until its claim is released
            if steps.child and steps.lease:
                steps.child = not await self._vault_step(
                    revoke_self(steps.lease.client), "lease revoke failed", steps.execution_id
                )
            if steps.login and steps.lease:
                steps.login = not await self.keeper.revoke(steps.lease.held)

    def _released(self, steps: _GiveBack) -> None:
        """``steps`` (once) left no claim behind: nothing of it to take over any more. Only
        accessors are kept, never a give-back's lease: one abandoned keeps no token alive."""
        unreleased, given_up = self._unreleased[steps.execution_id], steps.given_up
        unreleased[given_up] -= 1
        if not unreleased[given_up]:
            del unreleased[given_up]
        if not unreleased:
            del self._unreleased[steps.execution_id]

    async def _give_back_later(self, steps: _GiveBack) -> None:
        lifetime = steps.lease.login.ttl if steps.lease else claims.UNRECORDED.total_seconds()
        until = time.monotonic() + max(lifetime, FIRST_CLEANUP_DEADLINE)
        try:
            await self._until_done(
                lambda: bool(steps.pending),
                lambda: self._give_back_steps(steps),
                until,
            )
        finally:
            done = not steps.pending
            logs.event("failed preparation given back" if done else "give-back abandoned",
                       level=20 if done else 30, execution_id=steps.execution_id,
                       pending=steps.pending,
                       lease_accessor=steps.lease_accessor,
                       claim_accessor=steps.claim_accessor)  # fmt: skip

    async def _vault_step(
        self, step: Coroutine[Any, Any, object], what: str, execution_id: str
    ) -> bool:
        try:
            await step
        except PermissionDenied:
            return True  # the lease is gone already: so is what only it could do
        except VaultError as exc:
            logs.event(what, level=40, execution_id=execution_id, error=str(exc))
            return False
        return True

    async def stop_giving_back(self) -> None:
        """At shutdown: stop retrying give-backs (revoking the login ends child leases; the
        reaper frees a claim left behind)."""
        for task in list(self._leftovers):
            task.cancel()
        await asyncio.gather(*self._leftovers, return_exceptions=True)

    async def settle(self, seconds: float) -> None:
        """Wait up to ``seconds`` for failed preparations to be given back (``run`` before it
        exits); a sidecar lets them finish on their own."""
        if self._leftovers:
            await asyncio.wait(list(self._leftovers), timeout=seconds)

    # --- end ----------------------------------------------------------------------------------

    async def end(self, execution: Execution, lease_gone: bool = False) -> Cleanup:
        """Drop the plaintext, wipe ‖ destroy the context, release the claim, revoke the lease.

        ``lease_gone``: the lease was revoked from outside; the login does the Vault steps.
        Steps Vault could not do stay in ``Cleanup.pending`` for :meth:`finish`.
        """
        report = Cleanup()
        execution.drop_plaintext()
        if lease_gone:
            report.lease = "already revoked"
        with deadline(FIRST_CLEANUP_DEADLINE):  # an outage leaves steps pending for finish()
            # Vault's steps go out, then the files are wiped while Vault works: here when only
            # the broker's files are there, else in a worker thread (a runner's 10,000
            # entries must not stall the event loop).
            vault = asyncio.ensure_future(self._vault_steps(execution, report))
            for _ in range(SEND_TURNS):
                await asyncio.sleep(0)
            try:
                if _only_ours(execution):
                    wiped = wipe_and_release(execution.directory)
                else:
                    wiped = await asyncio.to_thread(wipe_and_release, execution.directory)
                report.files_removed, report.file_errors = wiped.removed, list(wiped.failed)
            finally:
                await vault
        logs.event("execution ended", execution_id=execution.id, **report.as_json())
        return report

    async def finish(self, execution: Execution, report: Cleanup, until: float) -> None:
        """Retry the pending Vault steps with backoff until done or ``until`` (monotonic)."""

        async def steps() -> None:
            with deadline(max(1.0, until - time.monotonic())):
                await self._vault_steps(execution, report)

        await self._until_done(lambda: bool(report.pending), steps, until)
        outcome = "cleanup finished" if not report.pending else "cleanup given up"
        logs.event(outcome, execution_id=execution.id, pending=report.pending,
                   lease_accessor=execution.lease.login.accessor)  # fmt: skip
        if report.pending:
            await self._detach(execution, report)

    async def _until_done(
        self, pending: Callable[[], bool], step: Callable[[], Awaitable[None]], until: float
    ) -> None:
        """Run ``step`` again, with backoff (0.5 s at least), while ``pending()`` and before
        ``until`` (monotonic): what Vault could not do during an outage."""
        attempt = 0
        while pending() and time.monotonic() < until:
            attempt += 1
            pause = self._client.policy.backoff(min(attempt, 8)) + 0.5
            await asyncio.sleep(min(pause, max(0.0, until - time.monotonic())))
            await step()

    async def _vault_steps(self, execution: Execution, report: Cleanup) -> None:
        lease, layout, tenant = execution.lease, self._layout, execution.tenant
        report.vault_errors = []
        lease_gone = report.lease == "already revoked"
        paths = {"context": layout.context_path(tenant, execution.id),
                 "claim": layout.claim_path(tenant, execution.id)}  # fmt: skip
        steps = [step for step in ("context", "claim") if step in report.pending]
        # A child lease can go in the same round trip as the destroys if the login does them
        # (same policy); a login that is the lease must outlive them.
        together = (self.settings.lease_mode is LeaseMode.CHILD and not lease_gone
                    and "lease" in report.pending and self.keeper.current is not None)  # fmt: skip
        # The revocation, Vault's costliest of the three, goes out first.
        revoking = asyncio.ensure_future(self._revoke_lease(lease, report)) if together else None
        destroying = asyncio.gather(  # independent: one round trip for all
            *(self._destroy(paths[step], lease, lease_gone or together, report) for step in steps)
        )
        if revoking is not None:
            done, report.lease = await asyncio.gather(destroying, revoking)
        else:
            done = await destroying
        for step, destroyed in zip(steps, done, strict=True):
            if destroyed and step == "context":
                report.context = "destroyed"
            elif destroyed:
                report.claim = "released"
        if "lease" in report.pending and not together:
            report.lease = await self._revoke_lease(lease, report)
        if not report.pending:
            await self._detach(execution, report)

    async def _detach(self, execution: Execution, report: Cleanup) -> None:
        if not execution.detached:
            execution.detached = True
            await self.keeper.detach(execution.lease.held)

    async def _destroy(self, path: str, lease: Lease, lease_gone: bool, report: Cleanup) -> bool:
        actors = [] if lease_gone else [lease.client]
        if self.keeper.current is not None:
            actors.append(self.keeper.current.client)
        for index, actor in enumerate(actors):
            try:
                await KV(actor, self._layout.kv_mount).destroy(path)
                return True
            except PermissionDenied as exc:  # the lease expired meanwhile: try the login
                if index == len(actors) - 1:
                    report.vault_errors.append(str(exc))
            except VaultError as exc:
                report.vault_errors.append(str(exc))
                return False
        return False

    async def _revoke_lease(self, lease: Lease, report: Cleanup) -> str:
        if self.settings.lease_mode is LeaseMode.LOGIN:
            if await self.keeper.revoke(lease.held):
                return "revoked"
            report.vault_errors.append(f"revoking the login {lease.login.accessor} failed")
            return "failed"
        try:
            await revoke_self(lease.client)
        except PermissionDenied:
            return "already revoked"  # Vault no longer knows it
        except VaultError as exc:
            report.vault_errors.append(f"revoking the lease failed: {exc}")
            return "failed"
        return "revoked"

    async def lease_alive(self, execution: Execution) -> bool:
        """False when Vault no longer accepts the execution's lease (revoked from outside)."""
        try:
            await lookup_self(execution.lease.client)
        except PermissionDenied:
            return False
        return True
