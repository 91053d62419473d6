"""The barrier's records as the audit reads them, and their retention.

The orchestrator reads a participant's barrier rows (BarrierAuditService,
served by `compensa.participants.audit`) and compares them with its log; once
a saga is final, audited clean and older than the operator's retention, it
tells the participant a purge watermark. Rows created before the watermark may
then be deleted, in small batches (`purge_below_watermark`), never on the
participant's own clock alone; and a call whose deadline lies before the
watermark belongs to a saga whose rows may be gone, so it is refused
(`compensa.participants.sdk`). The watermark is kept in a table of its own
beside the barrier table (`<barrier table>_watermark`), created by
`Participant.create_schema`: databases of earlier participants gain it, and
their barrier tables stay as they are.

`python -m compensa.participants.purge` purges once, for operators who run
it from a scheduled job instead of the `purge_interval` option of
`compensa.participants.serve`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from dataclasses import dataclass

import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncEngine

from compensa.common.database import bounded_transaction
from compensa.participants.barrier import insert_if_absent

__all__ = [
    "DEFAULT_PURGE_BATCH",
    "AuditedRow",
    "BadPageToken",
    "RowQuery",
    "answer_digest",
    "as_utc",
    "list_rows",
    "purge_below_watermark",
    "raise_watermark",
    "read_watermark",
    "watermark_table",
]

#: Rows deleted per transaction: short transactions that never hold up steps for long.
DEFAULT_PURGE_BATCH = 500

_WATERMARK_ROW = "purge_before"


def watermark_table(barrier_table_name: str, metadata: sqlalchemy.MetaData) -> sqlalchemy.Table:
    """The table holding the barrier table's purge watermark, in `metadata`."""
    return sqlalchemy.Table(
        f"{barrier_table_name}_watermark",
        metadata,
        sqlalchemy.Column("name", sqlalchemy.String(32), primary_key=True),
        sqlalchemy.Column("purge_before", sqlalchemy.DateTime(timezone=True), nullable=False),
    )


def as_utc(moment: datetime.datetime) -> datetime.datetime:
    """`moment` with its time zone (SQLite hands back UTC times without one)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)


def answer_digest(response: bytes | None) -> bytes:
    """SHA-256 of a stored answer; empty when none is stored."""
    return hashlib.sha256(response).digest() if response is not None else b""


@dataclass(frozen=True)
class AuditedRow:
    """A barrier row as the audit shows it: no business data, the answer as a digest."""

    saga_id: str
    step_name: str
    idempotency_key: str
    operation: str
    outcome: str | None
    answer_digest: bytes
    created_at: datetime.datetime


class BadPageToken(ValueError):
    """A page token not issued for this query."""


@dataclass(frozen=True)
class RowQuery:
    """Which rows to list: those of `saga_ids`, or else those created in [created_from, created_to)."""

    saga_ids: tuple[str, ...] = ()
    created_from: datetime.datetime | None = None
    created_to: datetime.datetime | None = None

    def fingerprint(self) -> str:
        text = json.dumps(
            [sorted(self.saga_ids), _iso(self.created_from), _iso(self.created_to)], separators=(",", ":")
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def page_token(self, last: AuditedRow) -> str:
        """The token of the page after `last`."""
        body = [self.fingerprint(), last.created_at.isoformat(), last.idempotency_key, last.operation]
        return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()

    def after(self, token: str) -> tuple[datetime.datetime, str, str] | None:
        """The (created_at, key, operation) a token continues after; BadPageToken when not this query's."""
        if not token:
            return None
        try:
            fingerprint, created, key, operation = json.loads(base64.urlsafe_b64decode(token.encode()))
            moment = as_utc(datetime.datetime.fromisoformat(created))
        except (ValueError, TypeError) as error:
            raise BadPageToken("page_token is not one this service issued; start again without it") from error
        if fingerprint != self.fingerprint() or not isinstance(key, str) or not isinstance(operation, str):
            raise BadPageToken("page_token was issued for another query; send the same saga_ids and times with it")
        return moment, key, operation


