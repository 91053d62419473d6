"""The command line's grammar: every command with its options (`build_parser`),
and the argument types that refuse bad values before any command runs.

A refused command line raises UsageError, which `main` prints like every other
error: one line `error: compensa COMMAND: ... (see compensa COMMAND --help)`.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import getpass
import logging
import math
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from google.protobuf import duration_pb2

from compensa.orchestrator.api.auth import Role, check_scope, parse_role
from compensa.orchestrator.cli import audit, bulk, codegen, definitions, replay, sagas, server
from compensa.orchestrator.config import DEFAULT_LISTEN
from compensa.orchestrator.shared import payloads, timeline
from compensa.orchestrator.shared.durations import DURATION_EXAMPLES, InvalidDuration, parse_duration
from compensa.orchestrator.shared.errors import CompensaError, InvalidArgument, quote
from compensa.orchestrator.shared.limits import INT32_MAX, INT64_MAX
from compensa.orchestrator.shared.selection import ACTIONS
from compensa.participants.faults import FaultPlan
from compensa.v1 import saga_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_SECONDS = 10.0

#: What a command does with the parsed arguments; returns the exit code.
Command = Callable[[argparse.Namespace], int]


class UsageError(InvalidArgument):
    """A command line the parser refuses; the message names the command and points at its --help."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting, so a
    usage error reaches the user the way every other error does."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def parse_arguments(arguments: Sequence[str]) -> argparse.Namespace:
    """`arguments` (without the program's name) parsed; UsageError if they are not a valid command line."""
    parser = build_parser()
    for argument in arguments:
        if not _is_text(argument):
            parser.error(f"argument {argument.encode('utf-8', 'replace')[:40]!r} is not valid UTF-8 text")
    _refuse_unknown_options(parser, arguments)
    return parser.parse_args(arguments)


def _refuse_unknown_options(parser: argparse.ArgumentParser, arguments: Sequence[str]) -> None:
    """A --option no command has, named as such (with the closest one it may
    have meant): argparse would take the value after it for the COMMAND and
    call that an invalid command."""
    known = _option_names(parser)
    for argument in arguments:
        if argument == "--":
            return
        if not argument.startswith("--"):
            continue
        name = argument.partition("=")[0]
        if any(option.startswith(name) for option in known):  # argparse accepts unique prefixes
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        parser.error(f"unknown option {quote(name)}{hint}")


