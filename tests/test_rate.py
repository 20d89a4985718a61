"""RateLimiter: slot spacing, cuts only for congestion, probing back, and simulated traffic.

The first tests drive the limiter by hand on a fake clock. The rest (`simulate`) run it for a minute
or more against a simulated quota (tests/rate_sim.py: the emulator's token bucket, random throttling,
another producer) with a seeded RNG: deterministic simulations of the algorithm, not timing tests.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from tests.rate_sim import Clock, Service, Trace, simulate
from worker.config import PersonalizeSettings
from worker.emulator import run_emulator
from worker.metrics import Metrics
from worker.ratelimit import RateLimiter
from worker.ratetally import SendTally
from worker.retry import Backoff
from worker.sink import Sink


def make(max_rate: float = 10.0, now: float = 0.0) -> tuple[RateLimiter, Clock]:
    clock = Clock(now)
    return RateLimiter(max_rate, clock), clock


LATENCY = SendTally.BUCKET
"""Round trip of `feed`'s calls: the answers to calls sent in a stretch of time are all in one
bucket later, when the tally can settle it."""


def feed(limiter: RateLimiter, clock: Clock, answers: int, throttled: int, seconds: float) -> None:
    """Answers to `answers` calls sent evenly over `seconds`, every k-th one throttled (the last one
    too), each LATENCY after its call."""
    every = answers / throttled if throttled else 0.0
    marks = {round((i + 1) * every) - 1 for i in range(throttled)}
    step = seconds / (answers - 1) * (1 + 1e-9)  # the first and the last call `seconds` apart
    for i in range(answers):
        clock.now += step if i else LATENCY + 0.001
        if i in marks:
            limiter.throttled(LATENCY)
        else:
            limiter.succeeded(LATENCY)
    # One more success for the last call's bucket, a bucket later: the tally settles it now, instead
    # of at the next call's answer.
    clock.now += SendTally.BUCKET
    limiter.succeeded(LATENCY + SendTally.BUCKET)


def settle(limiter: RateLimiter, clock: Clock) -> None:
    """Past a cut: the next calls are sent after it."""
    clock.now += 0.001


# --- slots -------------------------------------------------------------------------------------


def test_reservations_are_spaced_one_interval_apart() -> None:
    limiter, _ = make(10.0)
    waits = [limiter.reserve() for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_idle_time_banks_no_more_than_the_catch_up_allowance() -> None:
    limiter, clock = make(10.0)
    limiter.reserve()
    clock.now = 100.0
    banked = int(10.0 * RateLimiter.CATCH_UP_SECONDS) + 1
    assert [limiter.reserve() for _ in range(banked)] == [0.0] * banked
    assert limiter.reserve() == pytest.approx(banked * 0.1 - RateLimiter.CATCH_UP_SECONDS)


def test_available_counts_the_calls_that_need_no_wait() -> None:
    limiter, _ = make(100.0, now=10.0)
    calls, wait = limiter.available()
    assert (calls, wait) == (int(100.0 * RateLimiter.BURST_SECONDS) + 1, 0.0)
    for _ in range(calls):
        assert limiter.reserve() == 0.0
    calls, wait = limiter.available()
    assert calls == 0 and wait == pytest.approx(0.01)
    assert limiter.reserve() == pytest.approx(wait)


def test_catch_up_only_at_the_maximum_rate_after_a_quiet_spell() -> None:
    """A worker held off the CPU for 0.2 s catches up on those calls instead of losing them, once its rate has
    gone unthrottled for a while; a throttle brings the allowance back to BURST_SECONDS."""
    limiter, clock = make(100.0, now=10.0)
    assert limiter.available()[0] == int(100.0 * RateLimiter.BURST_SECONDS) + 1, "unproven at the start"
    clock.now = 15.0
    assert limiter.available()[0] == int(100.0 * RateLimiter.CATCH_UP_SECONDS) + 1
    limiter.throttled()
    assert limiter.available()[0] == int(100.0 * RateLimiter.BURST_SECONDS) + 1
    clock.now = 15.0 + RateLimiter.CATCH_UP_AFTER_SECONDS + 0.1
    assert limiter.rate == limiter.max_rate, "one throttle cuts nothing"
    assert limiter.available()[0] == int(100.0 * RateLimiter.CATCH_UP_SECONDS) + 1, "quiet again"


def test_waits_shrink_as_the_clock_reaches_reserved_slots() -> None:
    limiter, clock = make(10.0, now=50.0)
    for _ in range(10):
        limiter.reserve()
    clock.now = 50.55
    assert limiter.reserve() == pytest.approx(0.45 - RateLimiter.BURST_SECONDS)


# --- windows, cuts and checks, by hand ------------------------------------------------------------


def test_a_throttled_share_within_the_margin_does_not_cut() -> None:
    limiter, clock = make(1000.0)
    feed(limiter, clock, 500, 10, 0.5)  # 2 %
    assert limiter.rate == 1000.0
    assert limiter.throttled_share == pytest.approx(0.02, abs=0.001)


def test_single_throttles_never_cut_before_a_window_is_complete() -> None:
    """The old limiter cut x0.85 on each throttle: 20 in a row took it to 4 % of its rate."""
    limiter, clock = make(1000.0)
    for _ in range(RateLimiter.WINDOW_OUTCOMES - 1):
        clock.now += 0.001
        limiter.throttled()
    assert limiter.rate == 1000.0


def test_far_over_the_quota_cuts_at_once_to_the_accepted_rate() -> None:
    """No need to wait for the window's end: 100 answers in 0.1 s, 90 % throttled, say enough."""
    limiter, clock = make(1000.0, now=5.0)
    feed(limiter, clock, 100, 90, 0.1)  # 1,000 calls/s sent, 100/s accepted
    assert limiter.rate == pytest.approx(100.0, rel=0.03)
    calls, _ = limiter.available()
    assert calls <= limiter.rate * RateLimiter.BURST_SECONDS + 1, "the queue re-spaced at the new rate"


