"""A saga's log as a Gantt chart: one lane per step, a box per attempt.

Pure: from the saga's log entries to boxes placed in percent of the saga's
time span, which the saga page draws as positioned CSS boxes. Parallel steps
show as overlapping boxes on different lanes; each retry is a box of its own
(an attempt's box starts when it was scheduled, so the backoff before it is
inside it); compensations are drawn on the step's lane in their own colour.

Attempts the saga stopped waiting for (a cancel, a failure elsewhere) end
when compensation started, and everything open ends with the saga: a saga
that ended is drawn to its end, never to now. Compensation boxes, often
milliseconds in a chart of minutes, get a width one can see and point at.
Tick labels are round numbers of one unit (1, 2, 5 times a power of ten).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from compensa.orchestrator.shared.records import LogEvent
from compensa.v1 import saga_pb2

E = saga_pb2

#: Event types that end an attempt, with the outcome each box is drawn with.
_ENDS_EXECUTE: dict[int, str] = {
    E.EVENT_TYPE_STEP_SUCCEEDED: "succeeded",
    E.EVENT_TYPE_STEP_FAILED: "failed",
    E.EVENT_TYPE_STEP_RETRY_SCHEDULED: "retried",
}
_ENDS_COMPENSATE: dict[int, str] = {
    E.EVENT_TYPE_STEP_COMPENSATED: "compensated",
    E.EVENT_TYPE_STEP_COMPENSATION_FAILED: "failed",
    E.EVENT_TYPE_STEP_COMPENSATE_RETRY_SCHEDULED: "retried",
}
#: Saga-wide events after which no Execute attempt still open is waited for.
_ABANDON_EXECUTES = frozenset({E.EVENT_TYPE_COMPENSATION_STARTED})
#: Saga-wide events after which nothing is waited for.
_ENDS_SAGA = frozenset({E.EVENT_TYPE_SAGA_SUCCEEDED, E.EVENT_TYPE_SAGA_COMPENSATED, E.EVENT_TYPE_SAGA_FAILED})
#: The narrowest compensation box, in percent of the chart's width.
MIN_COMPENSATION_PERCENT = 2.5
#: Tick steps, in seconds: 1, 2, 5 times a power of ten of each unit, and
#: what the clock counts in (15 and 30 minutes, 6 and 12 hours).
_TICK_STEPS = (
    *(factor * 10.0**power for power in range(-3, 1) for factor in (1, 2, 5)),
    10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0,
    3600.0, 7200.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0,
    *(factor * 86400.0 * 10**power for power in range(0, 4) for factor in (1, 2, 5)),
)
_TICK_UNITS = ((86400.0, "d"), (3600.0, "h"), (60.0, "min"), (1.0, "s"), (0.001, "ms"))
#: At most this many intervals between ticks.
_MAX_TICKS = 6
#: Saga-wide events drawn as markers across every lane.
_MARKERS: dict[int, str] = {
    E.EVENT_TYPE_CANCEL_REQUESTED: "cancel requested",
    E.EVENT_TYPE_ALERT_RAISED: "alert",
    E.EVENT_TYPE_OPERATOR_RETRIED: "operator retried",
    E.EVENT_TYPE_OPERATOR_RESOLVED: "operator resolved",
    E.EVENT_TYPE_COMPENSATION_STARTED: "compensation started",
}


@dataclass
class Box:
    """One attempt of one phase (execute or compensate) of a step."""

    phase: str  # "execute" or "compensate"
    attempt: int
    start: float
    end: float | None = None
    outcome: str = "running"  # running, waiting, succeeded, failed, retried, compensated
    detail: str = ""
    first_sequence: int = 0
    last_sequence: int = 0
    left: float = 0.0  # percent of the chart's width
    width: float = 0.0

    @property
    def label(self) -> str:
        verb = "attempt" if self.phase == "execute" else "compensation"
        return f"{verb} {self.attempt}: {self.outcome}"


@dataclass
class Lane:
    step: str
    boxes: list[Box] = field(default_factory=list)

    def open_box(self, phase: str) -> Box | None:
        for box in reversed(self.boxes):
            if box.phase == phase and box.end is None:
                return box
        return None


@dataclass(frozen=True)
class Marker:
    label: str
    sequence: int
    left: float
    detail: str


@dataclass(frozen=True)
class Tick:
    left: float
    label: str


@dataclass(frozen=True)
class Chart:
    lanes: list[Lane]
    markers: list[Marker]
    ticks: list[Tick]
    span_seconds: float
    # Saga events after the last step's end (an operator's resolve hours
    # later), left out so that they do not squash the steps; the log has them.
    later_markers: int = 0


def chart(step_names: Sequence[str], events: Sequence[LogEvent], now: float) -> Chart:
    """The chart of a saga whose steps are `step_names` (in definition order)
    and whose log is `events`; boxes still open end at `now`. It spans the
    steps' activity (the whole log when no step ran)."""
    lanes = {name: Lane(name) for name in step_names}
    raw_markers: list[tuple[str, int, float, str]] = []
    for event in events:
        lane = lanes.get(event.step_name) if event.step_name else None
        if event.type in _ABANDON_EXECUTES or event.type in _ENDS_SAGA:
            phases = ("execute",) if event.type in _ABANDON_EXECUTES else ("execute", "compensate")
            for every in lanes.values():
                _abandon(every, phases, event)
        if lane is None:
            if event.type in _MARKERS:
                detail = " ".join(part for part in (event.message, f"by {event.actor}" if event.actor else "") if part)
                raw_markers.append((_MARKERS[event.type], event.sequence, event.time, detail))
            continue
        _apply(lane, event)
    start = min((event.time for event in events), default=now)
    boxes = [box for lane in lanes.values() for box in lane.boxes]
    if boxes:
        finish = max(now if box.end is None else box.end for box in boxes)
    else:
        finish = max((event.time for event in events), default=now)
    span = max(finish - start, 1e-3)

    def place(moment: float) -> float:
        return round(100.0 * (moment - start) / span, 3)

    for lane in lanes.values():
        for box in lane.boxes:
            end = box.end if box.end is not None else finish
            box.left = place(box.start)
            box.width = max(round(place(end) - box.left, 3), 0.0)
            if box.phase == "compensate" and box.width < MIN_COMPENSATION_PERCENT:
                box.width = MIN_COMPENSATION_PERCENT
                box.left = min(box.left, round(100.0 - MIN_COMPENSATION_PERCENT, 3))
    markers = [
        Marker(label, sequence, place(moment), detail)
        for label, sequence, moment, detail in raw_markers
        if moment <= finish
    ]
    return Chart(list(lanes.values()), markers, _ticks(span), span, len(raw_markers) - len(markers))


