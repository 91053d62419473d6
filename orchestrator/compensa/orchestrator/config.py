"""Configuration of an orchestrator process."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from compensa.common.database import DEFAULT_DATABASE_TIMEOUT, with_async_driver
from compensa.common.health import DEFAULT_PROBE_SECONDS
from compensa.common.startup import DatabaseMisconfigured
from compensa.common.tls import TlsFiles
from compensa.orchestrator.api.auth import AccessPolicy, Role, load_jwt_keys, load_token_file
from compensa.orchestrator.api.service import ServiceSettings
from compensa.orchestrator.engine.config import EngineConfig
from compensa.orchestrator.shared.payloads import DEFAULT_PROTO_MODULES
from compensa.orchestrator.store import DEFAULT_MAX_LAG_SECONDS

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_SQLITE_PATH = Path(".compensa") / "compensa.db"


def _replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class ServerConfig:
    """Everything `compensa serve` needs.

    `database_url` is a SQLAlchemy URL; None means the embedded SQLite store at
    `DEFAULT_SQLITE_PATH`. `participants` maps logical participant names used in
    definitions to HOST:PORT addresses.
    """

    listen: str = DEFAULT_LISTEN
    database_url: str | None = None
    #: Further PostgreSQL databases holding partitions of the sagas
    #: (docs/partitions.md); `database_url` is then the home database.
    partition_database_urls: tuple[str, ...] = ()
    definition_paths: tuple[Path, ...] = ()
    participants: Mapping[str, str] = field(default_factory=dict)
    proto_modules: tuple[str, ...] = DEFAULT_PROTO_MODULES
    replica_id: str = field(default_factory=_replica_id)
    # How long a replica owns a saga without renewing; a crashed replica's
    # sagas are taken over after at most this long.
    lease_seconds: float = 5.0
    # TLS for this server (mutual when tls.ca is set); None serves plaintext.
    tls: TlsFiles | None = None
    # TLS for the calls to participants: the CA that signs their certificates
    # and this orchestrator's client certificate; None calls in plaintext.
    participant_tls: TlsFiles | None = None
    # Client certificate names (common name or subject alternative name)
    # allowed to cancel, retry, resolve and register definitions; empty lets
    # every client do it. Needs mutual TLS (tls.ca).
    operators: tuple[str, ...] = ()
    # More client certificate names with their roles (reader, starter,
    # operator); `operators` are added as operators. Needs mutual TLS.
    certificate_roles: Mapping[str, Role] = field(default_factory=dict)
    # The definitions some of those certificate names are limited to
    # (`serve --role NAME=ROLE:DEFINITIONS`); a name not here sees every one.
    certificate_scopes: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # A file of bearer tokens with their identities, roles and definition
    # scopes (see orchestrator/auth.py); None accepts no tokens.
    token_file: Path | None = None
    # A JSON Web Key Set: JWTs signed by one of its keys are accepted as
    # bearer tokens (with these audience and issuer when set).
    jwt_keys: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Streams (watches, the dashboard's live list) one client may hold open
    # at once; 0 sets no limit.
    max_streams_per_client: int = 0
    # HOST:PORT of the web dashboard (over TLS when `tls` is set); None
    # serves none.
    http_listen: str | None = None
    # HOST:PORT of the Prometheus /metrics endpoint (over TLS when `tls` is
    # set); None serves none.
    metrics_listen: str | None = None
    # Sagas done for good (SUCCEEDED, COMPENSATED, or FAILED and resolved)
    # are deleted with their steps and events this long after their last
    # change; None keeps everything.
    retention_seconds: float | None = None
    # URL that alerts are POSTed to (see README, "Alerts"), from the durable
    # outbox, until answered 2xx; None delivers none (they stay in the outbox).
    alert_webhook: str | None = None
    # How long one delivery may take; a replica killed while delivering
    # leaves the alert to another after about this long.
    alert_webhook_timeout: float = 5.0
    # An unfinished saga unchanged for this long raises an alert (once per
    # stall); None raises none.
    alert_stuck_seconds: float | None = None
    # An audit of the log against participants' barrier rows runs this often
    # (seconds; auditor.py), resuming where the last one stopped; None runs none.
    audit_interval_seconds: float | None = None
    # With audit_interval_seconds: participants are told they may delete the
    # barrier rows of sagas final, audited clean and created this long ago.
    barrier_retention_seconds: float | None = None
    # Every stored participant is probed with grpc.health.v1 this often (seconds).
    participant_health_seconds: float = 5.0
    # A participant whose probes (by every replica) have failed for this long
    # raises an alert, once per outage, and another when it recovers; None
    # raises none.
    alert_participant_unhealthy_seconds: float | None = 60.0
    # Committed events that wait this long behind a transaction left open
    # (PostgreSQL's log readers stop below the oldest open one) raise an
    # alert, once per transaction; None raises none (the metric and the log
    # line remain).
    alert_log_held_back_seconds: float | None = 60.0
    # Sagas this replica takes on at once (being started, or driven); a
    # StartSaga over it is refused with RESOURCE_EXHAUSTED and a retry delay
    # (admission.py). 0 sets no limit.
    max_sagas_in_flight: int = 1000
    # Largest accepted request (saga input, step output), in bytes.
    max_payload_bytes: int = 1024 * 1024
    # Watch streams re-read the log this often even without a wake-up; a
    # safety net under LISTEN/NOTIFY and in-process notifications.
    watch_reread_seconds: float = 5.0
    # Events buffered per watch stream; a subscriber further behind reads
    # the log itself until it catches up.
    watch_buffer_events: int = 1000
    # The longest any one wait on the database may take (connecting, a
    # transaction, a group commit), in seconds: a call on a replica that
    # cannot reach its database answers UNAVAILABLE within about this long.
    database_timeout: float = DEFAULT_DATABASE_TIMEOUT
    # A streaming standby of the PostgreSQL database (`--read-db`): the reads
    # that tolerate a bounded lag go there while it is at most
    # `read_max_lag_seconds` behind (see store/standby.py); None: none.
    read_database_url: str | None = None
    read_max_lag_seconds: float = DEFAULT_MAX_LAG_SECONDS
    # grpc.health.v1 follows the database: it is probed this often (seconds)
    # when no real work reached it, and real failures count at once.
    health_probe_seconds: float = DEFAULT_PROBE_SECONDS

    def engine_config(self) -> EngineConfig:
        """The engine's part of these settings."""
        return EngineConfig(
            replica_id=self.replica_id,
            participants=self.participants,
            participant_tls=self.participant_tls,
            max_payload_bytes=self.max_payload_bytes,
            lease_seconds=self.lease_seconds,
            database_timeout=self.database_timeout,
            alert_webhook=self.alert_webhook,
            alert_webhook_timeout=self.alert_webhook_timeout,
            alert_stuck_seconds=self.alert_stuck_seconds,
            participant_health_seconds=self.participant_health_seconds,
            alert_participant_unhealthy_seconds=self.alert_participant_unhealthy_seconds,
            alert_log_held_back_seconds=self.alert_log_held_back_seconds,
            retention_seconds=self.retention_seconds,
            audit_interval_seconds=self.audit_interval_seconds,
            barrier_retention_seconds=self.barrier_retention_seconds,
        )

    def service_settings(self) -> ServiceSettings:
        """The gRPC service's and the dashboard's part of these settings."""
        return ServiceSettings(
            max_payload_bytes=self.max_payload_bytes,
            watch_buffer_events=self.watch_buffer_events,
            watch_reread_seconds=self.watch_reread_seconds,
            max_streams_per_client=self.max_streams_per_client,
            max_sagas_in_flight=self.max_sagas_in_flight,
        )

    def access_policy(self) -> AccessPolicy:
        """Who may do what: certificate roles and the token file (read now,
        so that a bad file stops the start)."""
        roles = {**self.certificate_roles, **{name: Role.OPERATOR for name in self.operators}}
        tokens = load_token_file(self.token_file) if self.token_file is not None else {}
        jwt = None
        if self.jwt_keys is not None:
            jwt = load_jwt_keys(self.jwt_keys, audience=self.jwt_audience, issuer=self.jwt_issuer)
        return AccessPolicy(
            certificate_roles=roles, certificate_scopes=self.certificate_scopes, tokens=tokens, jwt=jwt
        )

    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL to use, the embedded SQLite file by default."""
        if self.database_url:
            return with_async_driver(self.database_url)
        DEFAULT_SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{DEFAULT_SQLITE_PATH}"

    def resolved_partition_urls(self) -> tuple[str, ...]:
        """The SQLAlchemy URLs of the partition databases besides the home one."""
        if self.partition_database_urls and not self.database_url:
            raise DatabaseMisconfigured("--partition-db needs --db: the home database, PostgreSQL too")
        return tuple(with_async_driver(url) for url in self.partition_database_urls)
