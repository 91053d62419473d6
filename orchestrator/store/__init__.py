"""Durable state: the store interface and its SQL implementations."""

from orchestrator.store.base import (
    Claimed,
    ParticipantAddress,
    PendingAlert,
    SagaPage,
    SagaStore,
    SagaWrite,
    StateSummary,
    StoredEvent,
    WriteResult,
)
from orchestrator.store.sql import PostgresSagaStore, SqliteSagaStore, SqlSagaStore, open_store

__all__ = [
    "Claimed",
    "ParticipantAddress",
    "PendingAlert",
    "PostgresSagaStore",
    "SagaPage",
    "SagaStore",
    "SagaWrite",
    "SqlSagaStore",
    "SqliteSagaStore",
    "StateSummary",
    "StoredEvent",
    "WriteResult",
    "open_store",
]
