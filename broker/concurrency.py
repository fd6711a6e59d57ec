"""Running independent awaitables at once without losing the error a caller branches on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Hashable, Iterable
from contextlib import asynccontextmanager
from typing import TypeVar

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")


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
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """:func:`together` for two awaitables of different types."""
    results: list[object] = await together([first, second])
    return results[0], results[1]  # type: ignore[return-value]


class KeyedLock:
    """One asyncio lock per key, forgotten when nobody holds or waits for it (so a long-lived
    process does not keep one per execution it ever saw)."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
