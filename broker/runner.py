"""One-shot runner mode: ``stigmer-broker run -- CMD``.

login → read the context → decrypt (one batch) → resolve → render → run CMD → on its exit, or
on SIGINT/SIGTERM: wipe the files, destroy the context, revoke the token, exit with CMD's code.
The steps live in :class:`ExecutionSession` so the sidecar can reuse them.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Literal

from broker import ids, logs
from broker.config import Layout
from broker.errors import BrokerError, ConfigError, RevokeError, ValidationError
from broker.model import ExecutionContext
from broker.render import (
    GROUP_READABLE,
    PRIVATE,
    RenderedFiles,
    prepare_directory,
    render,
    wipe,
)
from broker.resolve import Variable, resolve_servers
from broker.store import read_context
from broker.vault import (
    KV,
    Login,
    Transit,
    VaultClient,
    approle_login,
    create_child_token,
    jwt_login,
    revoke_self,
    unwrap_secret_id,
)
from broker.vault.auth import read_credential_file, read_jwt
from broker.vault.renew import TokenRenewer

AuthMethod = Literal["jwt", "kubernetes", "token", "approle"]
_STRIPPED_FROM_CHILD = ("VAULT_", "BAO_", "STIGMER_DEV_IDENTITY_KEY")


@dataclass(frozen=True)
class RunOptions:
    tenant: str
    execution_id: str
    out_dir: Path
    auth: AuthMethod = "jwt"
    jwt_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    role: str = ""  # default: stigmer-runner (jwt), stigmer-runner-<tenant> (approle)
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    allow_disk: bool = False
    allow_secret_in_args: bool = False
    group_readable: bool = False  # sidecar: the runner reads the files as a group member


@dataclass
class Cleanup:
    """What ending an execution did; ``errors`` never hide the first failure."""

    files_removed: list[str] = field(default_factory=list)
    context: str = "kept"
    token: str = "kept"
    claim: str = "none"
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "files_removed": self.files_removed,
            "context": self.context,
            "lease": self.token,
            "claim": self.claim,
            "errors": self.errors,
        }


def login_as_runner(client: VaultClient, layout: Layout, options: RunOptions) -> Login:
    """One login with the runner's own identity (JWT, Kubernetes or AppRole), exactly once."""
    if options.auth in ("jwt", "kubernetes"):
        mount = layout.jwt_mount if options.auth == "jwt" else layout.kubernetes_mount
        role = options.role or layout.runner_role
        return jwt_login(client, mount, role, read_jwt(options.jwt_file), method=options.auth)
    if options.auth == "approle":
        if options.role_id_file is None or options.secret_id_file is None:
            raise ConfigError("--auth approle needs --role-id-file and --secret-id-file")
        role = options.role or layout.approle_role(options.tenant)
        role_id = read_credential_file("--role-id-file", options.role_id_file)
        wrapped = read_credential_file("--secret-id-file", options.secret_id_file)
        secret_id = unwrap_secret_id(client, wrapped, layout.approle_mount, role)
        return approle_login(client, layout.approle_mount, role_id, secret_id)
    raise ConfigError(f"--auth {options.auth} is not a runner identity")


