"""Alerts delivered: POSTs to `serve --alert-webhook URL` from the outbox.

Every alert (a saga's ALERT_RAISED event, a participant unhealthy or
recovered) is an entry of the alert log with an outbox row, both written in
the transaction that raises it (see the store's `commit` and its participant
health updates), so an alert is never lost between being raised and being
sent. Any replica with a webhook delivers:
it claims due rows (SKIP LOCKED on PostgreSQL), holding each for the length
of one delivery, POSTs them, and deletes a row once the webhook answered 2xx.
A failed delivery is retried with exponential backoff; a replica killed while
delivering leaves its claims to expire, and another replica sends them again.
So delivery is at least once: a receiver tells a repeat by `alert_id`.

The POST runs in a worker thread and the loop is a task of its own: a slow or
dead webhook never holds up the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import logging
import urllib.error
import urllib.request
from typing import Any

from compensa.common.retry import Backoff
from compensa.common.tracing import trace_id_of
from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.clock import SharedClock
from compensa.orchestrator.shared import records
from compensa.orchestrator.shared.errors import StoreUnavailable
from compensa.orchestrator.shared.metrics import Metrics
from compensa.orchestrator.shared.timeline import saga_state_name
from compensa.orchestrator.store import SAGA_ALERT, PendingAlert, SagaStore

__all__ = ["DATABASE_ALERT", "DELIVERY_BACKOFF", "AlertDelivery", "alert_body", "database_alert_body", "stuck_alert"]

#: The `kind` of the alert a replica sends when its database refuses writes.
DATABASE_ALERT = "DATABASE_REFUSES_WRITES"

log = logging.getLogger("compensa.alerts")

# How often the outbox is looked at when nothing woke the loop (alerts raised
# by other replicas, retries that came due).
_POLL_SECONDS = 1.0
_CLAIM_BATCH = 20
# A claim outlives the delivery's timeout by this much before others may retry.
_CLAIM_MARGIN_SECONDS = 1.0
#: The wait after each failed delivery of an alert: 0.5 s, doubling, at most 5 minutes.
DELIVERY_BACKOFF = Backoff(initial=0.5, cap=300.0)


def _rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="milliseconds")


def alert_body(pending: PendingAlert) -> dict[str, Any]:
    """The JSON object POSTed for an alert (documented in README, "Alerts").
    Fields about a saga are null for a participant's alert and the other
    way round; `position` stays the saga event's, as it always was."""
    alert = pending.alert
    about_saga = alert.kind == SAGA_ALERT
    return {
        "alert_id": alert.alert_id,
        "type": "ALERT_RAISED",
        "kind": alert.kind,
        "saga_id": alert.saga_id if about_saga else None,
        "definition": alert.definition_name if about_saga else None,
        "step": alert.step_name,
        "participant": None if about_saga else alert.participant,
        "address": None if about_saga else alert.address,
        "message": alert.message,
        "raised_at": _rfc3339(alert.raised_at),
        "sequence": alert.sequence if about_saga else None,
        "position": alert.event_position if about_saga else None,
        "alert_position": alert.position,
        "delivery_attempt": pending.attempts,
        "trace_id": trace_id_of(pending.trace_parent),
    }


def database_alert_body(replica: str, reason: str, message: str, raised_at: float) -> dict[str, Any]:
    """The JSON object POSTed when `replica`'s database refuses writes
    (documented in README, "Alerts"). It cannot be stored in the alert log,
    which is in that database: each replica sends its own, with an id of
    its own, straight from memory."""
    return {
        "alert_id": f"database/{replica}/{round(raised_at * 1000)}",
        "type": "ALERT_RAISED",
        "kind": DATABASE_ALERT,
        "reason": reason,
        "replica": replica,
        "saga_id": None,
        "definition": None,
        "step": "",
        "participant": None,
        "address": None,
        "message": message,
        "raised_at": _rfc3339(raised_at),
        "sequence": None,
        "position": None,
        "alert_position": None,
        "delivery_attempt": 1,
        "trace_id": None,
    }


def stuck_alert(saga: records.SagaRecord, now: float) -> machine.Transition:
    """The ALERT_RAISED event for a saga that has not moved since its
    `updated_at`. Unlike a transition it leaves `updated_at` alone: the saga
    still reads as stuck, and raises no second alert until it moves again
    (its last event is then no longer this one)."""
    event = records.LogEvent(
        sequence=saga.sequence + 1,
        type=records.E.EVENT_TYPE_ALERT_RAISED,
        time=now,
        saga_state=saga.state,
        message=f"stuck: {saga_state_name(saga.state)} with no change for {now - saga.updated_at:.1f}s",
    )
    return machine.Transition(dataclasses.replace(saga, sequence=event.sequence), (event,))


