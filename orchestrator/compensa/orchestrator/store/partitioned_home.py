"""The calls a partitioned store answers from the home database alone:
definitions, participants and their budget, bulk actions and the audit (docs/partitions.md, "What lives where")."""

from __future__ import annotations

from collections.abc import Sequence

from compensa.orchestrator.store.base import (
    AuditJob,
    AuditProgress,
    BulkBatchAction,
    BulkItem,
    BulkJob,
    ContractChange,
    DefinitionChange,
    DefinitionCheck,
    LogPage,
    ParticipantAddress,
    ParticipantLimits,
    RecordedAuditFinding,
    SagaStore,
)
from compensa.v1 import definition_pb2


class HomeDatabaseCalls(SagaStore):
    """SagaStore calls that go to `_home` unchanged."""

    _home: SagaStore

    async def has_schema(self) -> bool:
        return await self._home.has_schema()

    async def secret(self, name: str) -> bytes:
        return await self._home.secret(name)

    async def clock(self) -> float:
        return await self._home.clock()

    async def register_definition(
        self, definition: definition_pb2.SagaDefinition, fingerprint: str, now: float, *, actor: str = "",
        check: DefinitionCheck | None = None,
    ) -> tuple[definition_pb2.SagaDefinition, bool]:
        return await self._home.register_definition(definition, fingerprint, now, actor=actor, check=check)

    async def definition_fingerprints(self, name: str) -> dict[str, int]:
        return await self._home.definition_fingerprints(name)

    async def promote_definition(
        self, name: str, version: int, *, actor: str, now: float
    ) -> tuple[definition_pb2.SagaDefinition, bool] | None:
        return await self._home.promote_definition(name, version, actor=actor, now=now)

    async def definition_history(self, name: str) -> list[DefinitionChange]:
        return await self._home.definition_history(name)

    async def get_definition(self, name: str, version: int = 0) -> definition_pb2.SagaDefinition | None:
        return await self._home.get_definition(name, version)

    async def list_definitions(
        self, page_size: int, after_name: str
    ) -> list[definition_pb2.SagaDefinition]:
        return await self._home.list_definitions(page_size, after_name)

    async def definition_participants(self) -> dict[str, frozenset[str]]:
        return await self._home.definition_participants()

    async def set_participant(
        self, name: str, address: str, *, updated_by: str, now: float, contract: ContractChange | None = None
    ) -> ParticipantAddress:
        return await self._home.set_participant(name, address, updated_by=updated_by, now=now, contract=contract)

    async def list_participants(self) -> list[ParticipantAddress]:
        return await self._home.list_participants()

    async def set_participant_limits(
        self, name: str, limits: ParticipantLimits, *, updated_by: str, now: float
    ) -> ParticipantAddress | None:
        return await self._home.set_participant_limits(name, limits, updated_by=updated_by, now=now)

    async def hold_participant(
        self, name: str, *, reason: str | None, by: str, now: float
    ) -> ParticipantAddress | None:
        return await self._home.hold_participant(name, reason=reason, by=by, now=now)

    async def renew_capacity(self, replica: str, lease_until: float) -> None:
        return await self._home.renew_capacity(replica, lease_until)

    async def participant_contracts(self) -> dict[str, bytes]:
        return await self._home.participant_contracts()

    async def participant_failing(self, name: str, now: float) -> None:
        return await self._home.participant_failing(name, now)

    async def get_bulk_job(self, bulk_action_id: str) -> BulkJob | None:
        return await self._home.get_bulk_job(bulk_action_id)

    async def list_bulk_jobs(self, page_size: int, after: tuple[float, str] | None) -> list[BulkJob]:
        return await self._home.list_bulk_jobs(page_size, after)

    async def change_bulk_job_state(
        self, bulk_action_id: str, *, allowed_from: frozenset[int], to: int, now: float
    ) -> tuple[BulkJob | None, bool]:
        return await self._home.change_bulk_job_state(bulk_action_id, allowed_from=allowed_from, to=to, now=now)

    async def claim_bulk_job(self, owner: str, now: float, lease_until: float) -> BulkJob | None:
        return await self._home.claim_bulk_job(owner, now, lease_until)

    async def renew_bulk_job(self, bulk_action_id: str, owner: str, epoch: int, lease_until: float) -> bool:
        return await self._home.renew_bulk_job(bulk_action_id, owner, epoch, lease_until)

    async def release_bulk_job(self, bulk_action_id: str, owner: str, epoch: int) -> None:
        return await self._home.release_bulk_job(bulk_action_id, owner, epoch)

    async def run_bulk_batch(
        self, bulk_action_id: str, owner: str, epoch: int, limit: int, act: BulkBatchAction
    ) -> int | None:
        return await self._home.run_bulk_batch(bulk_action_id, owner, epoch, limit, act)

    async def complete_bulk_job(self, bulk_action_id: str, owner: str, epoch: int, now: float) -> bool:
        return await self._home.complete_bulk_job(bulk_action_id, owner, epoch, now)

    async def bulk_problems(self, bulk_action_id: str, limit: int) -> list[BulkItem]:
        return await self._home.bulk_problems(bulk_action_id, limit)

    async def audit_progress(self, participant: str) -> AuditProgress | None:
        return await self._home.audit_progress(participant)

    async def save_audit_progress(self, progress: AuditProgress) -> None:
        return await self._home.save_audit_progress(progress)

    async def create_audit_job(self, job: AuditJob) -> tuple[AuditJob, bool]:
        return await self._home.create_audit_job(job)

    async def get_audit_job(self, audit_id: str) -> AuditJob | None:
        return await self._home.get_audit_job(audit_id)

    async def claim_audit_job(self, owner: str, now: float, lease_until: float) -> AuditJob | None:
        return await self._home.claim_audit_job(owner, now, lease_until)

    async def renew_audit_job(self, audit_id: str, owner: str, epoch: int, lease_until: float) -> bool:
        return await self._home.renew_audit_job(audit_id, owner, epoch, lease_until)

    async def release_audit_job(self, audit_id: str, owner: str, epoch: int) -> None:
        return await self._home.release_audit_job(audit_id, owner, epoch)

    async def save_audit_job(
        self, audit_id: str, owner: str, epoch: int, *, report: bytes, cursor: str, now: float,
        progress: AuditProgress | None = None, complete: bool = False,
    ) -> bool:
        return await self._home.save_audit_job(
            audit_id, owner, epoch, report=report, cursor=cursor, now=now, progress=progress, complete=complete
        )

    async def list_audit_progress(self) -> list[AuditProgress]:
        return await self._home.list_audit_progress()

    async def list_audit_findings(self, limit: int, *, participant: str | None = None) -> list[RecordedAuditFinding]:
        return await self._home.list_audit_findings(limit, participant=participant)

    async def count_audit_findings(self) -> dict[str, int]:
        return await self._home.count_audit_findings()

    # The dashboard's live log: home's alone until it reads per database too.
    async def read_log_page(
        self, after_position: int, limit: int, *, definition_name: str = "", saga_state: int = 0,
        past_open_transactions: bool = False, skipping: Sequence[int] = (),
    ) -> LogPage:
        return await self._home.read_log_page(
            after_position, limit, definition_name=definition_name, saga_state=saga_state,
            past_open_transactions=past_open_transactions, skipping=skipping,
        )

    async def head_position(self) -> int:
        return await self._home.head_position()

    def transaction_positions(self, position: int) -> range:
        return self._home.transaction_positions(position)

