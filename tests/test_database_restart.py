"""The orchestrator's PostgreSQL crash-restarts while sagas run: the
orchestrator reconnects and every saga still ends consistently."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pg
import psycopg
import pytest
from harness import FINAL, assert_replays_without_divergence, checkout_stack, poll_until
from psycopg import sql

from compensa.participants.faults import FaultPlan
from compensa.v1 import orchestrator_pb2, saga_pb2

S = saga_pb2


# A cluster of its own, crash-restarted under sagas: one at a time (make test's --dist loadgroup).
pytestmark = pytest.mark.xdist_group("heavy")


async def test_sagas_survive_a_crash_restart_of_postgresql(
    private_postgres: pg.PostgresServer, make_postgres_url: Callable[[], str]
) -> None:
    with psycopg.connect(private_postgres.admin_conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("orchestrator")))
    orchestrator_url = private_postgres.admin_url.set(database="orchestrator").render_as_string(hide_password=False)
    # Slow participants keep sagas in flight while the database goes away.
    faults = {kind: FaultPlan(delay_seconds=0.05) for kind in ("inventory", "payment", "shipping")}
    async with checkout_stack(make_postgres_url, faults=faults, orchestrator_url=orchestrator_url) as stack:
        ids = [
            await stack.start(saga_id=f"pg-restart-{i}", card_token="flagged" if i % 3 == 0 else "ok")
            for i in range(30)
        ]
        await asyncio.to_thread(private_postgres.restart)

        async def states() -> dict[str, int] | None:
            try:
                found = {
                    saga_id: (await stack.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga.state
                    for saga_id in ids
                }
            except Exception:  # the orchestrator answers UNAVAILABLE until it reconnects
                return None
            return found if all(state in FINAL for state in found.values()) else None

        final = await poll_until(states, timeout=90, interval=0.2)
        for index, saga_id in enumerate(ids):
            expected = S.SAGA_STATE_COMPENSATED if index % 3 == 0 else S.SAGA_STATE_SUCCEEDED
            assert final[saga_id] == expected, saga_id
            charges = await stack.rows("payment", "payment_charges", saga_id=saga_id)
            reservations = await stack.rows("inventory", "inventory_reservations", saga_id=saga_id)
            shipments = await stack.rows("shipping", "shipping_shipments", saga_id=saga_id)
            if expected == S.SAGA_STATE_SUCCEEDED:
                assert [r.status for r in reservations] == ["reserved"]
                assert [c.status for c in charges] == ["charged"]
                assert len(shipments) == 1
            else:
                assert [r.status for r in reservations] == ["released"]
                assert charges == [] and shipments == []
            sequences = [e.sequence for e in await stack.events(saga_id)]
            assert sequences == list(range(1, len(sequences) + 1))
        await assert_replays_without_divergence(stack.stub, ids)
