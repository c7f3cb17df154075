"""`ready_batches`: what is ready together goes out together, in order, with errors after what came before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from lmaas.serve.streams import ready_batches


async def _bursts(sizes: list[int], error: BaseException | None = None, closed: list | None = None) -> AsyncIterator[int]:
    """Yields `sizes[i]` items back to back (no await between them), then waits, for each burst."""
    n = 0
    try:
        for size in sizes:
            for _ in range(size):
                yield n
                n += 1
            await asyncio.sleep(0.01)
        if error is not None:
            raise error
    finally:
        if closed is not None:
            closed.append(n)


def test_items_ready_at_once_come_as_one_list_and_lone_items_at_once():
    async def run() -> list[list[int]]:
        return [batch async for batch in ready_batches(_bursts([1, 3, 1, 2]))]

    assert asyncio.run(run()) == [[0], [1, 2, 3], [4], [5, 6]]


def test_an_error_comes_after_the_items_before_it():
    async def run() -> list[list[int]]:
        out = []
        with pytest.raises(ValueError, match="boom"):
            async for batch in ready_batches(_bursts([2], ValueError("boom"))):
                out.append(batch)
        return out

    assert asyncio.run(run()) == [[0, 1]]


def test_closing_early_closes_the_source():
    closed: list[int] = []

    async def run() -> None:
        stream = ready_batches(_bursts([1, 1, 1, 1], closed=closed))
        assert await stream.__anext__() == [0]
        await stream.aclose()

    asyncio.run(run())
    assert closed and closed[0] < 4  # the source stopped: for a generation, its engine request was aborted
