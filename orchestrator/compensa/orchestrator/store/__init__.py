"""Durable state: the store interface and its SQL implementations, one per database."""

from collections.abc import Sequence

from compensa.common.database import DEFAULT_DATABASE_TIMEOUT, parse_database_url
from compensa.common.startup import DatabaseMisconfigured
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
from compensa.orchestrator.store.partition_map import PARTITION_COUNT, partition_of
from compensa.orchestrator.store.partitioned import PartitionedStore
from compensa.orchestrator.store.postgres import PostgresSagaStore
from compensa.orchestrator.store.sql import SqlSagaStore
from compensa.orchestrator.store.sqlite import SqliteSagaStore
from compensa.orchestrator.store.standby import DEFAULT_MAX_LAG_SECONDS


def open_store(
    url: str, *, notifier: str = "", timeout: float = DEFAULT_DATABASE_TIMEOUT, read_url: str | None = None,
    read_max_lag: float = DEFAULT_MAX_LAG_SECONDS, partition_urls: Sequence[str] = (),
) -> SagaStore:
    """A store for a SQLAlchemy URL: postgresql+psycopg://... or sqlite+aiosqlite:///...

    `notifier` names this process in change notifications, so it can ignore
    its own. `timeout` bounds every wait on the database, in seconds.
    `read_url`, PostgreSQL only, is a streaming standby of `url` for the
    lag-tolerant reads, while it is at most `read_max_lag` seconds behind.
    With `partition_urls`, sagas are partitioned over `url` (the home
    database) and those (docs/partitions.md), all PostgreSQL (and no read
    database then). DatabaseMisconfigured (one line) for a URL that is
    neither; ValueError for a `read_url` with SQLite, or that is not
    PostgreSQL's, or with partitions."""
    if partition_urls:
        if not all(parse_database_url(each).is_postgres for each in (url, *partition_urls)):
            raise DatabaseMisconfigured("sagas are partitioned over PostgreSQL databases only (--db, --partition-db)")
        if read_url is not None:
            raise ValueError("a read database is not supported with --partition-db yet")
        return PartitionedStore(
            [PostgresSagaStore(each, notifier=notifier, timeout=timeout) for each in (url, *partition_urls)]
        )
    if parse_database_url(url).is_postgres:
        return PostgresSagaStore(url, notifier=notifier, timeout=timeout, read_url=read_url, read_max_lag=read_max_lag)
    if read_url is not None:
        raise ValueError("a read database is a PostgreSQL standby: it needs a PostgreSQL primary")
    return SqliteSagaStore(url, timeout=timeout)


__all__ = [
    "AUDIT_ALERT",
    "AUDIT_JOB_COMPLETED",
    "AUDIT_JOB_RUNNING",
    "CONTRACT_FORCED",
    "DEFAULT_MAX_LAG_SECONDS",
    "DEFAULT_PRIORITY",
    "LOG_HELD_BACK",
    "PARTICIPANT_RECOVERED",
    "PARTICIPANT_UNHEALTHY",
    "PARTITION_COUNT",
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
    "PartitionedStore",
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
    "partition_of",
]
