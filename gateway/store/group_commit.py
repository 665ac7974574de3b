"""One writer task draining a queue in batches: the shape both ledger backends share.

Everything waiting in the queue when a batch starts shares one transaction and one commit
(datasette's ``execute_write_fn``, grouped), so a busy gateway pays one commit per batch
rather than per request. The backend says how a batch is committed (``commit``); this class
owns the queue, the batching, the idle signal ``flush`` waits on and the task's lifetime.
A batch that fails is the backend's to report to its waiters (``resolve``); an unexpected
error is logged and the writer goes on, so it never dies with writes queued behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("costwall.ledger")


def resolve(future: asyncio.Future[Any] | None, error: BaseException | None,
            result: Any = None) -> None:
    """Wake one waiter with its write's outcome (unless it stopped waiting)."""
    if future is None or future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class GroupCommit(Generic[T]):
    """A queue of writes committed in batches of up to ``max_batch`` by one task."""

    def __init__(self, commit: Callable[[list[T]], Awaitable[None]], max_batch: int,
                 name: str):
        self._commit = commit
        self.max_batch = max_batch
        self.name = name
        self._queue: asyncio.Queue[T] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        # The queue's own methods, bound once: the request path pays no extra call.
        self.put: Callable[[T], None] = self._queue.put_nowait
        self.qsize: Callable[[], int] = self._queue.qsize
        self.empty: Callable[[], bool] = self._queue.empty
        self.batches = 0  # statistics for benchmarks
        self.ops = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def flush(self) -> None:
        """Wait until every queued write is committed (or has failed)."""
        while not self._queue.empty() or not self._idle.is_set():
            await self._idle.wait()
            await asyncio.sleep(0)

    async def close(self) -> None:
        """Flush, then stop the task."""
        if self._task is None:
            return
        await self.flush()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _loop(self) -> None:
        queue = self._queue
        while True:
            first = await queue.get()
            self._idle.clear()
            batch = [first]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._commit(batch)
            except Exception:  # never let the writer die; the backend reports its writes
                log.exception("%s: unexpected failure", self.name)
            self.batches += 1
            self.ops += len(batch)
            if queue.empty():
                self._idle.set()
