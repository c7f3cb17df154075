"""How a model replica groups a stream's token events into the Ray objects it sends (`deployments._chunks`)."""

from __future__ import annotations

import asyncio

import pytest

from lmaas.serve.engine import TokenEvent


def event(i: int, last: bool = False) -> TokenEvent:
    return TokenEvent("r", i, f"t{i}", 1, i + 1, "length" if last else None)


async def source(n: int, gap_s: float, log: list[str], error: BaseException | None = None):
    try:
        for i in range(n):
            await asyncio.sleep(gap_s)
            yield event(i, last=i == n - 1 and error is None)
        if error is not None:
            raise error
    finally:
        log.append("closed")


def chunks(n: int, gap_s: float, interval_s: float, busy: bool, error: BaseException | None = None) -> tuple[list[list[int]], list[str]]:
    from lmaas.serve.deployments import _chunks

    log: list[str] = []

    async def run() -> list[list[int]]:
        return [[e.token_id for e in chunk] async for chunk in _chunks(source(n, gap_s, log, error), interval_s, lambda: busy)]

    return asyncio.run(run()), log


def test_each_event_goes_alone_unless_the_engine_is_busy():
    assert chunks(5, 0.001, 0.05, busy=False)[0] == [[0], [1], [2], [3], [4]]
    assert chunks(5, 0.001, 0.0, busy=True)[0] == [[0], [1], [2], [3], [4]]  # interval 0: never grouped


def test_a_busy_engines_events_are_grouped_in_order_and_the_first_goes_at_once():
    got, log = chunks(20, 0.005, 0.05, busy=True)
    assert got[0] == [0]  # time to first token is not held back
    assert [i for chunk in got for i in chunk] == list(range(20))  # nothing lost, nothing reordered
    assert len(got) <= 6 and max(len(c) for c in got) >= 5
    assert log == ["closed"]


def test_an_error_after_some_events_reaches_the_caller_after_them():
    from lmaas.serve.deployments import _chunks

    log: list[str] = []

    async def run() -> list[int]:
        seen = []
        with pytest.raises(RuntimeError, match="engine step failed"):
            async for chunk in _chunks(source(3, 0.001, log, RuntimeError("engine step failed")), 0.01, lambda: True):
                seen += [e.token_id for e in chunk]
        return seen

    assert asyncio.run(run()) == [0, 1, 2] and log == ["closed"]


def test_a_consumer_that_leaves_closes_the_engines_stream():
    from lmaas.serve.deployments import _chunks

    log: list[str] = []

    async def run() -> None:
        stream = _chunks(source(1000, 0.001, log), 0.01, lambda: True)
        async for _ in stream:
            break
        await stream.aclose()  # the client disconnected: Serve closes the replica's generator
        await asyncio.sleep(0.01)

    asyncio.run(run())
    assert log == ["closed"]
