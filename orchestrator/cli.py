"""The `compensa` command: run the orchestrator, its example participants, and operate sagas.

Exit codes: 0 success; 1 a saga followed with `start --wait` ended COMPENSATED
or FAILED (or the demo failed); 2 a usage error, a malformed input, or an
error answered by the orchestrator (printed as ``error: CODE: details``);
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import logging
import math
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import descriptor_pool, duration_pb2, json_format
from google.protobuf.message import Message

from compensa.v1 import definition_pb2, orchestrator_pb2, orchestrator_pb2_grpc, saga_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orchestrator import payloads, timeline
from orchestrator.auth import Role, parse_role
from orchestrator.config import DEFAULT_LISTEN, ServerConfig
from orchestrator.definitions import DEFINITION_SUFFIXES, compile_proto_files, load_definitions, read_descriptor_set
from orchestrator.errors import CompensaError, quote
from orchestrator.limits import INT32_MAX, INT64_MAX
from orchestrator.logs import configure_logging
from orchestrator.records import ACTIVE_SAGA_STATES as _UNFINISHED  # states that can be stuck (`compensa status`)
from orchestrator.records import done_for_good as _done_for_good
from participants.faults import FaultPlan
from participants.startup import ServingError
from participants.tls import TlsConfigError, TlsFiles

__all__ = ["main", "build_parser", "parse_saga_state", "parse_duration"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_SECONDS = 10.0

EXIT_OK = 0
EXIT_SAGA_ENDED_BADLY = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

#: `compensa watch --all` asks for up to this many events per message: a busy
#: system costs the server one message per batch, not per event.
_WATCH_ALL_BATCH = 100
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_Command = Callable[[argparse.Namespace], int]
_T = TypeVar("_T")
#: What ends `compensa watch ID`: the saga is done for good.
_END_EVENTS = frozenset(
    {saga_pb2.EVENT_TYPE_SAGA_SUCCEEDED, saga_pb2.EVENT_TYPE_SAGA_COMPENSATED, saga_pb2.EVENT_TYPE_OPERATOR_RESOLVED}
)
#: Stream errors after which `watch` opens the stream again (a replica stopping
#: cancels its streams).
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED})
#: A watch reconnects within a couple of seconds of its orchestrator coming
#: back, instead of after gRPC's default backoff (1s growing to 2 minutes).
_RECONNECT_QUICKLY = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000))


def main(argv: list[str] | None = None) -> int:
    """Runs the `compensa` command line and returns its exit code."""
    parser = build_parser()
    arguments = sys.argv[1:] if argv is None else argv
    for argument in arguments:
        if not _is_text(argument):
            parser.error(f"argument {argument.encode('utf-8', 'replace')[:40]!r} is not valid UTF-8 text")
    args = parser.parse_args(arguments)
    _configure_logging(args)
    command: _Command = args.command
    try:
        return command(args)
    except grpc.RpcError as error:
        print(f"error: {_rpc_error_text(error)}", file=sys.stderr)
        return EXIT_ERROR
    except (CompensaError, TlsConfigError, ServingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, as every other error: `error: ...`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8, smuggled in as surrogates
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `compensa` with every subcommand."""
    parser = _Parser(
        prog="compensa",
        description="Compensa: a saga orchestrator for gRPC services.",
        epilog="Exit codes: 0 ok; 1 a saga waited for with `start --wait` ended COMPENSATED "
        "or FAILED; 2 usage error or an error answered by the orchestrator.",
    )
    _add_verbose_option(parser, suppress_default=False)
    _add_client_options(parser, suppress_default=False)
    # Global options are accepted after the subcommand too; SUPPRESS keeps the
    # subcommand from overwriting a value given before it.
    verbose_option = _Parser(add_help=False)
    _add_verbose_option(verbose_option, suppress_default=True)
    client_options = _Parser(add_help=False)
    _add_verbose_option(client_options, suppress_default=True)
    _add_client_options(client_options, suppress_default=True)
    subcommands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def add(name: str, command: _Command, help_text: str, *, client: bool = True) -> argparse.ArgumentParser:
        parents = [client_options if client else verbose_option]
        subparser = subcommands.add_parser(name, parents=parents, help=help_text, description=help_text)
        subparser.set_defaults(command=command)
        return subparser

    serve_parser = add("serve", _serve, "Run the orchestrator until SIGINT or SIGTERM.", client=False)
    _add_serve(serve_parser)
    _add_log_format_option(serve_parser)
    _add_db_option(
        add("migrate", _migrate, "Upgrade the database's schema from any earlier release to this one (or create it), then exit."
            " Sagas in flight are carried over; serve creates the schema only in an empty database.",
            client=False)
    )
    _add_purge(
        add("purge", _purge, "Delete sagas done for good that ended longer ago than --older-than, then exit.",
            client=False)
    )
    participant_parser = add("participant", _participant, "Run one of the example checkout participants.", client=False)
    _add_participant(participant_parser)
    _add_log_format_option(participant_parser)
    _add_demo(add(
        "demo",
        _demo,
        "Run a checkout that succeeds and one that compensates, all in this process.",
        client=False,
    ))
    _add_start(add("start", _start, "Start a saga; with --wait follow it to its end."))
    _add_get(add("get", _get, "Show a saga and its steps."))
    _add_list(add("list", _list, "List sagas, newest first."))
    _add_status(add("status", _status, "Count sagas by definition and state: stuck, awaiting a person, oldest."))
    _add_watch(add("watch", _watch, "Stream one saga's events, or every saga's with --all."))
    _add_cancel(add("cancel", _cancel, "Ask a running saga to stop and compensate."))
    _add_retry(add("retry", _retry, "Run the failed compensations of a FAILED saga again."))
    _add_resolve(add("resolve", _resolve, "Mark a FAILED saga as resolved by hand."))
    _add_register(
        add("register", _register, "Register definition files (YAML or JSON) with a running orchestrator.")
    )
    _add_definitions(add("definitions", _definitions, "List definitions (latest versions), or show one."))
    _add_participants(
        add("participants", _participants, "List participants and their addresses, or set one (participants set NAME"
            " HOST:PORT): every replica calls the new address within a second, no restart.")
    )
    return parser


