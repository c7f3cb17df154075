"""Stream plumbing shared by the replicas and the gateway: sending what is ready together.

A token stream crosses two hops per token (replica -> gateway over Ray Serve's handle, gateway -> client
over HTTP), and on a small machine each message costs more CPU than the token's own decode step. Under
load several tokens are often ready at once (vLLM's `stream_interval`, outputs merged while a reader was
busy): `ready_batches` sends those as one message, and sends a lone token at once, so an idle stream's
latency does not change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def ready_batches(items: AsyncIterator[T]) -> AsyncIterator[list[T]]:
    """`items` in lists of everything that is ready at once: the first item waited for, plus whatever else
    arrived by then. An error from `items` is raised after the items before it have been yielded.

    A task reads `items` into a queue. Closing the returned stream cancels that task, which closes
    `items` (for a generation: aborts the request in its engine).
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in items:
                queue.put_nowait(item)
            queue.put_nowait(_END)
        except Exception as exc:  # noqa: BLE001 - raised to the reader, in order
            queue.put_nowait(exc)
        finally:
            await items.aclose()

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            batch: list[T] = []
            item = await queue.get()
            while item is not _END and not isinstance(item, BaseException):
                batch.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                yield batch
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
