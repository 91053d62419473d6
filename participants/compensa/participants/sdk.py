"""The participant SDK: exactly-once saga steps behind the ParticipantService contract.

A participant subclasses `Participant`, declares its tables in `metadata` and
overrides `execute_step` (and `compensate_step` if the step can be undone).
The base class answers Execute and Compensate with DTM's barrier: in the
participant's own database, in the same transaction as the business effect, it
inserts a row keyed by (idempotency_key, operation) with ON CONFLICT DO NOTHING
and stores the answer with it. Inserting first, instead of checking first, is
what makes concurrent duplicates safe: on PostgreSQL the second insert waits on
the unique index until the first transaction ends; on SQLite writers are
serialised by the database lock (see `compensa.participants.serving.create_participant_engine`).

A long-running step (`long_running: true` in its definition) may return
`Pending(output)` from `execute_step`: its effect so far (a held charge) commits
with the barrier row, Execute answers EXECUTE_RESULT_PENDING, and a duplicate
Execute answers PENDING again without a second effect. The participant keeps
`request.completion_token` (in the same transaction) and reports the outcome
later with any `CompleteStep` caller, e.g. `compensa.orchestrator.client.SagaClient`:

    await client.complete_step(token, output=Charge(...))       # succeeded
    await client.complete_step(token, failure_reason="declined")  # failed

Outcomes, for both RPCs:
  - OK: done (or a duplicate of a call that was done; the stored answer).
  - DEADLINE_EXCEEDED: the call arrived after its `StepContext.deadline` (held
    by the network): the orchestrator stopped waiting for it and may have moved
    on, so nothing is done and nothing is recorded.
  - ABORTED: Execute failed for a business reason (`StepFailed`); a retry with
    the same key answers the same, without effect. Also a hanging Execute: one
    that arrives after a Compensate with its key.
  - FAILED_PRECONDITION: Compensate of a step that cannot be undone; Execute
    answering Pending for a step that is not long_running (nothing recorded);
    a call whose deadline lies before the purge watermark (or that has none,
    once there is a watermark): its saga's barrier rows may have been purged,
    so it is refused rather than applied as new (`PurgedSaga`,
    `compensa.participants.retention`).
  - UNAVAILABLE: transient (`TransientError`, the database, injected faults);
    nothing was recorded, so a retry runs the step again. Every wait on the
    database is bounded (`compensa.common.database`), so a silent database
    answers this within `database_timeout` too, and the server's health
    (`compensa.common.health`) says NOT_SERVING until the database answers again.
  - INTERNAL: a bug; nothing was recorded.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import grpc
import psycopg
import sqlalchemy
from google.protobuf import any_pb2, message
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from compensa.common import tracing
from compensa.common.database import DEFAULT_DATABASE_TIMEOUT, bounded_transaction, cancelled_by_the_database
from compensa.common.health import DatabaseHealth
from compensa.participants.barrier import (
    BarrierRow,
    BarrierTransaction,
    barrier_table,
    barrier_transaction,
    insert_if_absent,
)
from compensa.participants.faults import FaultPlan, InjectedFault
from compensa.participants.retention import read_watermark, watermark_table
from compensa.v1 import participant_pb2, participant_pb2_grpc

__all__ = [
    "CompleteStep",
    "DeadlinePassed",
    "InvalidRequest",
    "NotCompensable",
    "NotLongRunning",
    "Participant",
    "ParticipantError",
    "Pending",
    "PurgedSaga",
    "StepFailed",
    "TransientError",
    "WrongOutputType",
    "insert_if_absent",
    "pack",
    "unpack_as",
]

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound=message.Message)
_R = TypeVar("_R")
_Response = TypeVar("_Response", bound=message.Message)

_EXECUTE = "execute"
_COMPENSATE = "compensate"

# Barrier outcomes. An execute row written by Compensate carries
# _NULL_COMPENSATED: Execute never ran, and must never run for this key.
_SUCCEEDED = "succeeded"
_PENDING = "pending"
_FAILED = "failed"
_NULL_COMPENSATED = "null_compensated"
_COMPENSATED = "compensated"
_NOTHING_TO_UNDO = "nothing_to_undo"
# A PENDING Execute the participant settled (`Participant.settle_pending`).
_SETTLED_SUCCEEDED = "settled_succeeded"
_SETTLED_FAILED = "settled_failed"
#: Execute outcomes whose effect stands, so Compensate undoes them.
_APPLIED = frozenset({_SUCCEEDED, _PENDING, _SETTLED_SUCCEEDED})


class ParticipantError(Exception):
    """Root of the errors a step raises on purpose; `code` is the status answered."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL


