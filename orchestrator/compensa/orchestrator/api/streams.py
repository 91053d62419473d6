"""Fan-out of the event log to watch streams.

One `LogTail` per process reads the log once per change and appends the new
entries to a bounded feed per saga watched and per filter of the all-saga
watchers. Subscribers of one feed share it, each with its own cursor, so a
thousand subscribers cost one read and one append per event, not a thousand.
A subscriber that falls more than a buffer behind its feed serves itself from
the log (catch-up) until it is back at the tail: a slow reader holds no memory
and never slows the engine.

Ordering: a read of the log stops where the store can prove nothing will
appear below (`LogPage.horizon`: on PostgreSQL, below the oldest transaction
still open), so a reader that delivers strictly increasing positions misses
nothing, and this process's own commits are handed over without a read only
once everything below them is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from compensa.orchestrator.engine.changes import ChangeSignal
from compensa.orchestrator.shared.errors import StoreUnavailable
from compensa.orchestrator.store import LogPage, SagaStore, StoredEvent

log = logging.getLogger("compensa.streams")

#: Events per read of the log; `read` callbacks must use it as their limit.
READ_BATCH = 500
#: While committed events wait behind an open transaction, the tail reads
#: again after this, doubling up to its re-read interval: the transaction
#: that ends the wait may send no notice (it need not be Compensa's).
HELD_BACK_FIRST_REREAD_SECONDS = 0.005


#: (definition_name, saga_state) a subscriber to every saga filters on; "" and 0 mean any.
Filter = tuple[str, int]


@dataclass(eq=False)
class _Feed:
    """The recent events of one saga, or of every saga passing one filter.

    Holds between `capacity` and twice that many events, so that a reader at
    most `capacity` behind always finds its next event here.
    """

    capacity: int
    events: list[StoredEvent] = field(default_factory=list)
    start: int = 0  # the feed index of events[0]
    readers: set[_Reader] = field(default_factory=set)

    @property
    def end(self) -> int:
        return self.start + len(self.events)

    def append(self, event: StoredEvent) -> None:
        self.events.append(event)
        if len(self.events) > 2 * self.capacity:
            dropped = len(self.events) - self.capacity
            del self.events[:dropped]
            self.start += dropped

    def read(self, reader: _Reader, limit: int) -> list[StoredEvent] | None:
        """Up to `limit` events after the reader's cursor, moving it on;
        None when it fell more than `capacity` behind."""
        if self.end - reader.next > self.capacity:
            return None
        offset = reader.next - self.start
        batch = self.events[offset:offset + limit]
        reader.next += len(batch)
        return batch


@dataclass(eq=False)
class _Reader:
    feed: _Feed
    next: int  # the feed index of the next event to read
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def _passes(event: StoredEvent, wanted: Filter) -> bool:
    definition_name, saga_state = wanted
    return (not definition_name or event.definition_name == definition_name) and (
        not saga_state or event.event.saga_state == saga_state
    )


def _in_order(
    live: list[StoredEvent], last: int, key: Callable[[StoredEvent], int], *, one_saga: bool
) -> tuple[list[StoredEvent], bool]:
    """The events of `live` to send after key `last`, and whether one is
    missing before the rest: a saga's sequence has no gaps, so one of its
    events past the next one means that one must be read from its log."""
    if not one_saga:
        return [event for event in live if key(event) > last], False
    ready: list[StoredEvent] = []
    for event in live:
        if key(event) == last + len(ready) + 1:
            ready.append(event)
        elif key(event) > last + len(ready) + 1:
            return ready, True
    return ready, False


class LogTail:
    """Reads the global log as it grows and fans it out to subscribers."""

    def __init__(
        self, store: SagaStore, changes: ChangeSignal, *, buffer_size: int, reread_seconds: float,
        holds: Callable[[StoredEvent], bool] | None = None,
    ) -> None:
        """`store`'s log is the one read; `holds` says which of this process's
        commits went to it (when the sagas are spread over several
        databases, each with its own log and its own tail)."""
        self._store = store
        self._holds = holds
        self._changes = changes
        self._buffer_size = buffer_size
        self._reread_seconds = reread_seconds
        self._of_saga: dict[str, _Feed] = {}
        # Subscribers to every saga share a feed per filter: an event is
        # checked and appended once per distinct filter, however many
        # dashboards share it.
        self._of_all: dict[Filter, _Feed] = {}
        self._position: int | None = None
        # Every event below this has been fanned out (or precedes the start).
        self._horizon = 0
        # While an open transaction holds the log back, the events committed
        # past it are read for the subscribers of one saga (their order is the
        # saga's sequence, which holds there), from after this position.
        self._past_open = 0
        # This process's commits (by their transaction's first position)
        # handed to the subscribers of one saga ahead of the log's order, kept
        # for every-saga streams until a read proves nothing comes before
        # them: reads leave their rows out. With each, when known, the last
        # event of the log before it (WriteResult.preceded_by): once the tail
        # has that one, it has everything before the commit, which may go on
        # without a read.
        self._handed: dict[int, tuple[list[StoredEvent], int | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._commits = changes.on_commit(self._take_committed)

    def _take_committed(self, events: list[StoredEvent], preceded_by: int | None) -> bool:
        """This process's own commits (one transaction's), without reading
        them back: usable when the tail has everything below their
        transaction's positions (it read that far, or what precedes them is
        known to be no further than it read), else it re-reads."""
        if self._holds is not None and events:
            events = [event for event in events if self._holds(event)]
            if not events:
                return True  # none went to this tail's database
        if self._position is None or not events:
            return False
        transaction = self._store.transaction_positions(events[0].position).start
        if preceded_by is not None and (preceded_by < self._horizon or preceded_by <= self._position):
            self._horizon = max(self._horizon, transaction)
        if self._horizon < transaction:
            # Not yet for every-saga streams; one saga's need only its order.
            # Without an every-saga stream nobody needs the read soon.
            fresh = [event for event in events if event.position > self._position]
            self._fan_out(fresh, of_every_saga=False)
            self._handed[transaction] = (fresh, preceded_by)
            return not self._of_all
        fresh = [event for event in events if event.position > self._position]
        if fresh:
            self._position = fresh[-1].position
            self._fan_out(fresh)
        self._horizon = max(self._horizon, self._store.transaction_positions(events[-1].position).stop)
        self._place_handed()
        return True

    def _place_handed(self) -> None:
        """Sends the handed commits on to every-saga streams, oldest first,
        while what precedes each is known to be no further than the tail has."""
        while self._handed and self._position is not None:
            first = min(self._handed)
            handed, preceded_by = self._handed[first]
            if preceded_by is None or not (preceded_by < self._horizon or preceded_by <= self._position):
                return
            del self._handed[first]
            events = [event for event in handed if event.position > self._position]
            if events:
                self._position = events[-1].position
                self._fan_out(events, of_one_saga=False)
            self._horizon = max(self._horizon, self._store.transaction_positions(first).stop)

    async def stop(self) -> None:
        self._commits.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _ensure_running(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="compensa-log-tail")
        await self._started.wait()

    async def _run(self) -> None:
        changed = asyncio.Event()
        held_back_wait = HELD_BACK_FIRST_REREAD_SECONDS
        with self._changes.on_change(changed.set):
            while True:
                try:
                    if self._position is None:
                        self._position = await self._store.head_position()
                        self._horizon = self._position + 1
                        self._started.set()
                    changed.clear()
                    skipping = sorted(self._handed)
                    page = await self._store.read_log_page(self._position, READ_BATCH, skipping=skipping)
                except Exception as error:  # the store comes back; subscribers catch up
                    # Not at WARNING every second: the database's health logs an outage once.
                    level = logging.DEBUG if isinstance(error, StoreUnavailable) else logging.WARNING
                    log.log(level, "log tail: %s", error)
                    await asyncio.sleep(1.0)
                    continue
                self._take_read(page)
                if len(page.events) == READ_BATCH:
                    continue
                if page.held_back and self._of_saga:
                    await self._read_past_open_transactions()
                wait = self._reread_seconds
                if page.held_back:
                    wait = min(held_back_wait, wait)
                    held_back_wait *= 2
                else:
                    held_back_wait = HELD_BACK_FIRST_REREAD_SECONDS
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), wait)

    def _take_read(self, page: LogPage) -> None:
        """Fans out what a read found, with the handed commits it proved
        nothing comes before, in log order."""
        position = self._position or 0
        # Commits of this process may have been taken meanwhile.
        found = [event for event in page.events if event.position > position]
        # The read left the handed commits out: those below its horizon are in place now.
        placed = {start: self._handed.pop(start)[0] for start in sorted(self._handed) if start < page.horizon}
        if placed:
            transaction_of = self._store.transaction_positions
            self._fan_out([e for e in found if transaction_of(e.position).start not in placed], of_every_saga=False)
            merged = {event.position: event for event in found}
            for events in placed.values():
                merged.update((event.position, event) for event in events if event.position > position)
            found = [merged[key] for key in sorted(merged)]
            self._fan_out(found, of_one_saga=False)
        else:
            self._fan_out(found)
        if found:
            self._position = max(position, found[-1].position)
        if len(page.events) < READ_BATCH:
            # Everything below the horizon is known, what was left out included.
            self._position = max(self._position or 0, page.horizon - 1)
        self._horizon = max(self._horizon, page.horizon)
        self._place_handed()

    async def _read_past_open_transactions(self) -> None:
        """The events committed past an open transaction, to the subscribers
        of their saga only: a forgotten session holds every-saga streams back,
        not a caller waiting for its saga's end. A saga's events may arrive
        here with a gap (a transaction that began earlier commits later, below
        what was read): its subscribers then read their saga's log."""
        try:
            page = await self._store.read_log_page(
                max(self._position or 0, self._past_open), READ_BATCH, past_open_transactions=True,
                skipping=sorted(self._handed),
            )
        except Exception as error:  # the next read of the tail says it
            log.debug("log tail, past open transactions: %s", error)
            return
        if page.events:
            self._past_open = page.events[-1].position
            self._fan_out(page.events, of_every_saga=False)

    def _fan_out(
        self, events: list[StoredEvent], *, of_one_saga: bool = True, of_every_saga: bool = True
    ) -> None:
        touched: set[_Feed] = set()
        for event in events:
            feed = self._of_saga.get(event.saga_id) if of_one_saga else None
            if feed is not None:
                feed.append(event)
                touched.add(feed)
            if not of_every_saga:
                continue
            for wanted, feed in self._of_all.items():
                if _passes(event, wanted):
                    feed.append(event)
                    touched.add(feed)
        for feed in touched:
            for reader in feed.readers:
                reader.wake.set()

    @contextlib.asynccontextmanager
    async def _subscription(self, saga_id: str | None, wanted: Filter) -> AsyncIterator[_Reader]:
        """A reader positioned at the end of its feed: it gets every event
        the tail fans out from now on."""
        await self._ensure_running()
        if saga_id is None:
            feed = self._of_all.setdefault(wanted, _Feed(self._buffer_size))
        else:
            feed = self._of_saga.setdefault(saga_id, _Feed(self._buffer_size))
        reader = _Reader(feed, feed.end)
        feed.readers.add(reader)
        try:
            yield reader
        finally:
            # A feed with readers is never dropped, so the entry is still this one.
            feed.readers.discard(reader)
            if not feed.readers:
                if saga_id is None:
                    del self._of_all[wanted]
                else:
                    del self._of_saga[saga_id]

    async def follow(
        self,
        after: int,
        *,
        saga_id: str | None,
        key: Callable[[StoredEvent], int],
        read: Callable[[int], Awaitable[list[StoredEvent]]],
        wanted: Filter = ("", 0),
        max_batch: int = READ_BATCH,
        window: float = 0.0,
    ) -> AsyncGenerator[list[StoredEvent], None]:
        """Every event of `saga_id` (None: of every saga, passing `wanted`)
        with key > `after`, in key order, forever, in batches of at most
        `max_batch`: whatever is ready, or, with a `window` (seconds), what
        is ready that long after the first live event of a batch.

        `key` is the sequence (one saga) or the position (all sagas); `read(k)`
        reads a batch with key > k from the store, for catch-up: a read the
        store may answer from its read database (in `tolerating_lag`), as
        keys are the same there.
        """
        last = after
        while True:
            async with self._subscription(saga_id, wanted) as reader:
                # Catch up from the log; the feed collects what commits meanwhile.
                # The history comes from the read database, if there is one,
                # until it has no more; then the primary, which has every
                # commit, goes on from the same key to the feed (which the
                # tail fills from the primary): no gap between the two.
                from_history = self._store.read_database_status() is not None
                while True:
                    if from_history:
                        with self._store.tolerating_lag():
                            batch = await read(last)
                    else:
                        batch = await read(last)
                    for start in range(0, len(batch), max_batch):
                        chunk = batch[start:start + max_batch]
                        last = key(chunk[-1])
                        yield chunk
                    if len(batch) < READ_BATCH:
                        if not from_history:
                            break
                        from_history = False
                # Then live, from the feed, skipping what catch-up already sent.
                while True:
                    reader.wake.clear()
                    live = reader.feed.read(reader, max_batch)
                    if live is None:
                        break  # fell behind: catch up from the log again
                    if window and live and len(live) < max_batch:
                        await asyncio.sleep(window)
                        more = reader.feed.read(reader, max_batch - len(live))
                        if more is None:
                            break  # fell behind while waiting: the log has it all
                        live += more
                    ready, gap = _in_order(live, last, key, one_saga=saga_id is not None)
                    if ready:
                        last = key(ready[-1])
                        yield ready
                    if gap:
                        break  # a saga's event came before one it follows: read its log
                    if not ready and not live:
                        # No timeout: subscribed before catching up, so every
                        # later event reaches the feed; a missed wake-up is
                        # the tail's to recover (it re-reads on its own), once
                        # for all subscribers.
                        await reader.wake.wait()