def _apply(lane: Lane, event: LogEvent) -> None:
    kind = event.type
    if kind == E.EVENT_TYPE_STEP_STARTED:
        lane.boxes.append(Box("execute", max(event.attempt, 1), event.time, first_sequence=event.sequence))
    elif kind == E.EVENT_TYPE_STEP_WAITING:
        box = lane.open_box("execute") or _opened(lane, "execute", event)
        box.outcome, box.last_sequence = "waiting", event.sequence
    elif kind in _ENDS_EXECUTE:
        _close(lane.open_box("execute") or _opened(lane, "execute", event), event, _ENDS_EXECUTE[kind])
        if kind == E.EVENT_TYPE_STEP_RETRY_SCHEDULED:
            lane.boxes.append(Box("execute", event.attempt + 1, event.time, first_sequence=event.sequence))
    elif kind == E.EVENT_TYPE_STEP_COMPENSATING:
        lane.boxes.append(Box("compensate", max(event.attempt, 1), event.time, first_sequence=event.sequence))
    elif kind in _ENDS_COMPENSATE:
        _close(lane.open_box("compensate") or _opened(lane, "compensate", event), event, _ENDS_COMPENSATE[kind])
        if kind == E.EVENT_TYPE_STEP_COMPENSATE_RETRY_SCHEDULED:
            lane.boxes.append(Box("compensate", event.attempt + 1, event.time, first_sequence=event.sequence))


def _abandon(lane: Lane, phases: tuple[str, ...], event: LogEvent) -> None:
    """Ends the lane's open boxes of `phases` at `event`: nothing waits for them any more."""
    for phase in phases:
        box = lane.open_box(phase)
        if box is not None:
            box.end, box.last_sequence = event.time, event.sequence
            box.outcome = "abandoned"
            box.detail = event.message


def _opened(lane: Lane, phase: str, event: LogEvent) -> Box:
    """A box for an outcome whose start the log does not show (a retry
    reopened by an operator): it starts at the outcome."""
    box = Box(phase, max(event.attempt, 1), event.time, first_sequence=event.sequence)
    lane.boxes.append(box)
    return box


def _close(box: Box, event: LogEvent, outcome: str) -> None:
    box.end, box.outcome, box.last_sequence = event.time, outcome, event.sequence
    box.attempt = event.attempt or box.attempt
    box.detail = event.message


def _ticks(span: float) -> list[Tick]:
    """Ticks at 0 and every multiple of a round step up to `span`, labelled
    in the largest unit the step is a whole number of."""
    step = next((step for step in _TICK_STEPS if span / step <= _MAX_TICKS), _TICK_STEPS[-1])
    size, unit = next((size, unit) for size, unit in _TICK_UNITS if step >= size and _whole(step / size))
    count = int(span / step + 1e-9)
    return [
        Tick(round(100.0 * index * step / span, 3), f"{round(index * step / size)} {unit}")
        for index in range(count + 1)
    ]


def _whole(value: float) -> bool:
    return abs(value - round(value)) < 1e-9
