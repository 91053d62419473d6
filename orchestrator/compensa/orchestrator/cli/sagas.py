"""The saga commands, clients of a running orchestrator: start, get, list,
status, watch, and the operator's cancel, retry and resolve."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compensa.common.retry import Backoff
from compensa.orchestrator.api.history_checks import history_file_text
from compensa.orchestrator.cli.connection import RECONNECT_QUICKLY, open_channel
from compensa.orchestrator.cli.exit_codes import EXIT_OK, EXIT_SAGA_ENDED_BADLY
from compensa.orchestrator.cli.output import (
    DefinitionTypes,
    error_text,
    json_line,
    print_alert,
    print_events,
    print_saga,
    print_saga_table,
    print_status,
    use_color,
)
from compensa.orchestrator.cli.waiting import WaitReporter
from compensa.orchestrator.shared import payloads, timeline
from compensa.orchestrator.shared.errors import CompensaError
from compensa.orchestrator.shared.records import done_for_good
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2

_Message = TypeVar("_Message")

#: `compensa watch --all` asks for up to this many events per message: a busy
#: system costs the server one message per batch, not per event.
_WATCH_ALL_BATCH = 100
#: What ends `compensa watch ID`: the saga is done for good.
_END_EVENTS = frozenset(
    {saga_pb2.EVENT_TYPE_SAGA_SUCCEEDED, saga_pb2.EVENT_TYPE_SAGA_COMPENSATED, saga_pb2.EVENT_TYPE_OPERATOR_RESOLVED}
)
#: Stream errors after which `watch` opens the stream again (a replica stopping
#: cancels its streams).
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED})
#: Waits between reopenings of a broken stream.
_RECONNECT_BACKOFF = Backoff(initial=0.05, cap=2.0)


def start(args: argparse.Namespace) -> int:
    """`compensa start`: starts a saga (idempotent with --saga-id); with --wait
    follows it to its end and exits 1 unless it SUCCEEDED."""
    payloads.import_proto_modules(args.proto_module)
    with open_channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        definition = stub.GetDefinition(
            orchestrator_pb2.GetDefinitionRequest(name=args.definition, version=args.version),
            timeout=args.timeout,
        ).definition
        saga_input = payloads.pack_json(definition.input_type, _input_text(args.input), payloads.pool_of(definition))
        saga_id: str = args.saga_id or str(uuid.uuid4())
        response = stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(
                saga_id=saga_id,
                definition_name=definition.name,
                definition_version=definition.version,
                input=saga_input,
                priority=args.priority,
            ),
            timeout=args.timeout,
        )
        if not args.wait:
            if args.json:
                print_saga(args, response.saga, stub=stub)
            else:
                print(saga_id)
            return EXIT_OK
        if not args.json:
            created = "started" if response.created else "already existed"
            print(f"saga {saga_id} {created}")
        watch = stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True))
        with WaitReporter(stub, saga_id, args.timeout) as reporter:
            print_events(args, reporter.passing(response.event for response in watch))
        saga = stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id), timeout=args.timeout).saga
        if not args.json:
            print(timeline.format_saga(saga, color=use_color()))
        return EXIT_OK if saga.state == saga_pb2.SAGA_STATE_SUCCEEDED else EXIT_SAGA_ENDED_BADLY


def _input_text(given: str) -> str:
    """--input's JSON: the text itself, or @FILE's contents (@- reads stdin)."""
    if not given.startswith("@"):
        return given
    source = given[1:]
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as error:
        raise CompensaError(f"--input {given}: cannot read {source}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise CompensaError(f"--input {given}: {source} is not UTF-8 text") from None


def get(args: argparse.Namespace) -> int:
    """`compensa get ID`: the saga and its steps; with --history, the history
    file that replay reads."""
    if args.history:
        with open_channel(args) as channel:
            history = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).GetSagaHistory(
                orchestrator_pb2.GetSagaHistoryRequest(saga_id=args.saga_id), timeout=args.timeout
            ).history
        print(history_file_text(history))
        return EXIT_OK
    return _print_answered_saga(
        args, lambda stub: stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=args.saga_id), timeout=args.timeout)
    )


def list_sagas(args: argparse.Namespace) -> int:
    """`compensa list`: sagas newest first, one page or --all."""
    request = orchestrator_pb2.ListSagasRequest(
        state=args.state or saga_pb2.SAGA_STATE_UNSPECIFIED,
        definition_name=args.definition,
        page_size=args.page_size,
        stuck_for=args.stuck,
    )
    listed: list[saga_pb2.Saga] = []  # without --json, printed at the end in aligned columns
    with open_channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        types = DefinitionTypes(stub, args.timeout)
        while True:
            response = stub.ListSagas(request, timeout=args.timeout)
            if args.json:
                for saga in response.sagas:
                    print(types.saga_json(saga))
            else:
                listed.extend(response.sagas)
            if not args.all or not response.next_page_token:
                break
            request.page_token = response.next_page_token
    if not args.json:
        print_saga_table(listed)
        if response.next_page_token:
            print(f"(more: --all, or page token {response.next_page_token})", file=sys.stderr)
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    """`compensa status`: sagas counted by definition and state."""
    request = orchestrator_pb2.SummarizeSagasRequest(definition_name=args.definition, stuck_for=args.stuck)
    with open_channel(args) as channel:
        response = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).SummarizeSagas(request, timeout=args.timeout)
    if args.json:
        print(json_line(response))
    else:
        print_status(response)
    return EXIT_OK


def watch(args: argparse.Namespace) -> int:
    """`compensa watch ID` or `compensa watch --all`: events as they happen,
    across orchestrator restarts."""
    if args.all and args.saga_id:
        raise CompensaError("give a saga ID or --all, not both")
    if not args.all and not args.saga_id:
        raise CompensaError("watch needs a saga ID (compensa watch ID), or --all for every saga's events")
    with open_channel(args, options=RECONNECT_QUICKLY) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        if args.all:
            # Answers, or the error is the command's: resumed only once it was reached.
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
            _watch_all(args, stub)
        else:
            saga = stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=args.saga_id), timeout=args.timeout).saga
            if args.after >= saga.sequence and done_for_good(saga):
                return EXIT_OK
            _watch_saga(args, stub)
    return EXIT_OK


def alerts(args: argparse.Namespace) -> int:
    """`compensa alerts`: the alert log from `--after`, then alerts as they
    are raised, across orchestrator restarts (or until `--limit` of them)."""
    last: int = args.after
    printed = 0
    with open_channel(args, options=RECONNECT_QUICKLY) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        # Answers, or the error is the command's: resumed only once it was reached.
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)

        def open_stream() -> Iterable[orchestrator_pb2.WatchAlertsResponse]:
            return stub.WatchAlerts(orchestrator_pb2.WatchAlertsRequest(after_position=last))

        def show(response: orchestrator_pb2.WatchAlertsResponse) -> bool:
            nonlocal last, printed
            if response.alert.position > last:
                last = response.alert.position
                printed += 1
                print_alert(args, response.alert)
            return bool(args.limit) and printed >= args.limit

        _follow(open_stream, show)
    return EXIT_OK


def cancel(args: argparse.Namespace) -> int:
    """`compensa cancel ID`: asks a running saga to stop and compensate."""
    request = orchestrator_pb2.CancelSagaRequest(saga_id=args.saga_id, reason=args.reason, actor=args.actor)
    return _print_answered_saga(args, lambda stub: stub.CancelSaga(request, timeout=args.timeout))


def retry(args: argparse.Namespace) -> int:
    """`compensa retry ID`: runs a FAILED saga's failed compensations again."""
    request = orchestrator_pb2.RetrySagaRequest(saga_id=args.saga_id, reason=args.reason, actor=args.actor)
    return _print_answered_saga(args, lambda stub: stub.RetrySaga(request, timeout=args.timeout))


