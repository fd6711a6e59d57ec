"""The broker's one error tree: every error a caller can act on, with structured fields.

Callers branch on the class and its fields (``kind``, ``status``, ``operation``, ``path``),
never on message text. Messages name resources, fields, keys, paths and placeholders, never
values, so any error text is safe to log. ``hint`` says how to fix it; the CLI prints it.

::

    BrokerError                   .hint .retryable .diagnostics()        exit code (cli)
    ├─ ConfigError                a setting or flag is missing or wrong            2
    ├─ ValidationError            invalid input: resource + every problem          2
    │  ├─ ResourceNotFound        no such stored resource (an Environment)         2
    │  ├─ ContextNotFound         no context for this execution (any more)        2
    │  └─ ContextExpired          the context is past its expiry                   2
    ├─ ResolveError               unknown placeholders, secrets where they may not go  2
    ├─ VaultError                 .operation .path .status .kind, never a body     3
    │  ├─ VaultUnavailable        retryable: unreachable, sealed, standby, 5xx, 429, timeout
    │  ├─ VaultConfigError        TLS or address problem: fix the settings         2
    │  ├─ PermissionDenied        Vault answered 403                               8
    │  ├─ NotFound                Vault answered 404                               3
    │  ├─ Conflict                check-and-set lost: it exists or changed         3
    │  ├─ RequestTooLarge         the listener's JSON limits refused the request   3
    │  └─ OutcomeUnknown          a token-minting request may have succeeded       3
    ├─ IdentityError              login refused: method, role, allow-listed reason 4
    ├─ DecryptError               one opaque type for every decryption failure     5
    ├─ RenderError                not tmpfs, permissions, unsafe directory         6
    ├─ CleanupError               something of an execution could not be removed   7
    ├─ ExecutionError             an execution's state forbids the request
    │  ├─ ClaimConflict           another claimant holds it                        9
    │  ├─ ExecutionGone           it already ended here                            10
    │  ├─ ExecutionUnknown        this process does not know it                    11
    │  └─ ShuttingDown            the sidecar stopped it (SIGTERM): retry elsewhere  (503)
    └─ BrokerClientError          a runner's request to the sidecar failed (.status)
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""

    hint: str = ""
    retryable: bool = False

    def diagnostics(self) -> str:
        """The message plus how to fix it, for humans."""
        return f"{self}\n  hint: {self.hint}" if self.hint else str(self)


class ConfigError(BrokerError):
    """A setting, flag or environment variable is missing or wrong."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint


class ValidationError(BrokerError):
    """Invalid input: names the resource, the field and the reason for every problem."""

    def __init__(self, resource: str, problems: Sequence[str]) -> None:
        self.resource = resource
        self.problems = list(problems)
        super().__init__(f"{resource}: " + "; ".join(self.problems))


class ResourceNotFound(ValidationError):
    """A stored resource (an Environment) that does not exist."""


class ContextNotFound(ValidationError):
    """No ExecutionContext at the execution's path: never issued, ended or expired."""

    hint = "check the execution id and --tenant; an ended or expired execution cannot be rerun"

    def __init__(self, execution_id: str, tenant: str) -> None:
        self.execution_id = execution_id
        self.tenant = tenant
        reason = f"no context in tenant {tenant} (never issued, ended or expired)"
        super().__init__(f"execution {execution_id}", [reason])


class ContextExpired(ValidationError):
    hint = "issue the execution again (execution create) with a longer --ttl"

    def __init__(self, execution_id: str) -> None:
        self.execution_id = execution_id
        super().__init__(f"execution {execution_id}", ["context has expired"])


