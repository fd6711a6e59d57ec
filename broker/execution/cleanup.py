"""The record of ending one execution: what was removed, destroyed, released and revoked.

Every step is attempted even when an earlier one failed; errors are listed, never hiding the
first one, and name paths and accessors only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Cleanup:
    files_removed: list[str] = field(default_factory=list)
    context: str = "kept"  # destroyed | kept | failed
    claim: str = "none"  # released | none | failed
    lease: str = "kept"  # revoked | already revoked | kept | failed
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        return {
            "files_removed": self.files_removed,
            "context": self.context,
            "lease": self.lease,
            "claim": self.claim,
            "errors": self.errors,
        }
