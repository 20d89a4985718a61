"""RateLimiter: slot spacing, one multiplicative cut per window, additive recovery, a floor."""

from __future__ import annotations

import pytest

from worker.sink import RateLimiter


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(max_rate: float = 10.0, now: float = 0.0) -> tuple[RateLimiter, Clock]:
    clock = Clock(now)
    return RateLimiter(max_rate, clock), clock


def test_reservations_are_spaced_one_interval_apart() -> None:
    limiter, _ = make(10.0)
    waits = [limiter.reserve() for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_idle_time_banks_no_more_than_the_burst_allowance() -> None:
    limiter, clock = make(10.0)
    limiter.reserve()
    clock.now = 100.0
    assert limiter.reserve() == 0.0
    assert limiter.reserve() == pytest.approx(0.1 - RateLimiter.BURST_SECONDS)


def test_available_counts_the_calls_that_need_no_wait() -> None:
    limiter, _ = make(100.0, now=10.0)
    calls, wait = limiter.available()
    assert (calls, wait) == (int(100.0 * RateLimiter.BURST_SECONDS) + 1, 0.0)
    for _ in range(calls):
        assert limiter.reserve() == 0.0
    calls, wait = limiter.available()
    assert calls == 0 and wait == pytest.approx(0.01)
    assert limiter.reserve() == pytest.approx(wait)


def test_waits_shrink_as_the_clock_reaches_reserved_slots() -> None:
    limiter, clock = make(10.0, now=50.0)
    for _ in range(10):
        limiter.reserve()
    clock.now = 50.55
    assert limiter.reserve() == pytest.approx(0.45 - RateLimiter.BURST_SECONDS)


def test_throttle_cuts_the_rate_multiplicatively() -> None:
    limiter, _ = make(10.0)
    limiter.throttled()
    assert limiter.rate == pytest.approx(10.0 * RateLimiter.DECREASE)


def test_a_burst_of_throttles_counts_once_per_window() -> None:
    limiter, clock = make(10.0)
    limiter.throttled()
    for _ in range(20):
        limiter.throttled()
    cut = 10.0 * CUT
    assert limiter.rate == pytest.approx(cut)
    clock.now += 1.0 / cut + 0.001  # the window is one interval at the new rate, longer than 0.1 s
    limiter.throttled()
    assert limiter.rate < cut  # a second cut


def test_throttle_window_is_at_least_a_tenth_of_a_second() -> None:
    limiter, clock = make(1000.0)
    limiter.throttled()
    clock.now += 0.05
    limiter.throttled()
    assert limiter.rate == pytest.approx(1000.0 * CUT)
    clock.now += 0.06
    limiter.throttled()
    assert limiter.rate < 1000.0 * CUT  # a second cut


def test_throttle_respaces_the_next_slot_at_the_new_rate() -> None:
    limiter, _ = make(10.0, now=5.0)
    assert limiter.reserve() == 0.0
    limiter.throttled()
    assert limiter.reserve() == pytest.approx(1.0 / (10.0 * CUT))
    assert limiter.reserve() == pytest.approx(2.0 / (10.0 * CUT), rel=1e-3)


CUT = RateLimiter.DECREASE


class NoRecovery(RateLimiter):
    INCREASE_PER_SECOND = 0.0


def test_rate_never_falls_below_the_floor() -> None:
    clock = Clock()
    limiter = NoRecovery(100.0, clock)
    for _ in range(50):
        limiter.throttled()
        clock.now += max(0.1, 1.0 / limiter.rate) + 1e-6
        assert limiter.rate >= 100.0 * RateLimiter.MIN_FRACTION
    assert limiter.rate == pytest.approx(100.0 * RateLimiter.MIN_FRACTION)
    assert limiter.reserve() == pytest.approx(0.0, abs=1e-5)
    assert limiter.reserve() == pytest.approx(1.0, rel=1e-3)


def test_recovery_is_additive_over_time_and_capped() -> None:
    limiter, clock = make(100.0)
    limiter.throttled()
    assert limiter.rate == pytest.approx(100.0 * CUT)
    clock.now += 1.0
    limiter.reserve()
    assert limiter.rate == pytest.approx(100.0 * CUT + 100.0 * RateLimiter.INCREASE_PER_SECOND)
    clock.now += 5.0
    limiter.reserve()
    assert limiter.rate == pytest.approx(min(100.0, 100.0 * CUT + 6 * 2.0))
    clock.now += 1000.0
    limiter.reserve()
    assert limiter.rate == 100.0


def test_recovery_before_a_cut_is_counted_first() -> None:
    limiter, clock = make(100.0)
    limiter.throttled()
    clock.now += 2.0  # +2/s of recovery first, then the cut applies to the recovered rate
    limiter.throttled()
    assert limiter.rate == pytest.approx((100.0 * CUT + 4.0) * CUT)


def test_aimd_converges_between_two_limiters_sharing_a_quota() -> None:
    """Two replicas throttled together whenever their sum exceeds the quota end near fair shares."""
    clock = Clock()
    a, b = RateLimiter(100.0, clock), RateLimiter(100.0, clock)
    a.rate, b.rate = 90.0, 10.0
    for _ in range(2000):
        clock.now += 0.5
        a.reserve()
        b.reserve()
        if a.rate + b.rate > 100.0:
            a.throttled()
            b.throttled()
    assert abs(a.rate - b.rate) < 5.0