def _option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every --long option of `parser` and of its subcommands."""
    names: set[str] = set()
    for action in parser._actions:
        names.update(option for option in action.option_strings if option.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                names |= _option_names(subparser)
    return names


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8, smuggled in as surrogates
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `compensa` with every subcommand. Each sets
    `command` (a Command) and `base_log_level` (INFO for the commands that
    run a server, WARNING for the others; each -v logs more)."""
    parser = _Parser(
        prog="compensa",
        description="Compensa: a saga orchestrator for gRPC services.",
        epilog="Exit codes: 0 ok; 1 a saga waited for with `start --wait` ended COMPENSATED "
        "or FAILED, `replay` found a divergence, or `audit` found discrepancies; 2 usage error or an error answered"
        " by the orchestrator; 141 the reader of the output went away (compensa list | head), quietly.",
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

    def add(
        name: str, command: Command, help_text: str, *, client: bool = True, runs_a_server: bool = False
    ) -> argparse.ArgumentParser:
        parents = [client_options if client else verbose_option]
        subparser = subcommands.add_parser(name, parents=parents, help=help_text, description=help_text)
        subparser.set_defaults(command=command, base_log_level=logging.INFO if runs_a_server else logging.WARNING)
        return subparser

    _add_serve(add("serve", server.serve, "Run the orchestrator until SIGINT or SIGTERM.",
                   client=False, runs_a_server=True))
    _add_databases_options(
        add("migrate", server.migrate, "Upgrade the database's schema from any earlier release to this one (or create"
            " it), then exit. Sagas in flight are carried over; serve creates the schema only in an empty database.",
            client=False)
    )
    _add_purge(
        add("purge", server.purge, "Delete sagas done for good that ended longer ago than --older-than, then exit.",
            client=False)
    )
    _add_audit(
        add("audit", audit.audit, "Compare the saga log with every participant's own barrier records; name each"
            " discrepancy (alerted once, kind AUDIT); with --barrier-retention, tell participants what they may"
            " delete. Operator; runs in the orchestrator.")
    )
    _add_participant(
        add("participant", server.participant, "Run one of the example checkout participants.",
            client=False, runs_a_server=True)
    )
    _add_demo(add("demo", server.demo, "Run a checkout that succeeds and one that compensates, all in this process.",
                  client=False, runs_a_server=True))
    _add_start(add("start", sagas.start, "Start a saga; with --wait follow it to its end."))
    _add_get(add("get", sagas.get, "Show a saga and its steps."))
    _add_list(add("list", sagas.list_sagas, "List sagas, newest first."))
    _add_status(add("status", sagas.status,
                    "Count sagas by definition and state: stuck, awaiting a person, oldest."))
    _add_watch(add("watch", sagas.watch, "Stream one saga's events, or every saga's with --all."))
    _add_alerts(add("alerts", sagas.alerts,
                    "Stream the alert log (sagas' alerts, participants' health), resuming across restarts."))
    _add_cancel(add("cancel", sagas.cancel, "Ask a running saga to stop and compensate."))
    _add_retry(add("retry", sagas.retry, "Run the failed compensations of a FAILED saga again."))
    _add_resolve(add("resolve", sagas.resolve, "Mark a FAILED saga as resolved by hand."))
    _add_bulk(
        add("bulk", bulk.run, "Bulk actions run by the server: start ACTION --filter ... [--dry-run], list, get,"
            " pause, resume, cancel."),
        client_options,
    )
    _add_replay(add("replay", replay.replay,
                    "Replay a saga's log through the state machine: does it end where the saga is, or where"
                    " would a definition file decide otherwise? Exit 1 on a divergence."))
    _add_plan(add("plan", replay.plan,
                  "Classify sagas in flight against a new definition file (compatible, compatible with a"
                  " mapping, incompatible with the first diverging event). Changes nothing."))
    _add_register(
        add("register", definitions.register, "Register definition files (YAML or JSON) with a running orchestrator.")
    )
    _add_definitions(add("definitions", definitions.show_definitions,
                         "List definitions (latest versions), or show one."))
    _add_participants(
        add("participants", definitions.participants, "List participants and their addresses, or set one"
            " (participants set NAME HOST:PORT): every replica calls the new address within a second, no restart.")
    )
    _add_codegen(add("codegen", codegen.codegen, "Generate Python from .proto files: protoc's _pb2 modules and, for a"
                     " participant contract, typed participant base classes and saga starters (FILE_compensa.py).",
                     client=False))
    return parser


# --- argument types: each refuses a bad value with a message saying what to write ---


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


def _duration(text: str) -> duration_pb2.Duration:
    """A duration in the one grammar (orchestrator.durations), not negative."""
    try:
        duration = parse_duration(text)
    except InvalidDuration as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if duration.ToNanoseconds() < 0:
        raise argparse.ArgumentTypeError(f"invalid duration {quote(text)}: negative; use e.g. {DURATION_EXAMPLES}")
    return duration


def _duration_or_off(text: str) -> duration_pb2.Duration:
    """A duration, or "off" (the same as 0): the option's feature is off."""
    return duration_pb2.Duration() if text.strip().lower() == "off" else _duration(text)


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


def _parse_certificate_role(text: str) -> tuple[str, Role, frozenset[str]]:
    """NAME=ROLE, or NAME=ROLE:DEFINITION,... for a role limited to those definitions."""
    name, equals, granted = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=ROLE, e.g. ops-console=operator")
    role, colon, definitions = granted.partition(":")
    try:
        scope = check_scope({"definitions": definitions.split(",")} if colon else {}, f"--role {name}")
        return name, parse_role(role), scope
    except CompensaError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _host_port(text: str) -> str:
    _, colon, port = text.rpartition(":")
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


def _webhook_url(text: str) -> str:
    scheme, _, rest = text.partition("://")
    if scheme not in ("http", "https") or not rest.strip("/"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def _default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# --- options shared by several commands ---


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


def _add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=os.environ.get("COMPENSA_DATABASE_URL"),
        metavar="URL",
        help="SQLAlchemy database URL (default: $COMPENSA_DATABASE_URL, else embedded SQLite)",
    )


def _add_databases_options(parser: argparse.ArgumentParser) -> None:
    """--db, and --partition-db for the other databases of sagas partitioned over several."""
    _add_db_option(parser)
    parser.add_argument(
        "--partition-db", action="append", default=[], metavar="URL", dest="partition_db",
        help="another PostgreSQL database holding partitions of the sagas (repeatable; --db is the home database,"
        " holding the partition map, definitions and participants, and partitions too); see docs/partitions.md",
    )


def _add_database_timeout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-timeout", type=_duration, metavar="DURATION",
        help="the longest any one wait on the database may take (connecting, a transaction); a call that cannot"
             " reach the database answers UNAVAILABLE within about this long (default: 3s)",
    )


