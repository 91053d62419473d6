"""The checkout's long-running step end to end: payment holds a charge for review
(Execute answers PENDING through the SDK), the saga waits with nothing in memory,
and the review reports the outcome with the step's completion token."""

from __future__ import annotations

from collections.abc import Callable

from harness import Stack, checkout_stack, poll_until

from compensa.checkout.v1 import checkout_pb2
from compensa.examples import payment
from compensa.examples.payment import PaymentParticipant
from compensa.orchestrator.client import SagaClient
from compensa.participants.sdk import unpack_as
from compensa.v1 import orchestrator_pb2, saga_pb2

S = saga_pb2


def _step(saga: saga_pb2.Saga, name: str) -> saga_pb2.Step:
    return next(step for step in saga.steps if step.name == name)


async def _held(stack: Stack, saga_id: str) -> str:
    """Waits until the saga's charge is held; its charge id."""

    async def waiting() -> bool:
        saga = (await stack.stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id))).saga
        return _step(saga, "charge_card").state == S.STEP_STATE_WAITING

    await poll_until(waiting, timeout=15)
    rows = await stack.rows("payment", "payment_charges", saga_id=saga_id)
    assert [row.status for row in rows] == ["held"]
    return str(rows[0].charge_id)


async def test_a_held_charge_approved_on_review_completes_the_checkout(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack, SagaClient(stack.orchestrator.address) as client:
        participant = stack.participants["payment"].participant
        assert isinstance(participant, PaymentParticipant)
        participant.complete_step = client.complete_step
        saga_id = await stack.start(card_token="review-4242", amount_cents=9_900)
        charge_id = await _held(stack, saga_id)
        # Nothing else runs while the charge is held.
        assert not await stack.rows("shipping", "shipping_shipments", saga_id=saga_id)

        assert await participant.review(charge_id, approve=True)
        saga = await stack.wait_final(saga_id)
        assert saga.state == S.SAGA_STATE_SUCCEEDED
        charge = unpack_as(_step(saga, "charge_card").output, checkout_pb2.Charge)
        assert (charge.charge_id, charge.amount_cents) == (charge_id, 9_900)
        assert [row.status for row in await stack.rows("payment", "payment_charges", saga_id=saga_id)] == ["charged"]
        # A review repeated (its answer was lost, say) reports the same again.
        assert await participant.review(charge_id, approve=True)
        charges = await stack.rows("payment", "payment_charges", saga_id=saga_id)
        assert [row.status for row in charges] == ["charged"]


async def test_a_held_charge_declined_on_review_compensates_the_checkout(make_postgres_url: Callable[[], str]) -> None:
    async with checkout_stack(make_postgres_url) as stack, SagaClient(stack.orchestrator.address) as client:
        participant = stack.participants["payment"].participant
        assert isinstance(participant, PaymentParticipant)
        participant.complete_step = client.complete_step
        saga_id = await stack.start(card_token="review-4242")
        charge_id = await _held(stack, saga_id)

        assert await participant.review(charge_id, approve=False, reason="unusual amount")
        saga = await stack.wait_final(saga_id)
        assert saga.state == S.SAGA_STATE_COMPENSATED
        assert "unusual amount" in _step(saga, "charge_card").last_error
        assert _step(saga, "reserve_stock").state == S.STEP_STATE_COMPENSATED
        rows = await stack.rows("payment", "payment_charges", saga_id=saga_id)
        assert [row.status for row in rows] == ["declined"]
        assert not await stack.rows("payment", payment.REFUNDS.name, charge_id=charge_id)