def resolve(args: argparse.Namespace) -> int:
    """`compensa resolve ID --note ...`: marks a FAILED saga as resolved by hand."""
    request = orchestrator_pb2.ResolveSagaRequest(saga_id=args.saga_id, note=args.note, actor=args.actor)
    return _print_answered_saga(args, lambda stub: stub.ResolveSaga(request, timeout=args.timeout))


class _SagaAnswer(Protocol):
    """Any response that carries a saga (GetSaga's, CancelSaga's, ...)."""

    @property
    def saga(self) -> saga_pb2.Saga: ...


def _print_answered_saga(
    args: argparse.Namespace, call: Callable[[orchestrator_pb2_grpc.OrchestratorServiceStub], _SagaAnswer]
) -> int:
    with open_channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        print_saga(args, call(stub).saga, stub=stub)
    return EXIT_OK


def _watch_saga(args: argparse.Namespace, stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> None:
    """Prints the saga's events until its real end: SUCCEEDED, COMPENSATED,
    or FAILED and resolved by a person (a FAILED saga may still be retried)."""
    last: int = args.after

    def open_stream() -> Iterable[orchestrator_pb2.WatchSagaResponse]:
        return stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(
            saga_id=args.saga_id, after_sequence=last, replay_history=True, follow_after_end=True,
        ))

    def show(response: orchestrator_pb2.WatchSagaResponse) -> bool:
        nonlocal last
        event = response.event
        if event.sequence > last:
            last = event.sequence
            print_events(args, [event])
        return event.type in _END_EVENTS

    _follow(open_stream, show)


def _watch_all(args: argparse.Namespace, stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> None:
    """Prints every saga's events in log order, forever, resuming after the
    last message printed when the stream breaks (an orchestrator restart):
    from its resume token, which says where each database's log stands when
    the sagas are partitioned over several."""
    last: int = args.after
    resume_token = ""

    def open_stream() -> Iterable[orchestrator_pb2.WatchSagasResponse]:
        return stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(
            definition_name=args.definition, after_position=0 if resume_token else last, resume_token=resume_token,
            max_events_per_message=_WATCH_ALL_BATCH,
        ))

    def show(batch: orchestrator_pb2.WatchSagasResponse) -> bool:
        nonlocal last, resume_token
        # A server without resume tokens is resumed by position (one log).
        fresh = list(batch.events) if batch.resume_token else [e for e in batch.events if e.position > last]
        resume_token = batch.resume_token
        if fresh:
            last = fresh[-1].position
            print_events(args, fresh, with_saga_id=True)
        return False

    _follow(open_stream, show)


def _follow(open_stream: Callable[[], Iterable[_Message]], show: Callable[[_Message], bool]) -> None:
    """Passes each message of `open_stream()` to `show` until it returns True
    or the stream ends. A stream broken by UNAVAILABLE, CANCELLED or
    DEADLINE_EXCEEDED (an orchestrator restarting) is opened again, with
    backoff, for as long as it takes; one line on stderr per break."""
    waits = _RECONNECT_BACKOFF.waits()
    lost = False
    while True:
        try:
            for message in open_stream():
                if lost:
                    print("reconnected", file=sys.stderr, flush=True)
                    lost = False
                    waits.reset()
                if show(message):
                    return
            return
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call) or error.code() not in _RESUMABLE:
                raise
            if not lost:
                print(f"connection lost ({error_text(error)}); reconnecting", file=sys.stderr, flush=True)
                lost = True
        time.sleep(waits.next())
