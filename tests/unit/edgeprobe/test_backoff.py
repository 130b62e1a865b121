"""The one retry delay (edgeprobe.backoff): bounds, growth, cap, reset, jitter."""

from __future__ import annotations

import random

import pytest

from edgeprobe.backoff import Backoff, backoff_s


def test_backoff_grows_and_is_capped() -> None:
    rng = random.Random(1)
    values = [backoff_s(a, 0.5, 30, rng) for a in range(12)]
    assert 0.25 <= values[0] <= 0.5
    assert all(15 <= v <= 30 for v in values[8:])


def test_backoff_is_capped_exponential_with_jitter() -> None:
    b = Backoff(0.5, 4.0, random.Random(1))
    delays = [b.next_delay_s() for _ in range(8)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next_delay_s() <= 0.5


@pytest.mark.parametrize("seed", range(20))
def test_every_delay_is_in_the_upper_half_of_its_ceiling(seed: int) -> None:
    b = Backoff(0.1, 5.0, random.Random(seed))
    for attempt in range(40):
        ceiling = min(5.0, 0.1 * 2**attempt)
        assert ceiling / 2 <= b.next_delay_s() <= ceiling
    assert b.attempts == 40


def test_the_ceiling_doubles_then_stays_at_max() -> None:
    # An rng that always says 1.0 (the top of the range) shows the ceilings themselves.
    class Top(random.Random):
        def random(self) -> float:
            return 1.0

    b = Backoff(0.5, 30.0, Top())
    assert [b.next_delay_s() for _ in range(9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_huge_attempt_numbers_stay_finite_and_capped() -> None:
    rng = random.Random(3)
    for attempt in (64, 1_000, 10**9):
        assert 15.0 <= backoff_s(attempt, 0.5, 30.0, rng) <= 30.0
    assert 0.25 <= backoff_s(-1, 0.5, 30.0, rng) <= 0.5  # a negative attempt is the first one


def test_jitter_spreads_over_the_whole_upper_half() -> None:
    rng = random.Random(7)
    values = [backoff_s(0, 2.0, 2.0, rng) for _ in range(2000)]
    assert min(values) >= 1.0 and max(values) <= 2.0
    assert min(values) < 1.05 and max(values) > 1.95  # reaches both ends, not a fixed delay


def test_reset_starts_over_and_same_seed_same_delays() -> None:
    a, b = Backoff(1.0, 8.0, random.Random(42)), Backoff(1.0, 8.0, random.Random(42))
    first = [a.next_delay_s() for _ in range(5)]
    assert first == [b.next_delay_s() for _ in range(5)]  # pure given the rng
    a.reset()
    assert a.attempts == 0 and 0.5 <= a.next_delay_s() <= 1.0


def test_min_equal_to_max_is_a_fixed_ceiling() -> None:
    b = Backoff(0.01, 0.01, random.Random(0))
    assert all(0.005 <= b.next_delay_s() <= 0.01 for _ in range(10))


@pytest.mark.parametrize(("min_s", "max_s"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_bad_bounds_are_refused(min_s: float, max_s: float) -> None:
    with pytest.raises(ValueError):
        Backoff(min_s, max_s)
