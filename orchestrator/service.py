"""The OrchestratorService: request validation and the gRPC surface.

Handlers validate everything before they write anything, so a bad request
changes nothing. Errors are CompensaErrors, mapped to status codes in one
place (`_answer_errors`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from compensa.v1 import definition_pb2, orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2
from google.protobuf import duration_pb2

from orchestrator import machine, payloads
from orchestrator.definitions import definition_fingerprint, duration_seconds, validate_definition
from orchestrator.engine import DEFAULT_STUCK_SECONDS, SagaEngine, parse_completion_token
from orchestrator.errors import (
    AlreadyExists,
    CompensaError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    grpc_status_of,
)
from orchestrator.streams import READ_BATCH, LogTail
from orchestrator.views import EventViews, saga_message, timestamp

log = logging.getLogger("compensa.service")

SAGA_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
#: The most events one WatchSagas message may carry (max_events_per_message).
MAX_EVENTS_PER_MESSAGE = 1000
#: The longest a WatchSagas message may wait for more events (batch_window).
MAX_BATCH_WINDOW_SECONDS = 1.0

Request = TypeVar("Request")
Response = TypeVar("Response")


def _answer_errors(
    handler: Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await handler(self, request, context)
        except CompensaError as error:
            code, message = grpc_status_of(error)
            await context.abort(code, message)
        except Exception as error:
            log.exception("%s failed", handler.__name__)
            code, message = grpc_status_of(error)
            await context.abort(code, message)
        raise AssertionError("unreachable")

    return wrapper


def _answer_stream_errors(
    handler: Callable[[Any, Request, grpc.aio.ServicerContext], AsyncIterator[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext], AsyncIterator[Response]]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> AsyncIterator[Response]:
        try:
            async for item in handler(self, request, context):
                yield item
        except CompensaError as error:
            code, message = grpc_status_of(error)
            await context.abort(code, message)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("%s failed", handler.__name__)
            code, message = grpc_status_of(error)
            await context.abort(code, message)

    return wrapper


def _encode_token(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def _decode_token(token: str, what: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError):
        raise InvalidArgument(f"{what} is malformed: pass back the next_page_token of a previous response") from None


def _require_saga_id(saga_id: str) -> None:
    if not saga_id:
        raise InvalidArgument("saga_id is required")


def _stuck_seconds(stuck_for: duration_pb2.Duration) -> float:
    seconds = duration_seconds(stuck_for)
    if seconds <= 0:
        raise InvalidArgument("stuck_for must be positive, e.g. 600s")
    return seconds


def _page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument(f"page_size must be 0 (default {DEFAULT_PAGE_SIZE}) or positive, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _start_fingerprint(request: orchestrator_pb2.StartSagaRequest) -> str:
    digest = hashlib.sha256()
    for part in (
        request.definition_name.encode(),
        str(request.definition_version).encode(),
        request.input.type_url.encode(),
        request.input.value,
    ):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _certificate_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The client certificate's common name and alternative names, when the
    call came over mutual TLS (the certificate was verified by then)."""
    auth = context.auth_context()
    names = [*auth.get("x509_common_name", []), *auth.get("x509_subject_alternative_name", [])]
    return list(dict.fromkeys(name.decode() for name in names))