def test_a_small_excess_cuts_by_the_decrease_factor() -> None:
    limiter, clock = make(1000.0)
    feed(limiter, clock, 500, 40, 0.5)  # 8 %
    assert limiter.rate == pytest.approx(1000.0 * RateLimiter.DECREASE, rel=0.01)


def test_the_cut_stands_when_the_share_falls_with_it() -> None:
    limiter, clock = make(1000.0)
    feed(limiter, clock, 100, 30, 0.1)
    cut = limiter.rate
    assert cut == pytest.approx(700.0, rel=0.02)
    settle(limiter, clock)
    feed(limiter, clock, 350, 0, 0.5)  # at the accepted rate nothing is throttled: it was congestion
    assert limiter.noise == 0.0
    assert limiter.rate == pytest.approx(cut, rel=0.01)


def establish_noise(limiter: RateLimiter, clock: Clock, share: float = 0.2) -> None:
    """Noise setting in at 1,000 calls/s (not far enough over the threshold to cut early): a cut,
    its check, which cannot call a first throttled window noise, a second cut, its check, which
    can, and the confirming window: `noise` is `share`, the rate back at 1,000/s."""
    feed(limiter, clock, 500, round(500 * share), 0.5)
    settle(limiter, clock)
    sent = round(limiter.rate * RateLimiter.MAX_CHECK_SECONDS)
    feed(limiter, clock, sent, round(sent * share), RateLimiter.MAX_CHECK_SECONDS)
    settle(limiter, clock)
    sent = round(limiter.rate * 0.5)
    feed(limiter, clock, sent, round(sent * share), 0.5)
    feed(limiter, clock, 1000, round(1000 * share), RateLimiter.CONFIRM_SECONDS)


def test_the_cut_is_undone_when_the_share_does_not_follow_it() -> None:
    """20 % at 1,000 calls/s, and 20 % at every lower rate: noise, and both cuts are undone."""
    limiter, clock = make(1000.0)
    establish_noise(limiter, clock)
    assert limiter.noise == pytest.approx(0.2, abs=0.01)
    assert limiter.rate == 1000.0
    feed(limiter, clock, 1000, 200, 1.0)  # and 20 % again at the full rate is no reason to cut
    assert limiter.rate == 1000.0


