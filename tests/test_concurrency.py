"""``broker.concurrency``: the first error is raised as it is, the rest cancelled."""

from __future__ import annotations

import asyncio

import pytest

from broker.concurrency import both, together

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
