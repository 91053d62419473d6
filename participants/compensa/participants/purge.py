"""Deletes a participant's barrier rows below the purge watermark its
orchestrator set, once, then exits (`compensa.participants.retention`):

    python -m compensa.participants.purge --db URL [--barrier-table NAME] [--batch-size N]

for operators who run it from a scheduled job instead of the
`purge_interval` option of `compensa.participants.serve`. Without a
watermark it deletes nothing. A database it cannot use (a bad URL,
unreachable, without the barrier's tables) is said in one line on stderr,
exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import sqlalchemy

from compensa.common.database import database_error_text
from compensa.common.startup import DatabaseMisconfigured
from compensa.participants.barrier import barrier_table
from compensa.participants.retention import DEFAULT_PURGE_BATCH, purge_below_watermark, watermark_table
from compensa.participants.serving import create_participant_engine

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m compensa.participants.purge",
        description="Delete a participant's barrier rows below the purge watermark its orchestrator set, then exit.",
    )
    parser.add_argument("--db", required=True, metavar="URL", help="the participant's database URL")
    parser.add_argument("--barrier-table", default="participant_barrier", metavar="NAME",
                        help="the participant's barrier table (its barrier_table_name; default participant_barrier)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_PURGE_BATCH, metavar="N",
                        help=f"rows deleted per transaction (default {DEFAULT_PURGE_BATCH})")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    async def purge() -> int:
        engine = create_participant_engine(args.db)
        try:
            barrier = barrier_table(args.barrier_table)
            return await purge_below_watermark(
                engine, barrier, watermark_table(args.barrier_table, sqlalchemy.MetaData()),
                batch_size=args.batch_size, timeout=30.0,
            )
        finally:
            await engine.dispose()

    try:
        deleted = asyncio.run(purge())
    except DatabaseMisconfigured as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
        # Unreachable, timed out, or not a participant's database (no barrier
        # or watermark table): one line, as the driver said it.
        print(f"error: {args.barrier_table} at --db: {database_error_text(error)}", file=sys.stderr)
        return 2
    print(f"deleted {deleted} barrier row(s) below the purge watermark")
    return 0


if __name__ == "__main__":
    sys.exit(main())