def test_noise_that_sets_in_far_over_the_threshold_takes_two_cuts_and_both_are_undone() -> None:
    """30 % from one moment to the next: the first cut comes early, on 100 answers, which may have
    caught a transient, so its check cannot call it noise; the second, on a steady sample, can, and
    then neither cut was needed."""
    limiter, clock = make(1000.0)
    feed(limiter, clock, 100, 30, 0.1)
    assert limiter.rate == pytest.approx(700.0, rel=0.02)
    settle(limiter, clock)
    feed(limiter, clock, 1400, 420, RateLimiter.MAX_CHECK_SECONDS)
    assert limiter.rate == pytest.approx(490.0, rel=0.02)
    settle(limiter, clock)
    feed(limiter, clock, 245, 74, 0.5)
    assert limiter.noise == pytest.approx(0.3, abs=0.01)
    assert limiter.rate == 1000.0


def test_a_noise_verdict_is_refuted_when_the_share_rises_with_the_restored_rate() -> None:
    """Congestion that looked like noise for a check (another sender raised its rate meanwhile):
    back at the old rate, the first 100 answers show it."""
    limiter, clock = make(1000.0)
    feed(limiter, clock, 500, 100, 0.5)
    settle(limiter, clock)
    feed(limiter, clock, 1600, 320, RateLimiter.MAX_CHECK_SECONDS)
    settle(limiter, clock)
    feed(limiter, clock, 320, 64, 0.5)
    assert limiter.rate == 1000.0
    assert limiter.noise == pytest.approx(0.2, abs=0.01)
    feed(limiter, clock, 300, 180, 0.3)  # back at 1,000/s: 60 %
    assert limiter.noise == 0.0
    assert limiter.rate < 500.0, "and cut for"


def test_a_first_throttled_window_cannot_turn_out_noise() -> None:
    """Throttling in a window after a clean one may be a token bucket's saved burst running out:
    its check cannot call it noise, however the share moves."""
    limiter, clock = make(1000.0)
    feed(limiter, clock, 500, 100, 0.5)  # 20 % from nothing
    assert limiter.rate == pytest.approx(800.0, rel=0.02)
    settle(limiter, clock)
    feed(limiter, clock, 1600, 320, RateLimiter.MAX_CHECK_SECONDS)  # 20 % at 800/s too
    assert limiter.noise == 0.0
    assert limiter.rate < 800.0, "congestion assumed, cut again"


def test_a_share_that_rises_as_the_rate_is_cut_is_congestion() -> None:
    """What a quota's burst allowance running out looks like (the emulator's first second)."""
    limiter, clock = make(1000.0)
    feed(limiter, clock, 100, 50, 0.1)
    assert limiter.rate == pytest.approx(500.0, rel=0.02)
    settle(limiter, clock)
    feed(limiter, clock, 250, 175, 0.5)  # 70 % at half the rate
    assert limiter.noise == 0.0
    assert limiter.rate == pytest.approx(150.0, rel=0.02), "and that window cuts again, to what got through"


def test_an_unclear_check_keeps_the_cut_if_the_share_fell_more_than_half_way() -> None:
    """A share that neither fell significantly nor clearly stayed, for the check's whole time, but
    fell more than half what a quota of our own predicts: the cut stands."""
    limiter, clock = make(200.0)
    feed(limiter, clock, 300, 24, 1.5)  # 8 %
    cut = limiter.rate
    assert cut == pytest.approx(200.0 * RateLimiter.DECREASE, rel=0.02)
    settle(limiter, clock)
    feed(limiter, clock, 170, 5, 1.0)
    assert limiter.rate == cut, "still checking"
    feed(limiter, clock, 170, 5, 1.0)  # 2.9 % after 2 s
    assert limiter.noise == 0.0
    assert limiter.rate == pytest.approx(cut, rel=0.01)


def test_an_unclear_excess_over_known_noise_undoes_the_cut() -> None:
    """With noise established, a share a little over it that did not fall half way with the cut is
    most likely a chance high: back to the rate before, the estimate unchanged."""
    limiter, clock = make(1000.0)
    establish_noise(limiter, clock)
    assert limiter.rate == 1000.0
    assert limiter.noise == pytest.approx(0.2, abs=0.01)
    feed(limiter, clock, 1000, 300, 1.0)  # 30 %
    assert limiter.rate == pytest.approx(850.0, rel=0.02)
    settle(limiter, clock)
    feed(limiter, clock, 1700, 459, RateLimiter.MAX_CHECK_SECONDS)  # 27 %
    assert limiter.rate == 1000.0
    assert limiter.noise == pytest.approx(0.2, abs=0.01)


