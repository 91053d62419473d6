"""The OrchestratorService: request validation and the gRPC surface.

Handlers validate everything before they write anything, so a bad request
changes nothing. Errors are CompensaErrors, mapped to status codes in one
place (`_answer_errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import re
import ssl
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf import duration_pb2, message, message_factory

from compensa.common.tracing import traceparent_in
from compensa.orchestrator.api.admission import SagaAdmission
from compensa.orchestrator.api.auth import REQUIRED_ROLE, AccessPolicy, Identity, RefusedCalls, Role, StreamLimit
from compensa.orchestrator.api.log_tails import DeploymentLogs
from compensa.orchestrator.api.page_tokens import issue_page_token, read_page_token
from compensa.orchestrator.api.queries import SagaQueries, visible_bulk_job
from compensa.orchestrator.api.resume_tokens import ALERT_LOG, EVENT_LOG, issue_resume_token, read_resume_token
from compensa.orchestrator.api.streams import READ_BATCH
from compensa.orchestrator.api.views import EventViews, alert_message, audit_report_message, saga_message
from compensa.orchestrator.definitions import (
    MAX_DEFINITION_BYTES,
    MAX_REFERENCE_CHARS,
    NAME_PATTERN,
    validate_definition,
)
from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.auditor import AuditOptions, check_participants, enqueue_audit, report_of
from compensa.orchestrator.engine.bulk import bulk_action_message, bulk_item_message, command_bulk_job
from compensa.orchestrator.engine.config import EngineConfig
from compensa.orchestrator.engine.engine import DEFAULT_STUCK_SECONDS, SagaEngine
from compensa.orchestrator.engine.flow import HIGHEST_PRIORITY, LOWEST_PRIORITY
from compensa.orchestrator.engine.migration import read_history
from compensa.orchestrator.engine.migration_plan import check_step_mappings, classify
from compensa.orchestrator.engine.operations import operator_event
from compensa.orchestrator.engine.participant_health import ProbeOutcome
from compensa.orchestrator.engine.tokens import parse_completion_token
from compensa.orchestrator.shared import records, timeline
from compensa.orchestrator.shared.errors import (
    AlreadyExists,
    CompensaError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    definition_not_registered,
    grpc_error_details,
    grpc_status_of,
    quote,
    saga_not_found,
)
from compensa.orchestrator.shared.limits import (
    BULK_ACTION_ID_PATTERN,
    MAX_PARTICIPANT_BURST,
    MAX_PARTICIPANT_CALLS_PER_SECOND,
    MAX_PARTICIPANT_IN_FLIGHT,
    MAX_STORED_ACTOR_CHARS,
    MAX_STUCK_FOR_SECONDS,
    SAGA_ID_PATTERN,
    check_duration,
    check_filter,
    check_int,
    check_saga_id,
    check_text,
    is_possible,
    stored_text,
)
from compensa.orchestrator.shared.selection import SagaSelection, for_action, parse_filter
from compensa.orchestrator.shared.timestamps import timestamp
from compensa.orchestrator.store import (
    AUDIT_JOB_COMPLETED,
    DEFAULT_PRIORITY,
    AuditJob,
    BulkJob,
    ParticipantAddress,
    ParticipantLimits,
)
from compensa.v1 import bulk_pb2, contract_pb2, definition_pb2, orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

log = logging.getLogger("compensa.service")

SERVICE_DESCRIPTOR = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"]
DEFAULT_PAGE_SIZE = 50
# How often AuditSagas looks whether its audit job is done.
_AUDIT_POLL_SECONDS = 0.2
MAX_PAGE_SIZE = 1000
#: A List page stops before this many bytes of items (AIP-158 lets a page be
#: shorter than page_size); it always holds at least one item.
MAX_PAGE_BYTES = 2 * 1024 * 1024
# Rows read from the store at a time while a page is filled.
_PAGE_READ_CHUNK = 100
#: The most events one WatchSagas message may carry (max_events_per_message).
MAX_EVENTS_PER_MESSAGE = 1000
#: The most sagas one PlanMigration may name (saga_ids).
MAX_PLANNED_SAGA_IDS = 1000
#: The longest a WatchSagas message may wait for more events (batch_window).
MAX_BATCH_WINDOW_SECONDS = 1.0
# WatchAlerts re-reads the alert log at least this often (alerts another
# replica raised, should its notification be lost), and at most this often
# when woken (other replicas' saga commits wake it too).
_ALERT_POLL_SECONDS = 1.0
_ALERT_READ_SPACING_SECONDS = 0.05

Request = TypeVar("Request")
Row = TypeVar("Row")
Cursor = TypeVar("Cursor")
Response = TypeVar("Response")
#: The server side of a call that takes a Request and answers Response(s).
Context: TypeAlias = grpc.aio.ServicerContext[Request, Response]


class UndecodableRequest:
    """What a request decodes to when its bytes are not the method's request
    message: the handler answers INVALID_ARGUMENT instead of running."""

    def __init__(self, method: str) -> None:
        self.method = method

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request is not a valid compensa.v1.{SERVICE_DESCRIPTOR.methods_by_name[self.method].input_type.name}"
            " message: send the serialized request message"
        )


# Causes of undecodable requests already logged: each is logged once.
_logged_decode_failures: set[tuple[str, str]] = set()
_MAX_LOGGED_DECODE_FAILURES = 100


def _lenient_deserializer(request_class: type[message.Message], method: str) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return request_class.FromString(data)
        except Exception as error:  # whatever the bytes are, the caller gets INVALID_ARGUMENT
            cause = (method, f"{type(error).__name__}: {str(error)[:200]}")
            if cause not in _logged_decode_failures and len(_logged_decode_failures) < _MAX_LOGGED_DECODE_FAILURES:
                _logged_decode_failures.add(cause)
                log.warning("%s: a request that does not decode (%s); answered INVALID_ARGUMENT", *cause)
            return UndecodableRequest(method)

    return deserialize


def service_handler(service: OrchestratorService) -> grpc.GenericRpcHandler:
    """The gRPC handler of OrchestratorService on `service`. Unlike the
    generated one, a request whose bytes do not decode reaches the handler
    (as an UndecodableRequest) and is answered INVALID_ARGUMENT, without a
    traceback in the log."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE_DESCRIPTOR.methods:
        make_handler = (
            grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make_handler(
            getattr(service, method.name),
            request_deserializer=_lenient_deserializer(message_factory.GetMessageClass(method.input_type), method.name),
            response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_DESCRIPTOR.full_name, handlers)


def _answer_errors(
    handler: Callable[[Any, Request, Context[Request, Response]], Awaitable[Response]],
) -> Callable[[Any, Request, Context[Request, Response]], Awaitable[Response]]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: Context[Request, Response]) -> Response:
        try:
            if isinstance(request, UndecodableRequest):
                raise request.error()
            self._admit(handler.__name__, context)
            return await handler(self, request, context)
        except CompensaError as error:
            self._refused_calls.note(error, handler.__name__, context.peer())
            code, message = grpc_status_of(error)
            await context.abort(code, message, grpc_error_details(error))
        except Exception as error:
            log.exception("%s failed", handler.__name__)
            code, message = grpc_status_of(error)
            await context.abort(code, message, grpc_error_details(error))
        raise AssertionError("unreachable")

    return wrapper


def _answer_stream_errors(
    handler: Callable[[Any, Request, Context[Request, Response]], AsyncIterator[Response]],
) -> Callable[[Any, Request, Context[Request, Response]], AsyncIterator[Response]]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: Context[Request, Response]) -> AsyncIterator[Response]:
        try:
            if isinstance(request, UndecodableRequest):
                raise request.error()
            identity = self._admit(handler.__name__, context)
            with self._streams.slot(_stream_client(identity, context)):
                async for item in handler(self, request, context):
                    yield item
        except CompensaError as error:
            self._refused_calls.note(error, handler.__name__, context.peer())
            code, message = grpc_status_of(error)
            await context.abort(code, message, grpc_error_details(error))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("%s failed", handler.__name__)
            code, message = grpc_status_of(error)
            await context.abort(code, message, grpc_error_details(error))

    return wrapper


