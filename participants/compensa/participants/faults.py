"""Fault injection for participants: transient failures, delays and lost answers.

A `FaultPlan` applies to Execute and Compensate alike. It exists for tests and
for the demo, to show that the orchestrator retries and that the barrier keeps
effects exactly-once when answers are lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any


class InjectedFault(Exception):
    """A failure the fault plan chose to inject; always answered as UNAVAILABLE."""


@dataclass(frozen=True)
class FaultPlan:
    """Which faults a participant injects, before and after touching its database.

    Every field defaults to "no fault". The order on each call is: the delay,
    then the UNAVAILABLE checks (both before any database work), then the call
    runs, and then `fail_after_commit_rate` may throw the answer away.
    """

    #: Attempts with `context.attempt <= unavailable_attempts` answer UNAVAILABLE.
    unavailable_attempts: int = 0
    #: Probability that an attempt answers UNAVAILABLE before doing anything.
    unavailable_rate: float = 0.0
    #: Seconds to wait before doing anything, to provoke DEADLINE_EXCEEDED.
    delay_seconds: float = 0.0
    #: The delay applies to attempts `<= delay_attempts`; 0 means every attempt.
    delay_attempts: int = 0
    #: Probability that a call which committed a new barrier row (an effect or a
    #: recorded business failure) answers UNAVAILABLE anyway: the "effect
    #: happened, answer lost" window. Duplicates answered from the barrier are
    #: never failed this way, so a retry with the same key gets the stored answer.
    fail_after_commit_rate: float = 0.0
    #: Seed of the random choices; None seeds from the system.
    seed: int | None = None
    _random: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("unavailable_rate", "fail_after_commit_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault plan: {name} must be between 0 and 1, got {rate}")
        for name in ("unavailable_attempts", "delay_seconds", "delay_attempts"):
            if getattr(self, name) < 0:
                raise ValueError(f"fault plan: {name} must not be negative")
        # The plan is frozen configuration; the generator is its only (hidden) state.
        object.__setattr__(self, "_random", random.Random(self.seed))

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """Parses a CLI spec such as "unavailable_rate=0.2,delay_seconds=1.5".

        An empty spec is the plan with no faults. Raises ValueError naming the
        unknown key or the malformed value.
        """
        converters: dict[str, type[Any]] = {
            "unavailable_attempts": int,
            "unavailable_rate": float,
            "delay_seconds": float,
            "delay_attempts": int,
            "fail_after_commit_rate": float,
            "seed": int,
        }
        values: dict[str, Any] = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(f"fault plan: expected key=value, got {item!r}")
            if key not in converters:
                known = ", ".join(sorted(converters))
                raise ValueError(f"fault plan: unknown key {key!r} (known: {known})")
            try:
                values[key] = converters[key](raw.strip())
            except ValueError:
                raise ValueError(f"fault plan: {key} must be a number, got {raw.strip()!r}") from None
        return cls(**values)

    def describe(self) -> str:
        """The plan in the syntax `parse` accepts, listing only the fields set."""
        parts = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.init and getattr(self, f.name) != f.default
        ]
        return ",".join(parts)

    async def before_call(self, attempt: int) -> None:
        """Waits and/or raises InjectedFault as the plan says, before any database work."""
        if self.delay_seconds > 0 and (self.delay_attempts == 0 or attempt <= self.delay_attempts):
            await asyncio.sleep(self.delay_seconds)
        if attempt <= self.unavailable_attempts:
            raise InjectedFault(f"injected fault: attempt {attempt} <= unavailable_attempts")
        if self.unavailable_rate > 0 and self._random.random() < self.unavailable_rate:
            raise InjectedFault("injected fault: unavailable_rate")

    def after_commit(self) -> None:
        """Raises InjectedFault, with probability `fail_after_commit_rate`, after a commit."""
        if self.fail_after_commit_rate > 0 and self._random.random() < self.fail_after_commit_rate:
            raise InjectedFault("injected fault: answer lost after commit")