def test_throttling_at_a_steady_rate_is_measured_on_more_calls_before_a_cut() -> None:
    """At 100 calls/s a window closes after 100 answers: too few to tell noise later from a modest
    excess, so it grows first (up to CAUSE_OUTCOMES answers or MAX_CAUSE_SECONDS)."""
    limiter, clock = make(100.0)
    feed(limiter, clock, 100, 10, 1.0)
    assert limiter.rate == 100.0
    feed(limiter, clock, 50, 5, 0.5)
    assert limiter.rate == pytest.approx(100.0 * RateLimiter.DECREASE, rel=0.05)


def test_throttling_while_probing_cuts_at_once() -> None:
    """The rising rate is the likely cause: no wait for a bigger sample."""
    limiter, clock = make(100.0)
    feed(limiter, clock, 100, 40, 1.0)
    assert limiter.rate == pytest.approx(60.0, rel=0.05)
    settle(limiter, clock)
    feed(limiter, clock, 100, 0, 1.5)  # checked: congestion; probing from here
    clock.now += 5.0
    limiter.available()
    probing = limiter.rate
    assert probing > 60.0
    feed(limiter, clock, RateLimiter.PROBING_OUTCOMES, 10, 0.5)
    assert limiter.rate < probing


def test_rate_never_falls_below_the_floor() -> None:
    limiter, clock = make(100.0)
    for _ in range(5):
        feed(limiter, clock, 100, 100, 1.0)  # everything throttled
        settle(limiter, clock)
    assert limiter.rate == pytest.approx(100.0 * RateLimiter.MIN_FRACTION)


def test_probing_starts_slow_and_doubles_up_to_the_maximum() -> None:
    limiter, clock = make(1000.0)
    feed(limiter, clock, 100, 90, 0.1)
    settle(limiter, clock)
    feed(limiter, clock, 100, 0, 1.0)  # congestion confirmed at ~100/s: probing starts now
    start = limiter.rate
    clock.now += 1.0
    limiter.available()
    first = limiter.rate - start
    assert 0.5 * 1000 * RateLimiter.PROBE_PER_SECOND < first < 2 * 1000 * RateLimiter.PROBE_PER_SECOND
    clock.now += RateLimiter.PROBE_DOUBLING_SECONDS
    limiter.available()
    assert limiter.rate - start > 2.5 * first, "faster the longer nothing is throttled"
    clock.now += 30.0
    limiter.available()
    assert limiter.rate == 1000.0
    clock.now += 1e6  # a long idle time neither overflows nor passes the maximum
    limiter.available()
    assert limiter.rate == 1000.0


def test_from_the_floor_the_maximum_is_back_within_bounded_time_however_few_the_calls() -> None:
    """At 1.5 calls/s (the floor of 150) a window takes a minute to fill: recovery must not wait
    for windows (a chaos run once recovered at 13 events/s after an outage for that reason)."""
    clock = Clock(100.0)
    limiter = RateLimiter(150.0, clock)
    trace = simulate(limiter, clock, Service(quota=2.0, seed=9), 60, events={20: lambda s: s.set_quota(None)})
    assert trace.seconds[19].rate < 10.0, "at the floor while the quota is tiny"
    back = next(t for t in range(20, 60) if trace.seconds[t].rate >= 149.0) - 20
    assert back <= 25, f"back at 150/s after {back} s"


def test_an_outage_during_a_check_holds_the_rate_and_the_check_resumes() -> None:
    """Errors the caller does not report (5xx, timeouts) are no evidence either way: no answers, no
    decisions; when answers come back the check completes."""
    limiter, clock = make(1000.0)
    feed(limiter, clock, 100, 50, 0.1)
    cut = limiter.rate
    settle(limiter, clock)
    clock.now += 60.0  # an outage: nothing answered
    limiter.available()
    assert limiter.rate == cut
    feed(limiter, clock, 500, 0, 1.0)  # back: nothing throttled at the cut rate
    clock.now += 1.0
    limiter.available()
    assert limiter.rate > cut, "the check found congestion, the probe resumed"