def _post(url: str, body: bytes, alert_id: str, timeout: float) -> None:
    """POSTs `body`; raises unless the answer is 2xx."""
    request = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "compensa", "Idempotency-Key": alert_id},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()
        if not 200 <= response.status < 300:
            raise urllib.error.HTTPError(url, response.status, response.reason, response.headers, None)


class AlertDelivery:
    """Delivers the outbox's alerts to one webhook URL."""

    def __init__(self, store: SagaStore, url: str, clock: SharedClock, metrics: Metrics, *, timeout: float) -> None:
        self._store = store
        self._url = url
        self._clock = clock
        self._metrics = metrics
        self._timeout = timeout
        self._wake = asyncio.Event()
        self._unstored: set[asyncio.Task[None]] = set()

    def send_unstored(self, body: dict[str, Any]) -> None:
        """Delivers an alert that is not in the outbox (the database refuses
        writes), retried with DELIVERY_BACKOFF for as long as this replica runs."""
        task = asyncio.create_task(self._deliver_unstored(body), name="compensa-unstored-alert")
        self._unstored.add(task)
        task.add_done_callback(self._unstored.discard)

    async def _deliver_unstored(self, body: dict[str, Any]) -> None:
        alert_id = str(body["alert_id"])
        for attempt in itertools.count(1):
            body["delivery_attempt"] = attempt
            try:
                await asyncio.to_thread(_post, self._url, json.dumps(body).encode(), alert_id, self._timeout)
            except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
                self._metrics.alert_delivery("failed")
                wait = DELIVERY_BACKOFF.delay(attempt)
                log.warning(
                    "alert %s: delivery %d to the webhook failed (%s); next try in %.1fs",
                    alert_id, attempt, error, wait,
                )
                await asyncio.sleep(wait)
                continue
            self._metrics.alert_delivery("delivered")
            log.info("alert %s delivered to the webhook (attempt %d)", alert_id, attempt)
            return

    def wake(self) -> None:
        """An alert was just committed here: look at the outbox now."""
        self._wake.set()

    async def run(self) -> None:
        """Delivers until cancelled (alerts sent from memory stop then too)."""
        try:
            await self._deliver_outbox()
        finally:
            for task in list(self._unstored):
                task.cancel()

    async def _deliver_outbox(self) -> None:
        while True:
            self._wake.clear()
            try:
                now = self._clock.now()
                claimed = await self._store.claim_alerts(
                    now, now + self._timeout + _CLAIM_MARGIN_SECONDS, _CLAIM_BATCH
                )
            except StoreUnavailable as error:
                log.warning("alert outbox: %s", error)
                claimed = []
            if claimed:
                await asyncio.gather(*(self._deliver(alert) for alert in claimed))
            if len(claimed) == _CLAIM_BATCH:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _POLL_SECONDS)

    async def _deliver(self, pending: PendingAlert) -> None:
        alert = pending.alert
        body = json.dumps(alert_body(pending), ensure_ascii=False).encode()
        alert_id = alert.alert_id
        fields = {
            "saga_id": alert.saga_id or None, "step": alert.step_name or None,
            "trace_id": trace_id_of(pending.trace_parent),
        }
        try:
            await asyncio.to_thread(_post, self._url, body, alert_id, self._timeout)
        except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
            self._metrics.alert_delivery("failed")
            wait = DELIVERY_BACKOFF.delay(pending.attempts)
            log.warning(
                "alert %s: delivery %d to the webhook failed (%s); next try in %.1fs",
                alert_id, pending.attempts, error, wait, extra=fields,
            )
            with contextlib.suppress(StoreUnavailable):
                # Not recorded: the claim expires and the alert is tried again.
                await self._store.alert_not_delivered(
                    alert.position, pending.attempts, self._clock.now() + wait, str(error)[:1000]
                )
            return
        self._metrics.alert_delivery("delivered")
        log.info("alert %s delivered to the webhook (attempt %d)", alert_id, pending.attempts, extra=fields)
        try:
            await self._store.alert_delivered(alert.position)
        except StoreUnavailable as error:
            # It stays in the outbox and is sent again: at least once.
            log.warning("alert %s: delivered, but not removed from the outbox (%s)", alert_id, error)
