"""Human-readable rendering of sagas and their event logs.

Pure functions from protobuf messages to text; the caller decides whether
colour is wanted (only when writing to a terminal).
"""

from __future__ import annotations

from datetime import UTC

from compensa.v1 import saga_pb2

__all__ = [
    "describe_wait",
    "event_type_name",
    "format_event",
    "format_saga",
    "saga_state_name",
    "step_state_name",
]

_RESET = "\033[0m"
_STATE_COLORS: dict[str, str] = {
    "SUCCEEDED": "\033[32m",
    "COMPENSATED": "\033[33m",
    "COMPENSATING": "\033[33m",
    "FAILED": "\033[31m",
    "COMPENSATION_FAILED": "\033[31m",
    "ALERT RAISED": "\033[31m",
}

_EVENT_LABEL_WIDTH = 20
# Errors in a waiting line are cut to this many characters.
_WAIT_ERROR_WIDTH = 120
_STEP_NAME_WIDTH = 14


def saga_state_name(state: int) -> str:
    """The short name of a saga state: "RUNNING", "COMPENSATED", ..."""
    return _short_name(saga_pb2.SagaState.Name(state), "SAGA_STATE_")  # type: ignore[arg-type]


def step_state_name(state: saga_pb2.StepState.ValueType) -> str:
    """The short name of a step state: "SUCCEEDED", "COMPENSATION_FAILED", ..."""
    return _short_name(saga_pb2.StepState.Name(state), "STEP_STATE_")


def event_type_name(event_type: saga_pb2.EventType.ValueType) -> str:
    """The event type as words: "STEP SUCCEEDED", "COMPENSATION STARTED", ..."""
    return _short_name(saga_pb2.EventType.Name(event_type), "EVENT_TYPE_").replace("_", " ")


def format_event(event: saga_pb2.SagaEvent, *, color: bool = False) -> str:
    """One line for one event: sequence, time, type, step, attempt, saga state, reason.

    For example
    ``  #3  12:00:01.234  STEP SUCCEEDED        charge_card     attempt 1   saga RUNNING``.
    Times are UTC.
    """
    label = event_type_name(event.type)
    parts = [
        f"#{event.sequence:<3}",
        _format_time(event),
        _paint(label.ljust(_EVENT_LABEL_WIDTH), _event_color_key(label), color),
        event.step_name.ljust(_STEP_NAME_WIDTH),
        (f"attempt {event.attempt}" if event.attempt else "").ljust(10),
        "saga " + _paint(saga_state_name(event.saga_state), saga_state_name(event.saga_state), color),
    ]
    line = "  " + "  ".join(parts)
    if event.type == saga_pb2.EVENT_TYPE_TAKEN_OVER:
        # The message already says who took it from whom, and why.
        return f"{line}  {event.message}"
    if event.message:
        line += f"  reason: {event.message}"
    if event.actor:
        line += f"  by {event.actor}"
    return line


def format_saga(saga: saga_pb2.Saga, *, color: bool = False) -> str:
    """A header line (id, definition@version, state, sequence), then one line per step."""
    state = saga_state_name(saga.state)
    lines = [
        f"saga {saga.saga_id}  {saga.definition_name}@{saga.definition_version}  "
        f"{_paint(state, state, color)}  sequence {saga.sequence}"
    ]
    if saga.failure_reason:
        lines.append(f"  failure: {saga.failure_reason}")
    if saga.resolution_note:
        lines.append(f"  resolved: {saga.resolution_note}")
    for step in saga.steps:
        step_state = step_state_name(step.state)
        line = (
            f"  {step.name.ljust(_STEP_NAME_WIDTH)}  "
            f"{_paint(step_state.ljust(20), step_state, color)}  "
            f"attempts {step.attempts}"
        )
        if step.compensate_attempts:
            line += f"  compensate attempts {step.compensate_attempts}"
        if step.last_error:
            line += f"  last error: {step.last_error}"
        lines.append(line)
    return "\n".join(lines)


def describe_wait(saga: saga_pb2.Saga, now: float) -> str:
    """One line saying what an unfinished saga waits for (`now`: seconds
    since the epoch), e.g. ``saga s-1: step charge_card retrying (attempt 3:
    UNAVAILABLE: ...), next attempt in 40s``; "" when it waits for nothing."""
    waits = [what for step in saga.steps if (what := _step_wait(step, now))]
    return f"saga {saga.saga_id}: " + "; ".join(waits) if waits else ""


def _step_wait(step: saga_pb2.Step, now: float) -> str:
    error = step.last_error
    if len(error) > _WAIT_ERROR_WIDTH:
        error = error[:_WAIT_ERROR_WIDTH] + "..."
    next_in = step.next_attempt_time.ToNanoseconds() / 1e9 - now if step.HasField("next_attempt_time") else None
    later = f", next attempt in {_seconds_text(next_in)}" if next_in is not None and next_in > 0 else ""
    if step.state == saga_pb2.STEP_STATE_RUNNING:
        # `attempts` counts the next attempt too (views.py): the failed one is the one before.
        if error and later:
            return f"step {step.name} retrying (attempt {step.attempts - 1}: {error}){later}"
        if error:
            return f"step {step.name}: attempt {step.attempts} in flight (attempt {step.attempts - 1}: {error})"
        return f"step {step.name}: attempt {max(step.attempts, 1)} in flight"
    if step.state == saga_pb2.STEP_STATE_WAITING:
        return f"step {step.name} waiting for its participant to report the outcome (long-running)"
    if step.state == saga_pb2.STEP_STATE_COMPENSATING:
        if error and step.compensate_attempts:
            return f"compensating step {step.name} (attempt {step.compensate_attempts}: {error}){later}"
        return f"compensating step {step.name}"
    return ""


def _seconds_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds / 3600:.0f}h{seconds % 3600 / 60:02.0f}m"


def _short_name(full_name: str, prefix: str) -> str:
    return full_name.removeprefix(prefix)


def _format_time(event: saga_pb2.SagaEvent) -> str:
    if not event.HasField("time"):
        return " " * 12
    moment = event.time.ToDatetime(tzinfo=UTC)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _event_color_key(label: str) -> str:
    if label.endswith("SUCCEEDED"):
        return "SUCCEEDED"
    if label.endswith("COMPENSATED"):
        return "COMPENSATED"
    if "COMPENSAT" in label:
        return "COMPENSATING"
    if label.endswith("FAILED") or label == "ALERT RAISED":
        return "FAILED"
    return ""


def _paint(text: str, key: str, color: bool) -> str:
    code = _STATE_COLORS.get(key)
    if not color or code is None:
        return text
    return f"{code}{text}{_RESET}"


def short_duration(seconds: float) -> str:
    """90.5 -> "1m30s": the two largest units, for people (and in the grammar `--stuck` reads)."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    parts = [(whole // 86400, "d"), (whole % 86400 // 3600, "h"), (whole % 3600 // 60, "m"), (whole % 60, "s")]
    shown = [f"{amount}{unit}" for amount, unit in parts if amount]
    return "".join(shown[:2])