class ResolveError(BrokerError):
    """Placeholder resolution failed; lists every problem with its server and field."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("placeholder resolution failed: " + "; ".join(self.problems))


class Fault(StrEnum):
    """What went wrong with a Vault request; also the metric label."""

    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    SEALED = "sealed"
    STANDBY = "standby"
    RATE_LIMITED = "rate-limited"
    SERVER_ERROR = "server-error"
    TLS = "tls"
    ADDRESS = "address"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not-found"
    CONFLICT = "conflict"
    TOO_LARGE = "too-large"
    INVALID = "invalid"
    BAD_ANSWER = "bad-answer"
    UNKNOWN_OUTCOME = "unknown-outcome"


_REASONS: dict[Fault, str] = {
    Fault.UNREACHABLE: "cannot reach Vault",
    Fault.TIMEOUT: "Vault did not answer in time",
    Fault.SEALED: "Vault is sealed",
    Fault.STANDBY: "Vault is a standby that cannot serve the request",
    Fault.RATE_LIMITED: "Vault is rate-limiting requests",
    Fault.SERVER_ERROR: "Vault answered with a server error",
    Fault.TLS: "TLS handshake failed",
    Fault.ADDRESS: "the Vault address is not usable",
    Fault.FORBIDDEN: "permission denied",
    Fault.NOT_FOUND: "not found",
    Fault.CONFLICT: "check-and-set failed (it exists or changed)",
    Fault.TOO_LARGE: "request too large for the server's JSON limits (max_request_json_*)",
    Fault.INVALID: "invalid request",
    Fault.BAD_ANSWER: "unexpected answer",
    Fault.UNKNOWN_OUTCOME: "no answer; the server may have processed the request",
}


class VaultError(BrokerError):
    """A Vault request failed. Carries operation, path, status and kind, never a body."""

    def __init__(
        self,
        operation: str,
        path: str,
        kind: Fault,
        status: int | None = None,
        detail: str = "",
    ) -> None:
        self.operation = operation
        self.path = path
        self.kind = kind
        self.status = status
        self.detail = detail
        reason = _REASONS[kind]
        if detail and detail != reason:
            reason += f" ({detail})"
        super().__init__(f"vault {operation} {path}: {reason}")

    @property
    def reason(self) -> str:
        return str(self).split(": ", 1)[1]


class VaultUnavailable(VaultError):
    """Transient: unreachable, sealed, standby, 5xx, rate-limited or too slow."""

    retryable = True
    hint = "is the server running and unsealed? check VAULT_ADDR, then retry"

    def __init__(
        self,
        operation: str,
        path: str,
        kind: Fault,
        status: int | None = None,
        detail: str = "",
        retry_after: float | None = None,
        sent: bool = True,
    ) -> None:
        super().__init__(operation, path, kind, status, detail)
        self.retry_after = retry_after
        self.sent = sent  # False when the request surely never reached the server


class VaultConfigError(VaultError):
    """A TLS or address problem that retrying cannot fix."""

    def __init__(self, operation: str, path: str, kind: Fault, detail: str, hint: str) -> None:
        super().__init__(operation, path, kind, None, detail)
        self.hint = hint


class PermissionDenied(VaultError):
    hint = "the token's policies do not allow this; see policies/ and `stigmer-broker setup`"


class NotFound(VaultError):
    pass


class Conflict(VaultError):
    pass


class RequestTooLarge(VaultError):
    hint = "raise max_request_json_strings / max_request_json_memory on the listener"


class OutcomeUnknown(VaultError):
    """A request that mints a token got no answer: it is never retried blindly."""

    hint = "a token may have been created; it expires with its TTL. Retry the command later"


class IdentityError(BrokerError):
    """A login was refused. ``reason`` is an allow-listed code, never the server's text."""

    hint = "check the credential file, the role and `stigmer-broker setup` for this auth method"

    def __init__(self, message: str, reason: str = "") -> None:
        self.reason = reason
        super().__init__(message + (f": {reason}" if reason else ""))


class DecryptError(BrokerError):
    """Deliberately opaque: says that decryption failed, never why or for which value."""

    def __init__(self) -> None:
        super().__init__("decryption failed for the execution's secrets")


class RenderError(BrokerError):
    pass


class CleanupError(BrokerError):
    """Ending an execution left something behind; lists what, never hides the first error."""


class ExecutionError(BrokerError):
    """The execution's state forbids what was asked."""

    def __init__(self, execution_id: str, reason: str) -> None:
        self.execution_id = execution_id
        super().__init__(f"execution {execution_id}: {reason}")


class ClaimConflict(ExecutionError):
    """Another claimant (a sidecar, a `run`, another local caller) holds this execution."""

    hint = "an execution is delivered once; wait for its holder to end it or for the reaper"


class ExecutionGone(ExecutionError):
    pass


class ExecutionUnknown(ExecutionError):
    pass


class ShuttingDown(ExecutionError):
    """The sidecar received SIGTERM while preparing it: nothing was delivered, all given back."""

    retryable = True
    hint = "the context is kept: prepare it again (another sidecar, or this one after restart)"


class BrokerClientError(BrokerError):
    """The sidecar answered a runner's request with an error; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"sidecar answered {status}: {message}")
