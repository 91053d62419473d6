"""Prometheus metrics of one orchestrator replica: what to graph, and what
to page a person on.

`compensa serve --metrics-listen HOST:PORT` serves them at /metrics (over TLS
with the server's own certificate when it has one). Page on an increase of
`compensa_alerts_total`: with reason "saga", each is a saga that needs a
person, or soon may (a compensation that keeps failing past its policy's
alert_after, one that gave up, a step after the pivot that could not finish, a
stuck saga); with reason "participant_unhealthy", a participant that failed
its health checks past the threshold (a recovery is not counted); with reason
"database_refuses_writes", this replica's database answers but stores nothing
(`compensa_database_outages_total` says why: DATABASE_FULL, ...). It is
exported at 0 for every definition this replica knows, and for participants,
so the increase is seen from the first alert. `compensa_participant_serving`
is this replica's view of each participant's health. Overload:
`compensa_saga_starts_refused_total` counts the starts refused at
`compensa_max_sagas_in_flight` (see admission.py), `compensa_sagas_in_flight`
is what that bound is compared with. `compensa_sagas_awaiting_person` (FAILED, nobody resolved them) and
`compensa_sagas_stuck` (unfinished, unchanged for 10 minutes) are counted in
the database at each scrape, for the whole deployment; `compensa status` and
`compensa list --state failed` show which sagas they are.
`compensa_refused_calls_total` counts the calls refused by reason: a rise
shows someone probing (each reason is also logged, at most once per 10 s).
With `serve --read-db`, `compensa_read_database_in_use` is 0 while the reads
that may lag go to the primary instead (the standby lags past its bound, or
fails), and `compensa_read_database_lag_seconds` is its last measured lag.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from compensa.common.startup import AddressInUse, ensure_address_free
from compensa.common.tls import TlsFiles
from compensa.orchestrator.shared.errors import (
    DatabaseFull,
    DatabasePermissionDenied,
    DatabaseReadOnly,
    StoreUnavailable,
)
from compensa.orchestrator.shared.records import ENDING_EVENTS
from compensa.orchestrator.shared.timeline import saga_state_name
from compensa.v1 import saga_pb2

# The saga_duration_seconds outcome label of each event that ends a saga.
_FINAL_EVENTS: dict[int, str] = {event: saga_state_name(state).lower() for state, event in ENDING_EVENTS.items()}
# Seconds: a saga may take milliseconds or days.
_SAGA_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600, 6 * 3600, 86400, 7 * 86400)
_CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_FLUSH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# compensa_alerts_total's reason label.
SAGA_REASON = "saga"
PARTICIPANT_UNHEALTHY_REASON = "participant_unhealthy"
DATABASE_REASON = "database_refuses_writes"
# compensa_database_outages_total's reason label: the ErrorInfo reasons callers read.
_DATABASE_OUTAGE_REASONS = tuple(
    kind.reason for kind in (StoreUnavailable, DatabaseFull, DatabaseReadOnly, DatabasePermissionDenied)
)
#: compensa_refused_calls_total's reason label.
REFUSAL_REASONS = ("unauthenticated", "permission_denied", "out_of_scope")


class Metrics:
    """The replica's metrics, in a registry of its own (several engines may
    share a process, as in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._events = Counter(
            "compensa_saga_events", "Events committed to the saga log by this replica, by type.", ["type"],
            registry=self.registry,
        )
        self._alerts = Counter(
            "compensa_alerts",
            "Alerts raised by this replica, by definition and reason: saga (a saga needs a person, or soon may:"
            " ALERT_RAISED events) or participant_unhealthy (definition empty).",
            ["definition", "reason"], registry=self.registry,
        )
        self._alerts.labels("", PARTICIPANT_UNHEALTHY_REASON)
        self._alerts.labels("", DATABASE_REASON)
        self._database_outages = Counter(
            "compensa_database_outages",
            "Outages of this replica's database, by reason (the ErrorInfo reason callers read meanwhile):"
            " DATABASE_UNAVAILABLE (not reached), or writes refused: DATABASE_FULL, DATABASE_READ_ONLY,"
            " DATABASE_PERMISSION_DENIED (counted also when an outage turns into one).",
            ["reason"], registry=self.registry,
        )
        for reason in _DATABASE_OUTAGE_REASONS:
            self._database_outages.labels(reason)
        self._participant_serving = Gauge(
            "compensa_participant_serving",
            "1 while this replica's health probes of a participant succeed, 0 while they fail (absent: not"
            " probed, or it does not serve grpc.health.v1).",
            ["participant"], registry=self.registry,
        )
        self._deliveries = Counter(
            "compensa_alert_deliveries", "Alert webhook deliveries by this replica, by outcome (delivered, failed).",
            ["outcome"], registry=self.registry,
        )
        self._sagas = Histogram(
            "compensa_saga_duration_seconds", "Creation to end of the sagas that ended here, by definition and end.",
            ["definition", "end"], buckets=_SAGA_BUCKETS, registry=self.registry,
        )
        self._calls = Histogram(
            "compensa_participant_call_seconds",
            "Execute and Compensate calls, by participant, method and outcome (ok, failed: a business"
            " failure, or the gRPC status code of an error).",
            ["participant", "method", "outcome"], buckets=_CALL_BUCKETS, registry=self.registry,
        )
        self._flush_seconds = Histogram(
            "compensa_group_commit_seconds", "Duration of each group commit (one transaction).",
            buckets=_FLUSH_BUCKETS, registry=self.registry,
        )
        self._flush_size = Histogram(
            "compensa_group_commit_transitions", "Transitions written by each group commit.",
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self._driven = Gauge(
            "compensa_sagas_driven", "Sagas this replica drives now (calls in flight or due).", registry=self.registry,
        )
        self._in_flight = Gauge(
            "compensa_sagas_in_flight",
            "Sagas in flight on this replica: being started, or driven; what serve --max-sagas-in-flight bounds.",
            registry=self.registry,
        )
        self._max_in_flight = Gauge(
            "compensa_max_sagas_in_flight", "serve --max-sagas-in-flight of this replica (0: no limit).",
            registry=self.registry,
        )
        self._starts_refused = Counter(
            "compensa_saga_starts_refused",
            "StartSaga calls refused because this replica was at its limit of sagas in flight (RESOURCE_EXHAUSTED).",
            registry=self.registry,
        )
        self._refused = Counter(
            "compensa_refused_calls",
            "Calls (gRPC and dashboard) this replica refused, by reason: unauthenticated, permission_denied, or"
            " out_of_scope (a saga of a definition outside the caller's scope, answered as not found).",
            ["reason"], registry=self.registry,
        )
        for reason in REFUSAL_REASONS:
            self._refused.labels(reason)
        self._audit_discrepancies = Counter(
            "compensa_audit_discrepancies",
            "Discrepancies between the saga log and a participant's barrier rows that audits run here found"
            " (each once: also alerted, kind AUDIT), by participant (empty: the saga's own) and kind.",
            ["participant", "kind"], registry=self.registry,
        )
        self._waiting_for_capacity = Gauge(
            "compensa_participant_calls_waiting",
            "Calls this replica holds back for a participant's limits or hold (queue depth), by participant.",
            ["participant"], registry=self.registry,
        )
        self._throttled = Counter(
            "compensa_participant_throttled_seconds",
            "Seconds calls waited for a participant's capacity (its limits or hold) before being made, by"
            " participant.",
            ["participant"], registry=self.registry,
        )
        self._log_held_back = Gauge(
            "compensa_event_log_held_back_seconds",
            "How long committed events have waited behind the oldest transaction still open on the database, as"
            " this replica last looked (0: none waits; PostgreSQL's watch streams and alerts read nothing past"
            " it).",
            registry=self.registry,
        )
        self._event_children: dict[int, Counter] = {}
        self._server: WSGIServer | None = None

    def drive_count(self, count: Callable[[], int]) -> None:
        self._driven.set_function(count)

    def admission(self, limit: int, in_flight: Callable[[], int]) -> None:
        """Exports the bound on sagas in flight and, at each scrape, how many are."""
        self._max_in_flight.set(limit)
        self._in_flight.set_function(in_flight)

    def read_database(self, status: Callable[[], tuple[bool, float] | None]) -> None:
        """Exports, at each scrape, whether the read database (serve --read-db)
        is in use and its lag (see `status`); only with one."""

        in_use_gauge = Gauge(
            "compensa_read_database_in_use",
            "1 while the lag-tolerant reads (lists, counts, watch streams' history) go to the read database"
            " (serve --read-db), 0 while they go to the primary (it lags past its bound, or fails).",
            registry=self.registry,
        )
        lag_gauge = Gauge(
            "compensa_read_database_lag_seconds",
            "How far the read database was behind the primary at its last check, at most (NaN: unknown).",
            registry=self.registry,
        )

        def in_use() -> float:
            now = status()
            return 1.0 if now is not None and now[0] else 0.0

        def lag() -> float:
            now = status()
            return now[1] if now is not None else math.nan

        in_use_gauge.set_function(in_use)
        lag_gauge.set_function(lag)

    def start_refused(self) -> None:
        self._starts_refused.inc()

    def know_definition(self, name: str) -> None:
        """Exports the alert count of definition `name` (at 0 until its first alert)."""
        self._alerts.labels(name, SAGA_REASON)

    def participant_alert(self) -> None:
        """A participant's health checks failed past the threshold (alerted here)."""
        self._alerts.labels("", PARTICIPANT_UNHEALTHY_REASON).inc()

    def audit_discrepancy(self, participant: str, kind: str) -> None:
        """An audit run here found (and alerted) a discrepancy of `kind`."""
        self._audit_discrepancies.labels(participant, kind).inc()

    def database_outage(self, reason: str, *, alerted: bool) -> None:
        """This replica's database was lost, or began refusing writes (alerted)."""
        self._database_outages.labels(reason).inc()
        if alerted:
            self._alerts.labels("", DATABASE_REASON).inc()

    def participant_health(self, participant: str, serving: bool | None) -> None:
        """What this replica's last probe of `participant` saw (None: unknown, or gone)."""
        if serving is None:
            try:
                self._participant_serving.remove(participant)
            except KeyError:
                pass
        else:
            self._participant_serving.labels(participant).set(1 if serving else 0)

    def log_held_back(self, seconds: float) -> None:
        self._log_held_back.set(seconds)

    def count_for_people(self, count: Callable[[], tuple[int, int] | None]) -> None:
        """Exports, at each scrape, `count()`: the FAILED sagas nobody resolved
        and the stuck ones (None when they cannot be counted now)."""
        self.registry.register(_PeopleCounts(count))

    def committed(
        self, event_type: int, definition: str, created_at: float, time_of_event: float
    ) -> None:
        child = self._event_children.get(event_type)
        if child is None:
            child = self._event_children[event_type] = self._events.labels(
                saga_pb2.EventType.Name(saga_pb2.EventType.ValueType(event_type))
            )
        child.inc()
        end = _FINAL_EVENTS.get(event_type)
        if end is not None:
            self._sagas.labels(definition, end).observe(max(0.0, time_of_event - created_at))
        elif event_type == saga_pb2.EVENT_TYPE_ALERT_RAISED:
            self._alerts.labels(definition, SAGA_REASON).inc()

    def refused(self, reason: str) -> None:
        """A call was refused (one of REFUSAL_REASONS)."""
        self._refused.labels(reason).inc()

    def alert_delivery(self, outcome: str) -> None:
        self._deliveries.labels(outcome).inc()

    def called(self, participant: str, method: str, outcome: str, seconds: float) -> None:
        self._calls.labels(participant, method, outcome).observe(seconds)

    def waiting_for_capacity(self, participant: str, count: Callable[[], int]) -> None:
        """Exports `count()`, the calls to `participant` waiting for capacity, at each scrape."""
        self._waiting_for_capacity.labels(participant).set_function(count)
        self._throttled.labels(participant)

    def throttled(self, participant: str, seconds: float) -> None:
        """A call to `participant` waited `seconds` for capacity."""
        self._throttled.labels(participant).inc(seconds)

    def flushed(self, transitions: int, seconds: float) -> None:
        self._flush_size.observe(transitions)
        self._flush_seconds.observe(seconds)

    def serve(self, listen: str, tls: TlsFiles | None) -> int:
        """Serves /metrics on `listen` (HOST:PORT, port 0 picks one) in a
        daemon thread until `close`; the port it listens on. AddressInUse
        when another process listens there."""
        ensure_address_free(listen)
        host, _, port = listen.rpartition(":")
        options = {}
        if tls is not None:
            options = {
                "certfile": str(tls.cert), "keyfile": str(tls.key),
                "client_cafile": str(tls.ca) if tls.ca else None, "client_auth_required": tls.ca is not None,
            }
        try:
            self._server, _ = start_http_server(
                int(port), host.strip("[]") or "0.0.0.0", self.registry, **options  # type: ignore[arg-type]
            )
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise AddressInUse(f"address in use: {listen} (metrics; another process listens there)") from None
            raise
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _PeopleCounts(Collector):
    """Gauges read at scrape time, so that they are never stale."""

    _AWAITING = (
        "compensa_sagas_awaiting_person", "FAILED sagas that wait for a person (retry or resolve), in the database."
    )
    _STUCK = ("compensa_sagas_stuck", "Unfinished sagas unchanged for 10 minutes or more, in the database.")

    def __init__(self, count: Callable[[], tuple[int, int] | None]) -> None:
        self._count = count

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(*self._AWAITING)
        yield GaugeMetricFamily(*self._STUCK)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._count()
        if counts is None:
            return  # absent rather than a made-up 0 while the database does not answer
        awaiting, stuck = counts
        yield GaugeMetricFamily(*self._AWAITING, value=awaiting)
        yield GaugeMetricFamily(*self._STUCK, value=stuck)
