"""Validation and normalization of saga definitions, whatever their origin."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Literal

from google.protobuf import duration_pb2

from compensa.common.contracts import NAME_PATTERN
from compensa.orchestrator.definitions._durations import duration_of, duration_seconds, duration_text
from compensa.orchestrator.definitions._graph import DefinitionGraph, find_cycle
from compensa.orchestrator.definitions._keys import MAX_RUNNING_PER_KEY, key_path_problem
from compensa.orchestrator.shared.errors import DefinitionError, InvalidArgument, quote
from compensa.orchestrator.shared.limits import MAX_TEXT_CHARS, check_text, duration_problem
from compensa.orchestrator.shared.payloads import message_class, pool_of
from compensa.v1 import definition_pb2

MAX_ATTEMPTS_LIMIT = 1000
"""The largest `max_attempts` a retry policy may ask for."""

MAX_STEPS = 200
"""The most steps a definition may have."""

MAX_DEPENDENCY_DEPTH = 100
"""The longest chain of steps each depending on the one before it."""

MAX_DEFINITION_BYTES = 1024 * 1024
"""The largest definition, serialized with the message types it carries."""

MAX_REFERENCE_CHARS = 255
"""The longest `input_type` and `participant`."""

MAX_CALL_TIMEOUT_SECONDS = 86400.0
"""The longest `execute_timeout` and `compensate_timeout`: a day (a longer wait is a
long-running step, which reports with CompleteStep)."""

MAX_WAIT_SECONDS = 365 * 86400.0
"""The longest `step_timeout` and `saga_timeout`: a year."""

MAX_BACKOFF_SECONDS = 86400.0
"""The longest `initial_backoff` and `max_backoff`: a day."""

MAX_BACKOFF_MULTIPLIER = 100.0
"""The largest `backoff_multiplier` (an infinite one would make 0 * inf a NaN delay)."""

_DEFAULT_TIMEOUT = "10s"

StepKind = definition_pb2.StepKind
RetryPolicy = definition_pb2.RetryPolicy


def default_retry_policy() -> RetryPolicy:
    """The Execute retry policy of a step that sets none: 3 attempts, 200ms, x2, at most 10s."""
    return RetryPolicy(
        max_attempts=3,
        initial_backoff=duration_of("200ms"),
        backoff_multiplier=2.0,
        max_backoff=duration_of("10s"),
    )


def default_compensate_retry_policy() -> RetryPolicy:
    """The Compensate retry policy of a step that sets none: no limit on attempts,
    500ms, x2, at most 30s between attempts, an alert after 5m, giving up after 24h.

    Far beyond the Execute default: a compensation that gives up leaves the saga
    for a person, and a participant back after an outage should need nobody.
    """
    return RetryPolicy(
        max_attempts=0,
        initial_backoff=duration_of("500ms"),
        backoff_multiplier=2.0,
        max_backoff=duration_of("30s"),
        give_up_after=duration_of("24h"),
        alert_after=duration_of("5m"),
    )


def validate_definition(
    definition: definition_pb2.SagaDefinition, *, source: str = ""
) -> definition_pb2.SagaDefinition:
    """A validated, normalized copy of `definition`; DefinitionError naming `source`, step and field if invalid.

    `definition` itself is never modified. The copy has every default filled in: each step's
    kind (UNSPECIFIED -> COMPENSABLE), both timeouts, both retry policies, its `depends_on`
    (an empty list on a step that is not `independent` becomes the previous step) and
    `independent` (true exactly on the steps left with no dependencies, the first included),
    so downstream code reads the copy as written. Normalization is idempotent: the copy is a
    valid input again, and validating it returns an equal copy. Any `version` is accepted
    here; the file loaders reject non-zero ones. The rules are listed in the
    `compensa.orchestrator.definitions` docstring.
    """
    size = definition.ByteSize()
    if size > MAX_DEFINITION_BYTES:
        raise DefinitionError(f"is {size} bytes serialized; the limit is {MAX_DEFINITION_BYTES}", source=source)
    if len(definition.steps) > MAX_STEPS:
        raise DefinitionError(
            f"has {len(definition.steps)} steps; the limit is {MAX_STEPS}", source=source, field="steps"
        )
    result = definition_pb2.SagaDefinition()
    result.CopyFrom(definition)

    _check_name(result.name, source=source, step="", field="name", what="definition")
    _check_text(result.description, source=source, step="", field="description", max_chars=MAX_TEXT_CHARS)
    if not result.input_type:
        raise DefinitionError("required: the full name of the saga's input message", source=source, field="input_type")
    _check_text(result.input_type, source=source, step="", field="input_type", max_chars=MAX_REFERENCE_CHARS)
    try:
        pool = pool_of(result)
    except InvalidArgument as error:
        raise DefinitionError(str(error), source=source, field="types") from None
    try:
        input_class = message_class(result.input_type, pool)
    except InvalidArgument as error:
        raise DefinitionError(str(error), source=source, field="input_type") from None
    _check_concurrency_key(result, input_class.DESCRIPTOR, source=source)
    if result.HasField("saga_timeout"):
        _check_positive(result.saga_timeout, source=source, step="", field="saga_timeout", maximum=MAX_WAIT_SECONDS)
    if not result.steps:
        raise DefinitionError("a definition needs at least one step", source=source, field="steps")

    seen: set[str] = set()
    for index, step in enumerate(result.steps):
        label = step.name or f"#{index + 1}"
        _check_name(step.name, source=source, step=label, field="name", what="step")
        if step.name in seen:
            raise DefinitionError(
                "two steps have this name; step names must be unique", source=source, step=label, field="name"
            )
        seen.add(step.name)
        _normalize_step(step, source=source)

    _normalize_dependencies(result, source=source)
    graph = DefinitionGraph.of(result)
    _check_depth(graph, source=source)
    _check_pivot(result, graph, source=source)
    return result


def _check_concurrency_key(
    definition: definition_pb2.SagaDefinition, input_type: Any, *, source: str
) -> None:
    """The key path names a scalar field of the input; max_running_per_key
    is set to 1 when 0, and needs a key."""
    if not definition.concurrency_key:
        if definition.max_running_per_key:
            raise DefinitionError(
                "needs concurrency_key: it limits the sagas running at once per key", source=source,
                field="max_running_per_key",
            )
        return
    problem = key_path_problem(definition.concurrency_key, input_type)
    if problem is not None:
        raise DefinitionError(problem, source=source, field="concurrency_key")
    if not 0 <= definition.max_running_per_key <= MAX_RUNNING_PER_KEY:
        raise DefinitionError(
            f"must be from 1 to {MAX_RUNNING_PER_KEY} (0: 1), got {definition.max_running_per_key}",
            source=source, field="max_running_per_key",
        )
    definition.max_running_per_key = definition.max_running_per_key or 1


def definition_fingerprint(definition: definition_pb2.SagaDefinition) -> str:
    """The sha256 hex digest of `definition` without its `version`.

    Pass a normalized definition: two definitions with the same content then have the same
    fingerprint however they were written, which makes registration idempotent.
    """
    unversioned = definition_pb2.SagaDefinition()
    unversioned.CopyFrom(definition)
    unversioned.ClearField("version")
    return hashlib.sha256(unversioned.SerializeToString(deterministic=True)).hexdigest()


def _check_name(name: str, *, source: str, step: str, field: str, what: str) -> None:
    if not name:
        raise DefinitionError(f"required: every {what} needs a name", source=source, step=step, field=field)
    if not NAME_PATTERN.fullmatch(name):
        raise DefinitionError(
            f"{quote(name)} is not a valid {what} name: use 1-63 lowercase letters, digits, '-' and '_', "
            "starting with a letter",
            source=source,
            step=step,
            field=field,
        )


def _check_text(value: str, *, source: str, step: str, field: str, max_chars: int) -> None:
    try:
        check_text(value, "it", max_chars=max_chars)
    except InvalidArgument as error:
        raise DefinitionError(str(error).removeprefix("it "), source=source, step=step, field=field) from None


def _check_duration(
    duration: duration_pb2.Duration, *, source: str, step: str, field: str, minimum: float, maximum: float,
    positive: bool = False,
) -> None:
    problem = duration_problem(duration, minimum=minimum, maximum=maximum, exclusive_minimum=positive)
    if problem is not None:
        raise DefinitionError(problem, source=source, step=step, field=field)


def _check_positive(
    duration: duration_pb2.Duration, *, source: str, step: str, field: str, maximum: float = MAX_CALL_TIMEOUT_SECONDS
) -> None:
    _check_duration(duration, source=source, step=step, field=field, minimum=0.0, maximum=maximum, positive=True)


def _check_depth(graph: DefinitionGraph, *, source: str) -> None:
    """Chains of dependencies are at most MAX_DEPENDENCY_DEPTH steps long (no recursion)."""
    depth: dict[str, int] = {}
    for name in graph.order:
        depth[name] = 1 + max((depth[dependency] for dependency in graph.dependencies[name]), default=0)
        if depth[name] > MAX_DEPENDENCY_DEPTH:
            raise DefinitionError(
                f"ends a chain of {depth[name]} steps each depending on the one before; the limit is"
                f" {MAX_DEPENDENCY_DEPTH}",
                source=source,
                step=name,
                field="depends_on",
            )


def _normalize_step(step: definition_pb2.StepDefinition, *, source: str) -> None:
    if not step.participant.strip():
        raise DefinitionError(
            "required: a logical participant name or HOST:PORT", source=source, step=step.name, field="participant"
        )
    _check_text(step.participant, source=source, step=step.name, field="participant", max_chars=MAX_REFERENCE_CHARS)
    if step.kind == StepKind.STEP_KIND_UNSPECIFIED:
        step.kind = StepKind.STEP_KIND_COMPENSABLE
    elif step.kind not in StepKind.values():
        raise DefinitionError(f"unknown step kind {step.kind}", source=source, step=step.name, field="kind")

    if step.HasField("execute_timeout"):
        _check_positive(step.execute_timeout, source=source, step=step.name, field="execute_timeout")
    else:
        step.execute_timeout.CopyFrom(duration_of(_DEFAULT_TIMEOUT))
    if step.HasField("compensate_timeout"):
        _check_positive(step.compensate_timeout, source=source, step=step.name, field="compensate_timeout")
    else:
        step.compensate_timeout.CopyFrom(duration_of(_DEFAULT_TIMEOUT))
    if step.HasField("step_timeout"):
        _check_positive(
            step.step_timeout, source=source, step=step.name, field="step_timeout", maximum=MAX_WAIT_SECONDS
        )
        if duration_seconds(step.step_timeout) < duration_seconds(step.execute_timeout):
            raise DefinitionError(
                f"must be at least execute_timeout ({duration_text(step.execute_timeout)}), "
                f"got {duration_text(step.step_timeout)}",
                source=source,
                step=step.name,
                field="step_timeout",
            )

    elif step.long_running:
        # Without it a report that never comes would leave the saga waiting forever.
        raise DefinitionError(
            "a long_running step needs a step_timeout: how long to wait for CompleteStep",
            source=source,
            step=step.name,
            field="step_timeout",
        )

    def fail(field: str) -> Callable[[str], DefinitionError]:
        return lambda problem: DefinitionError(problem, source=source, step=step.name, field=field)

    if not step.HasField("retry"):
        step.retry.CopyFrom(default_retry_policy())
    else:
        _normalize_policy(step.retry, default_retry_policy(), fail, "retry")
    if not step.HasField("compensate_retry"):
        step.compensate_retry.CopyFrom(default_compensate_retry_policy())
    else:
        _normalize_policy(step.compensate_retry, default_compensate_retry_policy(), fail, "compensate_retry")


def _normalize_policy(
    policy: RetryPolicy, default: RetryPolicy, fail: Callable[[str], Callable[[str], DefinitionError]], name: str
) -> None:
    # A partly written policy inherits what it leaves out, except max_attempts: proto3 cannot
    # tell an omitted 0 from a written one, and silently turning "0 attempts" into 3 would hide
    # a mistake. backoff_multiplier 0 is never valid, so reading it as "omitted" hides nothing.
    if not policy.HasField("initial_backoff"):
        policy.initial_backoff.CopyFrom(default.initial_backoff)
    if not policy.HasField("max_backoff"):
        policy.max_backoff.CopyFrom(default.max_backoff)
    if policy.backoff_multiplier == 0:
        policy.backoff_multiplier = default.backoff_multiplier
    limit: Literal["give_up_after", "alert_after"]
    for limit in ("give_up_after", "alert_after"):
        if not policy.HasField(limit) and default.HasField(limit):
            getattr(policy, limit).CopyFrom(getattr(default, limit))

    unlimited = policy.max_attempts == 0 and policy.HasField("give_up_after")
    if not unlimited and not 1 <= policy.max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise fail(f"{name}.max_attempts")(
            f"must be between 1 and {MAX_ATTEMPTS_LIMIT} (attempts in total, the first included), "
            f"or 0 with a give_up_after; got {policy.max_attempts}"
        )
    for limit in ("give_up_after", "alert_after"):
        if policy.HasField(limit):
            problem = duration_problem(
                getattr(policy, limit), minimum=0.0, maximum=MAX_WAIT_SECONDS, exclusive_minimum=True
            )
            if problem is not None:
                raise fail(f"{name}.{limit}")(problem)
    if unlimited and duration_seconds(policy.max_backoff) <= 0:
        raise fail(f"{name}.max_backoff")(
            "must be positive when max_attempts is 0: without waits, give_up_after would never pass"
        )
    for backoff in ("initial_backoff", "max_backoff"):
        problem = duration_problem(getattr(policy, backoff), minimum=0.0, maximum=MAX_BACKOFF_SECONDS)
        if problem is not None:
            raise fail(f"{name}.{backoff}")(problem)
    if not 1.0 <= policy.backoff_multiplier <= MAX_BACKOFF_MULTIPLIER:  # also rejects NaN
        raise fail(f"{name}.backoff_multiplier")(
            f"must be from 1.0 to {MAX_BACKOFF_MULTIPLIER:g}, got {policy.backoff_multiplier}"
        )
    if duration_seconds(policy.max_backoff) < duration_seconds(policy.initial_backoff):
        raise fail(f"{name}.max_backoff")(
            f"must be at least initial_backoff ({duration_text(policy.initial_backoff)}), "
            f"got {duration_text(policy.max_backoff)}"
        )


def _normalize_dependencies(definition: definition_pb2.SagaDefinition, *, source: str) -> None:
    names = {step.name for step in definition.steps}
    previous = ""
    for step in definition.steps:
        if step.independent and step.depends_on:
            raise DefinitionError(
                "an independent step has no dependencies, so depends_on must be empty, got "
                + ", ".join(quote(d) for d in step.depends_on[:5]) + (", ..." if len(step.depends_on) > 5 else ""),
                source=source,
                step=step.name,
                field="independent",
            )
        if not step.depends_on and not step.independent and previous:
            step.depends_on.append(previous)
        if not step.depends_on:
            step.independent = True
        previous = step.name
        listed: set[str] = set()
        for dependency in step.depends_on:
            if dependency == step.name:
                raise DefinitionError(
                    "a step cannot depend on itself", source=source, step=step.name, field="depends_on"
                )
            if dependency not in names:
                raise DefinitionError(
                    f"unknown step {quote(dependency)}", source=source, step=step.name, field="depends_on"
                )
            if dependency in listed:
                raise DefinitionError(
                    f"{quote(dependency)} is listed twice", source=source, step=step.name, field="depends_on"
                )
            listed.add(dependency)
    cycle = find_cycle(
        [step.name for step in definition.steps],
        {step.name: frozenset(step.depends_on) for step in definition.steps},
    )
    if cycle:
        raise DefinitionError(
            "dependency cycle: " + " -> ".join(cycle) + " (each depends on the next)",
            source=source,
            step=cycle[0],
            field="depends_on",
        )


def _check_pivot(definition: definition_pb2.SagaDefinition, graph: DefinitionGraph, *, source: str) -> None:
    pivots = [step.name for step in definition.steps if step.kind == StepKind.STEP_KIND_PIVOT]
    if not pivots:
        return
    pivot = pivots[0]
    if len(pivots) > 1:
        raise DefinitionError(
            f"a definition has at most one PIVOT step, and {pivot!r} is one already",
            source=source,
            step=pivots[1],
            field="kind",
        )
    for step in definition.steps:
        if step.name == pivot:
            continue
        if step.name in graph.descendants[pivot]:
            if step.kind != StepKind.STEP_KIND_RETRIABLE:
                raise DefinitionError(
                    f"runs after the pivot {pivot!r}, so it must be RETRIABLE: once the pivot succeeds "
                    f"the saga only goes forward, got {StepKind.Name(step.kind).removeprefix('STEP_KIND_')}",
                    source=source,
                    step=step.name,
                    field="kind",
                )
        elif step.name not in graph.ancestors[pivot]:
            raise DefinitionError(
                f"may run concurrently with the pivot {pivot!r}: every other step must run before it "
                "(be among its dependencies) or after it (depend on it)",
                source=source,
                step=step.name,
                field="depends_on",
            )
