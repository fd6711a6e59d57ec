"""``broker.concurrency``: the first error is raised as it is, the rest cancelled; one holder
per key at a time."""

from __future__ import annotations

import asyncio

import pytest

from broker.concurrency import KeyedLocks, together

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
        await together([slow(), fails()])
    assert cancelled.is_set()
    assert await together([asyncio.sleep(0, n) for n in range(5)], limit=2) == [0, 1, 2, 3, 4]


async def test_one_holder_per_key_others_keys_meanwhile_and_nothing_kept() -> None:
    locks, order = KeyedLocks(), []

    async def hold(key: str, label: str, seconds: float) -> None:
        async with locks.hold(key):
            order.append(f"{label}+")
            await asyncio.sleep(seconds)
            order.append(f"{label}-")

    first = asyncio.create_task(hold("x", "a", 0.05))
    await asyncio.sleep(0)
    await asyncio.gather(hold("x", "b", 0), hold("y", "c", 0), first)
    assert order.index("c+") < order.index("a-")  # another key does not wait
    assert order.index("a-") < order.index("b+")  # the same key does
    assert len(locks) == 0  # no lock kept for a key nobody holds

    with pytest.raises(KeyError):  # a failure inside still lets the key go
        async with locks.hold("z"):
            raise KeyError("z")
    assert len(locks) == 0
