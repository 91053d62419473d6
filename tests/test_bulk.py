"""Bulk actions run by the server (issue 23): a repair of many sagas after a
planted participant bug, on two replica processes on PostgreSQL, one of them
SIGKILLed during the job; and the bad input a bulk action refuses.

The repair's size is COMPENSA_BULK_SAGAS (default 2,000, the issue's number):
half the sagas wait out a long retry backoff of `charge`, half ended FAILED
because the compensation of `reserve` failed.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
import sqlalchemy as sa
from dashboard_rig import TOKENS, DashboardRig, bearer, dashboard_rig
from google.protobuf import any_pb2, wrappers_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from harness import checkout_input, poll_until
from processes import ProcessSet
from scripted_participant import ScriptedParticipant, serve_scripted
from test_scope import OTHER

from compensa.orchestrator.api.history_checks import check_history
from compensa.v1 import bulk_pb2, orchestrator_pb2, orchestrator_pb2_grpc, participant_pb2
from compensa.v1 import saga_pb2 as S

SAGAS = int(os.environ.get("COMPENSA_BULK_SAGAS", "2000"))
COMPENSA = Path(sys.executable).parent / "compensa"

#: reserve's compensation is tried once; charge's Execute is retried after an hour.
REPAIRS = """\
name: repairs
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - name: reserve
    participant: planted
    execute_timeout: 5s
    compensate_timeout: 5s
    compensate_retry: {max_attempts: 1}
  - name: charge
    participant: planted
    execute_timeout: 5s
    compensate_timeout: 5s
    retry: {max_attempts: 100, initial_backoff: 1h, backoff_multiplier: 1, max_backoff: 1h}
"""


@dataclass
class PlantedBug(ScriptedParticipant):
    """While `broken`, charge answers UNAVAILABLE and every compensation
    fails; sagas whose id starts with "declined-" have their charge refused
    (a business failure) either way. Counts every call it receives."""

    broken: bool = True
    counted: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)

    async def Execute(
        self, request: participant_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.ExecuteResponse:
        step = request.context
        self.counted[(step.saga_id, step.step_name, "execute")] += 1
        if step.step_name == "charge":
            if step.saga_id.startswith("declined-"):
                await context.abort(grpc.StatusCode.ABORTED, "card declined")
            if self.broken:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "planted bug: payment client lost its key")
        output = any_pb2.Any()
        output.Pack(wrappers_pb2.StringValue(value="done"))
        return participant_pb2.ExecuteResponse(result=participant_pb2.EXECUTE_RESULT_SUCCEEDED, output=output)

    async def Compensate(
        self, request: participant_pb2.CompensateRequest, context: grpc.aio.ServicerContext
    ) -> participant_pb2.CompensateResponse:
        step = request.context
        self.counted[(step.saga_id, step.step_name, "compensate")] += 1
        if self.broken:
            await context.abort(grpc.StatusCode.INTERNAL, "planted bug: release of stock crashes")
        return participant_pb2.CompensateResponse()


async def _start_all(stubs: list[orchestrator_pb2_grpc.OrchestratorServiceStub], saga_ids: list[str]) -> None:
    slots = asyncio.Semaphore(32)

    async def start(index: int, saga_id: str) -> None:
        async with slots:
            await stubs[index % len(stubs)].StartSaga(
                orchestrator_pb2.StartSagaRequest(saga_id=saga_id, definition_name="repairs", input=checkout_input()),
                timeout=30,
            )

    await asyncio.gather(*(start(index, saga_id) for index, saga_id in enumerate(saga_ids)))


async def _job(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, job_id: str) -> bulk_pb2.BulkAction:
    answer = await stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=job_id), timeout=10)
    return answer.bulk_action


def _acted_on(database_url: str, job_id: str, event_type: int) -> collections.Counter[str]:
    """How many events of `event_type` naming the job each saga has."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT saga_id, count(*) FROM compensa_saga_events WHERE type = :type AND message LIKE :tag"
                    " GROUP BY saga_id"
                ),
                {"type": event_type, "tag": f"bulk action {job_id}%"},
            ).all()
    finally:
        engine.dispose()
    return collections.Counter({saga_id: count for saga_id, count in rows})


