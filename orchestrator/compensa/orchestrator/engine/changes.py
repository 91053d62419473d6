"""How the engine tells whoever reads the log that sagas changed, without
knowing who they are: readers subscribe, the engine and the store's
notification listener call in.

A wake-up is a hint to re-read the log. Only this process's own commits may
be handed over as data, and only to a taker that can prove it misses nothing
(its callback answers whether it could use them); otherwise every reader is
woken to re-read.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from compensa.orchestrator.store import StoredEvent

#: Takes events this process just committed (one transaction's), in position
#: order, and when known the position every earlier event is at or below
#: (WriteResult.preceded_by); returns False when it cannot use them (then
#: readers are woken to re-read).
CommitTaker = Callable[[list[StoredEvent], int | None], bool]
_Callback = TypeVar("_Callback", Callable[[], None], CommitTaker)


class Subscription:
    """A handle on a subscription: `cancel()`, or leaving its `with` block,
    ends it. Cancelling twice is harmless."""

    def __init__(self, end: Callable[[], object]) -> None:
        self._end: Callable[[], object] | None = end

    def cancel(self) -> None:
        if self._end is not None:
            self._end()
            self._end = None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.cancel()


class ChangeSignal:
    """Tells log readers that sagas changed."""

    def __init__(self) -> None:
        self._woken: dict[int, Callable[[], None]] = {}
        self._takers: dict[int, CommitTaker] = {}
        self._next_id = 0

    def _add(self, into: dict[int, _Callback], callback: _Callback) -> Subscription:
        self._next_id += 1
        key = self._next_id
        into[key] = callback
        return Subscription(lambda: into.pop(key, None))

    def on_change(self, wake: Callable[[], None]) -> Subscription:
        """Calls `wake()` whenever sagas may have changed (re-read the log);
        it runs in the caller's thread, so it must be quick and not block."""
        return self._add(self._woken, wake)

    def on_commit(self, take: CommitTaker) -> Subscription:
        """Hands this process's own commits to `take`, in position order,
        instead of a wake-up; when it answers False, every `on_change`
        subscriber is woken to re-read instead."""
        return self._add(self._takers, take)

    def notify(self, saga_ids: list[str] | None) -> None:
        """Sagas changed (None: anything may have)."""
        if saga_ids is None or saga_ids:
            for wake in list(self._woken.values()):
                wake()

    def wants_committed(self) -> bool:
        """Whether anyone takes commits as data (else `notify` is enough, and
        the committer need not build the events)."""
        return bool(self._takers)

    def committed(self, events: list[StoredEvent], preceded_by: int | None = None) -> None:
        """Events this process just committed: handed to every taker, and a
        wake-up for all when one of them could not use them."""
        used = [take(events, preceded_by) for take in list(self._takers.values())]
        if not used or not all(used):
            self.notify(None)
