"""The transition writer: group commit of the engine's guarded writes.

Transitions submitted while a flush runs go into the next one, so many sagas
share one transaction without any added delay; the store commits each batch
(on PostgreSQL in one statement, see store/sql.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from compensa.common.database import DEFAULT_DATABASE_TIMEOUT
from compensa.orchestrator.shared.errors import RejectedWrite, StoreUnavailable
from compensa.orchestrator.shared.metrics import Metrics
from compensa.orchestrator.store import SagaStore, SagaWrite, WriteResult

log = logging.getLogger("compensa.engine")


class TransitionWriter:
    """Group commit: transitions submitted while a flush runs go in the next
    one, so many sagas share one transaction without any added delay.

    A submitter waits at most `timeout` seconds for its flush: then it gets
    StoreUnavailable, and its write is dropped unless a flush already took it
    (it may then still land: the outcome is unknown, as for a lost answer).
    """

    def __init__(
        self,
        store: SagaStore,
        on_commit: Callable[[list[tuple[SagaWrite, WriteResult]]], None],
        metrics: Metrics,
        max_batch: int = 256,
        timeout: float = DEFAULT_DATABASE_TIMEOUT,
    ) -> None:
        self._store = store
        self._on_commit = on_commit
        self._metrics = metrics
        self._max_batch = max_batch
        self._timeout = timeout
        self._queue: asyncio.Queue[tuple[SagaWrite, asyncio.Future[WriteResult]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="compensa-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, write: SagaWrite) -> WriteResult:
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        await self._queue.put((write, future))
        try:
            # Cancels the future on expiry, which keeps the write out of later flushes.
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError:
            raise StoreUnavailable(
                f"the database did not confirm the write within {self._timeout:g}s; it may still land, retry"
            ) from None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # Submitters that stopped waiting (their timeout) were told it failed.
            batch = [item for item in batch if not item[1].done()]
            if not batch:
                continue
            groups = self._store.commit_groups([write for write, _ in batch])
            if len(groups) == 1:
                await self._flush(batch)
            else:  # one flush per database: each lands or fails on its own
                await asyncio.gather(*(self._flush([batch[index] for index in group]) for group in groups))

    async def _flush(self, batch: list[tuple[SagaWrite, asyncio.Future[WriteResult]]]) -> None:
        """Commits `batch`. When the database refuses a value of one write,
        nothing landed: the batch is split in halves and each half retried, so
        only the offending writes fail (with RejectedWrite) and the rest land."""
        began = time.perf_counter()
        try:
            results = await self._store.commit([write for write, _ in batch])
        except RejectedWrite as error:
            if len(batch) == 1:
                write, future = batch[0]
                log.warning("saga %s: the database refused its write: %s", write.saga.saga_id, error)
                if not future.done():
                    future.set_exception(error)
                return
            middle = len(batch) // 2
            await self._flush(batch[:middle])
            await self._flush(batch[middle:])
            return
        except Exception as error:  # the callers decide how to retry
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self._metrics.flushed(len(batch), time.perf_counter() - began)
        self._on_commit([(write, result) for (write, _), result in zip(batch, results, strict=True) if result.ok])
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