def parse_saga_state(text: str) -> saga_pb2.SagaState.ValueType:
    """A saga state from its short name ("compensated") or full name, in any case."""
    name = text.strip().upper()
    if not name.startswith("SAGA_STATE_"):
        name = "SAGA_STATE_" + name
    if name in saga_pb2.SagaState.keys() and name != "SAGA_STATE_UNSPECIFIED":
        return saga_pb2.SagaState.Value(name)
    valid = ", ".join(
        timeline.saga_state_name(value).lower()
        for value in saga_pb2.SagaState.values()
        if value != saga_pb2.SAGA_STATE_UNSPECIFIED
    )
    raise argparse.ArgumentTypeError(f"invalid saga state {text!r}; valid states: {valid}")


def parse_duration(text: str) -> duration_pb2.Duration:
    """A duration such as "10m", "90s", "1h30m" or "250ms"."""
    compact = text.strip().lower()
    if not compact or _DURATION_PART.sub("", compact):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}; use e.g. 30s, 10m, 1h30m, 250ms")
    seconds = sum(
        float(amount) * _DURATION_UNIT_SECONDS[unit] for amount, unit in _DURATION_PART.findall(compact)
    )
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _parse_participant(text: str) -> tuple[str, str]:
    name, separator, address = text.partition("=")
    if not separator or not name or ":" not in address:
        raise argparse.ArgumentTypeError(f"invalid participant {text!r}; use NAME=HOST:PORT")
    return name, address


def _parse_fault_plan(text: str) -> FaultPlan:
    try:
        return FaultPlan.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_verbose_option(parser: argparse.ArgumentParser, *, suppress_default: bool) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS if suppress_default else 0,
        help="log more (repeat for debug)",
    )


def _add_client_options(parser: argparse.ArgumentParser, *, suppress_default: bool) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress_default else value

    parser.add_argument(
        "--address",
        default=default(os.environ.get("COMPENSA_ADDRESS", DEFAULT_ADDRESS)),
        help="orchestrator HOST:PORT for client commands "
        f"(default: $COMPENSA_ADDRESS or {DEFAULT_ADDRESS})",
    )
    for name, help_text in (
        ("--tls-ca", "PEM of the CA that signs the orchestrator's certificate: call it over TLS"),
        ("--tls-cert", "PEM client certificate, for an orchestrator that requires one (with --tls-key)"),
        ("--tls-key", "PEM private key of --tls-cert"),
    ):
        # dest client_tls_*: `serve` and `participant` have --tls-* options of their own.
        parser.add_argument(
            name, dest="client_" + name[2:].replace("-", "_"), type=Path, metavar="FILE", default=default(None),
            help=help_text,
        )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=default(DEFAULT_TIMEOUT_SECONDS),
        help=f"deadline of each unary call, in seconds (default: {DEFAULT_TIMEOUT_SECONDS:g}); "
        "streams have none",
    )


