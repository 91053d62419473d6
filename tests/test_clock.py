"""Replicas compare leases and due times on one clock: the database's
(compensa.orchestrator.engine.clock). A replica whose own clock runs an hour ahead must not
take over the sagas another replica is driving."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from harness import checkout_stack
from sqlalchemy.ext.asyncio import create_async_engine

from compensa.orchestrator.engine.clock import SharedClock
from compensa.orchestrator.store.schema import sagas
from compensa.participants.faults import FaultPlan
from compensa.v1 import saga_pb2

S = saga_pb2
AN_HOUR = 3600.0


async def test_sync_puts_a_skewed_clock_on_the_database_time_base() -> None:
    readings: list[float] = []

    async def database_clock() -> float:
        readings.append(time.time())
        return readings[-1]

    clock = SharedClock(wall=lambda: time.time() + AN_HOUR)
    assert clock.now() - time.time() > AN_HOUR - 1
    await clock.sync(database_clock)
    assert len(readings) == 3
    assert abs(clock.now() - time.time()) < 0.05
    assert abs(clock.offset + AN_HOUR) < 0.05


@pytest.mark.postgres
async def test_a_replica_whose_clock_runs_an_hour_ahead_takes_nothing_over(
    make_postgres_url: Callable[[], str],
) -> None:
    # Each saga spends about 3 s in calls (two slow steps) holding a 2 s lease
    # that its replica renews: a replica reading leases on its own clock, an
    # hour ahead, would see every one of them expired at its first poll (1 s).
    slow = FaultPlan(delay_seconds=1.5)
    faults = {"inventory": slow, "shipping": slow}
    async with checkout_stack(make_postgres_url, faults=faults, lease_seconds=2.0) as stack:
        async with stack.another_replica(lease_seconds=2.0) as ahead:
            ahead.engine.clock = SharedClock(wall=lambda: time.time() + AN_HOUR)
            await ahead.engine.sync_clock()
            assert abs(ahead.engine.clock.now() - time.time()) < 0.5
            saga_ids = [await stack.start(order_id=f"order-{index}") for index in range(8)]
            finals = [await stack.wait_final(saga_id) for saga_id in saga_ids]
        assert [saga.state for saga in finals] == [S.SAGA_STATE_SUCCEEDED] * len(saga_ids)
        database = create_async_engine(stack.orchestrator_url)
        try:
            async with database.connect() as conn:
                rows = (await conn.execute(sa.select(sagas.c.saga_id, sagas.c.epoch))).all()
        finally:
            await database.dispose()
        # A takeover bumps the epoch: 1 means the starting replica drove each saga to its end.
        assert sorted(rows) == sorted((saga_id, 1) for saga_id in saga_ids)
        for saga_id in saga_ids:
            assert len(await stack.rows("inventory", "inventory_reservations", saga_id=saga_id)) == 1
            assert len(await stack.rows("shipping", "shipping_shipments", saga_id=saga_id)) == 1
