"""Moving sagas in flight to another version of their definition (issue 23):
`compensa plan --filter` classifies them, a MOVE bulk action moves the
compatible ones (with a mapping of renamed steps) and refuses the others one
by one with their reasons, and the moved sagas finish under the new version,
their participants' effects as that version says. On PostgreSQL, with the
checkout's real participants.

The sagas in flight are checkouts whose charge is held for review
(reserve_stock done, charge_card WAITING for CompleteStep): released by the
engine, so nothing of theirs is in flight while they move.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from harness import Stack, checkout_stack, poll_until
from sqlalchemy.ext.asyncio import create_async_engine
from test_replay import _checkout, _compensa, _versions, _write

from compensa.examples.payment import PaymentParticipant
from compensa.orchestrator.api.history_checks import check_history
from compensa.orchestrator.client import SagaClient
from compensa.orchestrator.definitions import load_definition_file
from compensa.orchestrator.store.schema import sagas
from compensa.v1 import bulk_pb2, orchestrator_pb2, saga_pb2

pytestmark = pytest.mark.postgres

S = saga_pb2
API = orchestrator_pb2
B = bulk_pb2
MOVE = B.BULK_ACTION_KIND_MOVE
#: The incompatible versions, each with what the job says of every saga it refuses.
INCOMPATIBLE = {
    "removed": "at event 2: step 'reserve_stock' is not in the definition (if it was renamed, map it to its new name)",
    "participant": "at event 2: step 'reserve_stock' ran on participant 'inventory'; the definition gives it to"
    " 'warehouse'",
    "compensability": "at event 2: step 'reserve_stock' ran as COMPENSABLE; the definition makes it RETRIABLE",
    "pivot_first": "at event 2: the log has STEP_STARTED of step 'reserve_stock' (attempt 1); the definition would"
    " have written STEP_STARTED of step 'ship_order' (attempt 1)",
    "dependency": "at event 4: the log has STEP_STARTED of step 'charge_card' (attempt 1); the definition would"
    " have written STEP_STARTED of step 'screen_order' (attempt 1)",
    "order": "at event 2: the log has STEP_STARTED of step 'reserve_stock' (attempt 1); the definition would have"
    " written STEP_STARTED of step 'charge_card' (attempt 1)",
}


def _step(saga: saga_pb2.Saga, name: str) -> saga_pb2.Step:
    return next(step for step in saga.steps if step.name == name)


def _waiting(saga: saga_pb2.Saga) -> bool:
    return any(step.state == S.STEP_STATE_WAITING for step in saga.steps)


async def _until(stack: Stack, saga_id: str, check: Callable[[saga_pb2.Saga], bool]) -> saga_pb2.Saga:
    async def reached() -> saga_pb2.Saga | None:
        saga = await stack.get(saga_id)
        return saga if check(saga) else None

    found: saga_pb2.Saga = await poll_until(reached, timeout=30)
    return found


async def _history(stack: Stack, saga_id: str) -> API.SagaHistory:
    return (await stack.stub.GetSagaHistory(API.GetSagaHistoryRequest(saga_id=saga_id))).history


async def _register(stack: Stack, path: Path) -> int:
    answer = await stack.stub.RegisterDefinition(API.RegisterDefinitionRequest(definition=load_definition_file(path)))
    return answer.definition.version


def _mappings(*pairs: str) -> list[B.StepMapping]:
    return [B.StepMapping(old_step=old, new_step=new) for old, _, new in (pair.partition("=") for pair in pairs)]


async def _move(
    stack: Stack, selection: str, to_version: int, *pairs: str, note: str = ""
) -> tuple[B.BulkAction, dict[str, B.BulkActionItem]]:
    """Runs a MOVE job to its end: the job, and its problems by saga."""
    started = await stack.stub.StartBulkAction(
        B.StartBulkActionRequest(
            kind=MOVE,
            filter=selection,
            to_version=to_version,
            step_mappings=_mappings(*pairs),
            note=note,
            actor="alice",
        )
    )
    job_id = started.bulk_action.bulk_action_id

    async def finished() -> B.GetBulkActionResponse | None:
        answer = await stack.stub.GetBulkAction(B.GetBulkActionRequest(bulk_action_id=job_id))
        return answer if answer.bulk_action.state == B.BULK_ACTION_STATE_COMPLETED else None

    answer = await poll_until(finished, timeout=60)
    return answer.bulk_action, {item.saga_id: item for item in answer.problems}


async def _plans(stack: Stack, path: Path, selection: str, *pairs: str) -> dict[str, API.SagaMigrationPlan]:
    response = await stack.stub.PlanMigration(
        API.PlanMigrationRequest(
            definition=load_definition_file(path),
            filter=selection,
            step_mappings=_mappings(*pairs),
        )
    )
    return {plan.saga_id: plan for plan in response.plans}


async def _moves_logged(stack: Stack, saga_id: str) -> list[saga_pb2.SagaEvent]:
    history = await _history(stack, saga_id)
    return [event for event in history.events if event.type == S.EVENT_TYPE_SAGA_MOVED]


async def _hold(database_url: str, saga_ids: Sequence[str], holder: str | None) -> None:
    """Marks the sagas held by replica `holder` under a live lease, as a
    replica with a call of theirs in flight holds them (None: released)."""
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.update(sagas)
                .where(sagas.c.saga_id.in_(saga_ids))
                .values(owner=holder, lease_until=None if holder is None else time.time() + 600)
            )
    finally:
        await engine.dispose()


def _versions_to_register(tmp_path: Path) -> dict[str, Path]:
    """The checkout's next versions: test_replay's (compatible, renamed, and
    six incompatible ones), and one renaming the step that waits."""
    renamed_waiting = _checkout()
    renamed_waiting["description"] = "checkout, the charge renamed"
    next(step for step in renamed_waiting["steps"] if step["name"] == "charge_card")["name"] = "take_payment"
    return {**_versions(tmp_path), "renamed_waiting": _write(tmp_path, "renamed_waiting", renamed_waiting)}


async def test_sagas_in_flight_move_to_compatible_versions_and_finish_there(
    make_postgres_url: Callable[[], str], tmp_path: Path
) -> None:
    files = _versions_to_register(tmp_path)
    async with checkout_stack(make_postgres_url) as stack, SagaClient(stack.orchestrator.address) as client:
        payment = stack.participants["payment"].participant
        assert isinstance(payment, PaymentParticipant)
        payment.complete_step = client.complete_step
        # Every saga starts on version 1, before any other is registered.
        groups = {
            "a": [await stack.start(f"mv-a-{n}", card_token=f"review-a{n}") for n in range(3)],
            "b": [await stack.start(f"mv-b-{n}", card_token=f"review-b{n}") for n in range(2)],
            "c": [await stack.start(f"mv-c-{n}", card_token=f"review-c{n}") for n in range(2)],
            "x": [await stack.start(f"mv-x-{n}", card_token=f"review-x{n}") for n in range(2)],
        }
        finished = await stack.start("mv-a-done")
        await stack.wait_final(finished)
        for saga_id in (saga_id for group in groups.values() for saga_id in group):
            await _until(stack, saga_id, _waiting)
        shipping = stack.participants["shipping"].address
        for name in ("warehouse", "fraud"):  # named by two of the versions
            await stack.stub.SetParticipant(API.SetParticipantRequest(name=name, address=shipping))
        version = {kind: await _register(stack, path) for kind, path in files.items()}
        assert sorted(version.values()) == list(range(2, 2 + len(files)))
        before = {saga_id: await stack.get(saga_id) for group in groups.values() for saga_id in group}

        # Plan first: the same filter language as the move, through the API and the CLI.
        plans = await _plans(stack, files["compatible"], "id_prefix=mv-a-")
        assert sorted(plans) == sorted(groups["a"]), "a finished saga is not planned"
        assert {plan.verdict for plan in plans.values()} == {API.MIGRATION_VERDICT_COMPATIBLE}
        plans = await _plans(stack, files["renamed"], "id_prefix=mv-b- version=1", "reserve_stock=hold_stock")
        assert {(plan.verdict, plan.reason) for plan in plans.values()} == {
            (API.MIGRATION_VERDICT_COMPATIBLE_WITH_MAPPING, "with reserve_stock=hold_stock")
        }
        for kind, reason in INCOMPATIBLE.items():
            plans = await _plans(stack, files[kind], "id_prefix=mv-x-")
            assert sorted(plans) == groups["x"], kind
            for plan in plans.values():
                assert plan.verdict == API.MIGRATION_VERDICT_INCOMPATIBLE, (kind, plan)
                assert f"at event {plan.diverging_sequence}: {plan.reason}".startswith(reason), (kind, plan.reason)
        planned = await _compensa(
            "--address",
            stack.orchestrator.address,
            "plan",
            str(files["renamed_waiting"]),
            "--json",
            "--filter",
            "id_prefix=mv-c- state=RUNNING",
            "--map",
            "charge_card=take_payment",
        )
        assert planned.returncode == 0, planned.stderr
        assert sorted((line["saga_id"], line["verdict"]) for line in map(json.loads, planned.stdout.splitlines())) == [
            (saga_id, "MIGRATION_VERDICT_COMPATIBLE_WITH_MAPPING") for saga_id in groups["c"]
        ]

        # Incompatible versions: every saga refused, with its reason, and untouched.
        for kind, reason in INCOMPATIBLE.items():
            job, problems = await _move(stack, "definition=checkout id_prefix=mv-x-", version[kind])
            assert (job.selected_count, job.done_count, job.failed_count, job.skipped_count) == (2, 0, 2, 0), kind
            for saga_id in groups["x"]:
                item = problems[saga_id]
                assert item.outcome == B.BULK_ITEM_OUTCOME_FAILED
                assert item.reason.startswith(f"incompatible with version {version[kind]} {reason}"), item.reason
        job, problems = await _move(stack, "definition=checkout id_prefix=mv-x-", version["renamed"])
        assert job.failed_count == 2, "a rename needs its mapping"
        assert "(if it was renamed, map it to its new name)" in problems[groups["x"][0]].reason
        for saga_id in groups["x"]:
            assert await stack.get(saga_id) == before[saga_id]
            assert not await _moves_logged(stack, saga_id)

        # A compatible version: each saga moves, but the one a replica holds
        # (a call in flight) is skipped, and a second job moves it once it waits.
        busy = groups["a"][0]
        await _hold(stack.orchestrator_url, [busy], "replica-with-a-call-in-flight")
        job, problems = await _move(stack, "definition=checkout id_prefix=mv-a-", version["compatible"], note="INC-7")
        assert (job.selected_count, job.done_count, job.skipped_count, job.failed_count) == (3, 2, 1, 0)
        assert job.to_version == version["compatible"]
        assert problems[busy].outcome == B.BULK_ITEM_OUTCOME_SKIPPED
        assert problems[busy].reason.startswith(
            "a call is in flight (replica replica-with-a-call-in-flight holds the saga); run the job again"
        )
        assert (await stack.get(busy)).definition_version == 1
        await _hold(stack.orchestrator_url, [busy], None)
        again, _ = await _move(stack, "definition=checkout id_prefix=mv-a- version=1", version["compatible"])
        assert (again.selected_count, again.done_count) == (1, 1)
        for saga_id in groups["a"]:
            (moved,) = await _moves_logged(stack, saga_id)
            first = job if saga_id != busy else again
            assert moved.message == (
                f"moved from version 1 to version {version['compatible']}; bulk action {first.bulk_action_id}"
                + (": INC-7" if first is job else "")
            )
            assert moved.actor == "alice" and moved.saga_state == S.SAGA_STATE_RUNNING

        # With a mapping: the renamed steps carry their state and output.
        job, _ = await _move(
            stack, "definition=checkout id_prefix=mv-b-", version["renamed"], "reserve_stock=hold_stock"
        )
        assert (job.done_count, job.failed_count) == (2, 0)
        assert [(m.old_step, m.new_step) for m in job.step_mappings] == [("reserve_stock", "hold_stock")]
        job, _ = await _move(
            stack, "definition=checkout id_prefix=mv-c-", version["renamed_waiting"], "charge_card=take_payment"
        )
        assert (job.done_count, job.failed_count) == (2, 0)
        for saga_id in groups["b"]:
            saga = await stack.get(saga_id)
            assert (saga.definition_version, [step.name for step in saga.steps]) == (
                version["renamed"],
                ["hold_stock", "charge_card", "ship_order"],
            )
            assert _step(saga, "hold_stock").output == _step(before[saga_id], "reserve_stock").output
            assert _step(saga, "hold_stock").state == S.STEP_STATE_SUCCEEDED
            (moved,) = await _moves_logged(stack, saga_id)
            assert moved.message.startswith(
                f"moved from version 1 to version {version['renamed']}, steps renamed reserve_stock=hold_stock;"
            )
        for saga_id in (*groups["a"], *groups["b"], *groups["c"]):
            check = check_history(await _history(stack, saga_id))
            assert check.ok, check.summary()

        # The moved sagas finish under their new versions; the refused ones
        # under version 1, where they stayed.
        async def review(saga_id: str, *, approve: bool) -> None:
            (charge,) = await stack.rows("payment", "payment_charges", saga_id=saga_id)
            assert await payment.review(charge.charge_id, approve=approve)

        # One moved saga (its first step renamed) and one that stayed are declined.
        declined = {groups["b"][1], groups["x"][1]}
        for saga_id in before:
            await review(saga_id, approve=saga_id not in declined)
        ends = {saga_id: await stack.wait_final(saga_id) for saga_id in before}
        for saga_id, saga in ends.items():
            expected = S.SAGA_STATE_COMPENSATED if saga_id in declined else S.SAGA_STATE_SUCCEEDED
            assert saga.state == expected, (saga_id, saga)
        assert {ends[saga_id].definition_version for saga_id in groups["x"]} == {1}
        assert _step(ends[groups["c"][0]], "take_payment").state == S.STEP_STATE_SUCCEEDED
        for saga_id, saga in ends.items():
            reservations = await stack.rows("inventory", "inventory_reservations", saga_id=saga_id)
            charges = await stack.rows("payment", "payment_charges", saga_id=saga_id)
            shipments = await stack.rows("shipping", "shipping_shipments", saga_id=saga_id)
            if saga_id in declined:
                # hold_stock (mv-b-1) was compensated under the idempotency key
                # its Execute had before the rename: the stock is released.
                assert [row.status for row in reservations] == ["released"]
                assert [row.status for row in charges] == ["declined"]
                assert not shipments
                assert saga.steps[0].state == S.STEP_STATE_COMPENSATED
            else:
                assert [row.status for row in reservations] == ["reserved"], saga_id
                assert [row.status for row in charges] == ["charged"], saga_id
                assert len(shipments) == 1, saga_id
            check = check_history(await _history(stack, saga_id))
            assert check.ok, check.summary()

        # The participants' barrier rows agree with the log, renamed steps
        # included. The example payment's review leaves a declined hold's
        # Execute row "pending" (it does not settle it), which the audit
        # reports for a saga never moved as for a moved one.
        audit = await stack.stub.AuditSagas(
            API.AuditSagasRequest(
                definition_name="checkout",
                participants=["inventory", "payment", "shipping"],
            )
        )
        assert all(found.audited for found in audit.participants), audit
        found = {
            (item.kind, item.saga_id, item.step_name)
            for participant in audit.participants
            for item in participant.discrepancies
        }
        assert found == {("HANGING_EXECUTE", saga_id, "charge_card") for saga_id in declined}


async def test_a_move_refuses_bad_input_before_anything_is_written(
    make_postgres_url: Callable[[], str], tmp_path: Path
) -> None:
    files = _versions(tmp_path)
    async with checkout_stack(make_postgres_url) as stack:
        held = await stack.start("mv-bad-0", card_token="review-bad")
        await _until(stack, held, _waiting)
        renamed = await _register(stack, files["renamed"])
        before = await stack.get(held)
        address = ("--address", stack.orchestrator.address)

        def request(**fields: Any) -> B.StartBulkActionRequest:
            values: dict[str, Any] = {
                "kind": MOVE,
                "filter": "definition=checkout",
                "to_version": renamed,
                "step_mappings": _mappings("reserve_stock=hold_stock"),
                **fields,
            }
            return B.StartBulkActionRequest(**values)

        refusals: list[tuple[B.StartBulkActionRequest, str]] = [
            (request(to_version=9), "to_version: definition 'checkout' has no version 9; its versions: 1 to 2"),
            (request(to_version=0), "to_version is required for MOVE"),
            (request(filter="id_prefix=mv-"), "filter: MOVE needs definition=NAME"),
            (request(filter="definition=nothing_here"), "filter: definition 'nothing_here' not found"),
            (
                request(step_mappings=_mappings("reserve=hold_stock")),
                "step_mappings[0].old_step 'reserve' is not a step of checkout version(s) 2, 1",
            ),
            (
                request(step_mappings=_mappings("reserve_stock=hold")),
                "step_mappings[0].new_step 'hold' is not a step of the new definition",
            ),
            (
                request(filter="definition=checkout version=1", step_mappings=_mappings("hold_stock=hold_stock")),
                "step_mappings[0].old_step 'hold_stock' is not a step of checkout version(s) 1",
            ),
            (request(filter="definition=checkout state=FAILED"), "MOVE applies only to COMPENSATING, RUNNING sagas"),
            (request(kind=B.BULK_ACTION_KIND_RETRY_NOW), "to_version and step_mappings are for MOVE only"),
        ]
        for bad, text in refusals:
            for validate_only in (False, True):
                bad.validate_only = validate_only
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stack.stub.StartBulkAction(bad)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
                assert text in (raised.value.details() or ""), raised.value.details()
        listed = await stack.stub.ListBulkActions(B.ListBulkActionsRequest())
        assert not listed.bulk_actions, "a refused start stored a job"
        assert await stack.get(held) == before

        # The CLI says the same, and a dry run counts without moving.
        refused = await _compensa(
            *address, "bulk", "start", "move", "--filter", "definition=checkout", "--to-version", "9"
        )
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.strip() == (
            "error: INVALID_ARGUMENT: to_version: definition 'checkout' has no version 9; its versions: 1 to 2"
            " (latest 2)"
        )
        missing = await _compensa(*address, "bulk", "start", "move", "--filter", "definition=checkout")
        assert missing.returncode == 2 and "move needs --to-version N" in missing.stderr, missing.stderr
        dry = await _compensa(
            *address,
            "bulk",
            "start",
            "move",
            "--dry-run",
            "--to-version",
            str(renamed),
            "--map",
            "reserve_stock=hold_stock",
            "--filter",
            "definition=checkout",
        )
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.startswith("move would act on 1 sagas; for example:"), dry.stdout
        assert await stack.get(held) == before

        # plan --filter: the same language, its own mistakes named.
        plan_refusals = [
            (
                API.PlanMigrationRequest(filter="definition=other"),
                "filter term 'definition=other': only sagas of 'checkout' are selected here",
            ),
            (
                API.PlanMigrationRequest(filter="version=1", state=S.SAGA_STATE_RUNNING),
                "leave definition_version, state and saga_ids unset",
            ),
            (API.PlanMigrationRequest(filter="stat=RUNNING"), "unknown field 'stat'"),
            (API.PlanMigrationRequest(filter="state=SUCCEEDED"), "applies only to COMPENSATING, RUNNING sagas"),
        ]
        for plan_request, text in plan_refusals:
            plan_request.definition.CopyFrom(load_definition_file(files["compatible"]))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stack.stub.PlanMigration(plan_request)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
            assert text in (raised.value.details() or ""), raised.value.details()
        assert await stack.get(held) == before


def _split(tmp_path: Path, name: str, *, confirm: list[str], charge: list[str], ship: list[str]) -> Path:
    """reserve_stock split into hold_stock (the step renamed) and confirm_stock
    (new), each step after those given."""
    definition = _checkout()
    definition["description"] = f"checkout, reserve_stock split ({name})"
    reserve, charge_card, ship_order = definition["steps"]
    charge_card["depends_on"], ship_order["depends_on"] = charge, ship
    definition["steps"] = [
        {**reserve, "name": "hold_stock"}, {**reserve, "name": "confirm_stock", "depends_on": confirm},
        charge_card, ship_order,
    ]
    return _write(tmp_path, f"split_{name}", definition)


async def test_a_split_step_moves_only_when_its_new_half_comes_after_what_is_done(
    make_postgres_url: Callable[[], str], tmp_path: Path
) -> None:
    """Sagas wait on charge_card, reserve_stock done. Split into hold_stock
    (mapped from reserve_stock) and a new confirm_stock: compatible with the
    mapping when confirm_stock comes after charge_card; incompatible when the
    new version would have started it before or beside a step the saga has
    already started."""
    files = {
        "after": _split(tmp_path, "after", confirm=["charge_card"], charge=["hold_stock"], ship=["confirm_stock"]),
        "before": _split(tmp_path, "before", confirm=["hold_stock"], charge=["confirm_stock"], ship=["charge_card"]),
        "first": _split(tmp_path, "first", confirm=[], charge=["hold_stock", "confirm_stock"], ship=["charge_card"]),
        "beside": _split(
            tmp_path, "beside", confirm=["hold_stock"], charge=["hold_stock"], ship=["charge_card", "confirm_stock"]
        ),
    }
    started_late = "the log has STEP_STARTED of step 'charge_card' (attempt 1); the definition would have written"
    refusals = {
        "before": (4, f"{started_late} STEP_STARTED of step 'confirm_stock' (attempt 1) (step 'charge_card' started"
                      " before 'confirm_stock', which it depends on there)"),
        "beside": (4, f"{started_late} STEP_STARTED of step 'confirm_stock' (attempt 1)"),
        "first": (3, "the log has STEP_SUCCEEDED of step 'hold_stock' (attempt 1); the definition would have written"
                     " STEP_STARTED of step 'confirm_stock' (attempt 1)"),
    }
    async with checkout_stack(make_postgres_url) as stack, SagaClient(stack.orchestrator.address) as client:
        payment = stack.participants["payment"].participant
        assert isinstance(payment, PaymentParticipant)
        payment.complete_step = client.complete_step
        held = [await stack.start(f"split-{n}", card_token=f"review-s{n}") for n in range(2)]
        for saga_id in held:
            await _until(stack, saga_id, _waiting)
        version = {kind: await _register(stack, path) for kind, path in files.items()}

        plans = await _plans(stack, files["after"], "id_prefix=split-", "reserve_stock=hold_stock")
        assert {(plan.verdict, plan.reason) for plan in plans.values()} == {
            (API.MIGRATION_VERDICT_COMPATIBLE_WITH_MAPPING, "with reserve_stock=hold_stock")
        }
        split, mapping = "id_prefix=split-", "reserve_stock=hold_stock"
        for kind, (sequence, reason) in refusals.items():
            plans = await _plans(stack, files[kind], split, mapping)
            assert {(plan.verdict, plan.diverging_sequence, plan.reason) for plan in plans.values()} == {
                (API.MIGRATION_VERDICT_INCOMPATIBLE, sequence, reason)
            }, kind
            job, problems = await _move(stack, f"definition=checkout {split}", version[kind], mapping)
            assert (job.done_count, job.failed_count) == (0, 2), kind
            assert {item.reason for item in problems.values()} == {
                f"incompatible with version {version[kind]} at event {sequence}: {reason}"
            }, kind
        # Without the mapping, the split is refused: reserve_stock is gone.
        job, problems = await _move(stack, f"definition=checkout id={held[0]}", version["after"])
        assert job.failed_count == 1 and "(if it was renamed, map it to its new name)" in problems[held[0]].reason
        job, _ = await _move(stack, f"definition=checkout id={held[0]}", version["after"], "reserve_stock=hold_stock")
        assert job.done_count == 1

        # Once charged, the moved saga runs the new half, then ships; the other stays on version 1.
        for saga_id in held:
            (charge,) = await stack.rows("payment", "payment_charges", saga_id=saga_id)
            assert await payment.review(charge.charge_id, approve=True)
        moved, stayed = [await stack.wait_final(saga_id) for saga_id in held]
        assert (moved.state, moved.definition_version) == (S.SAGA_STATE_SUCCEEDED, version["after"])
        assert {step.name: step.state for step in moved.steps} == {
            name: S.STEP_STATE_SUCCEEDED for name in ("hold_stock", "confirm_stock", "charge_card", "ship_order")
        }
        assert (stayed.state, stayed.definition_version) == (S.SAGA_STATE_SUCCEEDED, 1)
        events = (await _history(stack, held[0])).events
        started = [event.step_name for event in events if event.type == S.EVENT_TYPE_STEP_STARTED]
        assert started == ["reserve_stock", "charge_card", "confirm_stock", "ship_order"]
        reservations = await stack.rows("inventory", "inventory_reservations", saga_id=held[0])
        assert [row.status for row in reservations] == ["reserved", "reserved"]
        for saga_id in held:
            check = check_history(await _history(stack, saga_id))
            assert check.ok, check.summary()
