"""The one read path of both faces: the gRPC service and the dashboard load
the sagas, bulk actions and participants a caller may see through it, with the
access check inside, and build a saga's view the same way."""

from __future__ import annotations

from compensa.orchestrator.api.auth import AccessPolicy, Identity
from compensa.orchestrator.api.views import saga_message
from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.engine import SagaEngine
from compensa.orchestrator.shared import records
from compensa.orchestrator.shared.errors import NotFound, quote, saga_not_found
from compensa.orchestrator.shared.limits import BULK_ACTION_ID_PATTERN, SAGA_ID_PATTERN, is_possible
from compensa.orchestrator.store import BulkJob, SagaFlow
from compensa.v1 import saga_pb2


class SagaQueries:
    """Reads for callers: what exists and what the caller may see are
    answered alike (NotFound), whichever face asks."""

    def __init__(self, engine: SagaEngine, access: AccessPolicy) -> None:
        self._engine = engine
        self._store = engine.store
        self._access = access

    async def visible_saga(
        self, identity: Identity | None, saga_id: str, *, field: str = "saga_id"
    ) -> records.SagaRecord:
        """The saga, if it exists and `identity` (None: an open API) may see
        it; NotFound alike otherwise. `field` names the id in the message of
        an id that is empty or not text."""
        saga = await self._store.load_saga(saga_id) if is_possible(saga_id, field, SAGA_ID_PATTERN) else None
        if saga is None:
            raise saga_not_found(saga_id)
        self._access.require_visible(identity, saga_id, saga.definition_name)
        return saga

    async def visible_bulk_job(
        self, identity: Identity | None, bulk_action_id: str, *, field: str = "bulk_action_id"
    ) -> BulkJob:
        """The bulk action, if it exists and `identity` (None: an open API)
        may see it; NotFound alike otherwise."""
        possible = is_possible(bulk_action_id, field, BULK_ACTION_ID_PATTERN)
        job = await self._store.get_bulk_job(bulk_action_id) if possible else None
        if job is None or (identity is not None and not visible_bulk_job(identity, job)):
            raise NotFound(f"bulk action {quote(bulk_action_id)} not found")
        return job

    async def plan_of(self, saga: records.SagaRecord) -> machine.Plan:
        """The plan of the definition version `saga` runs (cached by the engine)."""
        return await self._engine.plan_for(saga.definition_name, saga.definition_version)

    async def saga_view(self, saga: records.SagaRecord, flow: SagaFlow | None = None) -> saga_pb2.Saga:
        """The saga as the API shows it (steps with their participants and
        kinds), with its priority and what it waits for (read unless given)."""
        if flow is None:
            flow = await self._store.flow_of(saga.saga_id, with_waits=not saga.is_final)
        return saga_message(saga, await self.plan_of(saga), flow)

    async def visible_participants(self, identity: Identity | None) -> frozenset[str] | None:
        """The names of the participants `identity` may see and set: those its
        definitions name; None when it may see every one."""
        if identity is None or not identity.definitions:
            return None
        return self._access.visible_participants(identity, await self._store.definition_participants())


def visible_bulk_job(identity: Identity, job: BulkJob) -> bool:
    """Whether `identity` may see `job`: a job over every definition ("") is
    not one for a caller limited to some."""
    return identity.may_see(job.definition_name)
