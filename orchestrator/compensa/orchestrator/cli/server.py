"""The commands that run or tend a server: serve (the orchestrator), migrate
and purge (its database), participant (an example checkout participant) and
demo (all of them in one process)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from pathlib import Path

from google.protobuf import duration_pb2

from compensa.common.tls import TlsConfigError, TlsFiles
from compensa.orchestrator.cli.connection import tls_files
from compensa.orchestrator.cli.exit_codes import EXIT_OK
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.shared.errors import CompensaError


def serve(args: argparse.Namespace) -> int:
    """`compensa serve`: the orchestrator, until SIGINT or SIGTERM."""
    from compensa.orchestrator.server import serve as serve_orchestrator

    definition_paths: list[Path] = args.definitions or ([Path("definitions")] if Path("definitions").is_dir() else [])
    participants: list[tuple[str, str]] = args.participant
    config = ServerConfig(
        listen=args.listen,
        database_url=args.db,
        partition_database_urls=tuple(args.partition_db),
        definition_paths=tuple(definition_paths),
        participants=dict(participants),
        proto_modules=tuple(dict.fromkeys(args.proto_module)),
    )
    if args.lease_seconds is not None:
        config = dataclasses.replace(config, lease_seconds=args.lease_seconds)
    if args.replica_id:
        config = dataclasses.replace(config, replica_id=args.replica_id)
    config = dataclasses.replace(
        config,
        metrics_listen=args.metrics_listen,
        tls=_server_tls(args),
        participant_tls=tls_files(args.participant_tls_ca, args.participant_tls_cert, args.participant_tls_key),
        operators=tuple(args.operator),
        database_timeout=_database_timeout(args),
        certificate_roles={name: role for name, role, _ in args.role},
        certificate_scopes={name: scope for name, _, scope in args.role if scope},
        token_file=args.tokens,
        jwt_keys=args.jwt_keys,
        jwt_audience=args.jwt_audience,
        jwt_issuer=args.jwt_issuer,
        http_listen=args.http,
    )
    config = _read_database(args, config)
    if args.max_streams_per_client < 0:
        raise CompensaError("--max-streams-per-client must be 0 (no limit) or positive")
    config = dataclasses.replace(config, max_streams_per_client=args.max_streams_per_client)
    if args.max_sagas_in_flight < 0:
        raise CompensaError("--max-sagas-in-flight must be 0 (no limit) or positive")
    config = dataclasses.replace(config, max_sagas_in_flight=args.max_sagas_in_flight)
    if args.retention is not None:
        config = dataclasses.replace(config, retention_seconds=_positive_seconds(args.retention, "--retention"))
    if args.audit_interval is not None:
        config = dataclasses.replace(
            config, audit_interval_seconds=_positive_seconds(args.audit_interval, "--audit-interval")
        )
    if args.barrier_retention is not None:
        if args.audit_interval is None:
            raise CompensaError("--barrier-retention needs --audit-interval: rows are purged only once audited")
        config = dataclasses.replace(
            config, barrier_retention_seconds=_positive_seconds(args.barrier_retention, "--barrier-retention")
        )
    if args.alert_webhook is not None:
        config = dataclasses.replace(config, alert_webhook=args.alert_webhook)
    if args.alert_stuck_after is not None:
        config = dataclasses.replace(
            config, alert_stuck_seconds=_positive_seconds(args.alert_stuck_after, "--alert-stuck-after")
        )
    if args.participant_health_interval is not None:
        config = dataclasses.replace(
            config, participant_health_seconds=_positive_seconds(
                args.participant_health_interval, "--participant-health-interval"
            )
        )
    if args.alert_participant_unhealthy_after is not None:
        seconds = args.alert_participant_unhealthy_after.ToNanoseconds() / 1e9
        config = dataclasses.replace(config, alert_participant_unhealthy_seconds=seconds or None)
    if args.alert_log_held_back_after is not None:
        seconds = args.alert_log_held_back_after.ToNanoseconds() / 1e9
        config = dataclasses.replace(config, alert_log_held_back_seconds=seconds or None)
    if args.alert_webhook_timeout is not None:
        config = dataclasses.replace(
            config, alert_webhook_timeout=_positive_seconds(args.alert_webhook_timeout, "--alert-webhook-timeout")
        )
    asyncio.run(serve_orchestrator(config))
    return EXIT_OK


def _read_database(args: argparse.Namespace, config: ServerConfig) -> ServerConfig:
    """--read-db and --read-db-max-lag, checked: a standby of a PostgreSQL --db."""
    from compensa.common.database import parse_database_url, with_async_driver

    if args.read_db is None:
        if args.read_db_max_lag is not None:
            raise CompensaError("--read-db-max-lag needs --read-db: it bounds how far that database may lag")
        return config
    if not args.db or not parse_database_url(with_async_driver(args.db)).is_postgres:
        raise CompensaError(
            "--read-db needs a PostgreSQL --db: a read database is a streaming standby of it, and SQLite has none"
        )
    config = dataclasses.replace(config, read_database_url=args.read_db)
    if args.read_db_max_lag is not None:
        config = dataclasses.replace(
            config, read_max_lag_seconds=_positive_seconds(args.read_db_max_lag, "--read-db-max-lag")
        )
    return config


def migrate(args: argparse.Namespace) -> int:
    """`compensa migrate`: upgrades (or creates) the database's schema, then exits."""
    from compensa.orchestrator.store import open_store

    async def upgrade() -> tuple[str | None, str]:
        config = ServerConfig(database_url=args.db, partition_database_urls=tuple(args.partition_db))
        store = open_store(config.resolved_database_url(), partition_urls=config.resolved_partition_urls())
        try:
            return await store.upgrade_schema()
        finally:
            await store.close()

    before, after = asyncio.run(upgrade())
    if before == after:
        print(f"schema up to date (revision {after})")
    else:
        print(f"schema upgraded from {before or 'an empty database'} to revision {after}")
    return EXIT_OK


