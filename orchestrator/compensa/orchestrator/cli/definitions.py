"""The commands about what sagas are made of, clients of a running
orchestrator: register (definition files), definitions (list or show) and
participants (list, or set where one is served)."""

from __future__ import annotations

import argparse
import datetime
import json
import re

from compensa.orchestrator.cli.connection import open_channel
from compensa.orchestrator.cli.exit_codes import EXIT_OK
from compensa.orchestrator.cli.output import definition_dict, json_line
from compensa.orchestrator.definitions import (
    DEFINITION_SUFFIXES,
    compile_proto_files,
    load_definitions,
    read_descriptor_set,
)
from compensa.orchestrator.shared.errors import CompensaError
from compensa.v1 import orchestrator_pb2, orchestrator_pb2_grpc


def register(args: argparse.Namespace) -> int:
    """`compensa register PATH...`: every definition file is checked, then each is registered."""
    types = None
    if args.proto:
        types = compile_proto_files(args.proto, args.proto_path)
    elif args.descriptor_set:
        types = read_descriptor_set(args.descriptor_set)
    # Checked here first: an invalid file is named before anything is registered.
    definitions = load_definitions(args.paths, types=types)
    if not definitions:
        raise CompensaError(
            f"no definition files ({', '.join('*' + suffix for suffix in DEFINITION_SUFFIXES)}) in "
            + ", ".join(str(path) for path in args.paths)
        )
    with open_channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        for definition in definitions:
            response = stub.RegisterDefinition(
                orchestrator_pb2.RegisterDefinitionRequest(
                    definition=definition, validate_only=args.dry_run, actor=args.actor
                ),
                timeout=args.timeout,
            )
            print(_registration_text(response, dry_run=args.dry_run))
    return EXIT_OK


def _registration_text(response: orchestrator_pb2.RegisterDefinitionResponse, *, dry_run: bool) -> str:
    """What registering did (or, dry run, would do), then the diff from the latest version."""
    definition = response.definition
    head = f"{definition.name} version {definition.version}"
    latest = response.previous_latest_version
    if not response.created:
        state = "the latest" if latest == definition.version else f"not the latest (version {latest} is)"
        return f"{head}: unchanged, already registered ({state})"
    if dry_run:
        what = f"would be registered as the latest, after version {latest}" if latest else "would be registered"
        return f"{head}: {what} (dry run: nothing registered)" + (f"\n{response.diff}" if response.diff else "")
    what = f"registered, the latest now (was version {latest})" if latest else "registered"
    return f"{head}: {what}" + (f"\n{response.diff}" if response.diff else "")


def show_definitions(args: argparse.Namespace) -> int:
    """`compensa definitions [NAME]`: the latest version of each definition, or one in full."""
    if args.name in _DEFINITION_ACTIONS and args.target:
        return _DEFINITION_ACTIONS[args.name](args)
    if args.target:
        raise CompensaError(
            f"definitions takes one NAME, got {args.name!r} and {args.target!r}"
            " (did you mean: definitions history NAME, or definitions promote NAME --version N?)"
        )
    if args.version and not args.name:
        raise CompensaError("--version needs a NAME")
    with open_channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        if args.name:
            definition = stub.GetDefinition(
                orchestrator_pb2.GetDefinitionRequest(name=args.name, version=args.version), timeout=args.timeout
            ).definition
            print(json.dumps(definition_dict(definition), indent=2))
            return EXIT_OK
        request = orchestrator_pb2.ListDefinitionsRequest()
        if not args.json:
            print(f"{'NAME':<24} {'VERSION':>7} {'STEPS':>5}  DESCRIPTION")
        while True:
            response = stub.ListDefinitions(request, timeout=args.timeout)
            for definition in response.definitions:
                if args.json:
                    print(json_line(definition))
                else:
                    print(f"{definition.name:<24} {definition.version:>7} {len(definition.steps):>5}  "
                          f"{definition.description}")
            if not response.next_page_token:
                return EXIT_OK
            request.page_token = response.next_page_token


def _promote(args: argparse.Namespace) -> int:
    """`compensa definitions promote NAME --version N`: version N becomes the latest again."""
    if not args.version:
        raise CompensaError("definitions promote needs --version N: the version to make the latest")
    with open_channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        response = stub.PromoteDefinition(
            orchestrator_pb2.PromoteDefinitionRequest(name=args.target, version=args.version, actor=args.actor),
            timeout=args.timeout,
        )
    definition = response.definition
    what = "is the latest now" if response.changed else "unchanged, already the latest"
    print(json_line(response) if args.json else f"{definition.name} version {definition.version}: {what}")
    return EXIT_OK