# Two replica processes, 2,000 sagas: one at a time (make test's --dist loadgroup).
@pytest.mark.xdist_group("heavy")
@pytest.mark.postgres
async def test_a_repair_of_many_sagas_survives_the_kill_of_the_replica_running_it(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    participant = PlantedBug()
    server, address = await serve_scripted(participant)
    (tmp_path / "repairs.yaml").write_text(REPAIRS)
    database_url = make_postgres_url()
    stuck = [f"stuck-{n:05d}" for n in range(SAGAS // 2)]
    declined = [f"declined-{n:05d}" for n in range(SAGAS - SAGAS // 2)]
    with ProcessSet(tmp_path) as processes:
        replicas = await processes.replicas(
            database_url, {"planted": address}, ("a", "b"), definitions=[tmp_path / "repairs.yaml"]
        )
        channels = {name: grpc.aio.insecure_channel(replica.address) for name, replica in replicas.items()}
        stubs = {name: orchestrator_pb2_grpc.OrchestratorServiceStub(channel) for name, channel in channels.items()}
        try:
            await _start_all(list(stubs.values()), stuck + declined)
            stub = stubs["a"]

            async def selects(kind: int, text: str, expected: int) -> bool:
                answer = await stub.StartBulkAction(
                    bulk_pb2.StartBulkActionRequest(kind=kind, filter=text, validate_only=True), timeout=30
                )
                return answer.selected_count == expected

            retry_now = "definition=repairs step=charge id_prefix=stuck-"
            retry = "definition=repairs state=FAILED step_state=COMPENSATION_FAILED"
            # Every saga is where the bug left it: waiting out charge's backoff, or FAILED.
            await poll_until(
                lambda: selects(bulk_pb2.BULK_ACTION_KIND_RETRY_NOW, retry_now, len(stuck)), timeout=120, interval=0.5
            )
            await poll_until(
                lambda: selects(bulk_pb2.BULK_ACTION_KIND_RETRY, retry, len(declined)), timeout=120, interval=0.5
            )

            participant.broken = False
            jobs = {}
            repairs = ((bulk_pb2.BULK_ACTION_KIND_RETRY_NOW, retry_now), (bulk_pb2.BULK_ACTION_KIND_RETRY, retry))
            for kind, text in repairs:
                started = await stub.StartBulkAction(
                    bulk_pb2.StartBulkActionRequest(
                        kind=kind, filter=text, note="payment client fixed (INC-7)", actor="ops",
                        max_sagas_per_second=300,
                    ),
                    timeout=30,
                )
                jobs[kind] = started.bulk_action.bulk_action_id
                assert started.bulk_action.selected_count == started.selected_count

            # SIGKILL the replica working on the retry-now job once it is under way.
            first = jobs[bulk_pb2.BULK_ACTION_KIND_RETRY_NOW]

            async def under_way() -> bulk_pb2.BulkAction | None:
                job = await _job(stub, first)
                return job if job.done_count >= len(stuck) // 10 and job.replica else None

            running = await poll_until(under_way, timeout=120, interval=0.05)
            assert running.state == bulk_pb2.BULK_ACTION_STATE_RUNNING and running.pending_count > 0
            victim = running.replica
            replicas[victim].kill()
            survivor = stubs["b" if victim == "a" else "a"]

            async def completed() -> list[bulk_pb2.BulkAction] | None:
                found = [await _job(survivor, job_id) for job_id in jobs.values()]
                return found if all(job.state == bulk_pb2.BULK_ACTION_STATE_COMPLETED for job in found) else None

            finished = await poll_until(completed, timeout=240, interval=0.5)
            for job, expected in zip(finished, (len(stuck), len(declined)), strict=True):
                progress = (job.selected_count, job.done_count, job.skipped_count, job.failed_count)
                assert progress == (expected, expected, 0, 0)

            async def summary() -> dict[int, int] | None:
                answer = await survivor.SummarizeSagas(
                    orchestrator_pb2.SummarizeSagasRequest(definition_name="repairs"), timeout=30
                )
                counts = {state.state: state.count for state in answer.states}
                return counts if counts.get(S.SAGA_STATE_SUCCEEDED) == len(stuck) else None

            # The survivor carried on with the job the victim held.
            assert replicas["b" if victim == "a" else "a"].log_lines(f"bulk action {first}: working on it")
            counts = await poll_until(summary, timeout=240, interval=0.5)
            assert counts == {S.SAGA_STATE_SUCCEEDED: len(stuck), S.SAGA_STATE_COMPENSATED: len(declined)}
            # A repaired saga's log replays, through the pure machine, to where it is.
            for saga_id in stuck[:25] + declined[:25]:
                answer = await survivor.GetSagaHistory(
                    orchestrator_pb2.GetSagaHistoryRequest(saga_id=saga_id), timeout=30
                )
                checked = check_history(answer.history)
                assert checked.ok, checked.summary()
        finally:
            for channel in channels.values():
                await channel.close()
            await server.stop(0)

    # Every saga acted on exactly once, by the job that selected it.
    assert _acted_on(database_url, jobs[bulk_pb2.BULK_ACTION_KIND_RETRY_NOW], S.EVENT_TYPE_BACKOFF_SKIPPED) == (
        collections.Counter(dict.fromkeys(stuck, 1))
    )
    assert _acted_on(database_url, jobs[bulk_pb2.BULK_ACTION_KIND_RETRY], S.EVENT_TYPE_OPERATOR_RETRIED) == (
        collections.Counter(dict.fromkeys(declined, 1))
    )
    # The participant saw the fix through: each charge ran again, each compensation again.
    assert all(participant.counted[(saga_id, "charge", "execute")] >= 2 for saga_id in stuck)
    assert all(participant.counted[(saga_id, "reserve", "compensate")] >= 2 for saga_id in declined)


# --- bad input, roles and scope, pause/resume/cancel (one orchestrator in process) ---

_KINDS = {
    "cancel": bulk_pb2.BULK_ACTION_KIND_CANCEL,
    "retry": bulk_pb2.BULK_ACTION_KIND_RETRY,
    "resolve": bulk_pb2.BULK_ACTION_KIND_RESOLVE,
    "retry-now": bulk_pb2.BULK_ACTION_KIND_RETRY_NOW,
    "move": bulk_pb2.BULK_ACTION_KIND_MOVE,
}


async def _refusal(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    return error.value


def _start(kind: str, text: str, **fields: object) -> bulk_pb2.StartBulkActionRequest:
    return bulk_pb2.StartBulkActionRequest(kind=_KINDS[kind], filter=text, **fields)  # type: ignore[arg-type]


async def _compensa(*args: str) -> subprocess.CompletedProcess[str]:
    """`compensa ARGS` in a thread: the orchestrator it calls runs on this event loop."""
    return await asyncio.to_thread(subprocess.run, [str(COMPENSA), *args], capture_output=True, text=True)


async def _failed_sagas(rig: DashboardRig, *saga_ids: str) -> None:
    for saga_id in saga_ids:
        await rig.failed_for_a_person(saga_id)


#: (action, filter, more request fields, what the refusal names)
BAD_STARTS: list[tuple[str, str, dict[str, object], str]] = [
    ("retry", "stat=FAILED", {}, "unknown field 'stat'"),
    ("retry", "state=FAILD", {}, "unknown saga state 'FAILD'"),
    ("retry", "step_state=BROKEN", {}, "unknown step state 'BROKEN'"),
    ("retry", "definition board", {}, "does not parse at character 1: 'definition board'"),
    ("retry", "definition=board updated>=yesterday", {}, "'updated>=yesterday': 'yesterday' is not an RFC 3339"),
    ("retry", "reason=timeout", {}, "reason takes :"),
    ("retry", "state=FAILED state=RUNNING", {}, "state is given twice"),
    ("retry", "version=2", {}, "a version needs definition=NAME"),
    ("retry", "", {}, "filter is required"),
    ("cancel", "state=COMPENSATED", {}, "CANCEL applies only to RUNNING sagas"),
    ("resolve", "definition=board", {}, "note is required"),
    ("retry", "definition=board", {"max_sagas_per_second": -1}, "max_sagas_per_second"),
    ("retry", "definition=board", {"request_id": "a b"}, "request_id"),
]


async def test_a_bad_filter_or_request_is_refused_naming_the_part_and_starts_nothing(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url) as rig:
        await _failed_sagas(rig, "f-1")
        for kind, text, fields, named in BAD_STARTS:
            for validate_only in (True, False):
                request = _start(kind, text, validate_only=validate_only, **fields)
                error = await _refusal(rig.stub.StartBulkAction(request, metadata=bearer("operator")))
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, error.details())
                assert named in (error.details() or ""), (text, error.details())
        listed = await rig.stub.ListBulkActions(bulk_pb2.ListBulkActionsRequest(), metadata=bearer("operator"))
        assert not listed.bulk_actions
        assert (await rig.saga("f-1")).state == S.SAGA_STATE_FAILED


async def test_a_dry_run_of_no_saga_says_so_and_a_start_of_none_starts_no_job(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url, token_file=None) as rig:
        await _failed_sagas(rig, "f-1")
        nothing = "definition=board id_prefix=nobody-"
        dry = await rig.stub.StartBulkAction(_start("retry", nothing, validate_only=True))
        assert (dry.selected_count, list(dry.sample), dry.HasField("bulk_action")) == (0, [], False)
        error = await _refusal(rig.stub.StartBulkAction(_start("retry", nothing)))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "selects no saga RETRY applies to: no bulk action started" in (error.details() or "")
        # The CLI says so too, and a dry run of what there is shows it without acting.
        cli = ["--address", rig.orchestrator.address, "bulk", "start", "retry", "--dry-run"]
        said = await _compensa(*cli, "--filter", nothing)
        assert "the filter selects no saga that retry applies to: nothing would be done" in said.stdout
        said = await _compensa(*cli, "--filter", "state=FAILED")
        assert "retry would act on 1 sagas" in said.stdout and "f-1" in said.stdout
        refused = await _compensa(*cli, "--filter", "stat=FAILED")
        assert refused.returncode == 2 and "unknown field 'stat'" in refused.stderr
        listed = await rig.stub.ListBulkActions(bulk_pb2.ListBulkActionsRequest())
        assert not listed.bulk_actions
        assert (await rig.saga("f-1")).state == S.SAGA_STATE_FAILED


async def test_bulk_actions_are_for_operators_and_a_scoped_token_stays_in_its_definitions(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    (tmp_path / "other.yaml").write_text(OTHER)
    async with dashboard_rig(
        tmp_path, make_postgres_url, definition_paths=(tmp_path / "board.yaml", tmp_path / "other.yaml"),
        participants={"other-side": "127.0.0.1:9"},
    ) as rig:
        await _failed_sagas(rig, "f-1")
        move = _start("move", "definition=board", to_version=1, validate_only=True)
        for who in ("reader", "starter"):
            for call in (
                rig.stub.StartBulkAction(_start("retry", "state=FAILED", validate_only=True), metadata=bearer(who)),
                rig.stub.StartBulkAction(move, metadata=bearer(who)),
                rig.stub.ListBulkActions(bulk_pb2.ListBulkActionsRequest(), metadata=bearer(who)),
            ):
                assert (await _refusal(call)).code() == grpc.StatusCode.PERMISSION_DENIED
        # A token limited to definition "other" must filter on it.
        for text in ("state=FAILED", "definition=board state=FAILED"):
            error = await _refusal(rig.stub.StartBulkAction(_start("retry", text), metadata=bearer("elsewhere")))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, text
        error = await _refusal(rig.stub.StartBulkAction(move, metadata=bearer("elsewhere")))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
        dry = await rig.stub.StartBulkAction(
            _start("retry", "definition=other", validate_only=True), metadata=bearer("elsewhere")
        )
        assert dry.selected_count == 0
        # The operator's job over "board" is not the scoped token's to see.
        started = await rig.stub.StartBulkAction(
            _start("resolve", "definition=board state=FAILED", note="refunded by hand"), metadata=bearer("operator")
        )
        job_id = started.bulk_action.bulk_action_id
        # The filter as the server read it, narrowed to the sagas resolve applies to.
        selection = started.bulk_action.selection
        assert (selection.definition_name, list(selection.states)) == ("board", [S.SAGA_STATE_FAILED])
        for call in (
            rig.stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=job_id), metadata=bearer("elsewhere")),
            rig.stub.CancelBulkAction(
                bulk_pb2.CancelBulkActionRequest(bulk_action_id=job_id), metadata=bearer("elsewhere")
            ),
        ):
            assert (await _refusal(call)).code() == grpc.StatusCode.NOT_FOUND
        listed = await rig.stub.ListBulkActions(bulk_pb2.ListBulkActionsRequest(), metadata=bearer("elsewhere"))
        assert not listed.bulk_actions
        # The dashboard lists jobs to operators and counts a filter, in the same language.
        async with aiohttp.ClientSession() as session:

            async def page(who: str, query: str = "") -> tuple[int, str]:
                headers = {"Authorization": f"Bearer {TOKENS[who]}"}
                async with session.get(f"{rig.url}/bulk{query}", headers=headers) as response:
                    return response.status, await response.text()

            status, html = await page("operator")
            assert status == 200 and job_id in html and "definition=board state=FAILED" in html
            assert (await page("reader"))[0] == 403
            status, html = await page("elsewhere")
            assert status == 200 and job_id not in html
            status, html = await page("operator", "?action=retry&filter=stat%3DFAILED")
            assert status == 400 and "unknown field &#39;stat&#39;" in html
            status, html = await page("operator", "?action=cancel&filter=definition%3Dboard")
            assert status == 200 and "selects no saga that cancel applies to" in html
        # The event on the saga names the job and who started it.
        resolved = await rig.until("f-1", lambda saga: bool(saga.resolution_note))
        assert resolved.resolution_note == f"bulk action {job_id}: refunded by hand"
        logged = [event for event in await rig.events("f-1") if event.type == S.EVENT_TYPE_OPERATOR_RESOLVED]
        assert [(event.actor, event.message) for event in logged] == [
            ("token:alice", f"bulk action {job_id}: refunded by hand")
        ]


async def test_a_job_pauses_resumes_skips_a_saga_that_changed_and_cancels(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url, token_file=None) as rig:
        await _failed_sagas(rig, "f-1", "f-2", "f-3", "f-4", "f-5")
        stub = rig.stub

        async def job(job_id: str) -> bulk_pb2.BulkAction:
            return (await stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=job_id))).bulk_action

        request = _start(
            "resolve", "id=f-1,f-2,f-3", note="done by hand", max_sagas_per_second=1, actor="ops", request_id="inc-1"
        )
        started = await stub.StartBulkAction(request)
        job_id = started.bulk_action.bulk_action_id
        assert (job_id, started.bulk_action.selected_count) == ("inc-1", 3)
        await poll_until(lambda: _done_at_least(job(job_id), 1), timeout=30)
        # The same start again (its answer lost) is the same job, though f-1 no longer matches.
        repeated = await stub.StartBulkAction(request)
        assert (repeated.bulk_action.bulk_action_id, repeated.selected_count) == ("inc-1", 3)
        paused = (await stub.PauseBulkAction(bulk_pb2.PauseBulkActionRequest(bulk_action_id=job_id))).bulk_action
        assert paused.state == bulk_pb2.BULK_ACTION_STATE_PAUSED
        again = await stub.PauseBulkAction(bulk_pb2.PauseBulkActionRequest(bulk_action_id=job_id))
        assert again.bulk_action.state == bulk_pb2.BULK_ACTION_STATE_PAUSED
        # While it is paused, a person resolves f-3 by hand: the job skips it, saying why.
        await stub.ResolveSaga(orchestrator_pb2.ResolveSagaRequest(saga_id="f-3", note="mine", actor="bob"))
        resumed = (await stub.ResumeBulkAction(bulk_pb2.ResumeBulkActionRequest(bulk_action_id=job_id))).bulk_action
        assert resumed.state == bulk_pb2.BULK_ACTION_STATE_RUNNING

        async def completed() -> bulk_pb2.BulkAction | None:
            found = await job(job_id)
            return found if found.state == bulk_pb2.BULK_ACTION_STATE_COMPLETED else None

        done = await poll_until(completed, timeout=30)
        assert (done.done_count, done.skipped_count, done.failed_count, done.pending_count) == (2, 1, 0, 0)
        problems = (await stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=job_id))).problems
        assert [(item.saga_id, item.outcome) for item in problems] == [("f-3", bulk_pb2.BULK_ITEM_OUTCOME_SKIPPED)]
        assert "changed since it was selected" in problems[0].reason
        assert "OPERATOR_RESOLVED by bob" in problems[0].reason
        assert (await rig.saga("f-3")).resolution_note == "mine"
        shown = await _compensa("--address", rig.orchestrator.address, "bulk", "get", job_id)
        assert shown.returncode == 0, shown.stderr
        assert "inc-1" in shown.stdout and "completed" in shown.stdout and "started by ops" in shown.stdout
        assert "skipped  f-3  changed since it was selected" in shown.stdout
        for request in (
            stub.ResumeBulkAction(bulk_pb2.ResumeBulkActionRequest(bulk_action_id=job_id)),
            stub.PauseBulkAction(bulk_pb2.PauseBulkActionRequest(bulk_action_id=job_id)),
            stub.CancelBulkAction(bulk_pb2.CancelBulkActionRequest(bulk_action_id=job_id)),
        ):
            error = await _refusal(request)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "is COMPLETED" in (error.details() or "")

        # Cancelled for good: what is left stays pending, and it cannot resume.
        other = await stub.StartBulkAction(_start("retry", "id=f-4,f-5", max_sagas_per_second=1))
        other_id = other.bulk_action.bulk_action_id
        cancelled = (await stub.CancelBulkAction(bulk_pb2.CancelBulkActionRequest(bulk_action_id=other_id))).bulk_action
        assert cancelled.state == bulk_pb2.BULK_ACTION_STATE_CANCELLED
        error = await _refusal(stub.ResumeBulkAction(bulk_pb2.ResumeBulkActionRequest(bulk_action_id=other_id)))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        listed = await stub.ListBulkActions(bulk_pb2.ListBulkActionsRequest())
        assert [job.bulk_action_id for job in listed.bulk_actions] == [other_id, job_id]
        table = (await _compensa("--address", rig.orchestrator.address, "bulk", "list")).stdout.splitlines()
        assert table[0].split()[:3] == ["ID", "ACTION", "STATE"]
        rows = [line.split()[:3] for line in table[1:]]
        assert rows == [[other_id, "retry", "cancelled"], [job_id, "resolve", "completed"]]
        unknown = await _refusal(stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id="nope")))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND


