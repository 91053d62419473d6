"""A participant for end-to-end tests: it records every call it gets and does what each step is told.

Every Execute and Compensate that reaches the step code leaves a row in the participant's
own table `recorded_calls` (saga, step, operation, attempt, outcome, the keys of the
`step_outputs` it received, when it started and finished). The row is written in a
transaction of its own, so business failures and transient errors, whose barrier
transaction rolls back, are recorded too.

What a step does is a `StepBehaviour`, looked up by step name in `behaviours`; a test may
replace a step's behaviour while sagas run ("the card works now").
"""

from __future__ import annotations

import asyncio
import datetime
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import sqlalchemy
from google.protobuf import message, wrappers_pb2
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from compensa.participants.sdk import Participant, StepFailed, TransientError
from compensa.v1 import participant_pb2

__all__ = ["CALLS", "RecordedCall", "RecordingParticipant", "StepBehaviour"]

EXECUTE = "execute"
COMPENSATE = "compensate"

metadata = sqlalchemy.MetaData()

#: One row per call that reached the step code.
CALLS = sqlalchemy.Table(
    "recorded_calls",
    metadata,
    sqlalchemy.Column("call_id", sqlalchemy.Integer, primary_key=True, autoincrement=True),
    sqlalchemy.Column("saga_id", sqlalchemy.String(256), nullable=False, index=True),
    sqlalchemy.Column("step_name", sqlalchemy.String(64), nullable=False),
    sqlalchemy.Column("operation", sqlalchemy.String(16), nullable=False),
    sqlalchemy.Column("attempt", sqlalchemy.Integer, nullable=False),
    # 'succeeded', 'failed' (business) or 'transient' for Execute; 'compensated' for Compensate.
    sqlalchemy.Column("outcome", sqlalchemy.String(16), nullable=False),
    sqlalchemy.Column("step_output_keys", sqlalchemy.JSON, nullable=False),
    sqlalchemy.Column("started_at", sqlalchemy.DateTime(timezone=True), nullable=False),
    sqlalchemy.Column("finished_at", sqlalchemy.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class StepBehaviour:
    """What one step does on each call; the default succeeds at once."""

    #: Seconds Execute works (holding its barrier transaction) before it answers.
    execute_seconds: float = 0.0
    #: Seconds Compensate works before it answers.
    compensate_seconds: float = 0.0
    #: Execute answers a business failure (StepFailed, ABORTED).
    fail: bool = False
    #: The first N Execute calls of the step, per saga, answer UNAVAILABLE.
    transient_failures: int = 0
    #: When set, Execute waits for it before doing anything else.
    gate: asyncio.Event | None = None


@dataclass(frozen=True)
class RecordedCall:
    """One row of `recorded_calls`."""

    saga_id: str
    step_name: str
    operation: str
    attempt: int
    outcome: str
    step_output_keys: frozenset[str]
    started_at: datetime.datetime
    finished_at: datetime.datetime

    def overlaps(self, other: RecordedCall) -> bool:
        """Both calls were running at some common instant."""
        return self.started_at < other.finished_at and other.started_at < self.finished_at


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class RecordingParticipant(Participant):
    """Serves any step name: Execute answers a StringValue "<step>@<saga>"; Compensate succeeds.

    Both follow the step's `StepBehaviour` and record the call in `recorded_calls`.
    """

    metadata: ClassVar[sqlalchemy.MetaData] = metadata
    barrier_table_name: ClassVar[str] = "recording_barrier"

    def __init__(self, engine: AsyncEngine, behaviours: Mapping[str, StepBehaviour] | None = None) -> None:
        super().__init__(engine)
        #: Behaviour by step name; steps not listed get `StepBehaviour()`.
        self.behaviours: dict[str, StepBehaviour] = dict(behaviours or {})
        self._execute_calls: Counter[tuple[str, str]] = Counter()

    async def execute_step(
        self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest
    ) -> wrappers_pb2.StringValue:
        """Waits, works and answers as the step's behaviour says, then records the call."""
        step = request.context
        started_at = _now()
        behaviour = self.behaviours.get(step.step_name, StepBehaviour())
        self._execute_calls[(step.saga_id, step.step_name)] += 1
        call_number = self._execute_calls[(step.saga_id, step.step_name)]
        if behaviour.gate is not None:
            await behaviour.gate.wait()
        if behaviour.execute_seconds:
            await asyncio.sleep(behaviour.execute_seconds)  # ok-sleep: the step's simulated work
        if call_number <= behaviour.transient_failures:
            outcome = "transient"
        elif behaviour.fail:
            outcome = "failed"
        else:
            outcome = "succeeded"
        await self._record_call(step, EXECUTE, outcome, request.step_outputs.keys(), started_at)
        if outcome == "transient":
            raise TransientError(f"step {step.step_name!r}: transient failure {call_number}")
        if outcome == "failed":
            raise StepFailed(f"step {step.step_name!r} declined")
        return wrappers_pb2.StringValue(value=f"{step.step_name}@{step.saga_id}")

    async def compensate_step(
        self, conn: AsyncConnection, request: participant_pb2.CompensateRequest
    ) -> message.Message | None:
        """Works as long as the step's behaviour says, then records the call."""
        step = request.context
        started_at = _now()
        behaviour = self.behaviours.get(step.step_name, StepBehaviour())
        if behaviour.compensate_seconds:
            await asyncio.sleep(behaviour.compensate_seconds)  # ok-sleep: the undo's simulated work
        await self._record_call(step, COMPENSATE, "compensated", request.step_outputs.keys(), started_at)
        return None

    async def _record_call(
        self,
        step: participant_pb2.StepContext,
        operation: str,
        outcome: str,
        output_keys: Iterable[str],
        started_at: datetime.datetime,
    ) -> None:
        # Its own transaction: the barrier's rolls back on failures, and those are recorded too.
        async with self.engine.begin() as conn:
            await conn.execute(
                CALLS.insert().values(
                    saga_id=step.saga_id,
                    step_name=step.step_name,
                    operation=operation,
                    attempt=step.attempt,
                    outcome=outcome,
                    step_output_keys=sorted(output_keys),
                    started_at=started_at,
                    finished_at=_now(),
                )
            )

    async def calls(self, saga_id: str) -> list[RecordedCall]:
        """Every recorded call of `saga_id`, in the order they finished."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(sqlalchemy.select(CALLS).where(CALLS.c.saga_id == saga_id).order_by(CALLS.c.call_id))
            ).all()
        return [
            RecordedCall(
                saga_id=row.saga_id,
                step_name=row.step_name,
                operation=row.operation,
                attempt=row.attempt,
                outcome=row.outcome,
                step_output_keys=frozenset(row.step_output_keys),
                started_at=row.started_at,
                finished_at=row.finished_at,
            )
            for row in rows
        ]