def test_the_noise_estimate_is_logged_once_confirmed(caplog: pytest.LogCaptureFixture) -> None:
    limiter, clock = make(1000.0)
    with caplog.at_level(logging.INFO, logger="worker.ratelimit"):
        feed(limiter, clock, 500, 100, 0.5)
        settle(limiter, clock)
        feed(limiter, clock, 400, 80, 0.5)
        assert not caplog.records, "not before the next window confirms it"
        for _ in range(4):
            feed(limiter, clock, 1000, 200, 1.0)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "does not follow our rate" in record.getMessage()
    assert record.__dict__["noise_share"] == pytest.approx(0.2, abs=0.01)


# --- simulations ---------------------------------------------------------------------------------


def run(service: Service, seconds: int, max_rate: float = 1000.0, **options: object) -> tuple[Trace, RateLimiter]:
    clock = Clock(100.0)
    limiter = RateLimiter(max_rate, clock)
    return simulate(limiter, clock, service, seconds, **options), limiter  # type: ignore[arg-type]


@pytest.mark.parametrize("latency", [0.03, 0.3])
def test_a_hard_quota_below_the_maximum_is_found_within_seconds(latency: float) -> None:
    """(a) Emulator max_tps=100, the worker configured for 1,000."""
    trace, limiter = run(Service(quota=100, seed=3), 60, latency=latency)
    found = next(s for s in range(60) if trace.window(s, s + 5)[1] <= 0.1)
    assert found <= 3, f"settled after {found} s"
    accepted, throttled, _ = trace.window(10, 60)
    assert accepted >= 95.0, "the quota is used"
    assert throttled <= (0.05 if latency < 0.1 else 0.07), "overshoot in steady state (detection waits for answers)"
    assert limiter.noise < 0.05


def test_random_throttling_at_full_quota_costs_about_its_share() -> None:
    """(b) 30 % of calls throttled at random, 1,000 calls/s quota: ~700 accepted, not ~20."""
    trace, limiter = run(Service(quota=1000, noise=0.3, seed=1), 120)
    accepted, throttled, _ = trace.window(5, 120)
    assert accepted >= 680.0
    assert throttled == pytest.approx(0.3, abs=0.01)
    assert limiter.noise == pytest.approx(0.3, abs=0.03)


def test_random_throttling_is_told_from_noise_on_every_seed() -> None:
    for seed in range(2, 7):
        trace, _ = run(Service(quota=1000, noise=0.3, seed=seed), 40)
        assert trace.window(5, 40)[0] >= 660.0, seed


@pytest.mark.parametrize("max_rate", [50.0, 200.0])
def test_random_throttling_at_low_rates_costs_about_its_share(max_rate: float) -> None:
    """Fewer answers per window, so noisier shares: the checks take longer but still tell noise."""
    for seed in range(1, 4):
        trace, _ = run(Service(noise=0.3, seed=seed), 120, max_rate=max_rate)
        assert trace.window(20, 120)[0] >= 0.6 * max_rate, seed


def test_a_quota_shared_with_a_steady_sender_settles_on_the_remainder() -> None:
    """(c) Another producer sends 400 calls/s into the same 1,000 calls/s quota, whatever happens."""
    trace, limiter = run(Service(quota=1000, other=400, seed=2), 90)
    accepted, throttled, other = trace.window(15, 90)
    assert accepted == pytest.approx(600.0, abs=30.0)
    assert accepted + other >= 970.0, "the quota is used"
    assert throttled <= 0.05
    assert limiter.noise < 0.05, "its throttling follows our rate: congestion, not noise"


def test_a_raised_quota_is_climbed_back_to_within_bounded_time() -> None:
    """(d) The quota goes from 100 to 1,000 calls/s at 30 s."""

    def raise_quota(service: Service) -> None:
        service.set_quota(1000)

    trace, _ = run(Service(quota=100, seed=4), 70, events={30: raise_quota})
    back = next(s for s in range(30, 70) if trace.seconds[s].accepted >= 950) - 30
    assert back <= 20, f"back at the maximum after {back} s"
    assert trace.window(50, 70)[0] >= 995.0


def test_random_throttling_over_a_quota_is_noise_and_congestion_at_once() -> None:
    """30 % random throttling and a 500 calls/s quota: noise is not cut for, the quota is."""
    trace, limiter = run(Service(quota=500, noise=0.3, seed=5), 150)
    accepted, throttled, _ = trace.window(30, 150)
    assert accepted >= 0.75 * 500 * 0.7, "probing is slow under noise (rule 4): short of the ideal 350"
    assert throttled <= 0.3 + 0.03
    assert limiter.noise == pytest.approx(0.3, abs=0.05)


