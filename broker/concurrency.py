"""Running independent awaitables at once without losing the error a caller branches on, and
keeping dependent ones on the same key apart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def together(steps: Iterable[Awaitable[T]], limit: int = 0) -> list[T]:
    """Await ``steps`` concurrently (at most ``limit`` at a time when > 0), results in order.

    The first failure cancels the rest and is raised as it is — not wrapped in an
    ExceptionGroup as ``asyncio.TaskGroup`` would: callers branch on the error's class."""
    gate = asyncio.Semaphore(limit) if limit > 0 else None

    async def gated(step: Awaitable[T]) -> T:
        if gate is None:
            return await step
        async with gate:
            return await step

    tasks = [asyncio.ensure_future(gated(step)) for step in steps]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        await cancel_all(tasks)
        raise


async def cancel_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until they are done (an error of theirs is not the caller's)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class KeyedLocks:
    """One :class:`asyncio.Lock` per key, kept only while someone holds or waits for it (the
    keys are execution ids: unbounded over a process's life)."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)
