"""The one backoff policy every hand-written retry loop uses (compensa.common.retry)."""

from __future__ import annotations

import pytest

from compensa.common.retry import Backoff


def test_waits_multiply_from_initial_up_to_the_cap_and_start_over_after_a_success() -> None:
    waits = Backoff(initial=0.05, cap=2.0).waits()
    assert [waits.next() for _ in range(8)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    waits.reset()
    assert waits.next() == pytest.approx(0.05)
    assert Backoff(initial=1.0, cap=100.0, multiplier=3.0).delay(3) == pytest.approx(9.0)
    # However long the outage, the wait stays the cap (no overflow).
    assert Backoff(initial=0.1, cap=5.0).delay(10_000) == 5.0


def test_jitter_spreads_each_wait_below_its_value() -> None:
    policy = Backoff(initial=1.0, cap=8.0, jitter=0.5)
    draws = [policy.delay(3) for _ in range(200)]
    assert all(2.0 <= draw <= 4.0 for draw in draws), (min(draws), max(draws))
    assert len(set(draws)) > 1


@pytest.mark.parametrize(
    "options",
    [dict(initial=0.0, cap=1.0), dict(initial=2.0, cap=1.0), dict(initial=1.0, cap=2.0, multiplier=0.5),
     dict(initial=1.0, cap=2.0, jitter=1.5)],
)
def test_a_policy_that_cannot_back_off_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**options)


async def test_sleep_counts_a_failure() -> None:
    waits = Backoff(initial=0.001, cap=0.002).waits()
    await waits.sleep()  # ok-sleep: the wait itself is what is tested, a millisecond
    await waits.sleep()  # ok-sleep: as above
    assert waits.failures == 2 and waits.next() == pytest.approx(0.002)
