"""Which database holds which saga: virtual partitions and their map.

A saga's partition is a hash of its id over a count fixed for ever
(PARTITION_COUNT); the map from partition to database is stored in the home
database and is what moves when databases are added (docs/partitions.md).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from compensa.common.startup import DatabaseMisconfigured
from compensa.orchestrator.store.base import SagaStore
from compensa.orchestrator.store.schema import partition_map, sagas
from compensa.orchestrator.store.sql import SqlSagaStore

#: Virtual partitions. Never changed once sagas exist: a saga's partition
#: is computed from its id alone.
PARTITION_COUNT = 1024

log = logging.getLogger("compensa.store")

#: The secret whose value names a database in the map (see `database_id`).
_DATABASE_ID_SECRET = "partition-database-id"

# Serializes replicas that create the map together (pg_advisory_xact_lock).
_MAP_LOCK = 0x636F6D70_70617274 & 0x7FFFFFFFFFFFFFFF


def partition_of(saga_id: str) -> int:
    """The saga's virtual partition, from its id alone."""
    digest = hashlib.blake2b(saga_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % PARTITION_COUNT


async def database_id(store: SagaStore) -> str:
    """The id `store`'s database gives itself on first use: the same for
    every replica whatever URL reaches it, different for every database."""
    return (await store.secret(_DATABASE_ID_SECRET))[:8].hex()


@dataclass(frozen=True)
class PartitionMap:
    """Where each partition lives: `databases[owners[p]]` holds partition p."""

    databases: tuple[str, ...]  # database ids, by index
    owners: tuple[int, ...]  # an index into `databases`, by partition

    def database_of(self, saga_id: str) -> int:
        return self.owners[partition_of(saga_id)]

    def partitions_of(self, index: int) -> int:
        """How many partitions database `index` holds."""
        return sum(1 for owner in self.owners if owner == index)


async def load_partition_map(home: SqlSagaStore, database_ids: Sequence[str]) -> PartitionMap:
    """The stored map, made at the first start: partition p to database p mod
    D of `database_ids` (the home's first), or every partition to home when
    home already holds sagas (a deployment that had one database: its sagas
    stay where they are, and the others hold nothing until partitions move).
    DatabaseMisconfigured when it names a database not among `database_ids`."""
    if len(set(database_ids)) != len(database_ids):
        raise DatabaseMisconfigured("a database is given twice (--db and --partition-db name the same one)")
    async with home._transaction() as conn:
        await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MAP_LOCK})
        rows = await conn.execute(sa.select(partition_map.c.partition_no, partition_map.c.database_id))
        stored: list[tuple[int, str]] = [(row.partition_no, row.database_id) for row in rows]
        if not stored:
            had_sagas = (await conn.execute(sa.select(sa.exists().select_from(sagas)))).scalar_one()
            spread = 1 if had_sagas else len(database_ids)
            stored = [(p, database_ids[p % spread]) for p in range(PARTITION_COUNT)]
            if had_sagas:
                log.warning(
                    "the home database holds sagas already: every partition stays there, and the other databases"
                    " hold none until partitions are moved to them (docs/partitions.md)"
                )
            await conn.execute(
                sa.insert(partition_map), [{"partition_no": p, "database_id": db} for p, db in stored]
            )
    where = {db: index for index, db in enumerate(database_ids)}
    owners = [0] * PARTITION_COUNT
    for partition_no, db in stored:
        if db not in where:
            raise DatabaseMisconfigured(
                f"the partition map holds partition {partition_no} in database {db}, which neither --db nor any"
                " --partition-db reaches: give every database of the deployment"
            )
        owners[partition_no] = where[db]
    return PartitionMap(tuple(database_ids), tuple(owners))
