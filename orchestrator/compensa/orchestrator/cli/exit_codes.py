"""The exit codes of `compensa`, as its --help and the package docstring list them."""

from __future__ import annotations

EXIT_OK = 0
#: A saga followed with `start --wait` ended COMPENSATED or FAILED (or the demo failed).
EXIT_SAGA_ENDED_BADLY = 1
#: `replay` found that the saga's log diverges from the definition (or, under
#: its own version, that the rebuilt saga is not where the stored one is).
EXIT_DIVERGED = 1
#: A usage error, a malformed input, or an error answered by the orchestrator.
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
#: The reader of the output went away (`compensa list | head`): stopped quietly,
#: with the status a shell shows for a process ended by SIGPIPE.
EXIT_BROKEN_PIPE = 141