class OrchestratorService(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """compensa.v1.OrchestratorService over a SagaEngine."""

    def __init__(self, engine: SagaEngine) -> None:
        self._engine = engine
        self._store = engine.store
        self._max_payload = engine.config.max_payload_bytes
        self._tail = LogTail(
            engine.store,
            engine.changes,
            buffer_size=engine.config.watch_buffer_events,
            reread_seconds=engine.config.watch_reread_seconds,
        )
        self._operators = frozenset(engine.config.operators)
        # Live subscribers lag the tail by at most a buffer; catch-up readers share views too.
        self._event_views = EventViews(size=4 * engine.config.watch_buffer_events)

    async def stop(self) -> None:
        """Stops the log reader behind the watch streams."""
        await self._tail.stop()

    async def _saga_view(self, saga: machine.SagaRecord) -> saga_pb2.Saga:
        plan = await self._engine.plan_for(saga.definition_name, saga.definition_version)
        return saga_message(saga, plan)

    def _operator(self, context: grpc.aio.ServicerContext, action: str, claimed: str = "") -> str:
        """Checks that the caller may run an operator action; who it is, for
        the saga's log. With a client certificate the log names it, next to
        the actor the request claims (which nothing verifies)."""
        names = _certificate_names(context)
        if self._operators and self._operators.isdisjoint(names):
            shown = ", ".join(names) or "no client certificate"
            raise PermissionDenied(
                f"{action} is for operators: call with the client certificate of one named by serve --operator"
                f" (this call's: {shown})"
            )
        if not names:
            return claimed
        return f"{claimed} (certificate {names[0]})" if claimed and claimed != names[0] else names[0]

    async def _existing(self, saga_id: str) -> machine.SagaRecord:
        _require_saga_id(saga_id)
        saga = await self._store.load_saga(saga_id)
        if saga is None:
            raise NotFound(f"saga {saga_id!r} not found")
        return saga

    # -- sagas

    @_answer_errors
    async def StartSaga(
        self, request: orchestrator_pb2.StartSagaRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.StartSagaResponse:
        if not SAGA_ID_PATTERN.match(request.saga_id):
            raise InvalidArgument(
                f"saga_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-', got {request.saga_id!r}"
            )
        if not request.definition_name:
            raise InvalidArgument("definition_name is required")
        if request.definition_version < 0:
            raise InvalidArgument(f"definition_version must be 0 (latest) or positive, got {request.definition_version}")
        plan = await self._engine.find_plan(request.definition_name, request.definition_version)
        if plan is None:
            version = f" version {request.definition_version}" if request.definition_version else ""
            raise NotFound(f"definition {request.definition_name!r}{version} not found; register it first")
        definition = plan.definition
        if not request.HasField("input") or not request.input.type_url:
            raise InvalidArgument(f"input is required: a google.protobuf.Any holding a {definition.input_type}")
        size = request.input.ByteSize()
        if size > self._max_payload:
            raise InvalidArgument(f"input is {size} bytes; the limit is {self._max_payload} bytes")
        given = payloads.type_name_of(request.input)
        if given != definition.input_type:
            raise InvalidArgument(f"input must be a {definition.input_type}, got {given or request.input.type_url!r}")
        payloads.unpack(request.input)
        fingerprint = _start_fingerprint(request)
        saga, created, existing_fingerprint = await self._engine.create(
            plan, request.saga_id, request.input.SerializeToString(deterministic=True), fingerprint
        )
        if not created and existing_fingerprint != fingerprint:
            raise AlreadyExists(
                f"saga {request.saga_id!r} already exists with a different definition or input; "
                "choose another saga_id"
            )
        return orchestrator_pb2.StartSagaResponse(saga=await self._saga_view(saga), created=created)

    @_answer_errors
    async def GetSaga(
        self, request: orchestrator_pb2.GetSagaRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.GetSagaResponse:
        return orchestrator_pb2.GetSagaResponse(saga=await self._saga_view(await self._existing(request.saga_id)))

    @_answer_errors
    async def ListSagas(
        self, request: orchestrator_pb2.ListSagasRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ListSagasResponse:
        page_size = _page_size(request.page_size)
        after: tuple[float, str] | None = None
        if request.page_token:
            token = _decode_token(request.page_token, "page_token")
            if not (isinstance(token, list) and len(token) == 2):
                raise InvalidArgument("page_token is malformed: pass back the next_page_token of a previous response")
            after = (float(token[0]), str(token[1]))
        updated_before = None
        if request.HasField("stuck_for"):
            updated_before = self._engine.clock.now() - _stuck_seconds(request.stuck_for)
        if request.state and request.state not in saga_pb2.SagaState.values():
            raise InvalidArgument(f"state {request.state} is not a SagaState")
        sagas = await self._store.list_sagas(
            state=request.state,
            definition_name=request.definition_name,
            updated_before=updated_before,
            page_size=page_size + 1,
            after=after,
        )
        more = len(sagas) > page_size
        sagas = sagas[:page_size]
        response = orchestrator_pb2.ListSagasResponse(
            sagas=[await self._saga_view(saga) for saga in sagas],
            next_page_token=_encode_token([sagas[-1].created_at, sagas[-1].saga_id]) if more else "",
        )
        return response

    @_answer_errors
    async def SummarizeSagas(
        self, request: orchestrator_pb2.SummarizeSagasRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.SummarizeSagasResponse:
        stuck = _stuck_seconds(request.stuck_for) if request.HasField("stuck_for") else DEFAULT_STUCK_SECONDS
        now = self._engine.clock.now()
        summaries = await self._store.summarize_sagas(
            definition_name=request.definition_name, stuck_before=now - stuck
        )
        response = orchestrator_pb2.SummarizeSagasResponse(
            states=[
                orchestrator_pb2.SagaStateSummary(
                    definition_name=summary.definition_name,
                    state=saga_pb2.SagaState.ValueType(summary.state),
                    count=summary.count,
                    stuck=summary.stuck,
                    unresolved=summary.unresolved,
                    oldest_update_time=timestamp(summary.oldest_updated_at),
                )
                for summary in summaries
            ],
            read_time=timestamp(now),
        )
        response.stuck_for.FromNanoseconds(round(stuck * 1e9))
        return response

    @_answer_errors
    async def CancelSaga(
        self, request: orchestrator_pb2.CancelSagaRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.CancelSagaResponse:
        actor = self._operator(context, "CancelSaga", request.actor)
        _require_saga_id(request.saga_id)
        event = machine.CancelRequested(actor=actor, reason=request.reason)
        saga = await self._engine.apply_external(request.saga_id, event)
        return orchestrator_pb2.CancelSagaResponse(saga=await self._saga_view(saga))

    @_answer_errors
    async def RetrySaga(
        self, request: orchestrator_pb2.RetrySagaRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.RetrySagaResponse:
        actor = self._operator(context, "RetrySaga", request.actor)
        _require_saga_id(request.saga_id)
        event = machine.RetryRequested(actor=actor, reason=request.reason)
        saga = await self._engine.apply_external(request.saga_id, event)
        return orchestrator_pb2.RetrySagaResponse(saga=await self._saga_view(saga))

    @_answer_errors
    async def ResolveSaga(
        self, request: orchestrator_pb2.ResolveSagaRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ResolveSagaResponse:
        actor = self._operator(context, "ResolveSaga", request.actor)
        if not request.note.strip():
            raise InvalidArgument("note is required: say what was done to repair the flow")
        _require_saga_id(request.saga_id)
        event = machine.ResolveRequested(actor=actor, note=request.note)
        saga = await self._engine.apply_external(request.saga_id, event)
        return orchestrator_pb2.ResolveSagaResponse(saga=await self._saga_view(saga))

    @_answer_errors
    async def CompleteStep(
        self, request: orchestrator_pb2.CompleteStepRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.CompleteStepResponse:
        try:
            saga_id, step_name = parse_completion_token(self._engine.token_key, request.completion_token)
        except (ValueError, TypeError):
            raise InvalidArgument(
                "completion_token is malformed or was not issued by this deployment: "
                "pass the completion_token of the ExecuteRequest unchanged"
            ) from None
        event: machine.Event
        if request.result == orchestrator_pb2.COMPLETION_RESULT_SUCCEEDED:
            if request.output.ByteSize() > self._max_payload:
                raise InvalidArgument(f"output is larger than {self._max_payload} bytes")
            output = request.output.SerializeToString(deterministic=True) if request.HasField("output") else None
            event, wanted = machine.ExecuteSucceeded(step_name, output), machine.STEP_SUCCEEDED
        elif request.result == orchestrator_pb2.COMPLETION_RESULT_FAILED:
            event, wanted = machine.ExecuteFailed(step_name, request.failure_reason or "failed"), machine.STEP_FAILED
        else:
            raise InvalidArgument("result must be COMPLETION_RESULT_SUCCEEDED or COMPLETION_RESULT_FAILED")
        saga = await self._existing(saga_id)
        plan = await self._engine.plan_for(saga.definition_name, saga.definition_version)
        if step_name not in plan.steps or not plan.steps[step_name].long_running:
            raise InvalidArgument(f"step {step_name!r} of saga {saga_id!r} is not a long-running step")
        state = saga.step(step_name).state
        if state == wanted:
            return orchestrator_pb2.CompleteStepResponse(saga=saga_message(saga, plan))
        if state not in (machine.STEP_RUNNING, machine.STEP_WAITING):
            raise FailedPrecondition(
                f"step {step_name!r} is {saga_pb2.StepState.Name(state)}; it no longer waits for an outcome"  # type: ignore[arg-type]
            )
        saga = await self._engine.apply_external(saga_id, event)
        return orchestrator_pb2.CompleteStepResponse(saga=saga_message(saga, plan))

    # -- watching

    @_answer_stream_errors
    async def WatchSaga(
        self, request: orchestrator_pb2.WatchSagaRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.WatchSagaResponse]:
        if request.after_sequence < 0:
            raise InvalidArgument(f"after_sequence must be 0 or positive, got {request.after_sequence}")
        saga_id = request.saga_id
        saga = await self._existing(saga_id)
        after = request.after_sequence
        if after and after == saga.sequence and saga.is_final and not request.follow_after_end:
            # A client reconnecting after the final event: nothing will follow.
            return
        if after == 0 and not request.replay_history:
            yield orchestrator_pb2.WatchSagaResponse(snapshot=await self._saga_view(saga))
            if saga.is_final and not request.follow_after_end:
                return
            after = saga.sequence
        async for batch in self._tail.follow(
            after,
            saga_id=saga_id,
            key=lambda stored: stored.event.sequence,
            read=lambda after: self._store.read_saga_events(saga_id, after, READ_BATCH),
        ):
            for stored in batch:
                yield orchestrator_pb2.WatchSagaResponse(event=self._event_views.of(stored))
                if stored.event.saga_state in machine.FINAL_SAGA_STATES and not request.follow_after_end:
                    if await self._finished(saga_id, stored.event.sequence):
                        return

    async def _finished(self, saga_id: str, sequence: int) -> bool:
        """True if the saga is final at this sequence (an operator retry can
        reopen a FAILED saga, so the stream ends only at the real end)."""
        saga = await self._store.load_saga(saga_id)
        return saga is not None and saga.is_final and saga.sequence == sequence

    @_answer_stream_errors
    async def WatchSagas(
        self, request: orchestrator_pb2.WatchSagasRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.WatchSagasResponse]:
        if request.after_position < 0:
            raise InvalidArgument(f"after_position must be 0 or positive, got {request.after_position}")
        if not 0 <= request.max_events_per_message <= MAX_EVENTS_PER_MESSAGE:
            raise InvalidArgument(
                f"max_events_per_message must be from 0 to {MAX_EVENTS_PER_MESSAGE}, "
                f"got {request.max_events_per_message}"
            )
        batched = request.max_events_per_message > 1
        window = duration_seconds(request.batch_window) if request.HasField("batch_window") else 0.0
        if not 0 <= window <= MAX_BATCH_WINDOW_SECONDS:
            raise InvalidArgument(f"batch_window must be from 0 to {MAX_BATCH_WINDOW_SECONDS:g}s, got {window:g}s")
        if window and not batched:
            raise InvalidArgument("batch_window needs max_events_per_message of 2 or more")
        definition_name, saga_state = request.definition_name, request.saga_state
        async for batch in self._tail.follow(
            request.after_position,
            saga_id=None,
            wanted=(definition_name, saga_state),
            key=lambda stored: stored.position,
            read=lambda after: self._store.read_log(
                after, READ_BATCH, definition_name=definition_name, saga_state=saga_state
            ),
            max_batch=request.max_events_per_message if batched else 1,
            window=window,
        ):
            if batched:
                yield orchestrator_pb2.WatchSagasResponse(events=[self._event_views.of(stored) for stored in batch])
            else:
                yield orchestrator_pb2.WatchSagasResponse(event=self._event_views.of(batch[0]))

    # -- definitions

    @_answer_errors
    async def RegisterDefinition(
        self, request: orchestrator_pb2.RegisterDefinitionRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.RegisterDefinitionResponse:
        self._operator(context, "RegisterDefinition")
        if not request.HasField("definition"):
            raise InvalidArgument("definition is required")
        definition, created = await register_definition(self._engine, request.definition, source="request")
        return orchestrator_pb2.RegisterDefinitionResponse(definition=definition, created=created)

    @_answer_errors
    async def GetDefinition(
        self, request: orchestrator_pb2.GetDefinitionRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.GetDefinitionResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        if request.version < 0:
            raise InvalidArgument(f"version must be 0 (latest) or positive, got {request.version}")
        definition = await self._store.get_definition(request.name, request.version)
        if definition is None:
            raise NotFound(f"definition {request.name!r} not found")
        return orchestrator_pb2.GetDefinitionResponse(definition=definition)

    @_answer_errors
    async def ListDefinitions(
        self, request: orchestrator_pb2.ListDefinitionsRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ListDefinitionsResponse:
        page_size = _page_size(request.page_size)
        after = str(_decode_token(request.page_token, "page_token")) if request.page_token else ""
        found = await self._store.list_definitions(page_size + 1, after)
        more = len(found) > page_size
        found = found[:page_size]
        return orchestrator_pb2.ListDefinitionsResponse(
            definitions=found, next_page_token=_encode_token(found[-1].name) if more else ""
        )


async def register_definition(
    engine: SagaEngine, definition: definition_pb2.SagaDefinition, *, source: str
) -> tuple[definition_pb2.SagaDefinition, bool]:
    """Validates and stores a definition; identical content keeps its version."""
    normalized = validate_definition(definition, source=source)
    normalized.version = 0
    stored, created = await engine.store.register_definition(
        normalized, definition_fingerprint(normalized), engine.clock.now()
    )
    if created:
        engine.forget_latest(stored.name)
    engine.metrics.know_definition(stored.name)
    return stored, created