def purge(args: argparse.Namespace) -> int:
    """`compensa purge`: what `serve --retention` does on its own, once, for
    deployments that run it from a scheduled job instead (or want a one-off
    clean-up)."""
    from compensa.common.database import parse_database_url
    from compensa.orchestrator.engine.engine import purge_finished
    from compensa.orchestrator.store import open_store

    older_than = _positive_seconds(args.older_than, "--older-than")
    config = ServerConfig(database_url=args.db, partition_database_urls=tuple(args.partition_db))
    url = config.resolved_database_url()
    partition_urls = config.resolved_partition_urls()
    database = parse_database_url(url)
    sqlite_file = None if database.is_postgres else database.engine_url.database
    if sqlite_file and not Path(sqlite_file).exists():  # connecting would create it
        raise CompensaError(f"no database at {sqlite_file}; check --db")

    async def purge_sagas() -> int:
        store = open_store(url, partition_urls=partition_urls)
        try:
            if not await store.has_schema():
                raise CompensaError("no Compensa tables in this database; check --db (or run compensa migrate)")
            # The database's clock, as the replicas read it.
            return await purge_finished(store, await store.clock() - older_than)
        finally:
            await store.close()

    print(f"deleted {asyncio.run(purge_sagas())} saga(s) done for good")
    return EXIT_OK


def participant(args: argparse.Namespace) -> int:
    """`compensa participant KIND`: one example checkout participant, until stopped."""
    from compensa.examples.server import serve_participant

    asyncio.run(
        serve_participant(
            args.kind, listen=args.listen, database_url=args.db, faults=args.faults, tls=_server_tls(args),
            database_timeout=_database_timeout(args),
            purge_interval=(
                _positive_seconds(args.purge_interval, "--purge-interval") if args.purge_interval is not None else None
            ),
        )
    )
    return EXIT_OK


def demo(args: argparse.Namespace) -> int:
    """`compensa demo`: a checkout that succeeds and one that compensates, in this process."""
    from compensa.orchestrator.cli.demo import run_demo

    return asyncio.run(run_demo(http_listen=args.http, stay=args.stay))


def _server_tls(args: argparse.Namespace) -> TlsFiles | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    return TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_client_ca)


def _database_timeout(args: argparse.Namespace) -> float:
    """--database-timeout in seconds, or the default."""
    from compensa.common.database import DEFAULT_DATABASE_TIMEOUT

    if args.database_timeout is None:
        return DEFAULT_DATABASE_TIMEOUT
    return _positive_seconds(args.database_timeout, "--database-timeout")


def _positive_seconds(duration: duration_pb2.Duration, option: str) -> float:
    seconds = duration.ToNanoseconds() / 1e9
    if seconds <= 0:
        raise CompensaError(f"{option} must be positive")
    return seconds