class StepFailed(ParticipantError):
    """A business failure (a declined card): answered ABORTED and never retried.

    Raised from `execute_step`, its effects are rolled back and the failure is
    recorded, so a retry with the same key answers the same failure.
    """

    code = grpc.StatusCode.ABORTED

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientError(ParticipantError):
    """A retryable failure: answered UNAVAILABLE, with nothing recorded."""

    code = grpc.StatusCode.UNAVAILABLE


class NotCompensable(ParticipantError):
    """The step cannot be undone (a pivot step): Compensate answers FAILED_PRECONDITION."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NotLongRunning(ParticipantError):
    """`execute_step` returned Pending for a step that is not long_running (it
    got no completion token, so nobody could report its outcome): answered
    FAILED_PRECONDITION, with nothing recorded."""

    code = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class Pending:
    """What `execute_step` returns when the step goes on on the participant's
    side: Execute answers EXECUTE_RESULT_PENDING, the effects made so far
    commit with the barrier, and the outcome is reported later with the
    request's `completion_token`. `output`, if any, is what `compensate_step`
    gets as `execute_output` should the saga compensate the step."""

    output: message.Message | None = None


class CompleteStep(Protocol):
    """Reports a long-running step's outcome (OrchestratorService.CompleteStep);
    `compensa.orchestrator.client.SagaClient.complete_step` is one."""

    async def __call__(
        self, completion_token: str, *, output: message.Message | None = None, failure_reason: str = ""
    ) -> object: ...


class InvalidRequest(ParticipantError):
    """A request this participant cannot read as sent (a page token it did
    not issue, a value out of range): answered INVALID_ARGUMENT, nothing done."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class PurgedSaga(ParticipantError):
    """A call for a saga whose barrier rows may have been purged: its deadline
    lies before the purge watermark the orchestrator set
    (`compensa.participants.retention`), so a missing row proves nothing.
    Answered FAILED_PRECONDITION; nothing is done or recorded."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlinePassed(ParticipantError):
    """The call arrived after its StepContext.deadline: answered DEADLINE_EXCEEDED, nothing done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def _database_error(error: Exception) -> bool:
    """The database could not be reached or did not answer in time (through
    SQLAlchemy, or psycopg's own errors from the pipelined barrier statements)."""
    return isinstance(
        error,
        (
            sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError,
            psycopg.OperationalError, psycopg.InterfaceError, OSError,
        ),
    )


def _unreachable(error: Exception) -> bool:
    """A database error that says nothing answered (not a statement the database cancelled)."""
    return _database_error(error) and not cancelled_by_the_database(error)


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The one place that maps a step's errors to a gRPC status and details."""
    if isinstance(error, ParticipantError):
        return error.code, str(error)
    if isinstance(error, InjectedFault):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if _database_error(error):
        return grpc.StatusCode.UNAVAILABLE, f"database unavailable: {type(error).__name__}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"


def _refuse_failed(response: participant_pb2.ExecuteResponse) -> None:
    """A recorded business failure is answered as one (ABORTED), also to a duplicate."""
    if response.result == participant_pb2.EXECUTE_RESULT_FAILED:
        raise StepFailed(response.failure_reason)


