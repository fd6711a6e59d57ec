"""The record of ending one execution: what was removed, destroyed, released and revoked.

Every step is attempted even when an earlier one failed; errors name paths and accessors
only. ``pending`` lists the Vault steps still to do, which the front ends retry.
"""

from __future__ import annotations

from typing import Any

from broker.records import field, record

DONE = {"context": ("destroyed",), "claim": ("released",), "lease": ("revoked", "already revoked")}


@record
class Cleanup:
    files_removed: list[str] = field(default_factory=list)
    context: str = "kept"  # destroyed | kept | failed
    claim: str = "none"  # released | none | failed
    lease: str = "kept"  # revoked | already revoked | kept | failed
    file_errors: list[str] = field(default_factory=list)
    vault_errors: list[str] = field(default_factory=list)  # of the latest attempt

    @property
    def errors(self) -> list[str]:
        return [*self.file_errors, *self.vault_errors]

    @property
    def pending(self) -> list[str]:
        """The Vault steps not done yet."""
        return [step for step, done in DONE.items() if getattr(self, step) not in done]

    def as_json(self) -> dict[str, Any]:
        return {
            "files_removed": self.files_removed,
            "context": self.context,
            "lease": self.lease,
            "claim": self.claim,
            "errors": self.errors,
            "pending": self.pending,
        }
