"""The store's part of the audit, on SQLite and PostgreSQL: sagas in creation
order, progress kept per participant, and each finding alerted once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from harness import log_caught_up

import compensa.checkout.v1.checkout_pb2  # noqa: F401  (registers the definitions' input_type)
from compensa.examples import DEFINITIONS_DIR
from compensa.orchestrator.definitions import definition_fingerprint, load_definition_file
from compensa.orchestrator.engine import machine
from compensa.orchestrator.engine.machine import Plan
from compensa.orchestrator.store import (
    AUDIT_ALERT,
    AUDIT_JOB_COMPLETED,
    AUDIT_JOB_RUNNING,
    AuditFinding,
    AuditJob,
    AuditProgress,
    SagaWrite,
    SqlSagaStore,
    open_store,
)

T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlSagaStore]:
    url = f"sqlite+aiosqlite:///{tmp_path}/s.db" if request.param == "sqlite" else (
        request.getfixturevalue("make_postgres_url")()
    )
    opened = open_store(url)
    await opened.ensure_schema()
    try:
        yield opened
    finally:
        await opened.close()


async def _create(store: SqlSagaStore, plan: Plan, saga_id: str, now: float) -> None:
    transition = machine.new_saga(plan, saga_id=saga_id, input=b"in", now=now)
    (result,) = await store.commit([
        SagaWrite(
            saga=transition.saga, events=transition.events, expected_sequence=0, owner="r", epoch=1, release=False,
            due_at=now, lease_until=now + 30, changed_steps=transition.changed_steps, request_fingerprint="fp",
        )
    ])
    assert result.ok


async def test_sagas_come_in_creation_order_after_a_cursor(store: SqlSagaStore) -> None:
    definition = load_definition_file(DEFINITIONS_DIR / "checkout.yaml")
    stored, _ = await store.register_definition(definition, definition_fingerprint(definition), T0)
    plan = Plan.of(stored)
    for index, saga_id in enumerate(["c", "a", "b", "d"]):
        await _create(store, plan, saga_id, T0 + (1 if saga_id in "ab" else index))
    everything = await store.sagas_in_creation_order(after=None, definition_name="", limit=10)
    assert [saga.saga_id for saga in everything] == ["c", "a", "b", "d"]
    later = await store.sagas_in_creation_order(after=(T0 + 1, "a"), definition_name="checkout", limit=2)
    assert [saga.saga_id for saga in later] == ["b", "d"]
    assert await store.sagas_in_creation_order(after=None, definition_name="other", limit=10) == []
    assert sorted(saga.saga_id for saga in await store.load_sagas(["a", "d", "nope"])) == ["a", "d"]


async def test_progress_is_kept_per_participant(store: SqlSagaStore) -> None:
    assert await store.audit_progress("payment") is None
    await store.save_audit_progress(AuditProgress("payment", (T0, "a"), T0 + 5))
    await store.save_audit_progress(AuditProgress("payment", (T0 + 1, "b"), T0 + 6, purge_before=T0 - 60))
    await store.save_audit_progress(AuditProgress("inventory", (T0, "z"), T0 + 7))
    assert await store.audit_progress("payment") == AuditProgress("payment", (T0 + 1, "b"), T0 + 6, T0 - 60)
    assert await store.audit_progress("inventory") == AuditProgress("inventory", (T0, "z"), T0 + 7)


async def test_each_finding_is_alerted_once(store: SqlSagaStore) -> None:
    missing = AuditFinding("payment", "s1", "charge_card", "EXECUTE_MISSING", "EXECUTE_MISSING: ...", "checkout", "h:1")
    orphan = AuditFinding("payment", "s9", "charge_card", "ORPHAN_ROW", "ORPHAN_ROW: ...", "", "h:1")
    first = await store.record_audit_findings([missing, orphan], T0)
    assert [alert.kind for alert in first] == [AUDIT_ALERT, AUDIT_ALERT]
    assert first[0].saga_id == "s1" and first[0].participant == "payment" and first[0].definition_name == "checkout"
    again = await store.record_audit_findings([orphan], T0 + 1)
    assert again == []
    await log_caught_up(store)
    logged = await store.read_alerts(0, 10)
    assert [alert.alert_id for alert in logged] == [f"audit/{alert.position}" for alert in first]
    claimed = await store.claim_alerts(T0 + 2, T0 + 10, 10)
    assert sorted(pending.alert.position for pending in claimed) == sorted(alert.position for alert in first)


def _job(audit_id: str) -> AuditJob:
    return AuditJob(audit_id, b"{}", "ops", AUDIT_JOB_RUNNING, began=T0, created_at=T0, updated_at=T0)


async def test_one_audit_job_runs_at_a_time_and_only_its_holder_writes(store: SqlSagaStore) -> None:
    first, created = await store.create_audit_job(_job("audit-1"))
    assert created and first.state == AUDIT_JOB_RUNNING
    # Another while it runs: the running one is answered, nothing stored.
    running, created = await store.create_audit_job(_job("audit-2"))
    assert not created and running.audit_id == "audit-1"
    assert await store.get_audit_job("audit-2") is None

    held = await store.claim_audit_job("r1", T0, T0 + 5)
    assert held is not None and held.epoch == 1
    assert await store.claim_audit_job("r2", T0 + 1, T0 + 6) is None  # r1's lease is live
    taken = await store.claim_audit_job("r2", T0 + 6, T0 + 11)  # it lapsed: r2 takes over
    assert taken is not None and taken.epoch == 2
    # r1 comes back: its writes are refused, its progress with them.
    stale = await store.save_audit_job(
        "audit-1", "r1", 1, report=b"stale", cursor="{}", now=T0 + 7,
        progress=AuditProgress("payment", (T0, "z"), T0 + 7),
    )
    assert not stale and await store.audit_progress("payment") is None
    assert not await store.renew_audit_job("audit-1", "r1", 1, T0 + 20)
    assert await store.save_audit_job(
        "audit-1", "r2", 2, report=b"{}", cursor="", now=T0 + 8, progress=AuditProgress("payment", (T0, "a"), T0 + 8)
    )
    progress = await store.audit_progress("payment")
    assert progress is not None and progress.clean_through == (T0, "a")
    assert await store.save_audit_job("audit-1", "r2", 2, report=b"done", cursor="", now=T0 + 9, complete=True)
    done = await store.get_audit_job("audit-1")
    assert done is not None and done.state == AUDIT_JOB_COMPLETED and done.report == b"done" and done.owner is None
    # Once it is done, the next one may start.
    _, created = await store.create_audit_job(_job("audit-2"))
    assert created
