"""`compensa audit`: the saga log against every participant's barrier records
(orchestrator.auditor), run here against the database, then a report."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compensa.orchestrator.cli.connection import tls_files
from compensa.orchestrator.cli.exit_codes import EXIT_DISCREPANCIES, EXIT_OK
from compensa.orchestrator.cli.server import positive_seconds
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.errors import CompensaError

if TYPE_CHECKING:
    from compensa.orchestrator.auditor import AuditReport
    from compensa.orchestrator.store import AuditFinding


def _rfc3339(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="milliseconds")


def audit(args: argparse.Namespace) -> int:
    """`compensa audit`: prints what the audit found; exit status 1 when it found discrepancies."""
    from sqlalchemy.engine import make_url

    from compensa.orchestrator.auditor import AuditOptions, run_audit
    from compensa.orchestrator.store import open_store

    url = ServerConfig(database_url=args.db).resolved_database_url()
    sqlite_file = make_url(url).database if url.startswith("sqlite") else None
    if sqlite_file and not Path(sqlite_file).exists():  # connecting would create it
        raise CompensaError(f"no database at {sqlite_file}; check --db")
    retention = (
        positive_seconds(args.barrier_retention, "--barrier-retention") if args.barrier_retention is not None else None
    )

    async def run() -> AuditReport:
        store = open_store(url)
        try:
            if not await store.has_schema():
                raise CompensaError("no Compensa tables in this database; check --db (or run compensa migrate)")
            since: float | None = None
            if isinstance(args.since, datetime.timedelta):
                since = await store.clock() - args.since.total_seconds()
            elif isinstance(args.since, datetime.datetime):
                since = args.since.timestamp()
            options = AuditOptions(
                since=since, definition_name=args.definition, participants=tuple(args.participant),
                barrier_retention=retention, max_sagas_per_second=args.max_sagas_per_second,
                participant_tls=tls_files(args.participant_tls_ca, args.participant_tls_cert, args.participant_tls_key),
            )
            if args.settle_grace is not None:
                options = dataclasses.replace(options, settle_grace=args.settle_grace.ToNanoseconds() / 1e9)
            if args.clock_skew_margin is not None:
                options = dataclasses.replace(
                    options, clock_skew_margin=args.clock_skew_margin.ToNanoseconds() / 1e9
                )
            try:
                return await run_audit(store, options)
            except ValueError as error:
                raise CompensaError(f"--participant: {error}") from None
        finally:
            await store.close()

    report = asyncio.run(run())
    if args.json:
        print(json.dumps(_as_json(report), ensure_ascii=False, indent=2))
    else:
        _print_text(report)
    return EXIT_DISCREPANCIES if report.findings else EXIT_OK


def _as_json(report: AuditReport) -> dict[str, Any]:
    def finding(found: AuditFinding) -> dict[str, Any]:
        return {
            "kind": found.kind, "participant": found.participant or None, "saga_id": found.saga_id,
            "definition": found.definition_name or None, "step": found.step_name or None, "message": found.message,
        }

    return {
        "discrepancies": len(report.findings),
        "participants": [
            {
                "participant": each.participant, "address": each.address, "audited": each.audited,
                "not_audited_because": each.reason or None, "sagas": each.sagas, "rows": each.rows,
                "discrepancies": [finding(found) for found in each.findings],
                "audited_clean_through": _rfc3339(each.clean_through[0]) if each.clean_through else None,
                "purge_watermark": _rfc3339(each.purge_before),
            }
            for each in report.participants
        ],
        "sagas": [finding(found) for found in report.saga_findings],
    }


def _print_text(report: AuditReport) -> None:
    for each in report.participants:
        if not each.audited:
            print(f"{each.participant} ({each.address}): not audited: {each.reason}")
            continue
        verdict = f"{len(each.findings)} discrepancies" if each.findings else "clean"
        print(f"{each.participant} ({each.address}): {each.sagas} sagas, {each.rows} rows: {verdict}")
        if each.clean_through:
            print(f"  audited clean through sagas created up to {_rfc3339(each.clean_through[0])}")
        if each.purge_before is not None:
            print(f"  may delete barrier rows created before {_rfc3339(each.purge_before)}")
        for found in each.findings:
            print(f"  {found.message}")
    for found in report.saga_findings:
        print(found.message)
    if not report.participants:
        print("no participants with a stored address to audit")
