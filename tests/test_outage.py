"""A short participant outage needs no person: with the shipped checkout policy,
compensations outlast it and the saga ends COMPENSATED on its own; what people
page on is exported from the start."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from harness import assert_replays_without_divergence, checkout_stack, poll_until, scrape

from compensa.examples.server import start_participant
from compensa.participants.faults import FaultPlan
from compensa.v1 import orchestrator_pb2, saga_pb2

S = saga_pb2


def _step(saga: saga_pb2.Saga, name: str) -> saga_pb2.Step:
    return next(step for step in saga.steps if step.name == name)


async def _compensating_charge(saga: Callable[[], Awaitable[saga_pb2.Saga]]) -> bool:
    """The charge failed (payment errs) and its refund is being retried."""
    return _step(await saga(), "charge_card").compensate_attempts > 0


async def test_a_payment_outage_longer_than_the_old_compensation_window_ends_compensated_on_its_own(
    make_postgres_url: Callable[[], str],
) -> None:
    # Payment's servicer answers every call UNAVAILABLE: the charge's Execute
    # reached it, so its effect is unknown and the refund must be retried (a
    # participant that was down from the start would never have been sent
    # the charge, and there would be nothing to refund).
    faults = {"payment": FaultPlan(unavailable_attempts=1_000_000)}
    async with checkout_stack(make_postgres_url, metrics_listen="127.0.0.1:0", faults=faults) as stack:
        payment = stack.participants["payment"]
        payment_url = payment.engine.url.render_as_string(hide_password=False)
        saga_id = await stack.start(quantity=1)

        async def saga() -> saga_pb2.Saga:
            return (await stack.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga

        assert await poll_until(lambda: _compensating_charge(saga), timeout=10)
        # Possibly delivered, so refunded rather than skipped.
        assert _step(await saga(), "charge_card").state == S.STEP_STATE_COMPENSATING
        await payment.stop(0)
        # Down for longer than the policy checkout shipped with retried the
        # refund (10 attempts at most 2s apart: about 11s after the charge
        # failed), which left the saga FAILED for a person.
        await asyncio.sleep(13)  # ok-sleep: the outage itself, as long as it is on purpose
        assert (await saga()).state == S.SAGA_STATE_COMPENSATING
        stack.participants["payment"] = await start_participant(
            "payment", payment_url, listen=f"127.0.0.1:{payment.port}"
        )
        ended = await stack.wait_final(saga_id, timeout=30)
        assert ended.state == S.SAGA_STATE_COMPENSATED, ended
        assert _step(ended, "reserve_stock").state == S.STEP_STATE_COMPENSATED
        events = await stack.events(saga_id)
        assert not [event for event in events if event.type in (S.EVENT_TYPE_SAGA_FAILED, S.EVENT_TYPE_ALERT_RAISED)]
        # Nothing was charged.
        assert not await stack.rows("payment", "payment_charges", saga_id=saga_id)
        assert stack.orchestrator.metrics_port is not None
        samples = await scrape(stack.orchestrator.metrics_port)
        assert samples[("compensa_alerts_total", frozenset({("definition", "checkout"), ("reason", "saga")}))] == 0
        await assert_replays_without_divergence(stack.stub, [saga_id])


async def test_alerts_and_the_counts_people_page_on_are_exported_before_anything_happens(
    make_postgres_url: Callable[[], str],
) -> None:
    # Shipping (the pivot) never answers: the saga can only stop, FAILED, for a person.
    faults = {"shipping": FaultPlan.parse("unavailable_attempts=10")}
    async with checkout_stack(make_postgres_url, metrics_listen="127.0.0.1:0", faults=faults) as stack:
        assert stack.orchestrator.metrics_port is not None
        port = stack.orchestrator.metrics_port
        checkout = frozenset({("definition", "checkout"), ("reason", "saga")})
        samples = await scrape(port)
        # A rate of increase needs a series that exists before the first alert.
        assert samples[("compensa_alerts_total", checkout)] == 0
        assert samples[("compensa_sagas_awaiting_person", frozenset())] == 0
        assert samples[("compensa_sagas_stuck", frozenset())] == 0
        saga_id = await stack.start()
        assert (await stack.wait_final(saga_id)).state == S.SAGA_STATE_FAILED
        samples = await scrape(port)
        assert samples[("compensa_alerts_total", checkout)] == 1
        assert samples[("compensa_sagas_awaiting_person", frozenset())] == 1
        assert samples[("compensa_sagas_stuck", frozenset())] == 0
        await stack.stub.ResolveSaga(orchestrator_pb2.ResolveSagaRequest(saga_id=saga_id, note="shipped by hand"))
        assert (await scrape(port))[("compensa_sagas_awaiting_person", frozenset())] == 0
        await assert_replays_without_divergence(stack.stub, [saga_id])