def test_a_wrong_noise_estimate_cannot_hide_a_quota_for_long() -> None:
    """Noise believed 60 % while a plain quota throttles: re-measured after NOISE_TTL_SECONDS."""
    clock = Clock(100.0)
    limiter = RateLimiter(1000.0, clock)
    limiter.noise = 0.6
    ttl = int(RateLimiter.NOISE_TTL_SECONDS)
    trace = simulate(limiter, clock, Service(quota=100, seed=6), ttl + 40)
    assert trace.window(5, ttl - 5)[1] > 0.4, "believed noise, so not cut for"
    assert trace.window(ttl + 10, ttl + 40)[1] <= 0.05
    assert limiter.noise < 0.05


def test_no_quota_in_sight_stays_at_the_maximum() -> None:
    trace, _ = run(Service(quota=None, seed=7), 30)
    accepted, throttled, _ = trace.window(1, 30)
    assert accepted == pytest.approx(1000.0, abs=1.0)
    assert throttled == 0.0


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_starting_together_share_a_quota_without_calling_each_other_noise(replicas: int) -> None:
    """Each replica's cut moves the share less than a quota of its own would: believing that noise,
    they would all keep over-sending (the shared-quota bench's case: 3 workers, 1,000 calls/s)."""
    for seed in range(1, 4):
        clock = Clock(100.0)
        limiters = [RateLimiter(1000.0, clock) for _ in range(replicas)]
        trace = simulate(limiters, clock, Service(quota=1000, seed=seed), 120)
        traces = [trace, *trace.others]
        accepted = [t.window(20, 120)[0] for t in traces]
        sent = sum(sum(s.sent for s in t.seconds[20:120]) for t in traces) / 100
        assert sum(accepted) >= 950.0, seed
        assert 1 - sum(accepted) / sent <= 0.05, seed
        assert all(limiter.noise < 0.05 for limiter in limiters), seed


def test_replicas_sharing_a_quota_converge_towards_fair_shares() -> None:
    """Two replicas from 900/100 calls/s: AIMD evens them out without talking to each other."""
    clock = Clock(100.0)
    a, b = RateLimiter(1000.0, clock), RateLimiter(1000.0, clock)
    for limiter, start in ((a, 900.0), (b, 100.0)):
        limiter.rate = start
        limiter._probe_from(start, clock.now, clock.now)  # a start away from the maximum
    trace = simulate([a, b], clock, Service(quota=1000, seed=8), 240)
    mine, throttled, _ = trace.window(120, 240)
    theirs, _, _ = trace.others[0].window(120, 240)
    assert mine + theirs >= 950.0
    assert 0.3 <= theirs / (mine + theirs) <= 0.7
    assert throttled <= 0.05


# --- the real sink against the real emulator -------------------------------------------------------


async def test_the_sink_keeps_its_rate_under_random_throttling_from_the_emulator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real sockets: the sink reports every answer to its limiter, which sees the emulator's 30 %
    random throttling as noise and keeps its rate (the old limiter fell to its floor)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-for-tests")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    event = orjson.dumps({"eventType": "click", "sentAt": 1_790_000_000}).decode()
    max_rate = 200.0  # a few windows of answers within seconds, without loading the machine
    async with run_emulator(access_key="AKIDTEST", secret_key="secret-for-tests", seed=11) as running:
        running.emulator.configure(throttle_rate=0.3)
        settings = PersonalizeSettings(tracking_id="trk", endpoint_url=running.url, max_requests_per_second=max_rate)
        sink = Sink(settings, Metrics(), Backoff(base=0.001, cap=0.01))
        await sink.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60.0

        async def session(n: int) -> None:
            while running.emulator.stats.requests < 1200 and loop.time() < deadline:
                assert await sink.deliver(f"s-{n}", None, [event], 1_790_000_000.0) == []

        try:
            await asyncio.gather(*(session(n) for n in range(16)))
        finally:
            await sink.close()
        stats = running.emulator.stats
    assert stats.requests >= 1200, "the deadline is a guard, not the measure"
    assert stats.throttled / stats.requests == pytest.approx(0.3, abs=0.05)
    assert sink.limiter.noise == pytest.approx(0.3, abs=0.1)
    assert sink.limiter.rate >= 0.9 * max_rate
