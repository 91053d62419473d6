"""Fan-out of the event log to watch streams.

One `LogTail` per process reads the log once per change and pushes the new
entries to every subscriber's bounded buffer, so a thousand subscribers cost
one read, not a thousand. A subscriber that falls behind is dropped from the
fan-out and serves itself from the log (catch-up) until it is back at the
tail: a slow reader holds no more than its buffer and never slows the engine.

Ordering: positions are handed out in commit order (see store/sql.py), so a
reader that delivers strictly increasing positions misses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from dataclasses import dataclass, field

from orchestrator.engine import ChangeSignal
from orchestrator.store import SagaStore, StoredEvent

log = logging.getLogger("compensa.streams")

#: Events per read of the log; `read` callbacks must use it as their limit.
READ_BATCH = 500


#: (definition_name, saga_state) a subscriber to every saga filters on; "" and 0 mean any.
Filter = tuple[str, int]


@dataclass(eq=False)
class _Subscriber:
    saga_id: str | None  # None: every saga's events that pass `filter`
    filter: Filter
    buffer: asyncio.Queue[StoredEvent]
    overflowed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def _passes(event: StoredEvent, wanted: Filter) -> bool:
    definition_name, saga_state = wanted
    return (not definition_name or event.definition_name == definition_name) and (
        not saga_state or event.event.saga_state == saga_state
    )


class LogTail:
    """Reads the global log as it grows and fans it out to subscribers."""

    def __init__(self, store: SagaStore, changes: ChangeSignal, *, buffer_size: int, reread_seconds: float) -> None:
        self._store = store
        self._changes = changes
        self._buffer_size = buffer_size
        self._reread_seconds = reread_seconds
        self._of_saga: dict[str, set[_Subscriber]] = {}
        # Subscribers to every saga, grouped by filter: an event is checked
        # once per distinct filter, however many dashboards share it.
        self._of_all: dict[Filter, set[_Subscriber]] = {}
        self._position: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        changes.take_committed = self._take_committed

    def _take_committed(self, events: list[StoredEvent]) -> bool:
        """This process's own commits, without reading them back: usable
        when they follow on from what the tail has, else it re-reads."""
        if self._position is None or not events or events[0].position != self._position + 1:
            return False
        self._position = events[-1].position
        self._fan_out(events)
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _ensure_running(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="compensa-log-tail")
        await self._started.wait()

    async def _run(self) -> None:
        with self._changes.subscribe() as changed:
            while True:
                try:
                    if self._position is None:
                        self._position = await self._store.head_position()
                        self._started.set()
                    changed.clear()
                    events = await self._store.read_log(self._position, READ_BATCH)
                except Exception as error:  # the store comes back; subscribers catch up
                    log.warning("log tail: %s", error)
                    await asyncio.sleep(1.0)
                    continue
                # Commits of this process may have been handed over meanwhile.
                fresh = [event for event in events if event.position > self._position]
                if fresh:
                    self._position = fresh[-1].position
                    self._fan_out(fresh)
                if len(events) == READ_BATCH:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self._reread_seconds)

    def _fan_out(self, events: list[StoredEvent]) -> None:
        woken: set[_Subscriber] = set()
        for event in events:
            for subscriber in self._of_saga.get(event.saga_id, ()):
                self._push(subscriber, event, woken)
            for wanted, subscribers in self._of_all.items():
                if _passes(event, wanted):
                    for subscriber in subscribers:
                        self._push(subscriber, event, woken)
        for subscriber in woken:
            subscriber.wake.set()
        # Dropped while iterating above; removed now.
        for subscriber in [s for s in woken if s.overflowed]:
            self._remove(subscriber)

    @staticmethod
    def _push(subscriber: _Subscriber, event: StoredEvent, woken: set[_Subscriber]) -> None:
        if subscriber.overflowed:
            return
        try:
            subscriber.buffer.put_nowait(event)
        except asyncio.QueueFull:
            subscriber.overflowed = True
        woken.add(subscriber)

    def _remove(self, subscriber: _Subscriber) -> None:
        index: dict[Any, set[_Subscriber]]
        key: Any
        if subscriber.saga_id is None:
            index, key = self._of_all, subscriber.filter
        else:
            index, key = self._of_saga, subscriber.saga_id
        bucket = index.get(key)
        if bucket is not None:
            bucket.discard(subscriber)
            if not bucket:
                del index[key]

    @contextlib.asynccontextmanager
    async def _subscription(self, saga_id: str | None, wanted: Filter) -> AsyncIterator[_Subscriber]:
        await self._ensure_running()
        subscriber = _Subscriber(saga_id, wanted, asyncio.Queue(self._buffer_size))
        if saga_id is None:
            self._of_all.setdefault(wanted, set()).add(subscriber)
        else:
            self._of_saga.setdefault(saga_id, set()).add(subscriber)
        try:
            yield subscriber
        finally:
            self._remove(subscriber)

    async def follow_batches(
        self,
        after: int,
        *,
        saga_id: str | None,
        key: Callable[[StoredEvent], int],
        read: Callable[[int], Awaitable[list[StoredEvent]]],
        wanted: Filter = ("", 0),
        max_batch: int = READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """Every event of `saga_id` (None: of every saga, passing `wanted`)
        with key > `after`, in key order, forever, in batches of at most
        `max_batch`: whatever is ready, never waiting for more.

        `key` is the sequence (one saga) or the position (all sagas); `read(k)`
        reads a batch with key > k from the store, for catch-up.
        """
        last = after
        while True:
            async with self._subscription(saga_id, wanted) as subscriber:
                # Catch up from the log; the buffer collects what commits meanwhile.
                while True:
                    batch = await read(last)
                    for start in range(0, len(batch), max_batch):
                        chunk = batch[start:start + max_batch]
                        last = key(chunk[-1])
                        yield chunk
                    if len(batch) < READ_BATCH:
                        break
                # Then live, from the buffer, skipping what catch-up already sent.
                while not subscriber.overflowed:
                    ready: list[StoredEvent] = []
                    while not subscriber.buffer.empty():
                        event = subscriber.buffer.get_nowait()
                        if key(event) > last:
                            last = key(event)
                            ready.append(event)
                            if len(ready) == max_batch:
                                yield ready
                                ready = []
                    if ready:
                        yield ready
                    if subscriber.overflowed:
                        break
                    subscriber.wake.clear()
                    if subscriber.buffer.empty() and not subscriber.overflowed:
                        # No timeout: subscribed before catching up, so every
                        # later event reaches the buffer; a missed wake-up is
                        # the tail's to recover (it re-reads on its own), once
                        # for all subscribers.
                        await subscriber.wake.wait()
