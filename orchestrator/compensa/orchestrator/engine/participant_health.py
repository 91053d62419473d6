"""Participants' health: every replica probes every stored participant with
grpc.health.v1 `Check`, and an outage past a threshold is alerted once for
the whole deployment.

Each round (every `interval`) probes all participants at once (at most
`_CONCURRENT_PROBES` calls in flight, each with a deadline), then compares
what it saw with the shared state in `compensa_participants`:

- a failed probe (NOT_SERVING, UNAVAILABLE, DEADLINE_EXCEEDED, ...) starts
  the outage (`unhealthy_since`) unless one has started; once it is older
  than `unhealthy_after` and not alerted, the replica raises the
  PARTICIPANT_UNHEALTHY alert by a guarded update (`alerted_at IS NULL`), so
  exactly one replica raises it, however many race;
- a successful probe by any replica ends the outage; one that was alerted
  raises PARTICIPANT_RECOVERED, by a guarded update as well;
- a participant without the health service (UNIMPLEMENTED) is "unknown":
  logged once per address, never alerted for that; its answer ends an
  outage a failed probe started, as a success does.

So a participant is unhealthy when no replica has reached it for the whole
threshold: a replica cut off from a participant that the others reach raises
no alert (its own gauge and `compensa participants list` on it show it).
Writes happen only when what a probe saw differs from the stored state, not
on every probe. Probing is a task of its own with bounded deadlines: it never
holds up the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compensa.orchestrator.engine.clock import SharedClock
from compensa.orchestrator.engine.participant_client import ParticipantClient
from compensa.orchestrator.shared.errors import StoreUnavailable
from compensa.orchestrator.shared.metrics import Metrics
from compensa.orchestrator.store import ParticipantAddress, SagaStore, StoredAlert
from compensa.v1 import orchestrator_pb2, participant_pb2

__all__ = ["PROBED_SERVICE", "ParticipantHealthWatch", "ProbeOutcome"]

log = logging.getLogger("compensa.participant_health")

#: The service name the SDK's servers report their health under (besides
#: ""); a health server that does not know it is asked about "" instead.
PROBED_SERVICE: str = participant_pb2.DESCRIPTOR.services_by_name["ParticipantService"].full_name
# Probes in flight at once, across participants.
_CONCURRENT_PROBES = 32
# A probe's deadline: the interval, at least a second (a loaded host must not
# read as an outage), at most five.
_MIN_DEADLINE = 1.0
_MAX_DEADLINE = 5.0

SERVING = orchestrator_pb2.PARTICIPANT_HEALTH_SERVING
FAILING = orchestrator_pb2.PARTICIPANT_HEALTH_FAILING
UNKNOWN = orchestrator_pb2.PARTICIPANT_HEALTH_UNKNOWN


@dataclass(frozen=True)
class ProbeOutcome:
    """What this replica's last probe of a participant saw."""

    address: str
    health: orchestrator_pb2.ParticipantHealth.ValueType
    detail: str = ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