def _check_not_purged(step: participant_pb2.StepContext, watermark: datetime.datetime | None) -> None:
    """Raises PurgedSaga for a call that may belong to a saga whose rows were
    purged: its deadline is before `watermark`, or it has none to tell."""
    if watermark is None:
        return
    if not step.HasField("deadline"):
        raise PurgedSaga(
            "the call has no deadline, and this participant purges barrier rows: a call without one cannot be"
            " told from a late call for a purged saga; refused, not applied"
        )
    deadline = step.deadline.ToDatetime(datetime.UTC)
    if deadline < watermark:
        raise PurgedSaga(
            f"saga {step.saga_id!r}: the call's deadline {deadline.isoformat()} is before the purge watermark"
            f" {watermark.isoformat()}; its barrier rows may be gone, so it is refused, not applied"
        )


def _check_deadline(step: participant_pb2.StepContext) -> None:
    """Raises DeadlinePassed if the call's deadline (when it has one) is behind us."""
    if step.HasField("deadline"):
        deadline = step.deadline.seconds + step.deadline.nanos / 1e9
        late = time.time() - deadline
        if late >= 0:
            raise DeadlinePassed(
                f"the call arrived {late:.3f}s after its deadline; the orchestrator stopped waiting for it, "
                "so it was not applied"
            )


def pack(payload: message.Message) -> any_pb2.Any:
    """`payload` packed in an Any."""
    packed = any_pb2.Any()
    packed.Pack(payload)
    return packed


def unpack_as(payload: any_pb2.Any, cls: type[_M]) -> _M:
    """Decodes `payload` as a `cls`; StepFailed if it holds another type.

    A payload of the wrong type will never succeed, so it is a business failure
    rather than a transient one.
    """
    decoded = cls()
    if not payload.Unpack(decoded):
        expected = cls.DESCRIPTOR.full_name
        got = payload.type_url.rpartition("/")[2] or "nothing"
        raise StepFailed(f"expected a {expected}, got {got}")
    return decoded


class WrongOutputType(ParticipantError):
    """`execute_step` or `compensate_step` returned something that is not a
    protobuf message: a bug of the participant, answered INTERNAL with a
    message naming the step and what it returned; nothing is recorded."""

    code = grpc.StatusCode.INTERNAL


def _returned_message(step: participant_pb2.StepContext, method: str, returned: object) -> message.Message:
    """`returned` if it is a protobuf message; WrongOutputType saying what it is otherwise."""
    if isinstance(returned, message.Message):
        return returned
    expected = "a protobuf message or Pending" if method == "execute_step" else "a protobuf message or None"
    raise WrongOutputType(
        f"step {step.step_name!r}: {method} returned {type(returned).__module__}.{type(returned).__qualname__}"
        f" ({returned!r:.60}); expected {expected} (e.g. wrappers_pb2.StringValue(value=...))"
    )


def _serialized(response: message.Message) -> bytes:
    return response.SerializeToString(deterministic=True)


def _claim(
    step: participant_pb2.StepContext, operation: str, outcome: str | None = None,
    response: message.Message | None = None,
) -> BarrierRow:
    """The barrier row of (key, operation), with its answer when it is known at the claim."""
    return BarrierRow(
        step.idempotency_key, operation, step.saga_id, step.step_name, outcome,
        _serialized(response) if response is not None else None,
    )


def _span_attributes(step: participant_pb2.StepContext) -> dict[str, str | int]:
    return {
        "compensa.saga.id": step.saga_id, "compensa.step": step.step_name, "compensa.attempt": step.attempt,
        "rpc.system": "grpc", "rpc.service": "compensa.v1.ParticipantService",
    }


