"""The deployment's event logs: one per database, each with its LogTail
(and its alert log).

With one database this is one tail, as it always was. With sagas partitioned
over several (docs/partitions.md) each database keeps its own commit-ordered
log; a stream of every saga follows all of them at once, with a position per
database, and a stream of one saga follows its database's tail alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence

from compensa.orchestrator.api.resume_tokens import EVENT_LOG, issue_resume_token, read_resume_token
from compensa.orchestrator.api.streams import READ_BATCH, Filter, LogTail
from compensa.orchestrator.engine.changes import ChangeSignal
from compensa.orchestrator.shared.limits import check_position
from compensa.orchestrator.store import PartitionedStore, SagaStore, StoredAlert, StoredEvent
from compensa.orchestrator.store.partition_map import database_id


def _log_reader(database: SagaStore, wanted: Filter) -> Callable[[int], Awaitable[list[StoredEvent]]]:
    """Reads a batch of `database`'s log after a position, for catch-up."""
    definition_name, saga_state = wanted

    def read(after: int) -> Awaitable[list[StoredEvent]]:
        return database.read_log(after, READ_BATCH, definition_name=definition_name, saga_state=saga_state)

    return read


class DeploymentLogs:
    """A LogTail per database of `store`."""

    def __init__(self, store: SagaStore, changes: ChangeSignal, *, buffer_size: int, reread_seconds: float) -> None:
        self._partitioned = store if isinstance(store, PartitionedStore) else None
        self.databases: Sequence[SagaStore] = (
            self._partitioned.databases if self._partitioned is not None else (store,)
        )
        self.tails = tuple(
            LogTail(
                database, changes, buffer_size=buffer_size, reread_seconds=reread_seconds,
                holds=self._holder(index),
            )
            for index, database in enumerate(self.databases)
        )
        self._ids: list[str] | None = None

    def _holder(self, index: int) -> Callable[[StoredEvent], bool] | None:
        partitioned = self._partitioned
        if partitioned is None:
            return None
        return lambda event: partitioned.database_index(event.saga_id) == index

    @property
    def partitioned(self) -> bool:
        return self._partitioned is not None

    @property
    def home(self) -> LogTail:
        """The home database's tail (the only one, unless partitioned)."""
        return self.tails[0]

    def tail_of(self, saga_id: str) -> LogTail:
        """The tail of the database holding the saga."""
        if self._partitioned is None:
            return self.tails[0]
        return self.tails[self._partitioned.database_index(saga_id)]

    async def stop(self) -> None:
        for tail in self.tails:
            await tail.stop()

    async def database_ids(self) -> list[str]:
        """The id of each database, by index (read once)."""
        if self._ids is None:
            self._ids = list(await asyncio.gather(*(database_id(database) for database in self.databases)))
        return self._ids

    async def heads(self) -> dict[int, int]:
        """A position to follow each database's log from "now", by index."""
        return dict(enumerate(await asyncio.gather(*(database.head_position() for database in self.databases))))

    async def cursor_text(self, positions: Mapping[int, int]) -> str:
        """Where a follow of every database's log stands, as a client passes
        it back: the position itself with one database (as always), else a
        resume token."""
        if not self.partitioned:
            return str(positions.get(0, 0))
        ids = await self.database_ids()
        return issue_resume_token(EVENT_LOG, {ids[index]: position for index, position in positions.items()})

    async def read_cursor(self, text: str, what: str) -> dict[int, int]:
        """The positions in a `cursor_text`; InvalidArgument for anything else."""
        if not self.partitioned:
            return {0: check_position(text, what)}
        positions = read_resume_token(EVENT_LOG, text)
        return {index: positions.get(database, 0) for index, database in enumerate(await self.database_ids())}

    async def read_alerts(self, index: int, after: int) -> list[tuple[int, StoredAlert]]:
        """Up to READ_BATCH alerts of database `index`'s alert log after its
        own position `after`, each with that position."""
        partitioned = self._partitioned
        if partitioned is None:
            return [(alert.position, alert) for alert in await self.databases[0].read_alerts(after, READ_BATCH)]
        alerts = await partitioned.read_alerts_of(index, after, READ_BATCH)
        return [(partitioned.position_in_database(alert.position), alert) for alert in alerts]

    async def follow_all(
        self, after: Mapping[int, int], *, wanted: Filter, max_batch: int, window: float
    ) -> AsyncGenerator[tuple[int, list[StoredEvent]], None]:
        """Every event of every database's log after its position in `after`
        (a database left out: from its start), as (database index, batch):
        each batch from one database, in its log order."""
        follows = [
            tail.follow(
                after.get(index, 0), saga_id=None, wanted=wanted, key=lambda stored: stored.position,
                read=_log_reader(database, wanted),
                max_batch=max_batch, window=window,
            )
            for index, (tail, database) in enumerate(zip(self.tails, self.databases, strict=True))
        ]
        if len(follows) == 1:
            async with contextlib.aclosing(follows[0]) as only:
                async for batch in only:
                    yield 0, batch
            return
        # Each follow has at most one read ahead in flight: a slow client
        # holds no more than a batch per database.
        pending: dict[asyncio.Task[list[StoredEvent]], int] = {}
        try:
            for index, follow in enumerate(follows):
                pending[asyncio.ensure_future(anext(follow))] = index
            while True:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda task: pending[task]):
                    index = pending.pop(task)
                    yield index, task.result()  # follows never end; an error ends the stream
                    pending[asyncio.ensure_future(anext(follows[index]))] = index
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for follow in follows:
                await follow.aclose()