class ParticipantHealthWatch:
    """Probes the stored participants and raises their alerts; `on_alert`
    is told of each alert this replica raised (after its commit)."""

    def __init__(
        self, store: SagaStore, client: ParticipantClient, clock: SharedClock, metrics: Metrics, *,
        interval: float, unhealthy_after: float | None, on_alert: Callable[[StoredAlert], None],
    ) -> None:
        self._store = store
        self._client = client
        self._clock = clock
        self._metrics = metrics
        self._interval = interval
        self._deadline = min(max(interval, _MIN_DEADLINE), _MAX_DEADLINE)
        self._unhealthy_after = unhealthy_after
        self._on_alert = on_alert
        self._seen: dict[str, ProbeOutcome] = {}
        # Per address: the service name its health server answers for.
        self._service: dict[str, str] = {}
        self._unknown_logged: set[str] = set()
        self._limit = asyncio.Semaphore(_CONCURRENT_PROBES)

    def seen(self, name: str, address: str) -> ProbeOutcome | None:
        """This replica's last probe of `name` at `address` (None: not probed there yet)."""
        outcome = self._seen.get(name)
        return outcome if outcome is not None and outcome.address == address else None

    async def run(self) -> None:
        """Probes every `interval` until cancelled."""
        while True:
            began = time.monotonic()
            try:
                await self.probe_all()
            except StoreUnavailable as error:
                # Logged once per outage by the database's health.
                log.debug("participant health: %s", error)
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - began)))

    async def probe_all(self) -> None:
        """One round: probes every stored participant, then records what changed."""
        stored = await self._store.list_participants()
        outcomes = await asyncio.gather(*(self._probe(participant.address) for participant in stored))
        self._forget_others({participant.name for participant in stored})
        for participant, outcome in zip(stored, outcomes, strict=True):
            await self._record(participant, outcome)

    async def probe_now(self, names: Iterable[str]) -> None:
        """Probes these participants at once (not waiting for the next round)
        and records what changed: after an operator's retry the health view
        shows the fresh connection's outcome."""
        wanted = set(names)
        stored = [participant for participant in await self._store.list_participants() if participant.name in wanted]
        outcomes = await asyncio.gather(*(self._probe(participant.address) for participant in stored))
        for participant, outcome in zip(stored, outcomes, strict=True):
            await self._record(participant, outcome)

    def _forget_others(self, names: set[str]) -> None:
        for name in [name for name in self._seen if name not in names]:
            del self._seen[name]
            self._metrics.participant_health(name, None)

    async def _probe(self, address: str) -> ProbeOutcome:
        async with self._limit:
            stub = health_pb2_grpc.HealthStub(self._client.channel(address))
            first = self._service.get(address, PROBED_SERVICE)
            for service in dict.fromkeys((first, "")):
                try:
                    answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._deadline)
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    if code == grpc.StatusCode.NOT_FOUND and service:
                        continue  # it reports only the server as a whole
                    if code == grpc.StatusCode.UNIMPLEMENTED:
                        return ProbeOutcome(address, UNKNOWN, "it does not serve grpc.health.v1")
                    if code == grpc.StatusCode.NOT_FOUND:
                        unknown = f"its health service knows neither {PROBED_SERVICE} nor ''"
                        return ProbeOutcome(address, UNKNOWN, unknown)
                    return ProbeOutcome(address, FAILING, f"{code.name}: {error.details()}")
                except Exception as error:  # whatever a probe meets, the round goes on
                    return ProbeOutcome(address, FAILING, f"{type(error).__name__}: {error}")
                self._service[address] = service
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return ProbeOutcome(address, SERVING)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                return ProbeOutcome(address, FAILING, f"health check answered {status}")
            raise AssertionError("unreachable")

    async def _record(self, participant: ParticipantAddress, outcome: ProbeOutcome) -> None:
        name, address = participant.name, participant.address
        before = self._seen.get(name)
        self._seen[name] = outcome
        changed = before is None or before.health != outcome.health or before.address != address
        now = self._clock.now()
        if outcome.health == UNKNOWN:
            self._metrics.participant_health(name, None)
            if address not in self._unknown_logged:
                self._unknown_logged.add(address)
                log.info("participant %s at %s: health unknown (%s); it is not watched", name, address, outcome.detail)
            # It answered: an outage an earlier failed probe started is over,
            # or a later short failure would be alerted for all the time since.
            await self._end_outage(participant, now, "answers again")
            return
        self._metrics.participant_health(name, outcome.health == SERVING)
        if outcome.health == SERVING:
            if changed and before is not None:
                log.info("participant %s at %s passes its health checks again", name, address)
            await self._end_outage(participant, now, "answers SERVING again")
            return
        if changed:
            log.warning(
                "participant %s at %s fails its health checks: %s", name, address, outcome.detail,
                extra={"participant": name, "address": address},
            )
        if participant.unhealthy_since is None:
            await self._store.participant_failing(name, now)
            return
        after = self._unhealthy_after
        if after is None or participant.alerted_at is not None or now - participant.unhealthy_since < after:
            return
        alert = await self._store.alert_participant_unhealthy(
            name, unhealthy_before=now - after, now=now,
            message=f"participant {name} at {address} has failed its health checks for"
                    f" {_duration(now - participant.unhealthy_since)}: {outcome.detail}",
        )
        if alert is not None:
            self._on_alert(alert)

    async def _end_outage(self, participant: ParticipantAddress, now: float, answer: str) -> None:
        """Ends the participant's stored outage, if one started (raising
        PARTICIPANT_RECOVERED if it was alerted)."""
        if participant.unhealthy_since is None:
            return
        since = _duration(now - participant.unhealthy_since)
        alert = await self._store.participant_serving(
            participant.name, now=now, message=f"participant {participant.name} at {participant.address} {answer},"
            f" after {since}",
        )
        if alert is not None:
            self._on_alert(alert)