def _history(args: argparse.Namespace) -> int:
    """`compensa definitions history NAME`: who made which version the latest, oldest first."""
    with open_channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        changes = stub.GetDefinitionHistory(
            orchestrator_pb2.GetDefinitionHistoryRequest(name=args.target), timeout=args.timeout
        ).changes
    if args.json:
        for change in changes:
            print(json_line(change))
        return EXIT_OK
    print(f"{'TIME (UTC)':<20} {'VERSION':>7}  {'CHANGE':<10} BY")
    for change in changes:
        when = change.change_time.ToDatetime(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        kind = orchestrator_pb2.DefinitionChangeKind.Name(change.kind).removeprefix("DEFINITION_CHANGE_KIND_").lower()
        print(f"{when:<20} {change.version:>7}  {kind:<10} {change.actor or '-'}")
    return EXIT_OK


_DEFINITION_ACTIONS = {"promote": _promote, "history": _history}


def participants(args: argparse.Namespace) -> int:
    """`compensa participants [list]`, `set NAME HOST:PORT`, `limit NAME ...`,
    `hold NAME [--reason TEXT]` or `release NAME`."""
    with open_channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        if args.action in ("limit", "hold", "release"):
            if not args.name or args.participant_address:
                raise CompensaError(f"participants {args.action} needs a NAME (and no ADDRESS)")
            changed = _change_participant(stub, args)
            print(json_line(changed) if args.json else _participant_line(changed))
            return EXIT_OK
        if args.action == "set":
            if not args.name or not args.participant_address:
                raise CompensaError("participants set needs a NAME and an ADDRESS (HOST:PORT)")
            request = orchestrator_pb2.SetParticipantRequest(
                name=args.name, address=args.participant_address, actor=args.actor,
                clear_contract=args.clear_contract, force=args.force,
            )
            if args.proto is not None:
                request.contract.service = args.service
                request.contract.types.CopyFrom(compile_proto_files([args.proto], args.proto_path))
            elif args.contract_from_reflection:
                request.contract_from_reflection.service = args.service
            stored = stub.SetParticipant(request, timeout=args.timeout).participant
            contract = f" (contract {stored.contract_service})" if stored.contract_service else ""
            print(json_line(stored) if args.json else f"{stored.name} -> {stored.address}{contract}")
            return EXIT_OK
        if args.name or args.participant_address:
            raise CompensaError("participants list takes no NAME or ADDRESS (did you mean: participants set?)")
        listed = stub.ListParticipants(orchestrator_pb2.ListParticipantsRequest(), timeout=args.timeout).participants
    if args.json:
        for participant in listed:
            print(json_line(participant))
        return EXIT_OK
    print(f"{'NAME':<24} {'ADDRESS':<32} {'HEALTH':<10} UPDATED BY")
    for participant in listed:
        print(f"{participant.name:<24} {participant.address:<32} {_health(participant):<10} {participant.updated_by}")
        if participant.HasField("hold") or _has_limits(participant.limits):
            print(f"    {_participant_line(participant).partition(': ')[2]}")
        if participant.contract_service:
            print(f"    contract: {participant.contract_service}")
        if participant.health == orchestrator_pb2.PARTICIPANT_HEALTH_FAILING:
            print(f"    failing: {participant.health_detail}")
        if participant.HasField("unhealthy_since"):
            since = participant.unhealthy_since.ToDatetime(datetime.UTC).isoformat(timespec="seconds")
            alerted = " (alerted)" if participant.HasField("alert_time") else ""
            print(f"    no replica has reached it since {since}{alerted}")
    return EXIT_OK


_RATE = re.compile(r"(?P<count>[0-9]+(?:\.[0-9]+)?)(?:/(?P<per>s|sec|second|m|min|minute))?")


def _rate(text: str) -> float:
    """100/s, 600/min or a bare number per second."""
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise CompensaError(f"--rate must be calls per second or minute, e.g. 100/s or 600/min, got {text!r}")
    per_minute = (match["per"] or "s").startswith("m")
    return float(match["count"]) / (60.0 if per_minute else 1.0)


def _change_participant(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, args: argparse.Namespace
) -> orchestrator_pb2.Participant:
    if args.action == "hold":
        hold = orchestrator_pb2.HoldParticipantRequest(name=args.name, reason=args.reason, actor=args.actor)
        return stub.HoldParticipant(hold, timeout=args.timeout).participant
    if args.action == "release":
        release = orchestrator_pb2.ReleaseParticipantRequest(name=args.name, actor=args.actor)
        return stub.ReleaseParticipant(release, timeout=args.timeout).participant
    limits = orchestrator_pb2.ParticipantLimits(
        max_in_flight=args.max_in_flight, burst=args.burst,
        calls_per_second=_rate(args.rate) if args.rate is not None else None,
    )
    request = orchestrator_pb2.SetParticipantLimitsRequest(name=args.name, limits=limits, actor=args.actor)
    return stub.SetParticipantLimits(request, timeout=args.timeout).participant


def _has_limits(limits: orchestrator_pb2.ParticipantLimits) -> bool:
    return limits.HasField("max_in_flight") or limits.HasField("calls_per_second")


def _participant_line(participant: orchestrator_pb2.Participant) -> str:
    """NAME: its limits, and its hold."""
    limits = participant.limits
    parts = []
    if limits.HasField("max_in_flight"):
        parts.append(f"at most {limits.max_in_flight} calls in flight")
    if limits.HasField("calls_per_second"):
        parts.append(f"{limits.calls_per_second:g} calls/s (burst {limits.burst})")
    said = ", ".join(parts) if parts else "no limits"
    if participant.HasField("hold"):
        since = participant.hold.hold_time.ToDatetime(datetime.UTC).isoformat(timespec="seconds")
        said += f"; HELD by {participant.hold.held_by} since {since}: {participant.hold.reason}"
    return f"{participant.name}: {said}"


def _health(participant: orchestrator_pb2.Participant) -> str:
    """What the answering replica's last probe saw: serving, failing, unknown
    (no grpc.health.v1), or - (not probed yet)."""
    if participant.health == orchestrator_pb2.PARTICIPANT_HEALTH_UNSPECIFIED:
        return "-"
    return orchestrator_pb2.ParticipantHealth.Name(participant.health).removeprefix("PARTICIPANT_HEALTH_").lower()