class ExecutionSession:
    """One execution on the runner side: its token, its context, its files."""

    def __init__(self, client: VaultClient, layout: Layout, options: RunOptions) -> None:
        ids.tenant(options.tenant)
        ids.execution_id(options.execution_id)
        self._client = client
        self._layout = layout
        self.options = options
        self.login: Login | None = None
        self.vault: VaultClient | None = None
        self.context: ExecutionContext | None = None
        self.variables: dict[str, Variable] = {}
        self.files: RenderedFiles | None = None
        self._directory: Path | None = None

    @property
    def _context_path(self) -> str:
        return self._layout.context_path(self.options.tenant, self.options.execution_id)

    def read_context(self, client: VaultClient | None = None) -> ExecutionContext:
        """The context, checked for tenant and expiry, read with ``client`` (default: this
        execution's token)."""
        options = self.options
        client = client or self.vault or self._client
        context = read_context(client, self._layout, options.tenant, options.execution_id)
        spec = context.spec
        if spec.tenant and spec.tenant != self.options.tenant:
            raise ValidationError(
                f"execution {spec.execution_id}", ["context belongs to another tenant"]
            )
        if spec.expires_at and spec.expires_at <= datetime.now(UTC):
            raise ValidationError(f"execution {spec.execution_id}", ["context has expired"])
        return context

    def authenticate(self) -> None:
        """Obtain this execution's token: a login (JWT, Kubernetes, AppRole) or a child token."""
        options = self.options
        if options.auth == "token":
            self.login = self._child_of_given_token()
        else:
            self.login = login_as_runner(self._client, self._layout, options)
        self.vault = self._client.with_token(self.login.token)
        logs.event(
            "logged in",
            auth=options.auth,
            accessor=self.login.accessor,
            ttl=self.login.ttl,
            execution_id=options.execution_id,
        )

    def _child_of_given_token(self) -> Login:
        options = self.options
        if not self._client.token:
            raise ConfigError("--auth token needs VAULT_TOKEN (or BAO_TOKEN)")
        context = self.read_context(self._client)
        remaining = 3600
        if context.spec.expires_at:
            remaining = int((context.spec.expires_at - datetime.now(UTC)).total_seconds())
        return create_child_token(
            self._client,
            max(remaining, 1),
            f"stigmer-run-{options.execution_id}",
            {"execution_id": options.execution_id, "tenant": options.tenant},
        )

    def use_token(self, login: Login) -> None:
        """Use a token obtained elsewhere (the sidecar's per-execution lease)."""
        self.login = login
        self.vault = self._client.with_token(login.token)

    def prepare(self, context: ExecutionContext | None = None) -> RenderedFiles:
        """Read, decrypt, resolve and render; nothing is written before all of it succeeded."""
        assert self.vault is not None, "authenticate() first"
        options = self.options
        self.context = context = context or self.read_context()
        secret_names = [n for n, v in context.spec.data.items() if v.is_secret]
        plaintexts = Transit(self.vault, self._layout.transit_mount).decrypt(
            self._layout.transit_key(options.tenant),
            [context.spec.data[n].value for n in secret_names],
        )
        logs.redact_values(plaintexts)
        decrypted = dict(zip(secret_names, plaintexts, strict=True))
        self.variables = {
            name: Variable(decrypted.get(name, value.value), value.is_secret, False, "context")
            for name, value in context.spec.data.items()
        }
        logs.event(
            "context decrypted",
            execution_id=options.execution_id,
            variables=len(self.variables),
            secrets=len(secret_names),
        )
        allow = options.allow_secret_in_args or context.spec.allow_secret_in_args
        servers = resolve_servers(context.spec.mcp_servers, self.variables, allow)
        dir_mode, file_mode = GROUP_READABLE if options.group_readable else PRIVATE
        self._directory = prepare_directory(
            options.out_dir, options.execution_id, options.allow_disk, dir_mode
        )
        self.files = render(
            self._directory,
            options.execution_id,
            options.tenant,
            self.variables,
            servers,
            context.spec.expires_at,
            file_mode,
        )
        logs.event(
            "files rendered", execution_id=options.execution_id, directory=str(self._directory)
        )
        return self.files

    def child_environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """The runner's environment: the broker's minus Vault credentials, plus the variables."""
        environ = {k: v for k, v in base.items() if not k.startswith(_STRIPPED_FROM_CHILD)}
        environ.update({name: var.value for name, var in self.variables.items()})
        if self.files is not None:
            environ.update(
                STIGMER_EXECUTION_ID=self.options.execution_id,
                STIGMER_MCP_CONFIG=str(self.files.mcp_json),
                STIGMER_ENV_FILE=str(self.files.env),
                STIGMER_ENV_JSON=str(self.files.env_json),
                STIGMER_MANIFEST=str(self.files.manifest),
            )
        return environ

    def end(
        self,
        destroy_context: bool = True,
        release_claim: bool = False,
        via: VaultClient | None = None,
    ) -> Cleanup:
        """Wipe the files, destroy the context, release the claim, revoke the token.

        Every step is attempted. ``via`` does the Vault steps when this execution's own token is
        already gone (revoked from outside); its token is then not revoked again.
        """
        report = Cleanup()
        if self._directory is not None:
            try:
                report.files_removed = wipe(self._directory)
            except OSError as exc:
                report.errors.append(f"wipe {self._directory}: {exc.strerror}")
        actor = via or self.vault
        if destroy_context and actor is not None:
            try:
                KV(actor, self._layout.kv_mount).destroy(self._context_path)
                report.context = "destroyed"
            except BrokerError as exc:
                report.errors.append(str(exc))
        if release_claim and actor is not None:
            claim = self._layout.claim_path(self.options.tenant, self.options.execution_id)
            try:
                KV(actor, self._layout.kv_mount).destroy(claim)
                report.claim = "released"
            except BrokerError as exc:
                report.errors.append(str(exc))
        if via is not None:
            report.token = "already revoked"
        elif self.vault is not None:
            try:
                revoke_self(self.vault)
                report.token = "revoked"
            except BrokerError as exc:
                report.errors.append(
                    str(RevokeError(f"revoking the execution token failed: {exc}"))
                )
        logs.event(
            "execution ended",
            execution_id=self.options.execution_id,
            files_removed=len(report.files_removed),
            context=report.context,
            token=report.token,
            errors=report.errors,
        )
        return report


class _Signals:
    """Forward SIGINT/SIGTERM to the child; before there is a child, interrupt the broker."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
            return
        if self.child is None:
            raise KeyboardInterrupt

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run(session: ExecutionSession, command: Sequence[str]) -> int:
    """Prepare the execution, run ``command`` with it, clean up, return the command's status."""
    if not command:
        raise ConfigError("no command given after --")
    signals = _Signals()
    signals.install()
    status = 1
    started = interrupted = False
    renewer: TokenRenewer | None = None
    try:
        session.authenticate()
        if session.login is not None and session.vault is not None and session.login.renewable:
            renewer = TokenRenewer(session.vault, session.login.ttl, session.login.accessor).start()
        session.prepare()
        environ = session.child_environment(os.environ)
        try:
            signals.child = subprocess.Popen(list(command), env=environ)
        except OSError as exc:
            logs.event("command failed to start", command=command[0], error=exc.strerror)
            raise ConfigError(f"command {command[0]!r} cannot be started: {exc.strerror}") from None
        started = True
        logs.event(
            "command started", pid=signals.child.pid, execution_id=session.options.execution_id
        )
        status = exit_status(signals.child.wait())
        logs.event("command exited", status=status, execution_id=session.options.execution_id)
        return status
    except KeyboardInterrupt:
        interrupted = True
        signum = signals.received or signal.SIGINT
        logs.event("interrupted before the command started", signal=signal.Signals(signum).name)
        return 128 + signum
    finally:
        if renewer is not None:
            renewer.stop()
        signals.child = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # cleanup must finish
        try:
            report = session.end(destroy_context=started or interrupted)
        finally:
            signals.restore()
        if report.errors and started and status == 0:
            raise RevokeError("; ".join(report.errors))
