"""The embedded default: orchestrator and participants on SQLite files, one
process, no PostgreSQL. The same engine and the same guarantees as on
PostgreSQL, with in-process change notification for the watch streams."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import checkout_stack

from compensa.participants.faults import FaultPlan
from compensa.v1 import orchestrator_pb2, saga_pb2

S = saga_pb2


@pytest.fixture
def make_sqlite_url(tmp_path: Path) -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"sqlite+aiosqlite:///{tmp_path / f'db-{next(counter)}.sqlite'}"


async def test_checkouts_run_to_the_end_on_sqlite(make_sqlite_url: Callable[[], str]) -> None:
    faults = {"payment": FaultPlan(unavailable_attempts=1)}
    # The watch streams' own re-read is off: only in-process notification
    # can bring them live events.
    async with checkout_stack(make_sqlite_url, faults=faults, watch_reread_seconds=3600) as stack:
        happy = await stack.start(saga_id="sqlite-happy")
        happy_final = await stack.wait_final(happy)
        assert happy_final.state == S.SAGA_STATE_SUCCEEDED
        # A subscriber to every saga: it reads the first saga from the log,
        # then is live when the second one runs.
        stream = aiter(stack.stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(), timeout=30))
        caught_up = [(await anext(stream)).event for _ in range(happy_final.sequence)]
        assert {event.saga_id for event in caught_up} == {happy}
        declined = await stack.start(saga_id="sqlite-declined", card_token="flagged-card", sku="sku-sqlite")
        saga = await stack.wait_final(declined)
        assert saga.state == S.SAGA_STATE_COMPENSATED
        live = [(await anext(stream)).event for _ in range(saga.sequence)]
        assert [(e.saga_id, e.sequence) for e in live] == [(declined, n) for n in range(1, saga.sequence + 1)]
        # The transient UNAVAILABLE was retried, and each saga's log is whole.
        charge = next(step for step in happy_final.steps if step.name == "charge_card")
        assert charge.attempts == 2
        for saga_id in (happy, declined):
            final = await stack.wait_final(saga_id)
            assert [e.sequence for e in await stack.events(saga_id)] == list(range(1, final.sequence + 1))
        # The participants' own tables agree.
        assert len(await stack.rows("payment", "payment_charges", saga_id=happy, status="charged")) == 1
        assert len(await stack.rows("shipping", "shipping_shipments", saga_id=happy)) == 1
        assert [row.status for row in await stack.rows("inventory", "inventory_reservations", saga_id=declined)] == [
            "released"
        ]
        assert await stack.rows("payment", "payment_charges", saga_id=declined) == []