class Participant(participant_pb2_grpc.ParticipantServiceServicer):
    """A ParticipantService servicer (grpc.aio) that runs each step exactly once.

    Subclasses set `metadata` (their tables), `barrier_table_name` (so that
    several participants may share one database) and override `execute_step`,
    and `compensate_step` unless the step is a pivot that cannot be undone.

    What the `request` of both holds (ExecuteRequest / CompensateRequest):
      - `context.saga_id`, `context.step_name`: which saga and step.
      - `context.idempotency_key`: the same on every retry of the step (the barrier dedupes on it).
      - `context.attempt`: 1, 2, 3, ... (informational: a restart may repeat one).
      - `context.definition_name`, `context.definition_version`: the definition the saga runs.
      - `context.deadline`: when the orchestrator stops waiting (a later call is refused).
      - `saga_input`: the saga's input, an Any (`unpack_as(request.saga_input, MyInput)`).
      - `step_outputs`: the outputs of the steps this one depends on, by step name (Anys).
    Execute only:
      - `completion_token`: set for a long_running step; report its outcome later with it.
    Compensate only:
      - `execute_output`: what this step's Execute returned (a Pending's output), an Any.
      - `reason`: why the saga compensates.
    """

    #: The subclass's tables, created by `create_schema`.
    metadata: ClassVar[sqlalchemy.MetaData] = sqlalchemy.MetaData()
    #: Name of the barrier table in the participant's database.
    barrier_table_name: ClassVar[str] = "participant_barrier"

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        faults: FaultPlan | None = None,
        database_timeout: float = DEFAULT_DATABASE_TIMEOUT,
    ) -> None:
        self.engine = engine
        self.faults = faults or FaultPlan()
        self.barrier = barrier_table(self.barrier_table_name)
        # One SERVER span per call, in the saga's trace, when traces are on.
        self._tracer = tracing.tracer("compensa.participant", f"compensa-participant-{type(self).__name__}")
        #: The longest one transaction may take, in seconds (connecting is
        #: bounded by the engine: see `compensa.participants.serving.create_participant_engine`).
        self.database_timeout = database_timeout
        #: Told whether each transaction reached the database; set by the server.
        self.database_health: DatabaseHealth | None = None
        self.barrier_watermark = watermark_table(self.barrier_table_name, self.barrier.metadata)
        #: The purge watermark in force, as last read or set
        #: (`compensa.participants.retention`); None: nothing is ever purged.
        self.purge_watermark: datetime.datetime | None = None

    async def ping(self) -> None:
        """Raises unless the database answers within `database_timeout`; the
        outcome goes to `database_health`."""
        try:
            async with bounded_transaction(self.engine, self.database_timeout) as conn:
                await conn.execute(sqlalchemy.text("SELECT 1"))
        except Exception as error:
            self._database_outcome(error)
            raise
        self._database_outcome(None)

    def _database_outcome(self, error: Exception | None) -> None:
        health = self.database_health
        if health is None:
            return
        if error is None:
            health.succeeded()
        elif _unreachable(error):
            health.failed(error)

    async def create_schema(self) -> None:
        """Creates the barrier table (with its watermark table and indexes) and
        the subclass's tables if they do not exist. A barrier table made by an
        earlier release is kept and gains the indexes (built once, blocking
        writes to it meanwhile)."""
        async with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # CREATE TABLE IF NOT EXISTS races with itself on PostgreSQL when
                # replicas of a participant start together.
                await conn.execute(
                    sqlalchemy.text("SELECT pg_advisory_xact_lock(hashtext(:name))"),
                    {"name": self.barrier_table_name},
                )
            await conn.run_sync(self.barrier.metadata.create_all)
            # A barrier table made before its indexes existed gains them here
            # (create_all makes the indexes of the tables it creates only).
            for index in self.barrier.indexes:
                await conn.run_sync(functools.partial(index.create, checkfirst=True))
            await conn.run_sync(self.metadata.create_all)
        await self.refresh_purge_watermark()

    async def refresh_purge_watermark(self) -> None:
        """Reads the purge watermark (another replica may have moved it)."""
        self.purge_watermark = await read_watermark(self.engine, self.barrier_watermark, self.database_timeout)

    async def settle_pending(
        self, conn: AsyncConnection, idempotency_key: str, *, output: message.Message | None = None,
        failure_reason: str = "",
    ) -> bool:
        """Records, in the participant's own transaction `conn`, that the
        step whose Execute answered Pending under `idempotency_key` is settled:
        succeeded with `output`, or failed with `failure_reason`. Call it in
        the transaction that settles the step's business effect, before
        reporting the outcome with CompleteStep: the orchestrator's audit then
        finds a settled step whose outcome never reached it. A duplicate
        Execute answers the settled answer. True if the row was pending (False:
        settled already, or no such Execute)."""
        if failure_reason:
            response = participant_pb2.ExecuteResponse(
                result=participant_pb2.EXECUTE_RESULT_FAILED, failure_reason=failure_reason
            )
            outcome = _SETTLED_FAILED
        else:
            response = participant_pb2.ExecuteResponse(result=participant_pb2.EXECUTE_RESULT_SUCCEEDED)
            if output is not None:
                response.output.CopyFrom(pack(output))
            outcome = _SETTLED_SUCCEEDED
        table = self.barrier
        settled = await conn.execute(
            table.update()
            .where(
                table.c.idempotency_key == idempotency_key, table.c.operation == _EXECUTE,
                table.c.outcome == _PENDING,
            )
            .values(outcome=outcome, response=_serialized(response))
            .returning(table.c.idempotency_key)
        )
        return settled.first() is not None

    @abc.abstractmethod
    async def execute_step(
        self, conn: AsyncConnection, request: participant_pb2.ExecuteRequest
    ) -> message.Message | Pending:
        """Applies the step's effect through `conn` and returns its output message
        (any protobuf message), or, for a long-running step, `Pending` (see the
        module docstring). `request` is described in the class docstring.

        Runs at most once per idempotency key that commits. It runs inside the
        barrier transaction, which must end within `database_timeout` (3 s by
        default; `start_participant(database_timeout=...)`, `compensa
        participant --database-timeout`): keep slow calls to other services
        out of it. Raise StepFailed
        for a business failure (its effects are rolled back and it is recorded)
        and TransientError for a retryable one (nothing is recorded).
        """

    async def compensate_step(
        self, conn: AsyncConnection, request: participant_pb2.CompensateRequest
    ) -> message.Message | None:
        """Undoes the step's effect through `conn`; returns optional details of the undo.

        Called at most once per idempotency key that commits, and only if
        Execute succeeded or answered Pending (`request` is described in the
        class docstring); `request.execute_output` is the
        output Execute recorded (a Pending's output). The default raises NotCompensable: override it unless the
        step is a pivot.
        """
        raise NotCompensable(f"step {request.context.step_name!r} cannot be compensated")

    async def Execute(
        self,
        request: participant_pb2.ExecuteRequest,
        context: grpc.aio.ServicerContext[participant_pb2.ExecuteRequest, participant_pb2.ExecuteResponse],
    ) -> participant_pb2.ExecuteResponse:
        """Performs the step once per idempotency key; see the module docstring for statuses."""
        return await self._answer(_EXECUTE, request.context, context, lambda: self._execute(request), _refuse_failed)

    async def Compensate(
        self,
        request: participant_pb2.CompensateRequest,
        context: grpc.aio.ServicerContext[participant_pb2.CompensateRequest, participant_pb2.CompensateResponse],
    ) -> participant_pb2.CompensateResponse:
        """Undoes the step once per idempotency key; see the module docstring for statuses."""
        return await self._answer(_COMPENSATE, request.context, context, lambda: self._compensate(request))

    async def _answer(
        self,
        operation: str,
        step: participant_pb2.StepContext,
        context: grpc.aio.ServicerContext[Any, _Response],
        work: Callable[[], Awaitable[tuple[_Response, str, bool]]],
        check: Callable[[_Response], None] | None = None,
    ) -> _Response:
        """One call of `operation`, in a server span when tracing is on: the
        deadline and faults first, then `work` in its barrier transaction;
        any error becomes the call's status, and the call is logged."""
        traceparent = tracing.traceparent_in(context.invocation_metadata())
        if self._tracer is None:
            return await self._answer_untraced(operation, step, context, work, check, traceparent)
        with tracing.server_span(
            self._tracer, f"{operation.capitalize()} {step.step_name}", traceparent, _span_attributes(step)
        ):
            return await self._answer_untraced(operation, step, context, work, check, traceparent)

    async def _answer_untraced(
        self,
        operation: str,
        step: participant_pb2.StepContext,
        context: grpc.aio.ServicerContext[Any, _Response],
        work: Callable[[], Awaitable[tuple[_Response, str, bool]]],
        check: Callable[[_Response], None] | None,
        traceparent: str | None,
    ) -> _Response:
        outcome = "not-run"
        status = grpc.StatusCode.OK
        try:
            _check_not_purged(step, self.purge_watermark)
            _check_deadline(step)
            await self.faults.before_call(step.attempt)
            response, outcome, committed = await self._transact(work())
            if committed:
                self.faults.after_commit()
            if check is not None:
                check(response)
            return response
        except Exception as error:
            status, details = self._error_status(step, operation, error)
            await context.abort(status, details)
            raise  # context.abort raises; this is never reached
        finally:
            self._log(step, operation, outcome, status, traceparent)

    async def _transact(self, work: Awaitable[_R]) -> _R:
        """Runs a barrier transaction, telling `database_health` whether the database answered."""
        try:
            result = await work
        except Exception as error:
            self._database_outcome(error)
            raise
        self._database_outcome(None)
        return result

    async def _execute(
        self, request: participant_pb2.ExecuteRequest
    ) -> tuple[participant_pb2.ExecuteResponse, str, bool]:
        """The response, the barrier outcome, and whether this call committed a new row."""
        step = request.context
        try:
            async with self._barrier_transaction() as barrier:
                if not await barrier.claim(_claim(step, _EXECUTE)):
                    return await self._stored_execute(barrier, step.idempotency_key)
                output = await self.execute_step(barrier.conn, request)
                if isinstance(output, Pending):
                    if not request.completion_token:
                        raise NotLongRunning(
                            f"step {step.step_name!r} answered Pending but is not long_running (no completion token)"
                        )
                    response = participant_pb2.ExecuteResponse(result=participant_pb2.EXECUTE_RESULT_PENDING)
                    if output.output is not None:
                        response.output.CopyFrom(pack(_returned_message(step, "execute_step", output.output)))
                    outcome = _PENDING
                else:
                    response = participant_pb2.ExecuteResponse(
                        result=participant_pb2.EXECUTE_RESULT_SUCCEEDED,
                        output=pack(_returned_message(step, "execute_step", output)),
                    )
                    outcome = _SUCCEEDED
                barrier.answer(step.idempotency_key, _EXECUTE, outcome, _serialized(response))
            return response, outcome, True
        except StepFailed as failure:
            # No savepoint around the step (two round trips on every call): its
            # failure rolled back the whole transaction, claim included, and is
            # recorded in a transaction of its own.
            return await self._record_failure(step, failure)

    def _barrier_transaction(self) -> contextlib.AbstractAsyncContextManager[BarrierTransaction]:
        return barrier_transaction(self.engine, self.barrier, self.database_timeout)

    async def _record_failure(
        self, step: participant_pb2.StepContext, failure: StepFailed
    ) -> tuple[participant_pb2.ExecuteResponse, str, bool]:
        """Claims the key with the failure; if a call with the same key committed
        since the failed step rolled back, that call's answer stands."""
        response = participant_pb2.ExecuteResponse(
            result=participant_pb2.EXECUTE_RESULT_FAILED, failure_reason=failure.reason
        )
        async with self._barrier_transaction() as barrier:
            if not await barrier.claim(_claim(step, _EXECUTE, _FAILED, response)):
                return await self._stored_execute(barrier, step.idempotency_key)
        return response, _FAILED, True

    async def _stored_execute(
        self, barrier: BarrierTransaction, key: str
    ) -> tuple[participant_pb2.ExecuteResponse, str, bool]:
        """The answer to an Execute whose key was already claimed (a duplicate, or a hanging call)."""
        outcome, stored = await barrier.stored(key, _EXECUTE)
        if outcome == _NULL_COMPENSATED:
            return (
                participant_pb2.ExecuteResponse(
                    result=participant_pb2.EXECUTE_RESULT_FAILED,
                    failure_reason="compensated before it executed",
                ),
                "hanging",
                False,
            )
        return participant_pb2.ExecuteResponse.FromString(stored), f"duplicate-{outcome}", False

    async def _compensate(
        self, request: participant_pb2.CompensateRequest
    ) -> tuple[participant_pb2.CompensateResponse, str, bool]:
        """The response, the barrier outcome, and whether this call committed a new row."""
        step = request.context
        key = step.idempotency_key
        response = participant_pb2.CompensateResponse()
        async with self._barrier_transaction() as barrier:
            claims = await barrier.claim_compensation(
                _claim(step, _EXECUTE, _NULL_COMPENSATED), _claim(step, _COMPENSATE)
            )
            if not claims.compensate_claimed:
                outcome, stored = await barrier.stored(key, _COMPENSATE)
                return participant_pb2.CompensateResponse.FromString(stored), f"duplicate-{outcome}", False
            if claims.execute_claimed or claims.execute is None:
                # Execute never ran; its key is now taken, so a late Execute is a no-op.
                barrier.answer(key, _COMPENSATE, _NULL_COMPENSATED, _serialized(response))
                return response, _NULL_COMPENSATED, True

            executed, stored_execute = claims.execute
            if executed in _APPLIED:
                undo = participant_pb2.CompensateRequest()
                undo.CopyFrom(request)
                stored_output = participant_pb2.ExecuteResponse.FromString(stored_execute).output
                # The barrier's copy is authoritative: the orchestrator may never
                # have received Execute's answer (a lost answer, a deadline).
                # A Pending with no output leaves it empty; the orchestrator's
                # copy is then the output reported later (CompleteStep), if any.
                if stored_output.type_url:
                    undo.execute_output.CopyFrom(stored_output)
                details = await self.compensate_step(barrier.conn, undo)
                if details is not None:
                    response.output.CopyFrom(pack(_returned_message(step, "compensate_step", details)))
                outcome = _COMPENSATED
            else:
                outcome = _NOTHING_TO_UNDO
            barrier.answer(key, _COMPENSATE, outcome, _serialized(response))
        return response, outcome, True

    def _error_status(
        self, step: participant_pb2.StepContext, operation: str, error: Exception
    ) -> tuple[grpc.StatusCode, str]:
        code, details = status_of(error)
        if code == grpc.StatusCode.INTERNAL:
            logger.exception(
                "saga=%s step=%s operation=%s: unexpected error", step.saga_id, step.step_name, operation
            )
        return code, details

    def _log(
        self, step: participant_pb2.StepContext, operation: str, outcome: str, status: grpc.StatusCode,
        traceparent: str | None,
    ) -> None:
        logger.info(
            "%s saga=%s step=%s operation=%s attempt=%d outcome=%s status=%s",
            type(self).__name__,
            step.saga_id,
            step.step_name,
            operation,
            step.attempt,
            outcome,
            status.name,
            extra={
                "saga_id": step.saga_id, "step": step.step_name, "attempt": step.attempt,
                "trace_id": tracing.trace_id_of(traceparent),
            },
        )
