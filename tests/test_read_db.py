"""Reads off the primary (`serve --read-db`): lists, summaries, the
dashboard and the history of watch streams are read on a streaming standby of
the orchestrator's PostgreSQL while it keeps within its lag bound; a watch
stream goes on from the standby's history to the primary's tail with no gap
and no duplicate; a standby that lags past the bound, or stops, sends those
reads back to the primary, said once in the log."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import psycopg
import pytest
from harness import Stack, checkout_stack, poll_until, scrape
from pg import ReplicatedPair, find_server_bindir, start_primary_with_standby

from compensa.common.startup import DatabaseMisconfigured
from compensa.orchestrator.cli import main
from compensa.orchestrator.config import ServerConfig
from compensa.orchestrator.server import start_orchestrator
from compensa.orchestrator.store import SagaStore
from compensa.v1 import orchestrator_pb2, saga_pb2

# A cluster pair of its own, and an orchestrator with three participants.
pytestmark = [pytest.mark.postgres, pytest.mark.xdist_group("heavy")]

DATABASE = "orchestrator"
# WatchSagas of a checkout that succeeds: every event up to its last.
_SUCCEEDED = saga_pb2.SAGA_STATE_SUCCEEDED


@pytest.fixture
def standby_pair() -> Iterator[ReplicatedPair]:
    """A primary and an asynchronous standby streaming from it, with the
    orchestrator's (empty) database on both."""
    bindir = find_server_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) in /usr/lib/postgresql/*/bin")
    pair = start_primary_with_standby(bindir, synchronous=False)
    try:
        with psycopg.connect(pair.conninfo(pair.primary_port), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        deadline = time.monotonic() + 30
        while True:
            with psycopg.connect(pair.conninfo(pair.standby_port), autocommit=True) as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
                    break
            assert time.monotonic() < deadline, "the standby did not replay CREATE DATABASE within 30s"
            time.sleep(0.05)  # ok-sleep: polling interval with a deadline
        yield pair
    finally:
        pair.close()


@asynccontextmanager
async def _stack_reading_the_standby(
    make_url: Callable[[], str], pair: ReplicatedPair, *, max_lag: float, **config: object
) -> AsyncIterator[Stack]:
    async with checkout_stack(
        make_url, orchestrator_url=pair.url(pair.primary_port, DATABASE),
        read_database_url=pair.url(pair.standby_port, DATABASE), read_max_lag_seconds=max_lag, **config,
    ) as stack:
        yield stack


def _replay(pair: ReplicatedPair, action: str) -> None:
    """pg_wal_replay_pause() or pg_wal_replay_resume() on the standby."""
    with psycopg.connect(pair.conninfo(pair.standby_port), autocommit=True) as conn:
        conn.execute(f"SELECT pg_wal_replay_{action}()")


def _store(stack: Stack) -> SagaStore:
    return stack.orchestrator.engine.store


def _read_database_in_use(stack: Stack) -> bool:
    status = _store(stack).read_database_status()
    assert status is not None
    return status[0]


async def _listed(stack: Stack) -> set[str]:
    response = await stack.stub.ListSagas(orchestrator_pb2.ListSagasRequest(page_size=100))
    return {saga.saga_id for saga in response.sagas}


async def _succeeded(stack: Stack) -> int:
    response = await stack.stub.SummarizeSagas(orchestrator_pb2.SummarizeSagasRequest())
    return sum(state.count for state in response.states if state.state == _SUCCEEDED)


async def _run_sagas(stack: Stack, count: int) -> list[str]:
    saga_ids = [await stack.start() for _ in range(count)]
    for saga_id in saga_ids:
        assert (await stack.wait_final(saga_id)).state == _SUCCEEDED
    return saga_ids


async def _standby_in_use_with(stack: Stack, saga_ids: list[str]) -> None:
    """Lists until the read database, in use, shows `saga_ids` and counts
    them as succeeded."""

    async def ready() -> bool:
        in_use_before = _read_database_in_use(stack)
        listed = await _listed(stack)
        succeeded = await _succeeded(stack)
        return in_use_before and _read_database_in_use(stack) and set(saga_ids) <= listed and succeeded == len(
            saga_ids
        )

    await poll_until(ready, timeout=20.0, interval=0.1)


def _messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        record.getMessage() for record in caplog.records
        if record.name == "compensa.store" and record.levelno == level and text in record.getMessage()
    ]


_AWAY = "is not used"
_BACK = "is used for lag-tolerant reads"


async def test_lists_come_from_the_standby_and_from_the_primary_once_it_lags_past_its_bound(
    make_postgres_url: Callable[[], str], standby_pair: ReplicatedPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="compensa.store")
    async with _stack_reading_the_standby(
        make_postgres_url, standby_pair, max_lag=3.0, http_listen="127.0.0.1:0"
    ) as stack:
        first = await _run_sagas(stack, 3)
        await _standby_in_use_with(stack, first)
        assert await _succeeded(stack) == 3
        assert len(_messages(caplog, logging.INFO, _BACK)) == 1, caplog.text

        # The standby stops replaying: whatever commits now is on the primary only.
        _replay(standby_pair, "pause")
        [late] = await _run_sagas(stack, 1)
        # Within the bound, the list and the summary are the standby's (stale);
        # GetSaga, which callers act on, reads the primary.
        assert await _listed(stack) == set(first)
        assert await _succeeded(stack) == 3
        assert await _dashboard_listed(stack) == set(first)
        assert (await stack.get(late)).state == _SUCCEEDED
        # Past the bound, they are the primary's: said once, not per read.
        await poll_until(lambda: _has(stack, late), timeout=15.0, interval=0.1)
        assert await _succeeded(stack) == 4
        assert late in await _dashboard_listed(stack)
        for _ in range(3):
            assert late in await _listed(stack)
        away = _messages(caplog, logging.WARNING, _AWAY)
        assert len(away) == 1 and "past the bound of 3s" in away[0], away

        # Replaying again, it catches up, and serves the lists again: said once.
        _replay(standby_pair, "resume")
        await poll_until(lambda: _read_database_in_use(stack), timeout=15.0, interval=0.1)
        assert late in await _listed(stack)
        assert len(_messages(caplog, logging.INFO, _BACK)) == 2
        assert len(_messages(caplog, logging.WARNING, _AWAY)) == 1


async def _dashboard_listed(stack: Stack) -> set[str]:
    """The sagas the dashboard's front page lists."""
    assert stack.orchestrator.dashboard is not None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(stack.orchestrator.dashboard.url) as response:
            assert response.status == 200
            return set(re.findall(r'<tr data-saga-id="([^"]+)"', await response.text()))


async def _has(stack: Stack, saga_id: str) -> bool:
    return saga_id in await _listed(stack)


async def test_a_watch_stream_goes_on_from_the_standbys_history_to_the_primarys_tail_without_gap_or_duplicate(
    make_postgres_url: Callable[[], str], standby_pair: ReplicatedPair
) -> None:
    async with _stack_reading_the_standby(make_postgres_url, standby_pair, max_lag=30.0) as stack:
        replicated = await _run_sagas(stack, 3)
        await _standby_in_use_with(stack, replicated)
        # The standby's history ends here; the primary's goes on.
        _replay(standby_pair, "pause")
        unreplicated = await _run_sagas(stack, 2)
        primary_last = _logged_positions(standby_pair)[-1]
        store = _store(stack)
        with store.tolerating_lag():
            standby_log = await store.read_log(0, 500)
        assert _read_database_in_use(stack)
        # The read the stream makes for its history is the standby's.
        assert standby_log and standby_log[-1].position < primary_last
        assert {stored.saga_id for stored in standby_log} == set(replicated)

        received: list[saga_pb2.SagaEvent] = []
        live: list[str] = []
        stream = stack.stub.WatchSagas(orchestrator_pb2.WatchSagasRequest(after_position=0))
        try:
            async for response in stream:
                received.append(response.event)
                if response.event.position == primary_last:
                    # The history is all here: what commits from now on comes live.
                    live = await _run_sagas(stack, 2)
                if live and set(live) <= {event.saga_id for event in received if event.saga_state == _SUCCEEDED}:
                    break
        finally:
            stream.cancel()
        _replay(standby_pair, "resume")

    positions = [event.position for event in received]
    assert positions == sorted(set(positions)), "positions go up, each once"
    assert positions == _logged_positions(standby_pair, up_to=positions[-1]), "every event of the log, none twice"
    by_saga: dict[str, list[int]] = {}
    for event in received:
        by_saga.setdefault(event.saga_id, []).append(event.sequence)
    assert set(by_saga) == {*replicated, *unreplicated, *live}
    for saga_id, sequences in by_saga.items():
        assert sequences == list(range(1, len(sequences) + 1)), saga_id


def _logged_positions(pair: ReplicatedPair, up_to: int | None = None) -> list[int]:
    """The positions of the primary's event log, in order (up to `up_to`)."""
    with psycopg.connect(pair.conninfo(pair.primary_port, DATABASE)) as conn:
        rows = conn.execute(
            "SELECT position FROM compensa_saga_events WHERE %(up_to)s::bigint IS NULL OR position <= %(up_to)s"
            " ORDER BY position", {"up_to": up_to},
        )
        return [row[0] for row in rows]


async def test_a_stopped_standby_sends_reads_to_the_primary_said_once(
    make_postgres_url: Callable[[], str], standby_pair: ReplicatedPair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="compensa.store")
    async with _stack_reading_the_standby(
        make_postgres_url, standby_pair, max_lag=1.0, metrics_listen="127.0.0.1:0"
    ) as stack:
        first = await _run_sagas(stack, 1)
        await _standby_in_use_with(stack, first)
        assert stack.orchestrator.metrics_port is not None
        metrics = await scrape(stack.orchestrator.metrics_port)
        assert metrics[("compensa_read_database_in_use", frozenset())] == 1.0
        assert metrics[("compensa_read_database_lag_seconds", frozenset())] <= 1.0

        standby_pair.stop_standby()
        [late] = await _run_sagas(stack, 1)
        # Fresh at once: a read that fails on the standby is made on the primary.
        assert await _listed(stack) == {*first, late}
        assert await _succeeded(stack) == 2
        await poll_until(lambda: not _read_database_in_use(stack), timeout=10.0)
        # Checks go on failing; reads go on to the primary, and nothing more is said.
        await poll_until(lambda: _checked_again(stack), timeout=10.0)
        for _ in range(3):
            assert await _listed(stack) == {*first, late}
        away = _messages(caplog, logging.WARNING, _AWAY)
        assert len(away) == 1, caplog.text
        metrics = await scrape(stack.orchestrator.metrics_port)
        assert metrics[("compensa_read_database_in_use", frozenset())] == 0.0
        assert math.isnan(metrics[("compensa_read_database_lag_seconds", frozenset())])


def _checked_again(stack: Stack) -> bool:
    """The last check could not measure the lag (the standby is away)."""
    status = _store(stack).read_database_status()
    return status is not None and math.isnan(status[1])


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (
            ["--read-db", "postgresql://reader@standby/compensa"],
            "--read-db needs a PostgreSQL --db: a read database is a streaming standby of it, and SQLite has none",
        ),
        (["--read-db-max-lag", "2s"], "--read-db-max-lag needs --read-db: it bounds how far that database may lag"),
    ],
    ids=["read-db-over-sqlite", "max-lag-alone"],
)
def test_serve_refuses_a_read_database_without_a_postgresql_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], options: list[str],
    error: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COMPENSA_DATABASE_URL", raising=False)
    assert main(["serve", *options, "--listen", "127.0.0.1:0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {error}"]
    assert not (tmp_path / ".compensa").exists()  # no SQLite file was made

async def test_a_read_database_that_is_no_standby_is_not_used(
    make_postgres_url: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    # The primary itself, say, or a standby since promoted: its positions are
    # not the primary's past, whatever its WAL position says.
    caplog.set_level(logging.INFO, logger="compensa.store")
    url = make_postgres_url()
    async with checkout_stack(make_postgres_url, orchestrator_url=url, read_database_url=url) as stack:
        saga_ids = await _run_sagas(stack, 1)
        await poll_until(lambda: _judged(caplog))
        assert await _listed(stack) == set(saga_ids)
        assert not _read_database_in_use(stack)
        [away] = _messages(caplog, logging.WARNING, _AWAY)
        assert "it is not a standby (not in recovery)" in away


def _judged(caplog: pytest.LogCaptureFixture) -> bool:
    return bool(_messages(caplog, logging.WARNING, _AWAY) or _messages(caplog, logging.INFO, _BACK))


async def test_an_orchestrator_refuses_a_read_database_over_sqlite(tmp_path: Path) -> None:
    config = ServerConfig(
        listen="127.0.0.1:0", database_url=f"sqlite+aiosqlite:///{tmp_path / 'compensa.db'}",
        read_database_url="postgresql://reader@standby/compensa",
    )
    with pytest.raises(DatabaseMisconfigured, match=r"^--read-db needs a PostgreSQL --db"):
        await start_orchestrator(config)
    assert not (tmp_path / "compensa.db").exists()