def _stuck_seconds(stuck_for: duration_pb2.Duration) -> float:
    return check_duration(
        stuck_for, "stuck_for", minimum=0.0, maximum=MAX_STUCK_FOR_SECONDS, exclusive_minimum=True
    )


def _stuck_query(request: orchestrator_pb2.ListSagasRequest) -> list[int] | None:
    return [request.stuck_for.seconds, request.stuck_for.nanos] if request.HasField("stuck_for") else None


async def _fill_page(
    items: AsyncGenerator[tuple[message.Message, list[Any]], None], page_size: int
) -> tuple[list[message.Message], list[Any] | None]:
    """Up to `page_size` items, stopping before MAX_PAGE_BYTES (never before
    the first); and the position of the last one when more follow."""
    page: list[message.Message] = []
    size = 0
    last: list[Any] | None = None
    async with contextlib.aclosing(items):
        async for item, position in items:
            item_size = item.ByteSize()
            if len(page) == page_size or (page and size + item_size > MAX_PAGE_BYTES):
                return page, last
            page.append(item)
            size += item_size
            last = position
    return page, None


async def _read_in_chunks(
    read: Callable[[Cursor, int], Awaitable[Sequence[Row]]], cursor: Cursor, chunk_size: int,
    cursor_after: Callable[[Row], Cursor],
) -> AsyncGenerator[Row, None]:
    """Every row `read(cursor, chunk_size)` gives, chunk after chunk, until a
    chunk comes back short; `cursor_after(row)` resumes after a chunk's last row."""
    while True:
        chunk = await read(cursor, chunk_size)
        for row in chunk:
            yield row
        if len(chunk) < chunk_size:
            return
        cursor = cursor_after(chunk[-1])


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


def _peer_certificate(context: Context[Request, Response]) -> bytes | None:
    """The client certificate (DER) when the call came over mutual TLS (it
    was verified by then). Read whole, not through gRPC's name properties:
    those cut a name at a NUL byte and mix every kind of alternative name."""
    pem = next(iter(context.auth_context().get("x509_pem_cert", ())), None)
    return ssl.PEM_cert_to_DER_cert(pem.decode("ascii")) if pem is not None else None