def _add_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", type=_host_port, default=DEFAULT_LISTEN, help=f"HOST:PORT to serve on (default: {DEFAULT_LISTEN})"
    )
    parser.add_argument(
        "--db",
        default=os.environ.get("COMPENSA_DATABASE_URL"),
        metavar="URL",
        help="SQLAlchemy database URL (default: $COMPENSA_DATABASE_URL, else embedded SQLite)",
    )
    parser.add_argument(
        "--definitions",
        action="append",
        type=Path,
        metavar="PATH",
        help="definition file or directory, repeatable (default: ./definitions if it exists)",
    )
    parser.add_argument(
        "--participant",
        action="append",
        type=_parse_participant,
        default=[],
        metavar="NAME=HOST:PORT",
        help="address of a logical participant named in definitions, repeatable",
    )
    parser.add_argument(
        "--proto-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="generated _pb2 module whose message types payloads use, repeatable; added to the defaults",
    )
    parser.add_argument(
        "--lease-seconds", type=_positive_float, help="how long this replica owns a saga without renewing"
    )
    _add_database_timeout_option(parser)
    parser.add_argument("--replica-id", help="this replica's id in saga leases (default: host-pid-random)")
    _add_server_tls_options(parser, "this orchestrator")
    parser.add_argument("--participant-tls-ca", type=Path, metavar="FILE",
                        help="PEM of the CA that signs the participants' certificates: call them over TLS")
    parser.add_argument("--participant-tls-cert", type=Path, metavar="FILE",
                        help="PEM client certificate shown to participants that require one (with --participant-tls-key)")
    parser.add_argument("--participant-tls-key", type=Path, metavar="FILE", help="PEM private key of --participant-tls-cert")
    parser.add_argument(
        "--operator", action="append", default=[], metavar="NAME",
        help="a client certificate name (CN or subject alternative name) allowed to cancel, retry, resolve and"
             " register definitions; repeat for several (default: every client may; needs --tls-client-ca)",
    )
    parser.add_argument("--metrics-listen", type=_host_port, metavar="HOST:PORT",
                        help="serve Prometheus metrics at http(s)://HOST:PORT/metrics (default: none)")
    _add_access_options(parser)
    parser.add_argument(
        "--alert-webhook", type=_webhook_url, metavar="URL",
        help="POST every alert to this http(s) URL as JSON (see README, Alerts), retried from a durable outbox"
             " until answered 2xx (default: alerts are only events, log lines and a metric)",
    )
    parser.add_argument(
        "--alert-stuck-after", type=parse_duration, metavar="DURATION",
        help="raise an alert for a running or compensating saga that has not changed for this long, once per"
             " stall, e.g. 15m (default: none)",
    )
    parser.add_argument(
        "--alert-webhook-timeout", type=parse_duration, metavar="DURATION",
        help="how long one delivery may take (default 5s); a replica killed while delivering leaves the alert"
             " to another replica after about this long",
    )
    parser.add_argument(
        "--retention", type=parse_duration, metavar="DURATION",
        help="delete sagas done for good (succeeded, compensated, or failed and resolved) this long after"
             " their last change, with their events, e.g. 30d (default: keep everything)",
    )


def _webhook_url(text: str) -> str:
    scheme, _, rest = text.partition("://")
    if scheme not in ("http", "https") or not rest.strip("/"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def _add_log_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text",
        help="text lines (the default), or one JSON object per line with time, level, logger, message and,"
             " where known, saga_id, step, attempt and trace_id",
    )


def _add_database_timeout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-timeout", type=parse_duration, metavar="DURATION",
        help="the longest any one wait on the database may take (connecting, a transaction); a call that cannot"
             " reach the database answers UNAVAILABLE within about this long (default: 3s)",
    )


def _database_timeout(args: argparse.Namespace) -> float:
    """--database-timeout in seconds, or the default."""
    from participants.database import DEFAULT_DATABASE_TIMEOUT

    if args.database_timeout is None:
        return DEFAULT_DATABASE_TIMEOUT
    return _positive_seconds(args.database_timeout, "--database-timeout")


def _add_access_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http", type=_host_port, metavar="HOST:PORT",
                        help="serve the web dashboard at http(s)://HOST:PORT/ (default: none)")
    parser.add_argument(
        "--role", action="append", type=_parse_certificate_role, default=[], metavar="NAME=ROLE",
        help="give the client certificate NAME (CN or subject alternative name) a role: reader, starter or"
             " operator; repeatable (needs --tls-client-ca)",
    )
    parser.add_argument(
        "--tokens", type=Path, metavar="FILE",
        help="bearer tokens with their identities, roles and definition scopes (YAML or JSON; see README)",
    )
    parser.add_argument("--jwt-keys", type=Path, metavar="FILE",
                        help="a JSON Web Key Set: accept JWTs signed by its keys as bearer tokens (claims sub, role,"
                             " definitions); needs compensa[jwt]")
    parser.add_argument("--jwt-audience", metavar="AUD", help="with --jwt-keys: the 'aud' a JWT must carry")
    parser.add_argument("--jwt-issuer", metavar="ISS", help="with --jwt-keys: the 'iss' a JWT must carry")
    parser.add_argument(
        "--max-streams-per-client", type=int, default=0, metavar="N",
        help="streams (watches, dashboard live lists) one client may hold open at once (default: no limit)",
    )


def _parse_certificate_role(text: str) -> tuple[str, Role]:
    name, equals, role = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=ROLE, e.g. ops-console=operator")
    try:
        return name, parse_role(role)
    except CompensaError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _host_port(text: str) -> str:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"{quote(text)} is not HOST:PORT with a port from 0 to 65535, e.g. 0.0.0.0:9464"
        )
    return text


