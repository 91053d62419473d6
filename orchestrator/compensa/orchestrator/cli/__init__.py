"""The `compensa` command: run the orchestrator, its example participants, and operate sagas.

Where to look:
- parser.py: every command and its options (`build_parser`), and the argument
  types that refuse bad values; durations in the grammar of orchestrator.durations.
- server.py: serve, migrate, purge, participant, demo.
- sagas.py: start, get, list, status, watch, cancel, retry, resolve.
- definitions.py: register, definitions, participants.
- replay.py: replay (a saga's log through the state machine) and plan (sagas
  in flight classified against a new definition).
- output.py: what the commands print (JSON, rows, tables, timelines, error lines).
- connection.py: the client commands' channel to the orchestrator.

Exit codes (exit_codes.py): 0 success; 1 a saga followed with `start --wait`
ended COMPENSATED or FAILED (or the demo failed), or `replay` found a
divergence; 2 a usage error, a malformed input, or an error answered by the
orchestrator; 130 interrupted; 141 the reader of its output went away
(`compensa list | head`), quietly. Every error
reaches the user through the one exit in `main`, as one line on stderr:
``error: ...`` (``error: CODE: details`` for one the orchestrator answered).
Commands raise; they never print an error themselves.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import grpc

from compensa.common.startup import ServingError
from compensa.common.tls import TlsConfigError
from compensa.orchestrator.cli.connection import no_orchestrator_text
from compensa.orchestrator.cli.exit_codes import EXIT_BROKEN_PIPE, EXIT_ERROR, EXIT_INTERRUPTED
from compensa.orchestrator.cli.output import error_text
from compensa.orchestrator.cli.parser import Command, build_parser, parse_arguments, parse_saga_state
from compensa.orchestrator.shared.errors import CompensaError
from compensa.orchestrator.shared.logs import configure_logging

__all__ = ["build_parser", "main", "parse_saga_state"]


def main(argv: list[str] | None = None) -> int:
    """Runs the `compensa` command line and returns its exit code."""
    address = None
    try:
        args = parse_arguments(sys.argv[1:] if argv is None else argv)
        address = getattr(args, "address", None)
        _configure_logging(args)
        command: Command = args.command
        return command(args)
    except (CompensaError, grpc.RpcError, TlsConfigError, ServingError) as error:
        nothing_there = no_orchestrator_text(error, address) if isinstance(error, grpc.Call) and address else None
        print(f"error: {nothing_there or error_text(error)}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`compensa list | head`): stop quietly, and keep
        # the interpreter's last flush of stdout from complaining too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _configure_logging(args: argparse.Namespace) -> None:
    level = max(logging.DEBUG, args.base_log_level - 10 * args.verbose)
    configure_logging(level, getattr(args, "log_format", "text"))  # --log-format: the commands that run a server
    # Alembic reports every step it takes at INFO; migrate says what it did in one line.
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))

