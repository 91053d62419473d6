"""Admission of new sagas: a replica takes on a bounded number at once.

Without a bound, callers faster than the participants pile sagas up in the
replica's memory and their starts wait ever longer for the group commit, and
gRPC's C core refused the calls its queue of calls not yet picked up by the
event loop could not hold (see MAX_WAITING_CALLS in
compensa.participants.serving) with a bare CANCELLED. With it, a StartSaga
over the bound is refused at once, before anything is read or written, as
RESOURCE_EXHAUSTED (ErrorInfo reason REPLICA_AT_CAPACITY) with a
google.rpc.RetryInfo saying when to try again. Sagas the replica already owes
(due retries, takeovers) are driven regardless and count against the bound:
work accepted is never held back by new work.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator

from compensa.orchestrator.shared.errors import AtCapacity
from compensa.orchestrator.shared.metrics import Metrics

#: What a refused caller is told to wait (RetryInfo) is drawn from this range,
#: in seconds, so that callers refused together do not come back together.
RETRY_AFTER_SECONDS = (0.5, 1.5)


class SagaAdmission:
    """At most `limit` sagas in flight on this replica (0: no limit): being
    started, or driven (a call in flight or due). Sagas that wait (a backoff,
    a long-running step) cost nothing and do not count."""

    def __init__(self, limit: int, driven: Callable[[], int], metrics: Metrics) -> None:
        self.limit = limit
        self._driven = driven
        self._starting = 0
        self._metrics = metrics
        metrics.admission(limit, lambda: self.in_flight)

    @property
    def in_flight(self) -> int:
        """Sagas being started here plus sagas this replica drives."""
        return self._starting + self._driven()

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Holds one start's place; AtCapacity at once if none is free."""
        in_flight = self.in_flight
        if self.limit and in_flight >= self.limit:
            self._metrics.start_refused()
            seconds = random.uniform(*RETRY_AFTER_SECONDS)
            raise AtCapacity(
                f"this replica has {in_flight} sagas in flight, its limit (serve --max-sagas-in-flight"
                f" {self.limit}); nothing was started: retry after {seconds:.1f}s, here or on another replica",
                seconds=seconds,
            )
        self._starting += 1
        try:
            yield
        finally:
            self._starting -= 1
