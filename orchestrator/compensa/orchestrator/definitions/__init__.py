"""Saga definitions: loading them from files, validating and normalizing them, and their graph.

A definition is a `compensa.v1.SagaDefinition`; files hold it as YAML or JSON in the
proto3 JSON mapping, so the proto is the schema. Every error is a `DefinitionError`
naming the file, the step and the field.

Validation rules (`validate_definition`):

- `name` and every step name match `NAME_PATTERN` in full; step names are unique; there is
  at least one step and at most `MAX_STEPS`; every step has a participant.
- Size: at most `MAX_DEFINITION_BYTES` serialized; `description` at most 4096 characters,
  `input_type` and `participant` at most `MAX_REFERENCE_CHARS`; no text holds a NUL.
- A chain of steps each depending on the one before is at most `MAX_DEPENDENCY_DEPTH` long.
- Durations are well-formed Durations within bounds: execute and compensate timeouts at
  most `MAX_CALL_TIMEOUT_SECONDS`, step and saga timeouts at most `MAX_WAIT_SECONDS`,
  backoffs from 0 to `MAX_BACKOFF_SECONDS`.
- `input_type` resolves to a message type: one of the definition's own `types` (a
  FileDescriptorSet registered with it), else one from an imported _pb2 module.
- Timeouts that are set are positive; `step_timeout` is at least `execute_timeout`, and a
  `long_running` step must have one.
- Retry policies: 1 <= max_attempts <= 1000, or 0 (no count limit) with a give_up_after;
  initial_backoff >= 0, 1 <= multiplier <= 100, max_backoff >= initial_backoff (and above 0
  without a count limit); give_up_after and alert_after above 0 and at most `MAX_WAIT_SECONDS`
  when set.
- `concurrency_key`, when set, is a path from `input` to a scalar, non-repeated field of
  `input_type` (`input.customer_id`); `max_running_per_key` is 1 to `MAX_RUNNING_PER_KEY`
  (0 becomes 1) and needs a key.
- `depends_on` names existing steps, never the step itself, and has no cycle.
- Pivot rule (the strict form from the saga literature): at most one PIVOT step; every
  step that depends on it, directly or not, is RETRIABLE; every other step is among its
  dependencies, directly or not, so nothing can run concurrently with it. A pivot cannot
  be undone, so once it has succeeded the saga must be able to finish going forward.

Normalization fills, per step: kind UNSPECIFIED -> COMPENSABLE; execute_timeout and
compensate_timeout 10s; retry 3 attempts / 200ms / x2 / 10s; compensate_retry no count limit /
500ms / x2 / 30s / an alert after 5m / giving up after 24h (a partly written policy takes
what it leaves out from these, except max_attempts); `depends_on`, so the normalized
definition lists every dependency; and `independent`, true exactly on the steps with no
dependencies (the first step included).

"No dependencies" (parallel starts): in proto3 an empty `depends_on` cannot be told from
an absent one, and the proto defines it as "the step before". A step says "none" with
`independent: true` (then `depends_on` must be empty, else a DefinitionError); a file may
write `depends_on: []` instead, which the loader sees before parsing and maps onto
`independent: true`. Normalization is idempotent: a normalized definition is a valid input
to `validate_definition` again, which returns an equal definition.
"""

from compensa.common.contracts import NAME_PATTERN
from compensa.orchestrator.definitions._contracts import (
    ContractMismatch,
    check_against_contracts,
    contract_change_breaks,
    forced_contract_message,
    read_contract,
    stored_contract,
)
from compensa.orchestrator.definitions._diff import definition_diff
from compensa.orchestrator.definitions._durations import (
    backoff_seconds,
    duration_seconds,
    retry_waited_seconds,
    shorthand_to_json,
)
from compensa.orchestrator.definitions._files import (
    DEFINITION_SUFFIXES,
    MAX_DEFINITION_FILE_BYTES,
    load_definition_file,
    load_definitions,
)
from compensa.orchestrator.definitions._graph import DefinitionGraph, ancestors, definition_graph, step_order
from compensa.orchestrator.definitions._keys import MAX_RUNNING_PER_KEY, key_value
from compensa.orchestrator.definitions._types import (
    compile_proto_files,
    proto_file_names,
    read_descriptor_set,
    run_protoc,
)
from compensa.orchestrator.definitions._validation import (
    MAX_ATTEMPTS_LIMIT,
    MAX_BACKOFF_SECONDS,
    MAX_CALL_TIMEOUT_SECONDS,
    MAX_DEFINITION_BYTES,
    MAX_DEPENDENCY_DEPTH,
    MAX_REFERENCE_CHARS,
    MAX_STEPS,
    MAX_WAIT_SECONDS,
    default_compensate_retry_policy,
    default_retry_policy,
    definition_fingerprint,
    validate_definition,
)

__all__ = [
    "DEFINITION_SUFFIXES",
    "MAX_ATTEMPTS_LIMIT",
    "MAX_BACKOFF_SECONDS",
    "MAX_CALL_TIMEOUT_SECONDS",
    "MAX_DEFINITION_BYTES",
    "MAX_DEFINITION_FILE_BYTES",
    "MAX_DEPENDENCY_DEPTH",
    "MAX_REFERENCE_CHARS",
    "MAX_RUNNING_PER_KEY",
    "MAX_STEPS",
    "MAX_WAIT_SECONDS",
    "NAME_PATTERN",
    "ContractMismatch",
    "DefinitionGraph",
    "ancestors",
    "backoff_seconds",
    "check_against_contracts",
    "compile_proto_files",
    "contract_change_breaks",
    "default_compensate_retry_policy",
    "default_retry_policy",
    "definition_diff",
    "definition_fingerprint",
    "definition_graph",
    "duration_seconds",
    "forced_contract_message",
    "key_value",
    "load_definition_file",
    "load_definitions",
    "proto_file_names",
    "read_contract",
    "read_descriptor_set",
    "retry_waited_seconds",
    "run_protoc",
    "shorthand_to_json",
    "step_order",
    "stored_contract",
    "validate_definition",
]
