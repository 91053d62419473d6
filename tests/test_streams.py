"""The shared feed behind the watch streams: bounded, one cursor per reader."""

from __future__ import annotations

from pathlib import Path

from compensa.orchestrator.api.streams import LogTail, _Feed, _Reader
from compensa.orchestrator.engine.changes import ChangeSignal
from compensa.orchestrator.shared.records import LogEvent
from compensa.orchestrator.store import StoredEvent, open_store
from compensa.v1 import saga_pb2


def _event(position: int) -> StoredEvent:
    return StoredEvent("saga", "def", position, LogEvent(position, saga_pb2.EVENT_TYPE_SAGA_STARTED, 0.0, 1))


def test_readers_share_a_feed_each_at_its_own_cursor() -> None:
    feed = _Feed(capacity=4)
    early = _Reader(feed, feed.end)
    for position in (1, 2, 3):
        feed.append(_event(position))
    late = _Reader(feed, feed.end)
    feed.append(_event(4))
    assert [e.position for e in feed.read(early, 2) or []] == [1, 2]
    assert [e.position for e in feed.read(early, 10) or []] == [3, 4]
    assert feed.read(early, 10) == []
    assert [e.position for e in feed.read(late, 10) or []] == [4]


def test_a_reader_more_than_capacity_behind_is_told_to_catch_up_and_memory_stays_bounded() -> None:
    feed = _Feed(capacity=3)
    slow = _Reader(feed, feed.end)
    keeping_up = _Reader(feed, feed.end)
    for position in range(1, 101):
        feed.append(_event(position))
        assert [e.position for e in feed.read(keeping_up, 10) or []] == [position]
        assert len(feed.events) <= 2 * feed.capacity
    assert feed.read(slow, 10) is None
    # Exactly `capacity` behind is still served, from the events kept.
    at_edge = _Reader(feed, feed.end - feed.capacity)
    assert [e.position for e in feed.read(at_edge, 10) or []] == [98, 99, 100]


def test_the_change_signal_hands_commits_to_its_takers_and_wakes_readers_when_one_cannot_use_them() -> None:
    changes = ChangeSignal()
    woken: list[str] = []
    taken: list[list[int]] = []
    preceded: list[int | None] = []
    usable = True

    def take(events: list[StoredEvent], preceded_by: int | None) -> bool:
        taken.append([event.position for event in events])
        preceded.append(preceded_by)
        return usable

    with changes.on_change(lambda: woken.append("wake")):
        assert not changes.wants_committed()
        changes.committed([_event(1)])  # nobody takes them: a plain wake-up
        assert woken == ["wake"]
        subscription = changes.on_commit(take)
        assert changes.wants_committed()
        changes.committed([_event(2), _event(3)])
        assert taken == [[2, 3]] and woken == ["wake"]
        usable = False
        changes.committed([_event(5)], preceded_by=3)
        assert taken == [[2, 3], [5]] and woken == ["wake", "wake"]
        assert preceded == [None, 3]
        subscription.cancel()
        subscription.cancel()
        assert not changes.wants_committed()
        changes.notify(["saga"])
        changes.notify([])  # nothing changed: nobody is woken
        assert taken == [[2, 3], [5]] and woken == ["wake"] * 3
    changes.notify(None)
    assert woken == ["wake"] * 3


async def test_a_stopped_log_tail_takes_no_more_commits(tmp_path: Path) -> None:
    changes = ChangeSignal()
    store = open_store(f"sqlite+aiosqlite:///{tmp_path / 'compensa.db'}")
    try:
        tail = LogTail(store, changes, buffer_size=4, reread_seconds=1.0)
        assert changes.wants_committed()
        await tail.stop()
        assert not changes.wants_committed()
    finally:
        await store.close()
