"""Durable state: the store interface and its SQL implementations, one per database."""

from compensa.common.database import DEFAULT_DATABASE_TIMEOUT, parse_database_url
from compensa.orchestrator.store.base import (
    AUDIT_ALERT,
    AUDIT_JOB_COMPLETED,
    AUDIT_JOB_RUNNING,
    CONTRACT_FORCED,
    DEFAULT_PRIORITY,
    LOG_HELD_BACK,
    PARTICIPANT_RECOVERED,
    PARTICIPANT_UNHEALTHY,
    SAGA_ALERT,
    AuditFinding,
    AuditJob,
    AuditProgress,
    BulkItem,
    BulkJob,
    CapacityGrant,
    CapacityWait,
    Claimed,
    ContractChange,
    ContractCheck,
    DefinitionChange,
    DefinitionCheck,
    LogHoldup,
    LogPage,
    ParticipantAddress,
    ParticipantHold,
    ParticipantLimits,
    PendingAlert,
    RecordedAuditFinding,
    SagaFlow,
    SagaMove,
    SagaStore,
    SagaWrite,
    StateSummary,
    StoredAlert,
    StoredEvent,
    WriteResult,
)
from compensa.orchestrator.store.postgres import PostgresSagaStore
from compensa.orchestrator.store.sql import SqlSagaStore
from compensa.orchestrator.store.sqlite import SqliteSagaStore


def open_store(url: str, *, notifier: str = "", timeout: float = DEFAULT_DATABASE_TIMEOUT) -> SagaStore:
    """A store for a SQLAlchemy URL: postgresql+psycopg://... or sqlite+aiosqlite:///...

    `notifier` names this process in change notifications, so it can ignore
    its own. `timeout` bounds every wait on the database, in seconds.
    DatabaseMisconfigured (one line) for a URL that is neither."""
    if parse_database_url(url).is_postgres:
        return PostgresSagaStore(url, notifier=notifier, timeout=timeout)
    return SqliteSagaStore(url, timeout=timeout)


__all__ = [
    "AUDIT_ALERT",
    "AUDIT_JOB_COMPLETED",
    "AUDIT_JOB_RUNNING",
    "CONTRACT_FORCED",
    "DEFAULT_PRIORITY",
    "LOG_HELD_BACK",
    "PARTICIPANT_RECOVERED",
    "PARTICIPANT_UNHEALTHY",
    "SAGA_ALERT",
    "AuditFinding",
    "AuditJob",
    "AuditProgress",
    "BulkItem",
    "BulkJob",
    "CapacityGrant",
    "CapacityWait",
    "Claimed",
    "ContractChange",
    "ContractCheck",
    "DefinitionChange",
    "DefinitionCheck",
    "LogHoldup",
    "LogPage",
    "ParticipantAddress",
    "ParticipantHold",
    "ParticipantLimits",
    "PendingAlert",
    "PostgresSagaStore",
    "RecordedAuditFinding",
    "SagaFlow",
    "SagaMove",
    "SagaStore",
    "SagaWrite",
    "SqlSagaStore",
    "SqliteSagaStore",
    "StateSummary",
    "StoredAlert",
    "StoredEvent",
    "WriteResult",
    "open_store",
]
