"""A saga's log as a Gantt chart: one lane per step, a box per attempt.

Pure: from the saga's log entries to boxes placed in percent of the saga's
time span, which the saga page draws as positioned CSS boxes. Parallel steps
show as overlapping boxes on different lanes; each retry is a box of its own
(an attempt's box starts when it was scheduled, so the backoff before it is
inside it); compensations are drawn on the step's lane in their own colour.
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


def _ticks(span: float, count: int = 5) -> list[Tick]:
    return [Tick(round(100.0 * index / count, 3), _duration_label(span * index / count)) for index in range(count + 1)]


def _duration_label(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