def _add_log_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text",
        help="text lines (the default), or one JSON object per line with time, level, logger, message and,"
             " where known, saga_id, step, attempt and trace_id",
    )


def _add_proto_module_option(parser: argparse.ArgumentParser, what: str) -> None:
    # The value starts as the defaults; each --proto-module is appended to a copy.
    parser.add_argument(
        "--proto-module",
        action="append",
        default=list(payloads.DEFAULT_PROTO_MODULES),
        metavar="MODULE",
        help=f"generated _pb2 module {what}, repeatable; added to the defaults",
    )


def _add_server_tls_options(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help=f"PEM certificate: {who} serves TLS only")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                        help="PEM CA: callers must present a certificate it signed (mutual TLS)")


def _add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true",
        help="print protobuf's JSON mapping, 64-bit integers as numbers (one object per line for lists and streams)"
    )


def _add_actor_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actor", default=_default_actor(),
                        help="who acts, recorded in the saga's log (default: USER@host)")


# --- server commands ---


def _add_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", type=_host_port, default=DEFAULT_LISTEN, help=f"HOST:PORT to serve on (default: {DEFAULT_LISTEN})"
    )
    _add_databases_options(parser)
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
    _add_proto_module_option(parser, "whose message types payloads use")
    parser.add_argument(
        "--lease-seconds", type=_positive_float, help="how long this replica owns a saga without renewing"
    )
    _add_database_timeout_option(parser)
    parser.add_argument(
        "--read-db", metavar="URL",
        help="a streaming standby of --db (PostgreSQL only): lists, summaries, the dashboard's pages and the history"
             " that watch streams replay are read there while it is at most --read-db-max-lag behind; everything"
             " else, and everything while it lags or fails, is read on --db (see README, Scaling out)",
    )
    parser.add_argument(
        "--read-db-max-lag", type=_duration, metavar="DURATION",
        help="how far --read-db may be behind --db and still be read (default 5s)",
    )
    parser.add_argument("--replica-id", help="this replica's id in saga leases (default: host-pid-random)")
    _add_server_tls_options(parser, "this orchestrator")
    parser.add_argument("--participant-tls-ca", type=Path, metavar="FILE",
                        help="PEM of the CA that signs the participants' certificates: call them over TLS")
    parser.add_argument("--participant-tls-cert", type=Path, metavar="FILE",
                        help="PEM client certificate shown to participants that require one"
                             " (with --participant-tls-key)")
    parser.add_argument("--participant-tls-key", type=Path, metavar="FILE",
                        help="PEM private key of --participant-tls-cert")
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
        "--alert-stuck-after", type=_duration, metavar="DURATION",
        help="raise an alert for a running or compensating saga that has not changed for this long, once per"
             " stall, e.g. 15m (default: none)",
    )
    parser.add_argument(
        "--audit-interval", type=_duration, metavar="DURATION",
        help="enqueue an audit of the saga log against the participants' barrier rows this often, unless one is"
             " running, resuming where the last audit stopped (as `compensa audit`; any replica runs it; default:"
             " never)",
    )
    parser.add_argument(
        "--barrier-retention", type=_duration, metavar="DURATION",
        help="with --audit-interval: tell participants they may delete the barrier rows of sagas final, audited"
             " clean and created longer ago than this (default: never)",
    )
    parser.add_argument(
        "--participant-health-interval", type=_duration, metavar="DURATION",
        help="probe every stored participant with grpc.health.v1 this often (default 5s)",
    )
    parser.add_argument(
        "--alert-participant-unhealthy-after", type=_duration_or_off, metavar="DURATION",
        help="raise an alert for a participant whose health checks have failed for this long (from every"
             " replica), once per outage, and another when it recovers (default 1m; 0 or off: none)",
    )
    parser.add_argument(
        "--alert-log-held-back-after", type=_duration_or_off, metavar="DURATION",
        help="raise an alert when committed events have waited this long behind a transaction left open on the"
             " database (PostgreSQL: watch streams and alerts wait for it), once per transaction, naming who"
             " holds it (default 1m; 0 or off: none)",
    )
    parser.add_argument(
        "--alert-webhook-timeout", type=_duration, metavar="DURATION",
        help="how long one delivery may take (default 5s); a replica killed while delivering leaves the alert"
             " to another replica after about this long",
    )
    parser.add_argument(
        "--retention", type=_duration, metavar="DURATION",
        help="delete sagas done for good (succeeded, compensated, or failed and resolved) this long after"
             " their last change, with their events, e.g. 30d (default: keep everything)",
    )
    _add_log_format_option(parser)


