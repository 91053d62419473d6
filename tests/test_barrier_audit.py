"""The SDK's BarrierAuditService and barrier retention, over real gRPC and real databases.

A participant lists its barrier rows as digests (never the business data),
keeps a purge watermark the orchestrator moves forward, deletes rows below it
in batches, and refuses a late call for a saga whose rows may be gone.
"""

from __future__ import annotations

import datetime
import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import sqlalchemy
from google.protobuf import timestamp_pb2
from participant_helpers import Connected, StepCall, serving, status_of

from compensa.participants.retention import purge_below_watermark
from compensa.participants.serving import create_participant_engine
from compensa.v1 import barrier_audit_pb2, barrier_audit_pb2_grpc, participant_pb2


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh participant database: PostgreSQL or a SQLite file."""
    if request.param == "postgres":
        make_postgres_url: Callable[[], str] = request.getfixturevalue("make_postgres_url")
        return make_postgres_url()
    return f"sqlite+aiosqlite:///{tmp_path / 'participant.db'}"


def _audit(participant: Connected) -> barrier_audit_pb2_grpc.BarrierAuditServiceAsyncStub:
    return barrier_audit_pb2_grpc.BarrierAuditServiceStub(participant.channel)  # type: ignore[return-value]


def _stamp(moment: datetime.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _with_deadline(request: participant_pb2.ExecuteRequest, deadline: datetime.datetime) -> None:
    request.context.deadline.CopyFrom(_stamp(deadline))


async def test_rows_are_listed_as_digests_paged_and_by_saga(database_url: str) -> None:
    steps = [StepCall.new("charge") for _ in range(5)]
    async with serving("payment", database_url) as payment:
        answers = [await payment.stub.Execute(step.execute()) for step in steps]
        await payment.stub.Compensate(steps[0].compensate())
        audit = _audit(payment)

        listed: list[barrier_audit_pb2.BarrierRow] = []
        token = ""
        while True:
            page = await audit.ListBarrierRows(barrier_audit_pb2.ListBarrierRowsRequest(page_size=2, page_token=token))
            assert len(page.rows) <= 2
            listed.extend(page.rows)
            token = page.next_page_token
            if not token:
                break
        assert len(listed) == 6  # five Executes, one Compensate
        by_key = {(row.idempotency_key, row.operation): row for row in listed}
        for step, answer in zip(steps, answers, strict=True):
            row = by_key[(step.key, barrier_audit_pb2.BARRIER_OPERATION_EXECUTE)]
            assert row.saga_id == step.saga_id and row.step_name == "charge"
            assert row.outcome == barrier_audit_pb2.BARRIER_OUTCOME_SUCCEEDED
            assert row.answer_digest == hashlib.sha256(answer.SerializeToString(deterministic=True)).digest()
        compensated = by_key[(steps[0].key, barrier_audit_pb2.BARRIER_OPERATION_COMPENSATE)]
        assert compensated.outcome == barrier_audit_pb2.BARRIER_OUTCOME_COMPENSATED

        one = await audit.ListBarrierRows(barrier_audit_pb2.ListBarrierRowsRequest(saga_ids=[steps[2].saga_id]))
        assert [row.idempotency_key for row in one.rows] == [steps[2].key]
        assert not one.HasField("purge_watermark")


async def test_bad_requests_are_refused_with_invalid_argument(database_url: str) -> None:
    async with serving("payment", database_url) as payment:
        audit = _audit(payment)
        code, details = await status_of(
            audit.ListBarrierRows(barrier_audit_pb2.ListBarrierRowsRequest(page_token="not-a-token"))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in details
        code, details = await status_of(audit.ListBarrierRows(barrier_audit_pb2.ListBarrierRowsRequest(page_size=5000)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in details
        code, details = await status_of(audit.SetPurgeWatermark(barrier_audit_pb2.SetPurgeWatermarkRequest()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "purge_before" in details
        # A watermark ahead of the participant's clock would purge rows of sagas not yet
        # audited, or not yet begun, and never move back: refused, nothing kept.
        ahead = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        code, details = await status_of(
            audit.SetPurgeWatermark(barrier_audit_pb2.SetPurgeWatermarkRequest(purge_before=_stamp(ahead)))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "purge_before" in details and "ahead of this participant's clock" in details, details
        listed = await audit.ListBarrierRows(barrier_audit_pb2.ListBarrierRowsRequest())
        assert not listed.HasField("purge_watermark")


async def test_rows_are_purged_only_below_the_watermark_and_a_late_execute_is_refused(database_url: str) -> None:
    async with serving("payment", database_url) as payment:
        old = [StepCall.new("charge") for _ in range(7)]
        for step in old:
            await payment.stub.Execute(step.execute())
        nothing = await purge_below_watermark(
            payment.running.engine, payment.running.participant.barrier,
            payment.running.participant.barrier_watermark, timeout=5.0,
        )
        assert nothing == 0  # no watermark: nothing is deleted on the participant's own clock
        listed = await _audit(payment).ListBarrierRows(barrier_audit_pb2.ListBarrierRowsRequest())
        watermark = max(row.create_time.ToDatetime(datetime.UTC) for row in listed.rows) + datetime.timedelta(
            microseconds=1
        )
        young = StepCall.new("charge")
        await payment.stub.Execute(young.execute())

        answered = await _audit(payment).SetPurgeWatermark(
            barrier_audit_pb2.SetPurgeWatermarkRequest(purge_before=_stamp(watermark))
        )
        assert answered.purge_watermark.ToDatetime(datetime.UTC) == watermark
        # An older watermark never moves it back.
        earlier = watermark - datetime.timedelta(hours=1)
        kept = await _audit(payment).SetPurgeWatermark(
            barrier_audit_pb2.SetPurgeWatermarkRequest(purge_before=_stamp(earlier))
        )
        assert kept.purge_watermark.ToDatetime(datetime.UTC) == watermark

        deleted = await purge_below_watermark(
            payment.running.engine, payment.running.participant.barrier,
            payment.running.participant.barrier_watermark, batch_size=3, timeout=5.0,
        )
        assert deleted == 7
        barrier = payment.running.participant.barrier
        assert await payment.rows(barrier, saga_id=old[0].saga_id) == []
        assert len(await payment.rows(barrier, saga_id=young.saga_id)) == 1

        # A late duplicate of a purged saga's Execute: its deadline is before the watermark.
        late = old[0].execute(attempt=2)
        _with_deadline(late, watermark - datetime.timedelta(seconds=30))
        code, details = await status_of(payment.stub.Execute(late))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "purge watermark" in details
        assert await payment.rows(barrier, saga_id=old[0].saga_id) == []
        # A call with no deadline cannot be told from one: refused too.
        code, _ = await status_of(payment.stub.Execute(old[1].execute(attempt=2)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        # A new saga's call, whose deadline is ahead, runs.
        fresh = StepCall.new("charge").execute()
        _with_deadline(fresh, datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1))
        answer = await payment.stub.Execute(fresh)
        assert answer.result == participant_pb2.EXECUTE_RESULT_SUCCEEDED


async def test_the_purge_keeps_the_database_bounded(make_postgres_url: Callable[[], str]) -> None:
    async with serving("payment", make_postgres_url()) as payment:
        barrier = payment.running.participant.barrier
        participant = payment.running.participant
        most = 0
        for _round in range(5):
            for _ in range(40):
                request = StepCall.new("charge").execute()
                _with_deadline(request, datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1))
                await payment.stub.Execute(request)
            listed = await _audit(payment).ListBarrierRows(barrier_audit_pb2.ListBarrierRowsRequest(page_size=1000))
            newest = max(row.create_time.ToDatetime(datetime.UTC) for row in listed.rows)
            await _audit(payment).SetPurgeWatermark(
                barrier_audit_pb2.SetPurgeWatermarkRequest(
                    purge_before=_stamp(newest + datetime.timedelta(microseconds=1))
                )
            )
            await purge_below_watermark(
                participant.engine, barrier, participant.barrier_watermark, batch_size=16, timeout=5.0
            )
            async with participant.engine.connect() as conn:
                count = (await conn.execute(sqlalchemy.select(sqlalchemy.func.count()).select_from(barrier))).scalar()
            assert count is not None
            most = max(most, count)
        assert most == 0  # each round's 40 rows are gone once the orchestrator allowed it


async def test_a_barrier_table_of_an_earlier_release_is_kept_and_gains_its_indexes(
    make_postgres_url: Callable[[], str]
) -> None:
    url = make_postgres_url()
    engine = create_participant_engine(url)
    step = StepCall.new("charge")
    try:
        async with engine.begin() as conn:
            await conn.execute(sqlalchemy.text(
                "CREATE TABLE payment_barrier (idempotency_key varchar NOT NULL, operation varchar(16) NOT NULL,"
                " saga_id varchar NOT NULL, step_name varchar NOT NULL, outcome varchar(32), response bytea,"
                " created_at timestamptz NOT NULL, PRIMARY KEY (idempotency_key, operation))"
            ))
            await conn.execute(
                sqlalchemy.text(
                    "INSERT INTO payment_barrier VALUES (:key, 'execute', :saga, 'charge', 'failed', '', now())"
                ),
                {"key": step.key, "saga": step.saga_id},
            )
    finally:
        await engine.dispose()
    async with serving("payment", url) as payment:
        async with payment.running.engine.connect() as conn:
            indexes = await conn.run_sync(lambda sync: sqlalchemy.inspect(sync).get_indexes("payment_barrier"))
        assert {index["name"] for index in indexes} >= {"payment_barrier_saga_id", "payment_barrier_created_at"}
        listed = await _audit(payment).ListBarrierRows(barrier_audit_pb2.ListBarrierRowsRequest())
        assert [(row.idempotency_key, row.outcome) for row in listed.rows] == [
            (step.key, barrier_audit_pb2.BARRIER_OUTCOME_FAILED)
        ]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nosuch://somewhere/db", "--db"),
        ("postgresql://127.0.0.1:1/nothing", "127.0.0.1"),
    ],
)
def test_the_purge_command_answers_a_bad_database_in_one_line(url: str, says: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "compensa.participants.purge", "--db", url],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr


def test_the_purge_command_answers_a_database_without_a_barrier_in_one_line(
    make_postgres_url: Callable[[], str],
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "compensa.participants.purge", "--db", make_postgres_url()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "participant_barrier" in lines[0], done.stderr