async def test_nothing_is_acted_on_once_a_pause_or_cancel_has_returned(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    # A lease far longer than the job's batches: a pause noticed only when the
    # lease is renewed would let the job act on every saga before it stops.
    async with dashboard_rig(tmp_path, make_postgres_url, token_file=None, lease_seconds=30) as rig:
        slow_ids = [f"slow-{n}" for n in range(10)]
        await _failed_sagas(rig, *slow_ids, "clock-a-1", "clock-a-2", "clock-b-1", "clock-b-2")
        stub = rig.stub

        async def job(job_id: str) -> bulk_pb2.BulkAction:
            return (await stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=job_id))).bulk_action

        async def resolved_by(job_id: str) -> set[str]:
            return {
                saga_id for saga_id in slow_ids
                if (await rig.saga(saga_id)).resolution_note.startswith(f"bulk action {job_id}")
            }

        async def completed(job_id: str) -> bulk_pb2.BulkAction | None:
            found = await job(job_id)
            return found if found.state == bulk_pb2.BULK_ACTION_STATE_COMPLETED else None

        def counts(found: bulk_pb2.BulkAction) -> tuple[int, int, int, int]:
            return found.done_count, found.skipped_count, found.failed_count, found.pending_count

        async def seconds_pass(prefix: str) -> None:
            """Another job, of two sagas at one a second, runs to its end."""
            tick = _start("resolve", f"id_prefix={prefix}", note="tick", max_sagas_per_second=1)
            clock = await stub.StartBulkAction(tick)
            await poll_until(lambda: completed(clock.bulk_action.bulk_action_id), timeout=30)

        async def stops_at_once(stop: Callable[[str], Awaitable[bulk_pb2.BulkAction]], clock: str) -> str:
            started = await stub.StartBulkAction(
                _start("resolve", "id_prefix=slow-", note="slowly", max_sagas_per_second=2)
            )
            job_id = started.bulk_action.bulk_action_id
            await poll_until(lambda: _done_at_least(job(job_id), 2), timeout=30)
            stopped = await stop(job_id)
            acted_on = await resolved_by(job_id)
            assert len(acted_on) == stopped.done_count < stopped.selected_count
            assert stopped.pending_count == stopped.selected_count - len(acted_on)
            await seconds_pass(clock)
            assert await resolved_by(job_id) == acted_on
            assert counts(await job(job_id)) == counts(stopped)
            return job_id

        async def pause(job_id: str) -> bulk_pb2.BulkAction:
            request = bulk_pb2.PauseBulkActionRequest(bulk_action_id=job_id)
            return (await stub.PauseBulkAction(request)).bulk_action

        async def cancel(job_id: str) -> bulk_pb2.BulkAction:
            request = bulk_pb2.CancelBulkActionRequest(bulk_action_id=job_id)
            return (await stub.CancelBulkAction(request)).bulk_action

        cancelled_id = await stops_at_once(cancel, "clock-a-")
        paused_id = await stops_at_once(pause, "clock-b-")
        # Resumed, the paused job acts on the rest (what the cancelled one left), each once.
        await stub.ResumeBulkAction(bulk_pb2.ResumeBulkActionRequest(bulk_action_id=paused_id))
        done = await poll_until(lambda: completed(paused_id), timeout=30)
        assert counts(done) == (done.selected_count, 0, 0, 0)
        by_cancelled, by_paused = await resolved_by(cancelled_id), await resolved_by(paused_id)
        assert not by_cancelled & by_paused and by_cancelled | by_paused == set(slow_ids)


