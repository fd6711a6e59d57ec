"""The broker's error tree.

Every error a caller can act on is a :class:`BrokerError`; the CLI catches that one type and
turns it into one line and an exit code. Messages name resources, fields, keys, paths and
placeholders, never values, so any error text is safe to log.

::

    BrokerError                 .exit_code, .diagnostics()
    ├─ ConfigError              a setting or flag is missing or wrong
    ├─ ValidationError          a resource, field or key is invalid (lists every problem)
    ├─ VaultError               method + path only, never a response body
    │  ├─ VaultUnavailable      connection refused, 5xx, sealed, 429 (retryable)
    │  ├─ PermissionDenied      Vault answered 403
    │  ├─ NotFound              Vault answered 404
    │  ├─ Conflict              check-and-set lost: the thing already exists or changed
    │  └─ RequestTooLarge       the server's request JSON limits refused the request
    ├─ IdentityError            login failed: which auth method, which role
    ├─ DecryptError             one opaque type for every decryption failure
    ├─ ResolveError             unknown placeholders, secrets where they may not go
    ├─ RenderError              not tmpfs, permissions, disk full
    └─ RevokeError              cleanup failed; never hides the first error
"""

from __future__ import annotations

from collections.abc import Sequence


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""

    exit_code = 1
    retryable = False
    hint = ""

    def diagnostics(self) -> str:
        """The message plus how to fix it, for humans."""
        return f"{self}\n  hint: {self.hint}" if self.hint else str(self)


class ConfigError(BrokerError):
    exit_code = 2


class ValidationError(BrokerError):
    """Invalid input: names the resource, the field and the reason for every problem."""

    exit_code = 2

    def __init__(self, resource: str, problems: Sequence[str]) -> None:
        self.resource = resource
        self.problems = list(problems)
        super().__init__(f"{resource}: " + "; ".join(self.problems))


class VaultError(BrokerError):
    """A Vault request failed. Carries the operation and path, never a response body."""

    exit_code = 3

    def __init__(self, operation: str, path: str, reason: str) -> None:
        self.operation = operation
        self.path = path
        self.reason = reason
        super().__init__(f"vault {operation} {path}: {reason}")


class VaultUnavailable(VaultError):
    retryable = True
    hint = "is the server running and unsealed? check VAULT_ADDR"


class PermissionDenied(VaultError):
    hint = "the token's policies do not allow this; see policies/ and `stigmer-broker setup`"


class NotFound(VaultError):
    pass


class Conflict(VaultError):
    pass


class RequestTooLarge(VaultError):
    hint = "raise max_request_json_strings / max_request_json_memory on the listener"


class IdentityError(BrokerError):
    exit_code = 4


class DecryptError(BrokerError):
    """Deliberately opaque: says that decryption failed, never why or for which value."""

    exit_code = 5

    def __init__(self) -> None:
        super().__init__("decryption failed for the execution's secrets")


class ResolveError(BrokerError):
    """Placeholder resolution failed; lists every problem with its server and field."""

    exit_code = 2

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("placeholder resolution failed: " + "; ".join(self.problems))


class RenderError(BrokerError):
    exit_code = 6


class RevokeError(BrokerError):
    exit_code = 7
