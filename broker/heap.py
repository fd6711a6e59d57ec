"""Hand freed memory back to the system where the C library can (glibc's ``malloc_trim``).

Why: a burst of Vault requests over TLS leaves each pooled connection's buffers (~0.6 MB in
asyncio) in the C heap. Closing the idle connections frees them, but glibc returns only the
top of its heap to the system on its own, so an idle sidecar would keep a burst's peak RSS
(~50 MB after 20 concurrent callers, where it starts at ~31). Elsewhere (musl) this does
nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
    return trim


def trim() -> bool:
    """Return the C heap's free memory to the system; whether any was returned."""
    malloc_trim = _malloc_trim()
    return bool(malloc_trim(0)) if malloc_trim is not None else False