def _int_from(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high` (the API field's range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{quote(text)} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{quote(text)} is out of range: use {low} to {high}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{quote(text)} is not a number of seconds") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{quote(text)} must be a positive number of seconds")
    return value


def _add_server_tls_options(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help=f"PEM certificate: {who} serves TLS only")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                        help="PEM CA: callers must present a certificate it signed (mutual TLS)")


def _server_tls(args: argparse.Namespace) -> TlsFiles | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    return TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_client_ca)


def _tls_files(ca: Path | None, cert: Path | None, key: Path | None) -> TlsFiles | None:
    """Client-side TLS, or None (plaintext) when no file is given."""
    return TlsFiles(cert=cert, key=key, ca=ca) if (ca or cert or key) else None


def _add_participant(parser: argparse.ArgumentParser) -> None:
    from participants.server import PARTICIPANT_KINDS

    parser.add_argument("kind", choices=PARTICIPANT_KINDS, help="which participant to run")
    parser.add_argument("--listen", type=_host_port, required=True, help="HOST:PORT to serve on")
    parser.add_argument("--db", required=True, metavar="URL", help="the participant's SQLAlchemy database URL")
    parser.add_argument(
        "--faults",
        type=_parse_fault_plan,
        metavar="SPEC",
        help='injected faults, e.g. "unavailable_attempts=1,delay_seconds=2"',
    )
    _add_database_timeout_option(parser)
    _add_server_tls_options(parser, "the participant")


def _add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print protobuf JSON (one object per line for lists and streams)"
    )


def _add_actor_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actor", default=_default_actor(), help="who acts, recorded in the saga's log (default: USER@host)")


def _add_start(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("definition", help="definition name")
    parser.add_argument("--input", required=True, metavar="JSON", help="saga input in proto3 JSON")
    parser.add_argument("--saga-id", help="saga id; makes the start idempotent (default: a new UUID)")
    parser.add_argument(
        "--version", type=_int_from(0, INT32_MAX), default=0, metavar="N", help="definition version (default: latest)"
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="follow the saga to its end and print its timeline; exit 1 unless it SUCCEEDED",
    )
    parser.add_argument(
        "--proto-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="generated _pb2 module defining the input type, repeatable; added to the defaults",
    )
    _add_json_option(parser)


def _add_get(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("saga_id", metavar="ID")
    _add_json_option(parser)


def _add_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", type=parse_saga_state, help="only sagas in this state, e.g. compensated")
    parser.add_argument("--definition", metavar="NAME", default="", help="only sagas of this definition")
    parser.add_argument(
        "--stuck", type=parse_duration, metavar="DURATION", help="only unfinished sagas unchanged for this long, e.g. 10m"
    )
    parser.add_argument(
        "--page-size", type=_int_from(0, INT32_MAX), default=0, metavar="N", help="sagas per page (server default 50)"
    )
    parser.add_argument("--all", action="store_true", help="follow every page")
    _add_json_option(parser)


def _add_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--definition", metavar="NAME", default="", help="only sagas of this definition")
    parser.add_argument(
        "--stuck", type=parse_duration, metavar="DURATION",
        help="count unfinished sagas unchanged for this long as stuck (server default 10m)",
    )
    _add_json_option(parser)


def _add_register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH",
        help="definition files, or directories of them (*.yaml, *.yml, *.json); all are checked before any is sent",
    )
    types = parser.add_mutually_exclusive_group()
    types.add_argument(
        "--proto", action="append", type=Path, default=[], metavar="FILE",
        help="a .proto file declaring the definitions' message types (repeatable): compiled with its imports and"
             " registered with each definition, so no replica needs a generated module",
    )
    types.add_argument(
        "--descriptor-set", type=Path, metavar="FILE",
        help="the types as a descriptor set instead (protoc --include_imports --descriptor_set_out=FILE)",
    )
    parser.add_argument(
        "--proto-path", action="append", type=Path, default=[], metavar="DIR",
        help="with --proto: a directory imports are relative to (repeatable; searched before each file's own)",
    )


def _add_participants(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="?", choices=("list", "set"), default="list",
        help="list (the default): every participant and its address; set NAME ADDRESS: store where NAME is served",
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help="with set: the participant's name in definitions")
    # Not dest "address": that is the orchestrator's (--address).
    parser.add_argument("participant_address", nargs="?", metavar="ADDRESS", help="with set: HOST:PORT")
    _add_actor_option(parser)
    _add_json_option(parser)


def _add_definitions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default="", metavar="NAME", help="show this definition in full")
    parser.add_argument(
        "--version", type=_int_from(0, INT32_MAX), default=0, metavar="N",
        help="with NAME: this version (default latest)",
    )
    _add_json_option(parser)


def _add_watch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("saga_id", metavar="ID", nargs="?", help="the saga to watch (omit with --all)")
    parser.add_argument("--all", action="store_true", help="every saga's events, in log order")
    parser.add_argument(
        "--after",
        type=_int_from(0, INT64_MAX),
        default=0,
        metavar="N",
        help="resume after this sequence (one saga) or log position (--all)",
    )
    parser.add_argument("--definition", metavar="NAME", default="", help="with --all: only sagas of this definition")
    _add_json_option(parser)


def _add_cancel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("saga_id", metavar="ID")
    parser.add_argument("--reason", default="", help="why, recorded in the saga's log")
    _add_actor_option(parser)
    _add_json_option(parser)


def _add_retry(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("saga_id", metavar="ID")
    parser.add_argument("--reason", default="", help="why, recorded in the saga's log")
    _add_actor_option(parser)
    _add_json_option(parser)


def _add_resolve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("saga_id", metavar="ID")
    parser.add_argument("--note", required=True, help="what was done by hand")
    _add_actor_option(parser)
    _add_json_option(parser)


def _serve(args: argparse.Namespace) -> int:
    from orchestrator.server import serve

    definition_paths: list[Path] = args.definitions or ([Path("definitions")] if Path("definitions").is_dir() else [])
    participants: list[tuple[str, str]] = args.participant
    config = ServerConfig(
        listen=args.listen,
        database_url=args.db,
        definition_paths=tuple(definition_paths),
        participants=dict(participants),
        proto_modules=_with_default_modules(args.proto_module),
    )
    if args.lease_seconds is not None:
        config = dataclasses.replace(config, lease_seconds=args.lease_seconds)
    if args.replica_id:
        config = dataclasses.replace(config, replica_id=args.replica_id)
    config = dataclasses.replace(
        config,
        metrics_listen=args.metrics_listen,
        tls=_server_tls(args),
        participant_tls=_tls_files(args.participant_tls_ca, args.participant_tls_cert, args.participant_tls_key),
        operators=tuple(args.operator),
        database_timeout=_database_timeout(args),
        certificate_roles=dict(args.role),
        token_file=args.tokens,
        jwt_keys=args.jwt_keys,
        jwt_audience=args.jwt_audience,
        jwt_issuer=args.jwt_issuer,
        http_listen=args.http,
    )
    if args.max_streams_per_client < 0:
        raise CompensaError("--max-streams-per-client must be 0 (no limit) or positive")
    config = dataclasses.replace(config, max_streams_per_client=args.max_streams_per_client)
    if args.retention is not None:
        config = dataclasses.replace(config, retention_seconds=_positive_seconds(args.retention, "--retention"))
    if args.alert_webhook is not None:
        config = dataclasses.replace(config, alert_webhook=args.alert_webhook)
    if args.alert_stuck_after is not None:
        config = dataclasses.replace(
            config, alert_stuck_seconds=_positive_seconds(args.alert_stuck_after, "--alert-stuck-after")
        )
    if args.alert_webhook_timeout is not None:
        config = dataclasses.replace(
            config, alert_webhook_timeout=_positive_seconds(args.alert_webhook_timeout, "--alert-webhook-timeout")
        )
    asyncio.run(serve(config))
    return EXIT_OK


def _positive_seconds(duration: duration_pb2.Duration, option: str) -> float:
    seconds = duration.ToNanoseconds() / 1e9
    if seconds <= 0:
        raise CompensaError(f"{option} must be positive")
    return seconds


def _add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=os.environ.get("COMPENSA_DATABASE_URL"),
        metavar="URL",
        help="SQLAlchemy database URL (default: $COMPENSA_DATABASE_URL, else embedded SQLite)",
    )


def _migrate(args: argparse.Namespace) -> int:
    from orchestrator.store import open_store

    async def migrate() -> tuple[str | None, str]:
        store = open_store(ServerConfig(database_url=args.db).resolved_database_url())
        try:
            return await store.upgrade_schema()
        finally:
            await store.close()

    before, after = asyncio.run(migrate())
    if before == after:
        print(f"schema up to date (revision {after})")
    else:
        print(f"schema upgraded from {before or 'an empty database'} to revision {after}")
    return EXIT_OK


def _add_purge(parser: argparse.ArgumentParser) -> None:
    _add_db_option(parser)
    parser.add_argument(
        "--older-than", type=parse_duration, required=True, metavar="DURATION",
        help="delete sagas that are SUCCEEDED, COMPENSATED, or FAILED and resolved, and last changed longer"
             " ago than this (e.g. 30d), with their steps and events; a FAILED saga nobody resolved is kept",
    )


def _purge(args: argparse.Namespace) -> int:
    """What `serve --retention` does on its own, once, for deployments that
    run it from a scheduled job instead (or want a one-off clean-up)."""
    from sqlalchemy.engine import make_url

    from orchestrator.engine import purge_finished
    from orchestrator.store import open_store

    older_than = _positive_seconds(args.older_than, "--older-than")
    url = ServerConfig(database_url=args.db).resolved_database_url()
    sqlite_file = make_url(url).database if url.startswith("sqlite") else None
    if sqlite_file and not Path(sqlite_file).exists():  # connecting would create it
        print(f"error: no database at {sqlite_file}; check --db", file=sys.stderr)
        return EXIT_ERROR

    async def purge() -> int:
        store = open_store(url)
        try:
            if not await store.has_schema():
                raise CompensaError("no Compensa tables in this database; check --db (or run compensa migrate)")
            # The database's clock, as the replicas read it.
            return await purge_finished(store, await store.clock() - older_than)
        finally:
            await store.close()

    print(f"deleted {asyncio.run(purge())} saga(s) done for good")
    return EXIT_OK


def _participant(args: argparse.Namespace) -> int:
    from participants.server import serve_participant

    tls = _server_tls(args)
    asyncio.run(
        serve_participant(
            args.kind, listen=args.listen, database_url=args.db, faults=args.faults, tls=tls,
            database_timeout=_database_timeout(args),
        )
    )
    return EXIT_OK


def _add_demo(parser: argparse.ArgumentParser) -> None:
    _add_log_format_option(parser)
    parser.add_argument("--http", type=_host_port, default="127.0.0.1:0", metavar="HOST:PORT",
                        help="where the demo serves the dashboard (default: a free port on 127.0.0.1)")
    parser.add_argument("--stay", action="store_true",
                        help="keep the demo's orchestrator and dashboard up after the checkouts, until Ctrl-C")


def _demo(args: argparse.Namespace) -> int:
    from orchestrator.demo import run_demo

    return asyncio.run(run_demo(http_listen=args.http, stay=args.stay))


def _start(args: argparse.Namespace) -> int:
    payloads.import_proto_modules(_with_default_modules(args.proto_module))
    with _channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        definition = stub.GetDefinition(
            orchestrator_pb2.GetDefinitionRequest(name=args.definition, version=args.version),
            timeout=args.timeout,
        ).definition
        saga_input = payloads.pack_json(definition.input_type, args.input, payloads.pool_of(definition))
        saga_id: str = args.saga_id or str(uuid.uuid4())
        response = stub.StartSaga(
            orchestrator_pb2.StartSagaRequest(
                saga_id=saga_id,
                definition_name=definition.name,
                definition_version=definition.version,
                input=saga_input,
            ),
            timeout=args.timeout,
        )
        if not args.wait:
            _print_result(args, response.saga, saga_id, stub=stub)
            return EXIT_OK
        if not args.json:
            created = "started" if response.created else "already existed"
            print(f"saga {saga_id} {created}")
        watch = stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(saga_id=saga_id, replay_history=True))
        _print_events(args, (response.event for response in watch))
        saga = stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=saga_id), timeout=args.timeout).saga
        if not args.json:
            print(timeline.format_saga(saga, color=_use_color()))
        return EXIT_OK if saga.state == saga_pb2.SAGA_STATE_SUCCEEDED else EXIT_SAGA_ENDED_BADLY


def _get(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        saga = stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=args.saga_id), timeout=args.timeout).saga
        _print_result(args, saga, stub=stub)
    return EXIT_OK


def _register(args: argparse.Namespace) -> int:
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
    with _channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        for definition in definitions:
            response = stub.RegisterDefinition(
                orchestrator_pb2.RegisterDefinitionRequest(definition=definition), timeout=args.timeout
            )
            registered = response.definition
            what = "registered" if response.created else "unchanged, already registered"
            print(f"{registered.name} version {registered.version}: {what}")
    return EXIT_OK


def _definition_dict(definition: definition_pb2.SagaDefinition) -> dict[str, object]:
    """A definition as JSON, its registered types named by file rather than
    written out as descriptors."""
    bare = definition_pb2.SagaDefinition()
    bare.CopyFrom(definition)
    bare.ClearField("types")
    shown = _json_dict(bare)
    if definition.types.file:
        shown["types"] = {"files": [file.name for file in definition.types.file]}
    return shown


def _participants(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        if args.action == "set":
            if not args.name or not args.participant_address:
                raise CompensaError("participants set needs a NAME and an ADDRESS (HOST:PORT)")
            request = orchestrator_pb2.SetParticipantRequest(
                name=args.name, address=args.participant_address, actor=args.actor
            )
            stored = stub.SetParticipant(request, timeout=args.timeout).participant
            print(_json_line(stored) if args.json else f"{stored.name} -> {stored.address}")
            return EXIT_OK
        if args.name or args.participant_address:
            raise CompensaError("participants list takes no NAME or ADDRESS (did you mean: participants set?)")
        listed = stub.ListParticipants(orchestrator_pb2.ListParticipantsRequest(), timeout=args.timeout).participants
    if args.json:
        for participant in listed:
            print(_json_line(participant))
        return EXIT_OK
    print(f"{'NAME':<24} {'ADDRESS':<32} UPDATED BY")
    for participant in listed:
        print(f"{participant.name:<24} {participant.address:<32} {participant.updated_by}")
    return EXIT_OK


def _definitions(args: argparse.Namespace) -> int:
    if args.version and not args.name:
        print("error: --version needs a NAME", file=sys.stderr)
        return EXIT_ERROR
    if args.version < 0:
        print(f"error: --version must be positive, got {args.version}", file=sys.stderr)
        return EXIT_ERROR
    with _channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        if args.name:
            definition = stub.GetDefinition(
                orchestrator_pb2.GetDefinitionRequest(name=args.name, version=args.version), timeout=args.timeout
            ).definition
            print(json.dumps(_definition_dict(definition), indent=2))
            return EXIT_OK
        request = orchestrator_pb2.ListDefinitionsRequest()
        if not args.json:
            print(f"{'NAME':<24} {'VERSION':>7} {'STEPS':>5}  DESCRIPTION")
        while True:
            response = stub.ListDefinitions(request, timeout=args.timeout)
            for definition in response.definitions:
                if args.json:
                    print(_json_line(definition))
                else:
                    print(f"{definition.name:<24} {definition.version:>7} {len(definition.steps):>5}  "
                          f"{definition.description}")
            if not response.next_page_token:
                return EXIT_OK
            request.page_token = response.next_page_token


def _list(args: argparse.Namespace) -> int:
    request = orchestrator_pb2.ListSagasRequest(
        state=args.state or saga_pb2.SAGA_STATE_UNSPECIFIED,
        definition_name=args.definition,
        page_size=args.page_size,
        stuck_for=args.stuck,
    )
    with _channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        types = _DefinitionTypes(stub, args.timeout)
        while True:
            response = stub.ListSagas(request, timeout=args.timeout)
            for saga in response.sagas:
                print(types.saga_json(saga) if args.json else _saga_row(saga))
            if not args.all or not response.next_page_token:
                break
            request.page_token = response.next_page_token
        if response.next_page_token and not args.json:
            print(f"(more: --all, or page token {response.next_page_token})", file=sys.stderr)
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    request = orchestrator_pb2.SummarizeSagasRequest(definition_name=args.definition, stuck_for=args.stuck)
    with _channel(args) as channel:
        response = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).SummarizeSagas(request, timeout=args.timeout)
    if args.json:
        print(_json_line(response))
        return EXIT_OK
    if not response.states:
        print("(no sagas)")
        return EXIT_OK
    read_at = response.read_time.ToNanoseconds() / 1e9
    rows = [("DEFINITION", "STATE", "SAGAS", "STUCK", "UNRESOLVED", "OLDEST CHANGE")]
    for summary in response.states:
        age = read_at - summary.oldest_update_time.ToNanoseconds() / 1e9
        rows.append((
            summary.definition_name,
            timeline.saga_state_name(summary.state),
            str(summary.count),
            str(summary.stuck) if summary.state in _UNFINISHED else "-",
            str(summary.unresolved) if summary.state == saga_pb2.SAGA_STATE_FAILED else "-",
            f"{_short_duration(max(age, 0.0))} ago",
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) if column < 2 else cell.rjust(width)
                        for column, (cell, width) in enumerate(zip(row, widths))).rstrip())
    stuck_for = response.stuck_for.ToNanoseconds() / 1e9
    print(f"stuck: unfinished and unchanged for {_short_duration(stuck_for)} (compensa list --stuck"
          f" {_short_duration(stuck_for)} lists them); unresolved: FAILED, waiting for retry or resolve")
    return EXIT_OK


def _short_duration(seconds: float) -> str:
    """90.5 -> "1m30s": the two largest units, for people."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    parts = [(whole // 86400, "d"), (whole % 86400 // 3600, "h"), (whole % 3600 // 60, "m"), (whole % 60, "s")]
    shown = [f"{amount}{unit}" for amount, unit in parts if amount]
    return "".join(shown[:2])


def _watch(args: argparse.Namespace) -> int:
    if args.all == bool(args.saga_id):
        print("error: give a saga ID or --all, not both", file=sys.stderr)
        return EXIT_ERROR
    with _channel(args, options=_RECONNECT_QUICKLY) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        if args.all:
            # Answers, or the error is the command's: resumed only once it was reached.
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
            _watch_all(args, stub)
        else:
            saga = stub.GetSaga(orchestrator_pb2.GetSagaRequest(saga_id=args.saga_id), timeout=args.timeout).saga
            if args.after >= saga.sequence and _done_for_good(saga):
                return EXIT_OK
            _watch_saga(args, stub)
    return EXIT_OK


def _watch_saga(args: argparse.Namespace, stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> None:
    """Prints the saga's events until its real end: SUCCEEDED, COMPENSATED,
    or FAILED and resolved by a person (a FAILED saga may still be retried)."""
    last: int = args.after

    def watch() -> Iterable[orchestrator_pb2.WatchSagaResponse]:
        return stub.WatchSaga(orchestrator_pb2.WatchSagaRequest(  # type: ignore[no-any-return]
            saga_id=args.saga_id, after_sequence=last, replay_history=True, follow_after_end=True,
        ))

    def show(response: orchestrator_pb2.WatchSagaResponse) -> bool:
        nonlocal last
        event = response.event
        if event.sequence > last:
            last = event.sequence
            _print_events(args, [event])
        return event.type in _END_EVENTS

    _follow(watch, show)


def _watch_all(args: argparse.Namespace, stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> None:
    """Prints every saga's events in log order, forever, resuming after the
    last position printed when the stream breaks (an orchestrator restart)."""
    last: int = args.after

    def watch() -> Iterable[orchestrator_pb2.WatchSagasResponse]:
        return stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(  # type: ignore[no-any-return]
            definition_name=args.definition, after_position=last, max_events_per_message=_WATCH_ALL_BATCH,
        ))

    def show(batch: orchestrator_pb2.WatchSagasResponse) -> bool:
        nonlocal last
        fresh = [event for event in batch.events if event.position > last]
        if fresh:
            last = fresh[-1].position
            _print_events(args, fresh, with_saga_id=True)
        return False

    _follow(watch, show)


def _follow(open_stream: Callable[[], Iterable[_T]], show: Callable[[_T], bool]) -> None:
    """Passes each message of `open_stream()` to `show` until it returns True
    or the stream ends. A stream broken by UNAVAILABLE, CANCELLED or
    DEADLINE_EXCEEDED (an orchestrator restarting) is opened again, with
    backoff, for as long as it takes; one line on stderr per break."""
    delay = 0.05
    lost = False
    while True:
        try:
            for message in open_stream():
                if lost:
                    print("reconnected", file=sys.stderr, flush=True)
                    lost, delay = False, 0.05
                if show(message):
                    return
            return
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call) or error.code() not in _RESUMABLE:
                raise
            if not lost:
                print(f"connection lost ({_rpc_error_text(error)}); reconnecting", file=sys.stderr, flush=True)
                lost = True
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def _cancel(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_pb2.CancelSagaRequest(saga_id=args.saga_id, reason=args.reason, actor=args.actor)
        _print_result(args, stub.CancelSaga(request, timeout=args.timeout).saga, stub=stub)
    return EXIT_OK


def _retry(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_pb2.RetrySagaRequest(saga_id=args.saga_id, reason=args.reason, actor=args.actor)
        _print_result(args, stub.RetrySaga(request, timeout=args.timeout).saga, stub=stub)
    return EXIT_OK


def _resolve(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_pb2.ResolveSagaRequest(saga_id=args.saga_id, note=args.note, actor=args.actor)
        _print_result(args, stub.ResolveSaga(request, timeout=args.timeout).saga, stub=stub)
    return EXIT_OK


def _channel(args: argparse.Namespace, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    tls = _tls_files(args.client_tls_ca, args.client_tls_cert, args.client_tls_key)
    if tls is None:
        return grpc.insecure_channel(args.address, options=options)
    return grpc.secure_channel(args.address, tls.channel_credentials, options=options)


class _DefinitionTypes:
    """The message types of the definitions sagas were started from, asked
    of the orchestrator once per definition version: --json output decodes
    inputs and outputs of any registered type."""

    def __init__(self, stub: orchestrator_pb2_grpc.OrchestratorServiceStub, timeout: float) -> None:
        self._stub = stub
        self._timeout = timeout
        self._pools: dict[tuple[str, int], descriptor_pool.DescriptorPool] = {}

    def saga_json(self, saga: saga_pb2.Saga, *, indent: int | None = None) -> str:
        key = (saga.definition_name, saga.definition_version)
        pool = self._pools.get(key)
        if pool is None:
            try:
                definition = self._stub.GetDefinition(
                    orchestrator_pb2.GetDefinitionRequest(name=key[0], version=key[1]), timeout=self._timeout
                ).definition
                pool = payloads.pool_of(definition)
            except (grpc.RpcError, CompensaError):
                pool = descriptor_pool.Default()  # shown as type and bytes if unknown
            self._pools[key] = pool
        as_dict = payloads.saga_json_dict(saga, pool)
        return json.dumps(as_dict, indent=indent) if indent else json.dumps(as_dict, separators=(",", ":"))


def _print_result(
    args: argparse.Namespace, saga: saga_pb2.Saga, saga_id: str | None = None, *,
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub,
) -> None:
    if args.json:
        print(_DefinitionTypes(stub, args.timeout).saga_json(saga, indent=2))
    elif saga_id is not None:
        print(saga_id)
    else:
        print(timeline.format_saga(saga, color=_use_color()))


def _print_events(
    args: argparse.Namespace,
    events: Iterable[saga_pb2.SagaEvent],
    *,
    with_saga_id: bool = False,
) -> None:
    color = _use_color()
    for event in events:
        if args.json:
            print(_json_line(event), flush=True)
        elif with_saga_id:
            print(f"@{event.position:<6} {event.saga_id}{timeline.format_event(event, color=color)}", flush=True)
        else:
            print(timeline.format_event(event, color=color), flush=True)


def _saga_row(saga: saga_pb2.Saga) -> str:
    updated = saga.update_time.ToJsonString() if saga.HasField("update_time") else ""
    state = timeline.saga_state_name(saga.state)
    return f"{saga.saga_id}  {saga.definition_name}@{saga.definition_version}  {state:<12}  seq {saga.sequence:<4}  {updated}"


def _json_dict(message: Message) -> dict[str, object]:
    try:
        return json_format.MessageToDict(message, preserving_proto_field_name=True)
    except json_format.Error as error:  # e.g. a Duration out of JSON's range, stored before it was checked
        raise CompensaError(f"the orchestrator's answer cannot be shown as JSON: {error}") from None


def _json_line(message: Message) -> str:
    return json.dumps(_json_dict(message), separators=(",", ":"))


def _rpc_error_text(error: grpc.RpcError) -> str:
    if isinstance(error, grpc.Call):
        return f"{error.code().name}: {error.details()}"
    return str(error)


def _with_default_modules(extra: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*payloads.DEFAULT_PROTO_MODULES, *extra]))


def _default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _use_color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _configure_logging(args: argparse.Namespace) -> None:
    server_command = args.command in (_serve, _participant, _demo)
    base = logging.INFO if server_command else logging.WARNING
    level = max(logging.DEBUG, base - 10 * args.verbose)
    configure_logging(level, getattr(args, "log_format", "text"))
    # Alembic reports every step it takes at INFO; migrate says what it did in one line.
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))


if __name__ == "__main__":
    sys.exit(main())
