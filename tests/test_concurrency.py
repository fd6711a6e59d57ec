"""``broker.concurrency``: errors kept as they are, and per-key locks that are forgotten."""

from __future__ import annotations

import asyncio

import pytest

from broker.concurrency import KeyedLock, both, together

pytestmark = pytest.mark.unit


async def test_the_first_failure_is_raised_as_it_is_and_the_rest_cancelled() -> None:
    cancelled = asyncio.Event()

    async def slow() -> int:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    async def fails() -> int:
        raise KeyError("x")

    with pytest.raises(KeyError):  # not an ExceptionGroup
        await both(slow(), fails())
    assert cancelled.is_set()
    assert await together([asyncio.sleep(0, n) for n in range(5)], limit=2) == [0, 1, 2, 3, 4]


async def test_a_keyed_lock_serialises_one_key_only_and_forgets_it() -> None:
    locks = KeyedLock()
    order: list[str] = []

    async def hold(key: str, name: str, seconds: float) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(seconds)
            order.append(f"{name}-")

    first = asyncio.create_task(hold("a", "a1", 0.05))
    await asyncio.sleep(0)
    await asyncio.gather(hold("a", "a2", 0), hold("b", "b1", 0), first)
    assert order.index("a1-") < order.index("a2+")  # the same key waits
    assert order.index("b1-") < order.index("a1-")  # another key does not
    assert len(locks) == 0  # nobody holds or waits: nothing kept

    with pytest.raises(RuntimeError):
        async with locks.hold("c"):
            raise RuntimeError
    assert len(locks) == 0