def _add_access_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http", type=_host_port, metavar="HOST:PORT",
                        help="serve the web dashboard at http(s)://HOST:PORT/ (default: none)")
    parser.add_argument(
        "--role", action="append", type=_parse_certificate_role, default=[], metavar="NAME=ROLE[:DEFINITIONS]",
        help="give the client certificate NAME (CN or subject alternative name) a role: reader, starter or"
             " operator, optionally limited to some definitions (ROLE:checkout,refund); repeatable (needs"
             " --tls-client-ca)",
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
    parser.add_argument(
        "--max-sagas-in-flight", type=int, default=1000, metavar="N",
        help="sagas this replica takes on at once (being started, or driven); a StartSaga over it is refused"
        " with RESOURCE_EXHAUSTED and a retry delay (default: 1000; 0: no limit)",
    )


def _add_purge(parser: argparse.ArgumentParser) -> None:
    _add_databases_options(parser)
    parser.add_argument(
        "--older-than", type=_duration, required=True, metavar="DURATION",
        help="delete sagas that are SUCCEEDED, COMPENSATED, or FAILED and resolved, and last changed longer"
             " ago than this (e.g. 30d), with their steps and events; a FAILED saga nobody resolved is kept",
    )


def _add_audit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", type=_moment, metavar="TIME",
        help="audit the sagas created since TIME (RFC 3339, or a duration ago: 1h) and report, leaving the audit's"
             " progress alone (default: resume where the last audit found everything clean)",
    )
    parser.add_argument("--definition", default="", metavar="NAME",
                        help="only sagas of this definition (and report, leaving the audit's progress alone)")
    parser.add_argument("--participant", action="append", default=[], metavar="NAME",
                        help="only this participant (repeatable; default: every participant with an address)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--barrier-retention", type=_duration, metavar="DURATION",
        help="tell each participant audited clean that it may delete its barrier rows of sagas final, audited"
             " clean and created longer ago than this (e.g. 30d); default: never",
    )
    parser.add_argument(
        "--settle-grace", type=_duration, metavar="DURATION",
        help="a step the participant settled while the log still waits for it is reported once its saga has not"
             " changed for this long (default 1m)",
    )
    parser.add_argument(
        "--clock-skew-margin", type=_duration, metavar="DURATION",
        help="how far a participant's clock may run ahead of the database's: the purge watermark stays this far"
             " behind (default 1m)",
    )
    parser.add_argument(
        "--wait", type=_duration, default=duration_pb2.Duration(seconds=3600), metavar="DURATION",
        help="how long to follow the audit job until its report (default 1h; the job goes on without the"
             " command, on any replica, and a later audit starts after it)",
    )


