"""What the engine needs of a process's configuration (the server builds it
from its own: see compensa.orchestrator.config.ServerConfig, which documents
each setting)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from compensa.common.tls import TlsFiles


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """The engine's settings: who it is, how it reaches participants, leases,
    and the background work it runs (alerts, retention, health probes)."""

    replica_id: str
    participants: Mapping[str, str]
    participant_tls: TlsFiles | None
    max_payload_bytes: int
    lease_seconds: float
    database_timeout: float
    alert_webhook: str | None
    alert_webhook_timeout: float
    alert_stuck_seconds: float | None
    participant_health_seconds: float
    alert_participant_unhealthy_seconds: float | None
    alert_log_held_back_seconds: float | None = 60.0
    retention_seconds: float | None
    audit_interval_seconds: float | None
    barrier_retention_seconds: float | None