def _stream_client(identity: Identity | None, context: Context[Request, Response]) -> str:
    """Whose stream this is, for the per-client limit: the verified identity,
    else the peer's address (an open API knows no better)."""
    if identity is not None and identity.how != "open":
        return f"{identity.how} {identity.name}"
    peer = context.peer()
    host = peer.rpartition(":")[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return f"client {host}"


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """The faces' settings (see ServerConfig): the largest request, and how
    watch streams buffer, re-read and are limited per client."""

    max_payload_bytes: int
    watch_buffer_events: int
    watch_reread_seconds: float
    max_streams_per_client: int
    max_sagas_in_flight: int


class OrchestratorService(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """compensa.v1.OrchestratorService over a SagaEngine.

    Every handler first admits the call (`_admit`): who calls, and whether
    their role allows the RPC; handlers over one saga also check the caller's
    definition scope.
    """

    def __init__(self, engine: SagaEngine, settings: ServiceSettings, access: AccessPolicy | None = None) -> None:
        self._engine = engine
        self._store = engine.store
        self._settings = settings
        self._max_payload = settings.max_payload_bytes
        self._logs = DeploymentLogs(
            engine.store,
            engine.changes,
            buffer_size=settings.watch_buffer_events,
            reread_seconds=settings.watch_reread_seconds,
        )
        self._access = access if access is not None else AccessPolicy()
        self._queries = SagaQueries(engine, self._access)
        self._streams = StreamLimit(settings.max_streams_per_client)
        self._admission = SagaAdmission(settings.max_sagas_in_flight, lambda: engine.sagas_driven, engine.metrics)
        self._refused_calls = RefusedCalls(engine.metrics.refused)
        # Live subscribers lag the tail by at most a buffer; catch-up readers share views too.
        self._event_views = EventViews(size=4 * settings.watch_buffer_events)

    @property
    def logs(self) -> DeploymentLogs:
        """The process's readers of the event log (one per database): the
        dashboard's live list follows them too."""
        return self._logs

    @property
    def stream_limit(self) -> StreamLimit:
        """Open streams per client, shared with the dashboard's live lists."""
        return self._streams

    @property
    def refused_calls(self) -> RefusedCalls:
        """Where refused calls are logged and counted, shared with the dashboard."""
        return self._refused_calls

    async def stop(self) -> None:
        """Stops the log readers behind the watch streams."""
        await self._logs.stop()

    async def _saga_view(self, saga: records.SagaRecord) -> saga_pb2.Saga:
        return await self._queries.saga_view(saga)

    def _caller(self, context: Context[Request, Response]) -> Identity:
        """Who calls: a bearer token in the metadata or the client certificate."""
        authorization = next(
            # Text, not bytes: only keys ending in -bin carry binary values.
            (
                value for key, value in context.invocation_metadata() or ()
                if key == "authorization" and isinstance(value, str)
            ),
            None,
        )
        return self._access.identify(_peer_certificate(context), authorization)

    def _admit(self, action: str, context: Context[Request, Response]) -> Identity | None:
        """Checks the caller's role for `action`; who it is (None on an open
        API for calls below operator: nothing to check, and the hot path
        stays free of it)."""
        if self._access.open and REQUIRED_ROLE[action] < Role.OPERATOR:
            return None
        identity = self._caller(context)
        self._access.authorize(identity, action)
        return identity

    def _in_scope(self, context: Context[Request, Response], action: str, definition_name: str) -> None:
        """PermissionDenied unless the caller may act on sagas of this definition."""
        if not self._access.open:
            self._access.authorize(self._caller(context), action, definition_name)

    def _all_in_scope(self, context: Context[Request, Response], action: str, definition_name: str) -> None:
        """For calls over many sagas: a caller limited to some definitions must filter on one."""
        if not self._access.open:
            self._access.require_scope(self._caller(context), action, definition_name)

    async def _existing(self, saga_id: str, context: Context[Request, Response]) -> records.SagaRecord:
        """The saga, if it exists and the caller may see it; NotFound alike otherwise."""
        return await self._queries.visible_saga(None if self._access.open else self._caller(context), saga_id)

    async def _operate(
        self, context: Context[Request, Response], action: str, saga_id: str, claimed: str, text: str
    ) -> saga_pb2.Saga:
        """An operator action, recorded with who did it. Its fields are
        checked before anything is read."""
        identity = self._caller(context)
        event = operator_event(action, identity.actor(claimed), text)
        if not is_possible(saga_id, "saga_id", SAGA_ID_PATTERN):
            raise saga_not_found(saga_id)
        if identity.definitions:
            await self._existing(saga_id, context)
        return await self._saga_view(await self._engine.apply_external(saga_id, event))

    def _actor(self, context: Context[Request, Response], claimed: str) -> str:
        """Who is acting, as recorded: the caller's identity with what it
        claims (`actor` of the request)."""
        return stored_text(self._caller(context).actor(claimed), MAX_STORED_ACTOR_CHARS)

    def _page_key(self) -> bytes:
        return self._engine.token_key

    def _resumed_at(self, query: list[Any], page_token: str) -> tuple[float, str] | None:
        """Where a list of sagas (or bulk actions) goes on: after the
        (created_at, id) in `page_token`, issued for this very `query`; None
        from the start."""
        if not page_token:
            return None
        position = read_page_token(self._page_key(), query, page_token)
        return (float(position[0]), str(position[1]))

    async def _sagas_after(
        self, after: tuple[float, str] | None, *, state: int, definition_name: str, updated_before: float | None,
        chunk: int, selection: SagaSelection | None = None,
    ) -> AsyncGenerator[records.SagaRecord, None]:
        """Sagas newest first from `after` on, read `chunk` at a time; only
        those `selection` selects, when given."""

        async def read(cursor: tuple[float, str] | None, size: int) -> list[records.SagaRecord]:
            return await self._store.list_sagas(
                state=state, definition_name=definition_name, updated_before=updated_before, page_size=size,
                after=cursor, selection=selection, now=self._engine.clock.now(),
            )

        sagas = _read_in_chunks(read, after, chunk, lambda saga: (saga.created_at, saga.saga_id))
        async with contextlib.aclosing(sagas):
            async for saga in sagas:
                yield saga

    # -- sagas

    @_answer_errors
    async def StartSaga(
        self,
        request: orchestrator_pb2.StartSagaRequest,
        context: Context[orchestrator_pb2.StartSagaRequest, orchestrator_pb2.StartSagaResponse],
    ) -> orchestrator_pb2.StartSagaResponse:
        with self._admission.starting():
            return await self._start_saga(request, context)

    async def _start_saga(
        self,
        request: orchestrator_pb2.StartSagaRequest,
        context: Context[orchestrator_pb2.StartSagaRequest, orchestrator_pb2.StartSagaResponse],
    ) -> orchestrator_pb2.StartSagaResponse:
        check_saga_id(request.saga_id)
        self._in_scope(context, "StartSaga", request.definition_name)
        if request.definition_version < 0:
            raise InvalidArgument(
                f"definition_version must be 0 (latest) or positive, got {request.definition_version}"
            )
        if not is_possible(request.definition_name, "definition_name", NAME_PATTERN):
            raise definition_not_registered(request.definition_name)
        priority = request.priority or DEFAULT_PRIORITY
        if not HIGHEST_PRIORITY <= priority <= LOWEST_PRIORITY:
            raise InvalidArgument(
                f"priority must be from {HIGHEST_PRIORITY} (highest) to {LOWEST_PRIORITY}, or 0 for the default"
                f" ({DEFAULT_PRIORITY}), got {request.priority}"
            )
        fingerprint = _start_fingerprint(request)
        started = await self._engine.start_saga(
            request.definition_name, request.definition_version, request.saga_id, request.input, fingerprint,
            caller_trace_parent=traceparent_in(context.invocation_metadata()), priority=priority,
        )
        if not started.created and started.fingerprint != fingerprint:
            raise AlreadyExists(
                f"saga {quote(request.saga_id)} already exists with a different definition or input; "
                "choose another saga_id"
            )
        return orchestrator_pb2.StartSagaResponse(
            saga=saga_message(started.saga, started.plan, started.flow), created=started.created
        )

    @_answer_errors
    async def GetSaga(
        self,
        request: orchestrator_pb2.GetSagaRequest,
        context: Context[orchestrator_pb2.GetSagaRequest, orchestrator_pb2.GetSagaResponse],
    ) -> orchestrator_pb2.GetSagaResponse:
        saga = await self._existing(request.saga_id, context)
        return orchestrator_pb2.GetSagaResponse(saga=await self._saga_view(saga))

    @_answer_errors
    async def GetSagaHistory(
        self,
        request: orchestrator_pb2.GetSagaHistoryRequest,
        context: Context[orchestrator_pb2.GetSagaHistoryRequest, orchestrator_pb2.GetSagaHistoryResponse],
    ) -> orchestrator_pb2.GetSagaHistoryResponse:
        saga = await self._existing(request.saga_id, context)
        return orchestrator_pb2.GetSagaHistoryResponse(history=await self._history(saga))

    async def _history(self, saga: records.SagaRecord) -> orchestrator_pb2.SagaHistory:
        """The saga as stored now, its log up to that sequence and its definition version."""
        plan = await self._engine.plan_for(saga.definition_name, saga.definition_version)
        return await read_history(self._store, saga, plan)

    @_answer_errors
    async def ListSagas(
        self,
        request: orchestrator_pb2.ListSagasRequest,
        context: Context[orchestrator_pb2.ListSagasRequest, orchestrator_pb2.ListSagasResponse],
    ) -> orchestrator_pb2.ListSagasResponse:
        page_size = _page_size(request.page_size)
        if request.state and request.state not in saga_pb2.SagaState.values():
            raise InvalidArgument(f"state {request.state} is not a SagaState")
        definition_name = check_filter(request.definition_name, "definition_name", NAME_PATTERN, "definition")
        self._all_in_scope(context, "ListSagas", definition_name)
        updated_before = None
        if request.HasField("stuck_for"):
            updated_before = self._engine.clock.now() - _stuck_seconds(request.stuck_for)
        query = ["ListSagas", request.state, definition_name, _stuck_query(request)]
        listed = self._sagas_after(
            self._resumed_at(query, request.page_token), state=request.state, definition_name=definition_name,
            updated_before=updated_before, chunk=min(page_size + 1, _PAGE_READ_CHUNK),
        )

        async def sagas() -> AsyncGenerator[tuple[message.Message, list[Any]], None]:
            async with contextlib.aclosing(listed):
                async for saga in listed:
                    yield await self._saga_view(saga), [saga.created_at, saga.saga_id]

        with self._store.tolerating_lag():
            page, last = await _fill_page(sagas(), page_size)
        return orchestrator_pb2.ListSagasResponse(
            sagas=page,  # type: ignore[arg-type]
            next_page_token=issue_page_token(self._page_key(), query, last) if last is not None else "",
        )

    @_answer_errors
    async def PlanMigration(
        self,
        request: orchestrator_pb2.PlanMigrationRequest,
        context: Context[orchestrator_pb2.PlanMigrationRequest, orchestrator_pb2.PlanMigrationResponse],
    ) -> orchestrator_pb2.PlanMigrationResponse:
        page_size = _page_size(request.page_size)
        if not request.HasField("definition"):
            raise InvalidArgument("definition is required: the new definition, as in a definition file")
        size = request.definition.ByteSize()
        if size > MAX_DEFINITION_BYTES:
            raise InvalidArgument(f"definition is {size} bytes serialized; the limit is {MAX_DEFINITION_BYTES}")
        if request.definition_version < 0:
            raise InvalidArgument(f"definition_version must be 0 (any) or positive, got {request.definition_version}")
        if request.state and request.state not in records.ACTIVE_SAGA_STATES:
            raise InvalidArgument(
                "state must be RUNNING or COMPENSATING (only sagas in flight move) or unspecified (both), got "
                + (saga_pb2.SagaState.Name(request.state) if request.state in saga_pb2.SagaState.values()
                   else str(request.state))
            )
        if len(request.saga_ids) > MAX_PLANNED_SAGA_IDS:
            raise InvalidArgument(f"saga_ids holds {len(request.saga_ids)} ids; the limit is {MAX_PLANNED_SAGA_IDS}")
        for index, saga_id in enumerate(request.saga_ids):
            check_saga_id(saga_id, f"saga_ids[{index}]")
        if request.filter and (request.definition_version or request.state or request.saga_ids):
            raise InvalidArgument(
                "filter selects the sagas on its own: leave definition_version, state and saga_ids unset"
                " (write them as filter terms: version=N state=RUNNING id=A,B)"
            )
        new = await asyncio.to_thread(validate_definition, request.definition, source="definition")
        name = new.name
        selection = _planned_selection(request.filter, name) if request.filter else None
        self._in_scope(context, "PlanMigration", name)
        version = selection.definition_version if selection is not None else request.definition_version
        old_versions = await self._versions(name, version)
        renames = check_step_mappings(request.step_mappings, old_versions, new)
        if request.saga_ids:
            chosen = await self._planned_sagas(request, name, context)
            plans = [classify(await self._history(saga), new, renames) for saga in chosen]
            return orchestrator_pb2.PlanMigrationResponse(plans=plans)
        query = ["PlanMigration", name, request.definition_version, request.state, request.filter]
        listed = self._sagas_after(
            self._resumed_at(query, request.page_token), state=request.state, definition_name=name,
            updated_before=None, chunk=_PAGE_READ_CHUNK, selection=selection,
        )

        async def planned() -> AsyncGenerator[tuple[message.Message, list[Any]], None]:
            async with contextlib.aclosing(listed):
                async for saga in listed:
                    in_flight = saga.state in records.ACTIVE_SAGA_STATES
                    if in_flight and request.definition_version in (0, saga.definition_version):
                        yield classify(await self._history(saga), new, renames), [saga.created_at, saga.saga_id]

        page, last = await _fill_page(planned(), page_size)
        return orchestrator_pb2.PlanMigrationResponse(
            plans=page,  # type: ignore[arg-type]
            next_page_token=issue_page_token(self._page_key(), query, last) if last is not None else "",
        )

    async def _versions(self, name: str, version: int) -> list[definition_pb2.SagaDefinition]:
        """The registered versions of `name` sagas may run on: `version`, or all of them (0)."""
        latest = await self._store.get_definition(name, version)
        if latest is None:
            raise await self._engine.definition_not_found(name, version)
        if version:
            return [latest]
        found = [latest]
        for number in range(latest.version - 1, 0, -1):
            older = await self._store.get_definition(name, number)
            if older is not None:
                found.append(older)
        return found

    async def _planned_sagas(
        self, request: orchestrator_pb2.PlanMigrationRequest, name: str,
        context: Context[orchestrator_pb2.PlanMigrationRequest, orchestrator_pb2.PlanMigrationResponse],
    ) -> list[records.SagaRecord]:
        """The sagas request.saga_ids names; NOT_FOUND for an unknown one,
        INVALID_ARGUMENT for one of another definition or version, or not in
        the state asked for."""
        chosen = []
        for saga_id in dict.fromkeys(request.saga_ids):
            saga = await self._existing(saga_id, context)
            if saga.definition_name != name:
                raise InvalidArgument(
                    f"saga {quote(saga_id)} runs definition {quote(saga.definition_name)}, not {quote(name)}"
                )
            if request.definition_version and saga.definition_version != request.definition_version:
                raise InvalidArgument(
                    f"saga {quote(saga_id)} runs version {saga.definition_version}, not {request.definition_version}"
                )
            if request.state and saga.state != request.state:
                raise InvalidArgument(
                    f"saga {quote(saga_id)} is {timeline.saga_state_name(saga.state)}, not"
                    f" {timeline.saga_state_name(request.state)}"
                )
            chosen.append(saga)
        return chosen

    @_answer_errors
    async def SummarizeSagas(
        self,
        request: orchestrator_pb2.SummarizeSagasRequest,
        context: Context[orchestrator_pb2.SummarizeSagasRequest, orchestrator_pb2.SummarizeSagasResponse],
    ) -> orchestrator_pb2.SummarizeSagasResponse:
        stuck = _stuck_seconds(request.stuck_for) if request.HasField("stuck_for") else DEFAULT_STUCK_SECONDS
        definition_name = check_filter(request.definition_name, "definition_name", NAME_PATTERN, "definition")
        self._all_in_scope(context, "SummarizeSagas", definition_name)
        now = self._engine.clock.now()
        with self._store.tolerating_lag():
            summaries = await self._store.summarize_sagas(definition_name=definition_name, stuck_before=now - stuck)
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
        if request.HasField("stuck_for"):
            response.stuck_for.CopyFrom(request.stuck_for)
        else:
            response.stuck_for.FromNanoseconds(round(stuck * 1e9))
        return response

    @_answer_errors
    async def CancelSaga(
        self,
        request: orchestrator_pb2.CancelSagaRequest,
        context: Context[orchestrator_pb2.CancelSagaRequest, orchestrator_pb2.CancelSagaResponse],
    ) -> orchestrator_pb2.CancelSagaResponse:
        saga = await self._operate(context, "CancelSaga", request.saga_id, request.actor, request.reason)
        return orchestrator_pb2.CancelSagaResponse(saga=saga)

    @_answer_errors
    async def RetrySaga(
        self,
        request: orchestrator_pb2.RetrySagaRequest,
        context: Context[orchestrator_pb2.RetrySagaRequest, orchestrator_pb2.RetrySagaResponse],
    ) -> orchestrator_pb2.RetrySagaResponse:
        saga = await self._operate(context, "RetrySaga", request.saga_id, request.actor, request.reason)
        return orchestrator_pb2.RetrySagaResponse(saga=saga)

    @_answer_errors
    async def ResolveSaga(
        self,
        request: orchestrator_pb2.ResolveSagaRequest,
        context: Context[orchestrator_pb2.ResolveSagaRequest, orchestrator_pb2.ResolveSagaResponse],
    ) -> orchestrator_pb2.ResolveSagaResponse:
        saga = await self._operate(context, "ResolveSaga", request.saga_id, request.actor, request.note)
        return orchestrator_pb2.ResolveSagaResponse(saga=saga)

    @_answer_errors
    async def CompleteStep(
        self,
        request: orchestrator_pb2.CompleteStepRequest,
        context: Context[orchestrator_pb2.CompleteStepRequest, orchestrator_pb2.CompleteStepResponse],
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
            event, wanted = machine.ExecuteSucceeded(step_name, output), records.STEP_SUCCEEDED
        elif request.result == orchestrator_pb2.COMPLETION_RESULT_FAILED:
            check_text(request.failure_reason, "failure_reason")
            event, wanted = machine.ExecuteFailed(step_name, request.failure_reason or "failed"), records.STEP_FAILED
        else:
            raise InvalidArgument("result must be COMPLETION_RESULT_SUCCEEDED or COMPLETION_RESULT_FAILED")
        saga = await self._existing(saga_id, context)
        plan = await self._engine.plan_for(saga.definition_name, saga.definition_version)
        if step_name not in plan.steps and (renamed := saga.step_keyed(step_name)) is not None:
            # The token was issued before a move renamed the step.
            step_name = renamed.name
            event = dataclasses.replace(event, step=step_name)
        if step_name not in plan.steps or not plan.steps[step_name].long_running:
            raise InvalidArgument(f"step {quote(step_name)} of saga {quote(saga_id)} is not a long-running step")
        state = saga.step(step_name).state
        if state == wanted:
            return orchestrator_pb2.CompleteStepResponse(saga=saga_message(saga, plan))
        if state not in (records.STEP_RUNNING, records.STEP_WAITING):
            raise FailedPrecondition(
                f"step {step_name!r} is {saga_pb2.StepState.Name(state)}; it no longer waits for an outcome"  # type: ignore[arg-type]
            )
        saga = await self._engine.apply_external(saga_id, event)
        return orchestrator_pb2.CompleteStepResponse(saga=saga_message(saga, plan))

    # -- watching

    @_answer_stream_errors
    async def WatchSaga(
        self,
        request: orchestrator_pb2.WatchSagaRequest,
        context: Context[orchestrator_pb2.WatchSagaRequest, orchestrator_pb2.WatchSagaResponse],
    ) -> AsyncIterator[orchestrator_pb2.WatchSagaResponse]:
        if request.after_sequence < 0:
            raise InvalidArgument(f"after_sequence must be 0 or positive, got {request.after_sequence}")
        saga_id = request.saga_id
        saga = await self._existing(saga_id, context)
        after = request.after_sequence
        if after and after == saga.sequence and saga.is_final and not request.follow_after_end:
            # A client reconnecting after the final event: nothing will follow.
            return
        if after == 0 and not request.replay_history:
            yield orchestrator_pb2.WatchSagaResponse(snapshot=await self._saga_view(saga))
            if saga.is_final and not request.follow_after_end:
                return
            after = saga.sequence
        async for batch in self._logs.tail_of(saga_id).follow(
            after,
            saga_id=saga_id,
            key=lambda stored: stored.event.sequence,
            read=lambda after: self._store.read_saga_events(saga_id, after, READ_BATCH),
        ):
            for stored in batch:
                yield orchestrator_pb2.WatchSagaResponse(event=self._event_views.of(stored))
                if stored.event.saga_state in records.FINAL_SAGA_STATES and not request.follow_after_end:
                    if await self._finished(saga_id, stored.event.sequence):
                        return

    async def _finished(self, saga_id: str, sequence: int) -> bool:
        """True if the saga is final at this sequence (an operator retry can
        reopen a FAILED saga, so the stream ends only at the real end)."""
        saga = await self._store.load_saga(saga_id)
        return saga is not None and saga.is_final and saga.sequence == sequence

    @_answer_stream_errors
    async def WatchSagas(
        self,
        request: orchestrator_pb2.WatchSagasRequest,
        context: Context[orchestrator_pb2.WatchSagasRequest, orchestrator_pb2.WatchSagasResponse],
    ) -> AsyncIterator[orchestrator_pb2.WatchSagasResponse]:
        after = await self._resumed_from(request.after_position, request.resume_token, EVENT_LOG)
        if not 0 <= request.max_events_per_message <= MAX_EVENTS_PER_MESSAGE:
            raise InvalidArgument(
                f"max_events_per_message must be from 0 to {MAX_EVENTS_PER_MESSAGE}, "
                f"got {request.max_events_per_message}"
            )
        batched = request.max_events_per_message > 1
        window = (
            check_duration(request.batch_window, "batch_window", minimum=0.0, maximum=MAX_BATCH_WINDOW_SECONDS)
            if request.HasField("batch_window") else 0.0
        )
        if window and not batched:
            raise InvalidArgument("batch_window needs max_events_per_message of 2 or more")
        if request.saga_state and request.saga_state not in saga_pb2.SagaState.values():
            raise InvalidArgument(f"saga_state {request.saga_state} is not a SagaState")
        definition_name = check_filter(request.definition_name, "definition_name", NAME_PATTERN, "definition")
        saga_state = request.saga_state
        self._all_in_scope(context, "WatchSagas", definition_name)
        database_ids = await self._logs.database_ids()
        positions = {database_ids[index]: position for index, position in after.items()}
        followed = self._logs.follow_all(
            after, wanted=(definition_name, saga_state), max_batch=request.max_events_per_message if batched else 1,
            window=window,
        )
        async with contextlib.aclosing(followed):
            async for index, batch in followed:
                positions[database_ids[index]] = batch[-1].position
                resume_token = issue_resume_token(EVENT_LOG, positions)
                if batched:
                    yield orchestrator_pb2.WatchSagasResponse(
                        events=[self._event_views.of(stored) for stored in batch], resume_token=resume_token
                    )
                else:
                    yield orchestrator_pb2.WatchSagasResponse(
                        event=self._event_views.of(batch[0]), resume_token=resume_token
                    )

    async def _resumed_from(self, after_position: int, resume_token: str, log: str) -> dict[int, int]:
        """Where a stream of every saga's events (or alerts) starts: the
        position after which each database's `log` is read, by database
        index (0 when left out)."""
        if after_position < 0:
            raise InvalidArgument(f"after_position must be 0 or positive, got {after_position}")
        if resume_token:
            if after_position:
                raise InvalidArgument("set after_position or resume_token, not both")
            positions = read_resume_token(log, resume_token)
            database_ids = await self._logs.database_ids()
            return {index: positions.get(database, 0) for index, database in enumerate(database_ids)}
        if after_position and self._logs.partitioned:
            raise InvalidArgument(
                "the sagas are partitioned over several databases, each with its own log positions: resume with"
                " a response's resume_token (after_position 0 reads from the start)"
            )
        return {0: after_position}

    @_answer_stream_errors
    async def WatchAlerts(
        self,
        request: orchestrator_pb2.WatchAlertsRequest,
        context: Context[orchestrator_pb2.WatchAlertsRequest, orchestrator_pb2.WatchAlertsResponse],
    ) -> AsyncIterator[orchestrator_pb2.WatchAlertsResponse]:
        after = await self._resumed_from(request.after_position, request.resume_token, ALERT_LOG)
        if not self._access.open:
            self._access.require_whole_deployment(self._caller(context), "WatchAlerts")
        database_ids = await self._logs.database_ids()
        positions = {database: after.get(index, 0) for index, database in enumerate(database_ids)}
        woken = asyncio.Event()
        # The history may come from the read database, until it has no more;
        # from then on the primary goes on from the same position.
        from_history = self._store.read_database_status() is not None
        # Subscribed before the first read: an alert committed meanwhile wakes it.
        with self._engine.alert_signal.on_change(woken.set), self._engine.changes.on_change(woken.set):
            while True:
                woken.clear()
                more = False
                for index, database in enumerate(database_ids):
                    # Each database's alert log in its order: reading past
                    # the last one sent misses nothing.
                    if from_history:
                        with self._store.tolerating_lag():
                            batch = await self._logs.read_alerts(index, positions[database])
                    else:
                        batch = await self._logs.read_alerts(index, positions[database])
                    for position, alert in batch:
                        positions[database] = position
                        yield orchestrator_pb2.WatchAlertsResponse(
                            alert=alert_message(alert), resume_token=issue_resume_token(ALERT_LOG, positions)
                        )
                    more = more or len(batch) == READ_BATCH
                if more:
                    continue
                if from_history:
                    from_history = False
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), _ALERT_POLL_SECONDS)
                await asyncio.sleep(_ALERT_READ_SPACING_SECONDS)

    # -- definitions

    @_answer_errors
    async def RegisterDefinition(
        self,
        request: orchestrator_pb2.RegisterDefinitionRequest,
        context: Context[orchestrator_pb2.RegisterDefinitionRequest, orchestrator_pb2.RegisterDefinitionResponse],
    ) -> orchestrator_pb2.RegisterDefinitionResponse:
        if not request.HasField("definition"):
            raise InvalidArgument("definition is required")
        size = request.definition.ByteSize()
        if size > MAX_DEFINITION_BYTES:
            raise InvalidArgument(f"definition is {size} bytes serialized; the limit is {MAX_DEFINITION_BYTES}")
        self._in_scope(context, "RegisterDefinition", request.definition.name)
        actor = self._actor(context, request.actor)
        registration = await self._engine.register_definition(
            request.definition, source="request", actor=actor, validate_only=request.validate_only
        )
        definition = registration.definition
        if registration.created and not request.validate_only:
            log.info("definition %s version %d registered by %s", definition.name, definition.version, actor)
        return orchestrator_pb2.RegisterDefinitionResponse(
            definition=definition, created=registration.created, diff=registration.diff,
            previous_latest_version=registration.previous.version if registration.previous else 0,
        )

    @_answer_errors
    async def PromoteDefinition(
        self,
        request: orchestrator_pb2.PromoteDefinitionRequest,
        context: Context[orchestrator_pb2.PromoteDefinitionRequest, orchestrator_pb2.PromoteDefinitionResponse],
    ) -> orchestrator_pb2.PromoteDefinitionResponse:
        possible = is_possible(request.name, "name", NAME_PATTERN)
        if request.version <= 0:
            raise InvalidArgument(f"version must be a registered version (positive), got {request.version}")
        actor = self._actor(context, request.actor)
        self._in_scope(context, "PromoteDefinition", request.name)
        if not possible:
            raise definition_not_registered(request.name)
        definition, changed = await self._engine.promote_definition(request.name, request.version, actor=actor)
        if changed:
            log.info("definition %s version %d made the latest by %s", definition.name, definition.version, actor)
        return orchestrator_pb2.PromoteDefinitionResponse(definition=definition, changed=changed)

    @_answer_errors
    async def GetDefinitionHistory(
        self,
        request: orchestrator_pb2.GetDefinitionHistoryRequest,
        context: Context[orchestrator_pb2.GetDefinitionHistoryRequest, orchestrator_pb2.GetDefinitionHistoryResponse],
    ) -> orchestrator_pb2.GetDefinitionHistoryResponse:
        possible = is_possible(request.name, "name", NAME_PATTERN)
        self._in_scope(context, "GetDefinitionHistory", request.name)
        changes = await self._store.definition_history(request.name) if possible else []
        if not changes:
            raise definition_not_registered(request.name)
        return orchestrator_pb2.GetDefinitionHistoryResponse(changes=[
            orchestrator_pb2.DefinitionChange(
                name=change.name, version=change.version, actor=change.actor,
                kind=orchestrator_pb2.DefinitionChangeKind.Value("DEFINITION_CHANGE_KIND_" + change.kind.upper()),
                change_time=timestamp(change.changed_at),
            )
            for change in changes
        ])

    @_answer_errors
    async def GetDefinition(
        self,
        request: orchestrator_pb2.GetDefinitionRequest,
        context: Context[orchestrator_pb2.GetDefinitionRequest, orchestrator_pb2.GetDefinitionResponse],
    ) -> orchestrator_pb2.GetDefinitionResponse:
        possible = is_possible(request.name, "name", NAME_PATTERN)
        if request.version < 0:
            raise InvalidArgument(f"version must be 0 (latest) or positive, got {request.version}")
        self._in_scope(context, "GetDefinition", request.name)
        if not possible:
            raise definition_not_registered(request.name)
        definition = await self._store.get_definition(request.name, request.version)
        if definition is None:
            raise await self._engine.definition_not_found(request.name, request.version)
        return orchestrator_pb2.GetDefinitionResponse(definition=definition)

    @_answer_errors
    async def ListDefinitions(
        self,
        request: orchestrator_pb2.ListDefinitionsRequest,
        context: Context[orchestrator_pb2.ListDefinitionsRequest, orchestrator_pb2.ListDefinitionsResponse],
    ) -> orchestrator_pb2.ListDefinitionsResponse:
        page_size = _page_size(request.page_size)
        caller = None if self._access.open else self._caller(context)
        query = ["ListDefinitions"]
        after = str(read_page_token(self._page_key(), query, request.page_token)[0]) if request.page_token else ""

        async def definitions() -> AsyncGenerator[tuple[message.Message, list[Any]], None]:
            chunks = _read_in_chunks(
                lambda cursor, size: self._store.list_definitions(size, cursor), after,
                min(page_size + 1, _PAGE_READ_CHUNK), lambda definition: definition.name,
            )
            async with contextlib.aclosing(chunks):
                async for definition in chunks:
                    if caller is None or caller.may_see(definition.name):
                        yield definition, [definition.name]

        page, last = await _fill_page(definitions(), page_size)
        return orchestrator_pb2.ListDefinitionsResponse(
            definitions=page,  # type: ignore[arg-type]
            next_page_token=issue_page_token(self._page_key(), query, last) if last is not None else "",
        )


    # -- participants

    @_answer_errors
    async def SetParticipant(
        self,
        request: orchestrator_pb2.SetParticipantRequest,
        context: Context[orchestrator_pb2.SetParticipantRequest, orchestrator_pb2.SetParticipantResponse],
    ) -> orchestrator_pb2.SetParticipantResponse:
        identity = self._caller(context)
        actor = stored_text(identity.actor(request.actor), MAX_STORED_ACTOR_CHARS)
        if not PARTICIPANT_NAME_PATTERN.fullmatch(request.name):
            raise InvalidArgument(
                f"name must be 1-64 letters, digits, '.', '_' or '-', got {quote(request.name)}"
            )
        _check_address(request.address)
        from_reflection = request.HasField("contract_from_reflection")
        if sum((request.clear_contract, request.HasField("contract"), from_reflection)) > 1:
            raise InvalidArgument("give one of contract, contract_from_reflection or clear_contract, not several")
        if request.force and not (request.HasField("contract") or from_reflection):
            raise InvalidArgument("force stores a contract that breaks definitions: give contract or"
                                  " contract_from_reflection with it (`--proto` or `--contract-from-reflection`)")
        _check_contract_size(request.contract)
        if identity.definitions:
            named = await self._store.definition_participants()
            self._access.require_settable_participant(identity, request.name, named)
        contract = request.contract if request.HasField("contract") else None
        if from_reflection:
            contract = await self._engine.reflected_contract(
                request.address, service=request.contract_from_reflection.service
            )
            _check_contract_size(contract)
        stored = await self._engine.set_participant(
            request.name, request.address, updated_by=actor or "unknown",
            contract=contract, clear_contract=request.clear_contract, force=request.force,
        )
        log.info("participant %s set to %s by %s", stored.name, stored.address, actor or "unknown")
        services = await self._engine.contract_services()
        return orchestrator_pb2.SetParticipantResponse(
            participant=_participant_message(stored, contract_service=services.get(request.name, ""))
        )

    async def _changing_participant(self, name: str, actor: str, context: Context[Request, Response]) -> str:
        """Who changes participant `name` (its limits or hold), once the
        caller may: the stored actor."""
        identity = self._caller(context)
        stored_actor = stored_text(identity.actor(actor), MAX_STORED_ACTOR_CHARS)
        if not PARTICIPANT_NAME_PATTERN.fullmatch(name):
            raise InvalidArgument(f"name must be 1-64 letters, digits, '.', '_' or '-', got {quote(name)}")
        if identity.definitions:
            named = await self._store.definition_participants()
            self._access.require_settable_participant(identity, name, named)
        return stored_actor or "unknown"

    @_answer_errors
    async def SetParticipantLimits(
        self,
        request: orchestrator_pb2.SetParticipantLimitsRequest,
        context: Context[orchestrator_pb2.SetParticipantLimitsRequest, orchestrator_pb2.SetParticipantLimitsResponse],
    ) -> orchestrator_pb2.SetParticipantLimitsResponse:
        limits = _participant_limits(request.limits)
        actor = await self._changing_participant(request.name, request.actor, context)
        stored = await self._engine.limit_participant(request.name, limits, updated_by=actor)
        return orchestrator_pb2.SetParticipantLimitsResponse(participant=_participant_message(stored))

    @_answer_errors
    async def HoldParticipant(
        self,
        request: orchestrator_pb2.HoldParticipantRequest,
        context: Context[orchestrator_pb2.HoldParticipantRequest, orchestrator_pb2.HoldParticipantResponse],
    ) -> orchestrator_pb2.HoldParticipantResponse:
        reason = check_text(request.reason, "reason") or "held by an operator"
        actor = await self._changing_participant(request.name, request.actor, context)
        stored = await self._engine.hold_participant(request.name, reason, by=actor)
        return orchestrator_pb2.HoldParticipantResponse(participant=_participant_message(stored))

    @_answer_errors
    async def ReleaseParticipant(
        self,
        request: orchestrator_pb2.ReleaseParticipantRequest,
        context: Context[orchestrator_pb2.ReleaseParticipantRequest, orchestrator_pb2.ReleaseParticipantResponse],
    ) -> orchestrator_pb2.ReleaseParticipantResponse:
        actor = await self._changing_participant(request.name, request.actor, context)
        stored = await self._engine.hold_participant(request.name, None, by=actor)
        return orchestrator_pb2.ReleaseParticipantResponse(participant=_participant_message(stored))

    @_answer_errors
    async def AuditSagas(
        self,
        request: orchestrator_pb2.AuditSagasRequest,
        context: Context[orchestrator_pb2.AuditSagasRequest, orchestrator_pb2.AuditSagasResponse],
    ) -> orchestrator_pb2.AuditSagasResponse:
        identity = self._caller(context)
        if not self._access.open:
            self._access.require_whole_deployment(identity, "AuditSagas")
        if request.audit_id and not BULK_ACTION_ID_PATTERN.fullmatch(request.audit_id):
            raise InvalidArgument(
                f"audit_id must be 1-64 letters, digits, '.', '_' or '-', got {quote(request.audit_id)}"
            )
        job = await self._store.get_audit_job(request.audit_id) if request.audit_id else None
        if job is None:
            options = _audit_options(request, self._engine.config)
            await check_participants(self._store, options.participants)
            while True:
                job, created = await enqueue_audit(
                    self._store, options, started_by=identity.actor(""), audit_id=request.audit_id
                )
                if created or job.audit_id == request.audit_id:
                    break
                # Another audit runs: one at a time, so this one starts after it.
                await self._audit_done(job.audit_id)
        done = await self._audit_done(job.audit_id)
        answer = audit_report_message(report_of(done))
        answer.audit_id = done.audit_id
        return answer

    async def _audit_done(self, audit_id: str) -> AuditJob:
        """The audit job once COMPLETED (whichever replica runs it), polled."""
        while True:
            job = await self._store.get_audit_job(audit_id)
            if job is None:
                raise NotFound(f"no audit job {quote(audit_id)}")
            if job.state == AUDIT_JOB_COMPLETED:
                return job
            await asyncio.sleep(_AUDIT_POLL_SECONDS)

    async def ListParticipants(
        self,
        request: orchestrator_pb2.ListParticipantsRequest,
        context: Context[orchestrator_pb2.ListParticipantsRequest, orchestrator_pb2.ListParticipantsResponse],
    ) -> orchestrator_pb2.ListParticipantsResponse:
        stored = await self._engine.refresh_participants()
        visible = await self._queries.visible_participants(None if self._access.open else self._caller(context))
        health = self._engine.participant_health
        services = await self._engine.contract_services()
        return orchestrator_pb2.ListParticipantsResponse(participants=[
            _participant_message(
                participant, health.seen(participant.name, participant.address), services.get(participant.name, "")
            )
            for participant in stored
            if visible is None or participant.name in visible
        ])


    # -- bulk actions

    @_answer_errors
    async def StartBulkAction(
        self,
        request: bulk_pb2.StartBulkActionRequest,
        context: Context[bulk_pb2.StartBulkActionRequest, bulk_pb2.StartBulkActionResponse],
    ) -> bulk_pb2.StartBulkActionResponse:
        identity = self._caller(context)
        actor = stored_text(identity.actor(request.actor), MAX_STORED_ACTOR_CHARS)
        selection = for_action(request.kind, parse_filter(request.filter))
        check_text(request.note, "note")
        if request.kind == bulk_pb2.BULK_ACTION_KIND_RESOLVE and not request.note.strip():
            raise InvalidArgument("note is required to resolve: say what was done to repair the flows")
        rate = request.max_sagas_per_second or DEFAULT_BULK_RATE
        if not math.isfinite(rate) or not 0 < rate <= MAX_BULK_RATE:
            raise InvalidArgument(f"max_sagas_per_second must be 0 (default {DEFAULT_BULK_RATE:g}) or up to"
                                  f" {MAX_BULK_RATE:g}, got {rate:g}")
        if request.request_id and not BULK_ACTION_ID_PATTERN.fullmatch(request.request_id):
            raise InvalidArgument(
                f"request_id must be 1-64 letters, digits, '.', '_' or '-', got {quote(request.request_id)}"
            )
        self._all_in_scope(context, "StartBulkAction", selection.definition_name)
        renames = await self._move_to(request, selection)
        if request.request_id and not request.validate_only:
            # A repeat (its answer was lost) finds the job, even once its sagas moved on.
            existing = await self._store.get_bulk_job(request.request_id)
            if existing is not None:
                self._visible_bulk_job(identity, existing)
                return bulk_pb2.StartBulkActionResponse(
                    bulk_action=bulk_action_message(existing), selected_count=existing.selected
                )
        now = self._engine.clock.now()
        count, sample = await self._store.count_selection(selection, now=now, sample_size=BULK_SAMPLE_SIZE)
        response = bulk_pb2.StartBulkActionResponse(
            selected_count=count, sample=[await self._saga_view(saga) for saga in sample]
        )
        if request.validate_only:
            return response
        job = BulkJob(
            bulk_action_id=request.request_id or uuid.uuid4().hex, kind=request.kind, filter=request.filter,
            selection=selection.to_message().SerializeToString(deterministic=True),
            definition_name=selection.definition_name, note=request.note, started_by=actor,
            state=bulk_pb2.BULK_ACTION_STATE_RUNNING, max_per_second=rate, created_at=now, updated_at=now,
            to_version=request.to_version, step_mappings=json.dumps(list(renames.items())) if renames else "",
        )
        stored, _ = await self._store.create_bulk_job(job, selection) if count else (None, False)
        if stored is None:
            raise FailedPrecondition(
                f"the filter selects no saga {_kind_name(request.kind)} applies to: no bulk action started"
            )
        self._visible_bulk_job(identity, stored)
        response.bulk_action.CopyFrom(bulk_action_message(stored))
        return response

    async def _move_to(self, request: bulk_pb2.StartBulkActionRequest, selection: SagaSelection) -> dict[str, str]:
        """A MOVE's step mappings (old -> new), once its target version and
        mappings are checked against the versions its filter selects;
        InvalidArgument naming what is wrong. Other kinds take neither."""
        if request.kind != bulk_pb2.BULK_ACTION_KIND_MOVE:
            if request.to_version or request.step_mappings:
                raise InvalidArgument(f"to_version and step_mappings are for MOVE only, not {_kind_name(request.kind)}")
            return {}
        name = selection.definition_name
        if not name:
            raise InvalidArgument(
                "filter: MOVE needs definition=NAME (the version the sagas move to is one of that definition's)"
            )
        if request.to_version <= 0:
            raise InvalidArgument(f"to_version is required for MOVE: a registered version of {quote(name)}")
        try:
            old_versions = await self._versions(name, selection.definition_version)
        except NotFound as error:
            raise InvalidArgument(f"filter: {error}") from None
        target = await self._store.get_definition(name, request.to_version)
        if target is None:
            raise InvalidArgument(f"to_version: {await self._engine.definition_not_found(name, request.to_version)}")
        return check_step_mappings(request.step_mappings, old_versions, target)

    @_answer_errors
    async def GetBulkAction(
        self,
        request: bulk_pb2.GetBulkActionRequest,
        context: Context[bulk_pb2.GetBulkActionRequest, bulk_pb2.GetBulkActionResponse],
    ) -> bulk_pb2.GetBulkActionResponse:
        job = await self._bulk_job(request.bulk_action_id, context)
        problems = await self._store.bulk_problems(job.bulk_action_id, BULK_PROBLEMS_SHOWN)
        return bulk_pb2.GetBulkActionResponse(
            bulk_action=bulk_action_message(job), problems=[bulk_item_message(item) for item in problems]
        )

    @_answer_errors
    async def ListBulkActions(
        self,
        request: bulk_pb2.ListBulkActionsRequest,
        context: Context[bulk_pb2.ListBulkActionsRequest, bulk_pb2.ListBulkActionsResponse],
    ) -> bulk_pb2.ListBulkActionsResponse:
        page_size = _page_size(request.page_size)
        caller = None if self._access.open else self._caller(context)
        query = ["ListBulkActions"]
        after = self._resumed_at(query, request.page_token)

        async def jobs() -> AsyncGenerator[tuple[message.Message, list[Any]], None]:
            chunks = _read_in_chunks(
                lambda cursor, size: self._store.list_bulk_jobs(size, cursor), after,
                min(page_size + 1, _PAGE_READ_CHUNK), lambda job: (job.created_at, job.bulk_action_id),
            )
            async with contextlib.aclosing(chunks):
                async for job in chunks:
                    if caller is None or caller.may_see(job.definition_name):
                        yield bulk_action_message(job), [job.created_at, job.bulk_action_id]

        page, last = await _fill_page(jobs(), page_size)
        return bulk_pb2.ListBulkActionsResponse(
            bulk_actions=page,  # type: ignore[arg-type]
            next_page_token=issue_page_token(self._page_key(), query, last) if last is not None else "",
        )

    @_answer_errors
    async def PauseBulkAction(
        self,
        request: bulk_pb2.PauseBulkActionRequest,
        context: Context[bulk_pb2.PauseBulkActionRequest, bulk_pb2.PauseBulkActionResponse],
    ) -> bulk_pb2.PauseBulkActionResponse:
        job = await self._command_bulk_job(request.bulk_action_id, context, "pause")
        return bulk_pb2.PauseBulkActionResponse(bulk_action=job)

    @_answer_errors
    async def ResumeBulkAction(
        self,
        request: bulk_pb2.ResumeBulkActionRequest,
        context: Context[bulk_pb2.ResumeBulkActionRequest, bulk_pb2.ResumeBulkActionResponse],
    ) -> bulk_pb2.ResumeBulkActionResponse:
        job = await self._command_bulk_job(request.bulk_action_id, context, "resume")
        return bulk_pb2.ResumeBulkActionResponse(bulk_action=job)

    @_answer_errors
    async def CancelBulkAction(
        self,
        request: bulk_pb2.CancelBulkActionRequest,
        context: Context[bulk_pb2.CancelBulkActionRequest, bulk_pb2.CancelBulkActionResponse],
    ) -> bulk_pb2.CancelBulkActionResponse:
        job = await self._command_bulk_job(request.bulk_action_id, context, "cancel")
        return bulk_pb2.CancelBulkActionResponse(bulk_action=job)

    async def _bulk_job(self, bulk_action_id: str, context: Context[Request, Response]) -> BulkJob:
        """The job, if it exists and the caller may see it; NotFound alike otherwise."""
        caller = None if self._access.open else self._caller(context)
        return await self._queries.visible_bulk_job(caller, bulk_action_id)

    @staticmethod
    def _visible_bulk_job(identity: Identity, job: BulkJob) -> None:
        if not visible_bulk_job(identity, job):
            raise NotFound(f"bulk action {quote(job.bulk_action_id)} not found")

    async def _command_bulk_job(
        self, bulk_action_id: str, context: Context[Request, Response], command: str
    ) -> bulk_pb2.BulkAction:
        job = await self._bulk_job(bulk_action_id, context)
        return bulk_action_message(await command_bulk_job(self._store, job, command, self._engine.clock.now()))


#: StartBulkAction's default and highest rate, in sagas per second.
DEFAULT_BULK_RATE = 100.0
MAX_BULK_RATE = 10_000.0
#: Sagas a StartBulkAction answer shows of its selection.
BULK_SAMPLE_SIZE = 10
#: Skipped and failed sagas GetBulkAction shows.
BULK_PROBLEMS_SHOWN = 100


def _planned_selection(text: str, name: str) -> SagaSelection:
    """The sagas a PlanMigration filter selects: in flight, of definition `name`."""
    return for_action(bulk_pb2.BULK_ACTION_KIND_MOVE, parse_filter(text, definition_name=name))


def _kind_name(kind: int) -> str:
    return bulk_pb2.BulkActionKind.Name(kind).removeprefix("BULK_ACTION_KIND_")  # type: ignore[arg-type]


def _audit_options(request: orchestrator_pb2.AuditSagasRequest, config: EngineConfig) -> AuditOptions:
    """What AuditSagas asks for; InvalidArgument naming a field out of range."""
    options = AuditOptions(
        since=request.since.ToNanoseconds() / 1e9 if request.HasField("since") else None,
        definition_name=request.definition_name, participants=tuple(request.participants),
        participant_tls=config.participant_tls, commit_lag=config.database_timeout,
    )
    if request.HasField("barrier_retention"):
        options = dataclasses.replace(options, barrier_retention=check_duration(
            request.barrier_retention, "barrier_retention", minimum=0.0, maximum=MAX_STUCK_FOR_SECONDS,
            exclusive_minimum=True,
        ))
    if request.HasField("settle_grace"):
        options = dataclasses.replace(options, settle_grace=check_duration(
            request.settle_grace, "settle_grace", minimum=0.0, maximum=MAX_STUCK_FOR_SECONDS
        ))
    if request.HasField("clock_skew_margin"):
        options = dataclasses.replace(options, clock_skew_margin=check_duration(
            request.clock_skew_margin, "clock_skew_margin", minimum=0.0, maximum=MAX_STUCK_FOR_SECONDS
        ))
    return options


PARTICIPANT_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]{1,253}):(?P<port>[0-9]{1,5})")


