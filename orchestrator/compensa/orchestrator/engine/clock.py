"""One time base for every replica: the database's clock.

Leases, due times and deadlines are written by one replica and compared by
another, so they must be read off the same clock. Each replica measures how
far its own clock is from the database's and adds that offset to every
reading: a replica whose clock runs ahead then neither takes leases over
early nor fires timers early. The error is half the round trip of the
measurement (well under a millisecond next to the database).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

# Measurements per sync; the one with the shortest round trip is kept.
_SAMPLES = 3


class SharedClock:
    """Wall-clock seconds since the epoch, on the database's time base."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self.offset = 0.0

    def now(self) -> float:
        return self._wall() + self.offset

    async def sync(self, read_database_clock: Callable[[], Awaitable[float]]) -> None:
        """Measures the offset again (clocks drift, and NTP may step ours)."""
        best: tuple[float, float] | None = None
        for _ in range(_SAMPLES):
            sent = self._wall()
            database = await read_database_clock()
            received = self._wall()
            round_trip = received - sent
            if best is None or round_trip < best[0]:
                best = (round_trip, database - (sent + received) / 2)
        assert best is not None
        self.offset = best[1]
