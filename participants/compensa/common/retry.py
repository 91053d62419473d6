"""Exponential backoff for the loops that wait for something to come back
(a database at start-up, a broken stream, a write the database did not
confirm): one policy object instead of a `delay = min(delay * 2, cap)` in
each loop.

Shared by the participant SDK and the orchestrator, like database.py and
tls.py. Participant steps' retries are not this: their policy is stored with
the definition and their next attempt is a stored time (compensa.orchestrator.engine.machine).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

__all__ = ["Backoff", "Waits"]


@dataclass(frozen=True)
class Backoff:
    """Waits of `initial` seconds, multiplied by `multiplier` after each
    failure, never more than `cap`. With `jitter` (0 to 1), each wait is
    drawn uniformly from [wait * (1 - jitter), wait], so that many waiters
    that failed together do not come back together."""

    initial: float
    cap: float
    multiplier: float = 2.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError(f"backoff needs 0 < initial <= cap, got initial={self.initial} cap={self.cap}")
        if self.multiplier < 1:
            raise ValueError(f"backoff multiplier must be at least 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff jitter must be within [0, 1], got {self.jitter}")

    def delay(self, failures: int) -> float:
        """The wait after `failures` failures in a row (1: the first wait)."""
        # The exponent is bounded so that a long outage cannot overflow a float.
        wait = min(self.cap, self.initial * self.multiplier ** min(max(failures - 1, 0), 64))
        if self.jitter:
            wait *= 1 - self.jitter * random.random()
        return wait

    def waits(self) -> Waits:
        """A fresh run of waits, for one loop."""
        return Waits(self)


class Waits:
    """One loop's progress through a Backoff: `next()` is the wait after one
    more failure, `reset()` starts over after a success."""

    def __init__(self, policy: Backoff) -> None:
        self.policy = policy
        self.failures = 0

    def next(self) -> float:
        """Counts a failure and returns how long to wait before trying again."""
        self.failures += 1
        return self.policy.delay(self.failures)

    def reset(self) -> None:
        """A success: the next failure waits `initial` again."""
        self.failures = 0

    async def sleep(self) -> None:
        """Counts a failure and waits as long as `next()` says."""
        await asyncio.sleep(self.next())