async def test_two_jobs_that_select_the_same_sagas_act_on_each_once(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url, token_file=None) as rig:
        saga_ids = [f"f-{n}" for n in range(6)]
        await _failed_sagas(rig, *saga_ids)
        jobs = [
            (await rig.stub.StartBulkAction(_start("resolve", "state=FAILED", note=f"job {n}"))).bulk_action
            for n in range(2)
        ]
        assert [job.selected_count for job in jobs] == [6, 6]

        async def completed() -> list[bulk_pb2.BulkAction] | None:
            found = [
                (await rig.stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=job.bulk_action_id)))
                .bulk_action for job in jobs
            ]
            return found if all(job.state == bulk_pb2.BULK_ACTION_STATE_COMPLETED for job in found) else None

        finished = await poll_until(completed, timeout=30)
        assert sum(job.done_count for job in finished) == 6
        assert sum(job.skipped_count for job in finished) == 6
        for saga_id in saga_ids:
            resolutions = [e for e in await rig.events(saga_id) if e.type == S.EVENT_TYPE_OPERATOR_RESOLVED]
            assert len(resolutions) == 1


async def _done_at_least(job: Awaitable[bulk_pb2.BulkAction], count: int) -> bool:
    return (await job).done_count >= count


async def test_bulk_actions_run_on_the_embedded_sqlite_too(tmp_path: Path) -> None:
    async with dashboard_rig(tmp_path, lambda: f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", token_file=None) as rig:
        await _failed_sagas(rig, "f-1", "f-2")
        started = await rig.stub.StartBulkAction(_start("retry", "definition=board state=FAILED id_prefix=f-"))
        job_id = started.bulk_action.bulk_action_id

        async def completed() -> bulk_pb2.BulkAction | None:
            job = (await rig.stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=job_id))).bulk_action
            return job if job.state == bulk_pb2.BULK_ACTION_STATE_COMPLETED else None

        job = await poll_until(completed, timeout=30)
        assert (job.selected_count, job.done_count) == (2, 2)
        for saga_id in ("f-1", "f-2"):  # reserve's compensation runs again, and succeeds now
            assert (await rig.final(saga_id)).state == S.SAGA_STATE_COMPENSATED


