"""Serving the example checkout participants by kind (`compensa participant KIND`).

The serving itself is the SDK's (`compensa.participants.serving`); its names are
re-exported here for the callers that import them from this module.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from compensa.common.database import DEFAULT_DATABASE_TIMEOUT
from compensa.common.health import DEFAULT_PROBE_SECONDS
from compensa.common.tls import TlsFiles
from compensa.examples.fraud import FraudParticipant
from compensa.examples.inventory import InventoryParticipant
from compensa.examples.payment import PaymentParticipant
from compensa.examples.shipping import ShippingParticipant
from compensa.participants.faults import FaultPlan
from compensa.participants.sdk import Participant
from compensa.participants.serving import RunningParticipant, create_participant_engine, serve, start_server

__all__ = [
    "PARTICIPANT_KINDS",
    "RunningParticipant",
    "build_participant",
    "create_participant_engine",
    "serve_participant",
    "start_participant",
    "start_server",
]

logger = logging.getLogger(__name__)

#: The kinds of participant `build_participant` knows.
PARTICIPANT_KINDS = ("inventory", "fraud", "payment", "shipping")


def build_participant(kind: str, engine: AsyncEngine, *, faults: FaultPlan | None = None) -> Participant:
    """The participant servicer of `kind` (one of PARTICIPANT_KINDS) on `engine`.

    Raises ValueError for an unknown kind.
    """
    if kind == "inventory":
        return InventoryParticipant(engine, faults=faults)
    if kind == "fraud":
        return FraudParticipant(engine, faults=faults)
    if kind == "payment":
        return PaymentParticipant(engine, faults=faults)
    if kind == "shipping":
        return ShippingParticipant(engine, faults=faults)
    raise ValueError(f"unknown participant kind {kind!r} (known: {', '.join(PARTICIPANT_KINDS)})")


async def start_participant(
    kind: str,
    database_url: str,
    *,
    listen: str = "127.0.0.1:0",
    faults: FaultPlan | None = None,
    tls: TlsFiles | None = None,
    database_timeout: float = DEFAULT_DATABASE_TIMEOUT,
    health_probe_seconds: float = DEFAULT_PROBE_SECONDS,
    purge_interval: float | None = None,
) -> RunningParticipant:
    """Creates the schema and starts serving participant `kind` (one of
    PARTICIPANT_KINDS) from `database_url` on `listen`; see `start_server`
    (and for `purge_interval`). Every wait on the database takes at most
    `database_timeout` seconds."""
    participant = await _participant_on(kind, database_url, faults, database_timeout)
    return await start_server(
        participant, listen=listen, tls=tls, health_probe_seconds=health_probe_seconds, purge_interval=purge_interval
    )


async def serve_participant(
    kind: str,
    *,
    listen: str,
    database_url: str,
    faults: FaultPlan | None = None,
    tls: TlsFiles | None = None,
    database_timeout: float = DEFAULT_DATABASE_TIMEOUT,
    purge_interval: float | None = None,
) -> None:
    """Serves participant `kind` until SIGINT or SIGTERM, then stops gracefully;
    with `purge_interval`, deleting barrier rows below the purge watermark that often."""
    await serve(
        await _participant_on(kind, database_url, faults, database_timeout), listen=listen, tls=tls,
        purge_interval=purge_interval,
    )


async def _participant_on(
    kind: str, database_url: str, faults: FaultPlan | None, database_timeout: float
) -> Participant:
    engine = create_participant_engine(database_url, database_timeout=database_timeout)
    try:
        participant = build_participant(kind, engine, faults=faults)
        participant.database_timeout = database_timeout
        return participant
    except BaseException:
        await engine.dispose()
        raise