def _iso(moment: datetime.datetime | None) -> str | None:
    return as_utc(moment).isoformat() if moment is not None else None


async def list_rows(
    engine: AsyncEngine, barrier: sqlalchemy.Table, query: RowQuery, page_token: str, page_size: int,
    timeout: float,
) -> tuple[list[AuditedRow], str]:
    """A page of barrier rows in (created_at, key, operation) order, and the next page's token ("" at the end)."""
    after = query.after(page_token)
    columns = barrier.c
    statement = sqlalchemy.select(
        columns.saga_id, columns.step_name, columns.idempotency_key, columns.operation, columns.outcome,
        columns.response, columns.created_at,
    )
    if query.saga_ids:
        statement = statement.where(columns.saga_id.in_(query.saga_ids))
    else:
        if query.created_from is not None:
            statement = statement.where(columns.created_at >= query.created_from)
        if query.created_to is not None:
            statement = statement.where(columns.created_at < query.created_to)
    if after is not None:
        statement = statement.where(
            sqlalchemy.tuple_(columns.created_at, columns.idempotency_key, columns.operation) > after
        )
    statement = statement.order_by(columns.created_at, columns.idempotency_key, columns.operation).limit(page_size + 1)
    async with bounded_transaction(engine, timeout) as conn:
        found = (await conn.execute(statement)).all()
    rows = [
        AuditedRow(
            row.saga_id, row.step_name, row.idempotency_key, row.operation, row.outcome,
            answer_digest(row.response), as_utc(row.created_at),
        )
        for row in found[:page_size]
    ]
    return rows, (query.page_token(rows[-1]) if len(found) > page_size else "")


async def read_watermark(
    engine: AsyncEngine, watermark: sqlalchemy.Table, timeout: float
) -> datetime.datetime | None:
    """The purge watermark in force; None when none was ever set."""
    async with bounded_transaction(engine, timeout) as conn:
        found = (
            await conn.execute(
                sqlalchemy.select(watermark.c.purge_before).where(watermark.c.name == _WATERMARK_ROW)
            )
        ).scalar_one_or_none()
    return as_utc(found) if found is not None else None


async def raise_watermark(
    engine: AsyncEngine, watermark: sqlalchemy.Table, purge_before: datetime.datetime, timeout: float
) -> datetime.datetime:
    """Moves the watermark forward to `purge_before` (never back); the one in force after."""
    async with bounded_transaction(engine, timeout) as conn:
        raised = await conn.execute(
            watermark.update()
            .where(watermark.c.name == _WATERMARK_ROW, watermark.c.purge_before < purge_before)
            .values(purge_before=purge_before)
        )
        if raised.rowcount == 0:
            await insert_if_absent(conn, watermark, {"name": _WATERMARK_ROW, "purge_before": purge_before})
        found = (
            await conn.execute(sqlalchemy.select(watermark.c.purge_before).where(watermark.c.name == _WATERMARK_ROW))
        ).scalar_one()
    return as_utc(found)


async def purge_below_watermark(
    engine: AsyncEngine, barrier: sqlalchemy.Table, watermark: sqlalchemy.Table, *,
    batch_size: int = DEFAULT_PURGE_BATCH, timeout: float,
) -> int:
    """Deletes the barrier rows created before the watermark, `batch_size`
    per transaction, until none is left; how many. Nothing without a watermark."""
    purge_before = await read_watermark(engine, watermark, timeout)
    if purge_before is None:
        return 0
    columns = barrier.c
    deleted = 0
    while True:
        oldest = (
            sqlalchemy.select(columns.idempotency_key, columns.operation)
            .where(columns.created_at < purge_before)
            .order_by(columns.created_at)
            .limit(batch_size)
        )
        async with bounded_transaction(engine, timeout) as conn:
            result = await conn.execute(
                barrier.delete().where(
                    sqlalchemy.tuple_(columns.idempotency_key, columns.operation).in_(oldest)
                )
            )
        count = max(result.rowcount, 0)
        deleted += count
        if count < batch_size:
            return deleted