def _between(earlier: Timestamp, later: Timestamp) -> str:
    """An RFC 3339 time halfway between two of a saga's times."""
    middle = (earlier.ToMicroseconds() + later.ToMicroseconds()) // 2
    return datetime.datetime.fromtimestamp(middle / 1e6, tz=datetime.UTC).isoformat()


async def test_the_reason_and_time_terms_select_what_they_say_end_to_end(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    async with dashboard_rig(tmp_path, make_postgres_url, token_file=None) as rig:
        # Each fails for a person: reserve's compensation fails (early-1, late-1),
        # or notify's cannot reach its participant (early-2, late-2).
        for saga_id, step, answer in (
            ("early-1", "reserve", "fail"), ("early-2", "notify", "unavailable"),
            ("late-1", "reserve", "fail"), ("late-2", "notify", "unavailable"),
        ):
            rig.participant.script("execute", "charge", "fail")
            rig.participant.script("compensate", step, answer, answer, answer)
            await rig.begin(saga_id)
            assert (await rig.final(saga_id)).state == S.SAGA_STATE_FAILED
        sagas = {saga_id: await rig.saga(saga_id) for saga_id in ("early-1", "early-2", "late-1", "late-2")}
        late = _between(sagas["early-2"].create_time, sagas["late-1"].create_time)
        # early-1 fails again after a retry: only its update time moves.
        rig.participant.script("compensate", "reserve", "fail", "fail", "fail")
        await rig.stub.RetrySaga(orchestrator_pb2.RetrySagaRequest(saga_id="early-1", reason="try again"))
        before = sagas["early-1"].update_time
        retried = await rig.until(
            "early-1", lambda saga: saga.state == S.SAGA_STATE_FAILED and saga.update_time != before
        )
        last_update = max((saga.update_time for saga in sagas.values()), key=Timestamp.ToMicroseconds)
        touched = _between(last_update, retried.update_time)

        async def selected(text: str) -> list[str]:
            dry = await rig.stub.StartBulkAction(_start("retry", text, validate_only=True))
            assert dry.selected_count == len(dry.sample)
            return sorted(saga.saga_id for saga in dry.sample)

        assert await selected('reason:"scripted compensation failure"') == ["early-1", "late-1"]
        assert await selected("reason:outage") == ["early-2", "late-2"]
        assert len(await selected('reason:"business failure"')) == 4  # the saga's own failure reason
        assert await selected('reason:"no such failure"') == []
        assert await selected(f"created>={late}") == ["late-1", "late-2"]
        assert await selected(f"created<{late}") == ["early-1", "early-2"]
        assert await selected(f"updated>={touched}") == ["early-1"]
        assert await selected(f"updated<{touched}") == ["early-2", "late-1", "late-2"]
        assert await selected(f'reason:outage created>={late} updated<{touched}') == ["late-2"]
        # The same terms in a job that acts.
        started = await rig.stub.StartBulkAction(
            _start("resolve", f'reason:"compensation failure" created<{late}', note="by reason and time")
        )
        assert started.bulk_action.selected_count == 1
        await rig.until("early-1", lambda saga: bool(saga.resolution_note))
        for saga_id in ("early-2", "late-1", "late-2"):
            assert not (await rig.saga(saga_id)).resolution_note


#: A definition whose `ship` cannot be undone: a saga past it can only go forward.
GATE = """\
name: gate
input_type: compensa.checkout.v1.CheckoutInput
steps:
  - name: reserve
    participant: scripted
    long_running: true
    step_timeout: 30m
  - name: ship
    participant: scripted
    kind: PIVOT
  - name: deliver
    participant: scripted
    kind: RETRIABLE
    long_running: true
    step_timeout: 30m
"""


async def test_a_bulk_cancel_compensates_and_refuses_a_saga_past_its_pivot_saying_why(
    tmp_path: Path, make_postgres_url: Callable[[], str]
) -> None:
    (tmp_path / "gate.yaml").write_text(GATE)
    async with dashboard_rig(
        tmp_path, make_postgres_url, token_file=None, definition_paths=(tmp_path / "board.yaml", tmp_path / "gate.yaml")
    ) as rig:

        async def waiting_at(saga_id: str, step: str) -> None:
            """`saga_id` started on gate, its `step` waiting for a late answer."""
            rig.participant.script("execute", step, "pending")
            request = orchestrator_pb2.StartSagaRequest(saga_id=saga_id, definition_name="gate", input=checkout_input())
            await rig.stub.StartSaga(request)
            await rig.until(
                saga_id, lambda saga: any(s.name == step and s.state == S.STEP_STATE_WAITING for s in saga.steps)
            )

        await waiting_at("before-1", "reserve")
        await waiting_at("before-2", "reserve")
        await waiting_at("after-1", "deliver")  # reserve and ship done
        started = await rig.stub.StartBulkAction(_start("cancel", "definition=gate", note="withdrawn", actor="ops"))
        job_id = started.bulk_action.bulk_action_id
        assert started.bulk_action.selected_count == 3

        async def completed() -> bulk_pb2.BulkAction | None:
            job = (await rig.stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=job_id))).bulk_action
            return job if job.state == bulk_pb2.BULK_ACTION_STATE_COMPLETED else None

        job = await poll_until(completed, timeout=30)
        assert (job.done_count, job.skipped_count, job.failed_count) == (2, 0, 1)
        for saga_id in ("before-1", "before-2"):
            saga = await rig.final(saga_id)
            assert saga.state == S.SAGA_STATE_COMPENSATED
            assert [s.state for s in saga.steps if s.name == "reserve"] == [S.STEP_STATE_COMPENSATED]
            assert [c.saga_id for c in rig.participant.of("compensate", "reserve")].count(saga_id) == 1
            cancels = [e for e in await rig.events(saga_id) if e.type == S.EVENT_TYPE_CANCEL_REQUESTED]
            assert [(e.actor, e.message) for e in cancels] == [("ops", f"bulk action {job_id}: withdrawn")]
        problems = (await rig.stub.GetBulkAction(bulk_pb2.GetBulkActionRequest(bulk_action_id=job_id))).problems
        assert [(item.saga_id, item.outcome) for item in problems] == [("after-1", bulk_pb2.BULK_ITEM_OUTCOME_FAILED)]
        assert "step 'ship' cannot be undone" in problems[0].reason
        after = await rig.saga("after-1")
        assert after.state == S.SAGA_STATE_RUNNING
        assert not [c for c in rig.participant.calls if c.operation == "compensate" and c.saga_id == "after-1"]