def _moment(text: str) -> datetime.datetime | datetime.timedelta:
    """A time: RFC 3339 (2026-12-07T10:00:00Z), or a duration meaning that long ago."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return datetime.timedelta(seconds=_duration(text).ToNanoseconds() / 1e9)
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{quote(text)} has no time zone; end it with Z or +HH:MM")
    return moment


def _add_participant(parser: argparse.ArgumentParser) -> None:
    from compensa.examples.server import PARTICIPANT_KINDS

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
    parser.add_argument(
        "--purge-interval", type=_duration, metavar="DURATION",
        help="delete barrier rows below the purge watermark the orchestrator's audit set, this often"
             " (default: never)",
    )
    _add_server_tls_options(parser, "the participant")
    _add_log_format_option(parser)


def _add_demo(parser: argparse.ArgumentParser) -> None:
    _add_log_format_option(parser)
    parser.add_argument("--http", type=_host_port, default="127.0.0.1:0", metavar="HOST:PORT",
                        help="where the demo serves the dashboard (default: a free port on 127.0.0.1)")
    parser.add_argument("--stay", action="store_true",
                        help="keep the demo's orchestrator and dashboard up after the checkouts, until Ctrl-C")


# --- saga commands ---


def _add_start(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("definition", help="definition name")
    parser.add_argument("--input", required=True, metavar="JSON",
                        help="saga input in proto3 JSON, or @FILE to read it from FILE (@- from stdin)")
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
        "--priority", type=_int_from(1, 5), default=0, metavar="N",
        help="1 (highest) to 5: goes first when a participant's limits hold calls back (default 3)",
    )
    _add_proto_module_option(parser, "defining the input type")
    _add_json_option(parser)


def _add_get(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("saga_id", metavar="ID")
    parser.add_argument(
        "--history", action="store_true",
        help="print the saga's history instead (its events, its definition version and the saga as stored), the"
        " JSON file `compensa replay` and compensa.testing replay: compensa get ID --history > h.json",
    )
    _add_json_option(parser)


def _step_mapping(text: str) -> tuple[str, str]:
    old, separator, new = text.partition("=")
    if not separator or not old.strip() or not new.strip():
        raise argparse.ArgumentTypeError(f"invalid mapping {quote(text)}; use OLD_STEP=NEW_STEP")
    return old.strip(), new.strip()


def _add_map_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--map", type=_step_mapping, action="append", default=[], metavar="OLD=NEW",
        help="a step renamed in the new definition (repeat for several)",
    )


def _add_replay(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("saga_id", metavar="ID")
    parser.add_argument(
        "--definition", type=Path, metavar="FILE",
        help="replay under this definition file instead of the saga's own version, and report where it diverges",
    )
    _add_map_option(parser)
    _add_proto_module_option(parser, "defining the definition's input type")
    _add_json_option(parser)


def _add_plan(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("definition_file", type=Path, metavar="DEFINITION_FILE",
                        help="the new definition (YAML or JSON); sagas of the definition it names are planned")
    parser.add_argument(
        "--definition-version", type=_int_from(0, INT32_MAX), default=0, metavar="N",
        help="only sagas running on this version (default: any)",
    )
    parser.add_argument("--state", type=parse_saga_state, help="only sagas in this state: running or compensating")
    parser.add_argument("--saga", action="append", default=[], metavar="ID",
                        help="only this saga (repeat for several)")
    parser.add_argument(
        "--filter", default="",
        help="only the sagas in flight this bulk-action filter selects, e.g. 'version=1 step=charge_card'"
        " (instead of --definition-version, --state and --saga; the same filter as `bulk start move`)",
    )
    _add_map_option(parser)
    parser.add_argument(
        "--page-size", type=_int_from(0, INT32_MAX), default=0, metavar="N",
        help="sagas per request (server default 50)",
    )
    _add_proto_module_option(parser, "defining the definition's input type")
    _add_json_option(parser)


def _add_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", type=parse_saga_state, help="only sagas in this state, e.g. compensated")
    parser.add_argument("--definition", metavar="NAME", default="", help="only sagas of this definition")
    parser.add_argument(
        "--stuck", type=_duration, metavar="DURATION", help="only unfinished sagas unchanged for this long, e.g. 10m"
    )
    parser.add_argument(
        "--page-size", type=_int_from(0, INT32_MAX), default=0, metavar="N", help="sagas per page (server default 50)"
    )
    parser.add_argument("--all", action="store_true", help="follow every page")
    _add_json_option(parser)


def _add_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--definition", metavar="NAME", default="", help="only sagas of this definition")
    parser.add_argument(
        "--stuck", type=_duration, metavar="DURATION",
        help="count unfinished sagas unchanged for this long as stuck (server default 10m)",
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


def _add_alerts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--after", type=_int_from(0, INT64_MAX), default=0, metavar="N",
        help="resume after this alert log position (default: from the first alert kept)",
    )
    parser.add_argument(
        "--limit", type=_int_from(0, INT64_MAX), default=0, metavar="N",
        help="stop after N alerts (default: follow the log until interrupted)",
    )
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


def _add_bulk(parser: argparse.ArgumentParser, client_options: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(title="bulk commands", metavar="BULK_COMMAND", dest="bulk_command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[client_options], help=help_text, description=help_text)

    start = add("start", "Start a bulk action on the sagas --filter selects (see the README's Incident runbook).")
    start.add_argument("action", choices=tuple(ACTIONS), help="what to do to each saga")
    start.add_argument(
        "--filter", required=True,
        help="which sagas, e.g. 'definition=checkout state=FAILED step=charge reason:\"declined\"'; 'all' for every",
    )
    start.add_argument("--dry-run", action="store_true", help="count and show a few of the sagas, and do nothing")
    start.add_argument("--note", default="", help="why (the note of resolve, required there), written on each saga")
    start.add_argument(
        "--rate", type=_positive_float, default=0.0, metavar="PER_SECOND",
        help="act on at most this many sagas per second (server default 100)",
    )
    start.add_argument("--request-id", default="", help="starting again with the same id returns the same job")
    start.add_argument(
        "--to-version", type=_int_from(1, INT32_MAX), default=0, metavar="N",
        help="move: the registered version of the filter's definition the sagas move to (run `compensa plan` first)",
    )
    _add_map_option(start)
    _add_actor_option(start)
    _add_json_option(start)
    listing = add("list", "List bulk actions, newest first.")
    listing.add_argument(
        "--page-size", type=_int_from(0, INT32_MAX), default=0, metavar="N", help="jobs per page (server default 50)"
    )
    listing.add_argument("--all", action="store_true", help="follow every page")
    _add_json_option(listing)
    for name, help_text in (
        ("get", "Show a bulk action's progress and the sagas it skipped or failed on, with reasons."),
        ("pause", "Pause a running bulk action."),
        ("resume", "Resume a paused bulk action where it stopped."),
        ("cancel", "Stop a bulk action for good (sagas already acted on stay so)."),
    ):
        command = add(name, help_text)
        command.add_argument("id", metavar="ID")
        _add_json_option(command)


# --- definition and participant commands ---


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
    parser.add_argument(
        "--dry-run", action="store_true",
        help="check each definition with the orchestrator and show what would change from the latest version;"
             " register nothing",
    )
    _add_actor_option(parser)


def _add_definitions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", nargs="?", default="", metavar="NAME",
        help="show this definition in full; or `history NAME`: who registered and promoted which version;"
             " or `promote NAME --version N`: make version N the latest again",
    )
    parser.add_argument("target", nargs="?", default="", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument(
        "--version", type=_int_from(0, INT32_MAX), default=0, metavar="N",
        help="with NAME: this version (default latest); with promote: the version to make the latest",
    )
    _add_actor_option(parser)
    _add_json_option(parser)


def _add_codegen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE.proto", help="the .proto files to generate from")
    parser.add_argument(
        "--proto-path", action="append", type=Path, default=[], metavar="DIR",
        help="a directory imports are relative to (repeatable; searched before each file's own); the generated"
             " modules are named from it (travel/v1/trip.proto -> travel.v1.trip_pb2)",
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="where to write the generated modules (required)")
    parser.add_argument(
        "--include-path", action="store_true",
        help="print the directory holding compensa/v1/contract.proto (installed with compensa) and exit: what to"
             " give protoc as -I to compile a contract itself (python -m grpc_tools.protoc -I. -I\"$(compensa codegen"
             " --include-path)\" --python_out=DIR --compensa_python_out=DIR FILE.proto); codegen adds it on its own",
    )


def _add_participants(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="?", choices=("list", "set", "limit", "hold", "release"), default="list",
        help="list (the default): every participant, its address, limits and hold; set NAME ADDRESS: store where"
             " NAME is served; limit NAME [--max-in-flight N] [--rate R/s] [--burst B]: its limits for the whole"
             " deployment (none given: no limits); hold NAME [--reason TEXT]: no new calls to it from any replica;"
             " release NAME: calls resume within its limits",
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help="the participant's name in definitions")
    # Not dest "address": that is the orchestrator's (--address).
    parser.add_argument("participant_address", nargs="?", metavar="ADDRESS", help="with set: HOST:PORT")
    parser.add_argument("--max-in-flight", type=int, metavar="N", help="with limit: calls in flight at once (1-10000)")
    parser.add_argument(
        "--rate", metavar="R/s", help="with limit: calls started per second, e.g. 100/s or 600/min (at most 100000/s)"
    )
    parser.add_argument(
        "--burst", type=int, metavar="B",
        help="with limit and --rate: calls let through at once after a quiet spell (default: the rate per second)",
    )
    parser.add_argument("--reason", default="", help="with hold: why (shown by waiting sagas)")
    contract = parser.add_mutually_exclusive_group()
    contract.add_argument(
        "--proto", type=Path, metavar="FILE",
        help="with set: the .proto file of the participant's contract (compensa/v1/contract.proto), compiled with its"
             " imports and stored: registered definitions naming NAME are checked against it, and so are later ones",
    )
    contract.add_argument(
        "--contract-from-reflection", action="store_true",
        help="with set: the orchestrator reads the contract from the participant at ADDRESS, through its server"
             " reflection (compensa.participants.serve lists the contract of a participant on generated stubs), and"
             " checks and stores it as with --proto; the participant must be running",
    )
    contract.add_argument("--clear-contract", action="store_true", help="with set: remove the stored contract")
    parser.add_argument(
        "--force", action="store_true",
        help="with set and --proto or --contract-from-reflection: store the contract even though registered"
             " definitions do not fit it (they fail at run time where they do not); logged with who did it and"
             " raised as an alert listing what it breaks",
    )
    parser.add_argument(
        "--proto-path", action="append", type=Path, default=[], metavar="DIR",
        help="with --proto: a directory imports are relative to (repeatable)",
    )
    parser.add_argument(
        "--service", default="", metavar="NAME",
        help="with --proto or --contract-from-reflection: the contract service's full name, when there are several",
    )
    _add_actor_option(parser)
    _add_json_option(parser)
