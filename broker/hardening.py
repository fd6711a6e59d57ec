"""Make the broker's own process a poor place to look for secrets, before anything else runs.

No core file (``RLIMIT_CORE`` = 0) and not dumpable (``PR_SET_DUMPABLE`` = 0): a crash leaves
no core full of secrets, and another process of the same uid — the command ``run`` starts
included — can neither read ``/proc/<pid>/environ`` or ``mem`` nor attach a debugger.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _prctl(option: int, value: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, value, 0, 0, 0))


def harden() -> None:
    """Best effort where the platform lacks a call; never raises."""
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        _prctl(PR_SET_DUMPABLE, 0)


def dumpable() -> bool:
    return _prctl(PR_GET_DUMPABLE, 0) == 1