def _check_contract_size(contract: contract_pb2.ParticipantContract) -> None:
    size = contract.ByteSize()
    if size > MAX_DEFINITION_BYTES:
        raise InvalidArgument(f"contract is {size} bytes serialized; the limit is {MAX_DEFINITION_BYTES}")


def _check_address(address: str) -> None:
    match = _HOST_PORT.fullmatch(address) if len(address) <= MAX_REFERENCE_CHARS else None
    if match is None or not 0 < int(match["port"]) < 65536:
        raise InvalidArgument(f"address must be HOST:PORT with a port from 1 to 65535, got {quote(address)}")


def _participant_limits(message: orchestrator_pb2.ParticipantLimits) -> ParticipantLimits:
    """The limits a SetParticipantLimits asks for, if they can hold."""
    max_in_flight = rate = burst = None
    if message.HasField("max_in_flight"):
        max_in_flight = check_int(
            message.max_in_flight, "limits.max_in_flight", minimum=1, maximum=MAX_PARTICIPANT_IN_FLIGHT
        )
    if message.HasField("calls_per_second"):
        rate = message.calls_per_second
        if not 0 < rate <= MAX_PARTICIPANT_CALLS_PER_SECOND:  # NaN too
            raise InvalidArgument(
                f"limits.calls_per_second must be above 0 and at most {MAX_PARTICIPANT_CALLS_PER_SECOND:g}, got {rate}"
            )
        burst = min(MAX_PARTICIPANT_BURST, math.ceil(rate))
    if message.HasField("burst"):
        if rate is None:
            raise InvalidArgument("limits.burst needs limits.calls_per_second: a burst is of a rate")
        burst = check_int(message.burst, "limits.burst", minimum=1, maximum=MAX_PARTICIPANT_BURST)
    return ParticipantLimits(max_in_flight, rate, burst)


def _participant_message(
    stored: ParticipantAddress, seen: ProbeOutcome | None = None, contract_service: str = ""
) -> orchestrator_pb2.Participant:
    return orchestrator_pb2.Participant(
        name=stored.name, address=stored.address, update_time=timestamp(stored.updated_at),
        updated_by=stored.updated_by,
        health=seen.health if seen is not None else orchestrator_pb2.PARTICIPANT_HEALTH_UNSPECIFIED,
        health_detail=seen.detail if seen is not None else "",
        unhealthy_since=timestamp(stored.unhealthy_since), alert_time=timestamp(stored.alerted_at),
        limits=orchestrator_pb2.ParticipantLimits(
            max_in_flight=stored.limits.max_in_flight, calls_per_second=stored.limits.rate_per_second,
            burst=stored.limits.burst,
        ) if stored.limits.limited else None,
        hold=orchestrator_pb2.ParticipantHold(
            reason=stored.hold.reason, held_by=stored.hold.by, hold_time=timestamp(stored.hold.at)
        ) if stored.hold is not None else None,
        contract_service=contract_service,
    )
