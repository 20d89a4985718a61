"""The client-side PutEvents rate: AIMD that backs off from congestion, not from noise.

Pure apart from `acquire`'s sleep: time comes from an injected clock, and what the service answered
comes in through `throttled()` / `succeeded()`, so tests/test_rate.py can simulate minutes of traffic.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Literal

from worker.personalize.ratenoise import NoiseEstimate
from worker.personalize.ratetally import SendTally, spread

log = logging.getLogger("worker.ratelimit")  # the pre-move name: log filters match it

Verdict = Literal["noise", "congestion", "assumed", "unclear"]


class RateLimiter:
    """Calls per second: cut when the quota is exceeded, probe for free quota otherwise.

    Why not cut on every throttle: a throttle does not always mean *we* send too much. A service that
    sheds a share of calls whatever the rate, or a producer elsewhere that keeps the quota full,
    throttles a steady fraction that no rate of ours removes; cutting on each one drove the rate to
    its floor (~20 accepted calls/s of a 1,000 calls/s quota under 30 % random throttling).

    The evidence: answers counted by when their call was sent (worker/personalize/ratetally.py), in windows of
    ≥ WINDOW_SECONDS and ≥ WINDOW_OUTCOMES answers (fewer while the rate rises); each run of
    WINDOW_OUTCOMES answers is also looked at alone, so that a share far over the threshold (Z_EARLY)
    acts at once instead of being diluted by earlier answers (a token bucket's burst hides the first
    fraction of a second over a quota). `noise` estimates the throttled share that does not follow
    our rate; it starts at 0.

    1. A window throttled within `noise` + max(MARGIN, Z_TRIGGER standard errors) is fine: the rate
       keeps probing, and `noise`, if any, moves toward the window's share (up only at the maximum
       rate: below it, a higher share may be a quota we are nearing, or sit just above).
    2. Above that, the quota looks exceeded: cut to the sent rate * min(DECREASE, (1 - p) / (1 - noise)).
       The second factor is the accepted rate, corrected for noise: the quota's size, reached in one
       step however far above it we were; DECREASE leaves headroom when we were only just above it.
       A share just over the threshold, at a steady rate, is first measured on CAUSE_OUTCOMES answers,
       because rule 3 compares with it.
    3. Then check whether the throttling followed the cut, at the new rate held. Had a quota of our
       own been exceeded, the accepted rate stays and the share falls by a predictable amount; noise
       stays where it was. A share that moved significantly (down, or up: a burst ran out) is
       congestion: the cut stands. One that clearly stayed nearer where it was than half the
       predicted fall is noise: `noise` takes it and the cut is undone. Only a share measured on a
       steady rate's full window, MIN_NOISE_CHANGE above the noise assumed, can turn out noise:
       other senders raising their rates while we check, or a burst running out under a run of 100
       answers, make small, probing-time or early excesses look unmoved. The sample grows for
       MAX_CHECK_SECONDS (longer at low rates); still unclear, congestion is assumed, as in classic
       AIMD — replicas sharing a quota each see only part of the effect of their own cut — unless a
       noise estimate exists and the share did not fall half way: then it was most likely a chance
       high, and the cut is undone. A cut made on an assumption keeps the undo of the one before: if
       the next check finds noise, both are undone.
    4. Noise is believed only while the evidence holds. The answers after a noise verdict, back at
       the old rate, must not be throttled significantly more than in the check (else `noise` is 0
       again); the estimate expires NOISE_TTL_SECONDS of traffic (idle time is no evidence) after a
       check last found it (worker/personalize/ratenoise.py); and while there is noise the probe does
       not accelerate: throttling believed to be noise may be other replicas' load, and probing fast
       into it would raise their share until they believe it noise too.

    Probing adds PROBE_PER_SECOND of the maximum per second, doubling every PROBE_DOUBLING_SECONDS
    without a cut: slow near a quota just found, back from the floor to the maximum within ~20 s
    once the quota is raised (or an outage is over), however few calls that rate makes. Replicas
    sharing a quota see the same share, so they cut by the same factor and probe alike: AIMD
    converges on fair shares without them talking to each other.
    """

    DECREASE = 0.85
    MIN_FRACTION = 0.01
    """The floor, as a fraction of the maximum: some calls keep going to see the quota come back."""
    PROBE_PER_SECOND = 0.005  # of the maximum: the additive increase right after a cut
    PROBE_DOUBLING_SECONDS = 2.0
    WINDOW_SECONDS = 0.5
    WINDOW_OUTCOMES = 100
    PROBING_OUTCOMES = 30  # while the rate rises: a quota is found sooner, overshot less
    MARGIN = 0.03  # throttled share over the noise tolerated: the steady-state overshoot
    Z_TRIGGER = 4.0
    """Standard errors over the noise before a cut: rare enough that noise alone almost never cuts."""
    Z = 3.0  # standard errors a share must move by with a cut to count as following it
    Z_EARLY = 5.0  # over the threshold: a run of answers acts at once
    Z_NOISE = 2.0  # for "it did not follow": a wrong "noise" is caught by rule 4
    CAUSE_OUTCOMES = 300
    MAX_CAUSE_SECONDS = 1.5
    MAX_CHECK_SECONDS = 2.0
    CHECK_OUTCOMES = 200
    LONGEST_CHECK_SECONDS = 4.0
    FEWEST_OUTCOMES = 10
    """A check runs MAX_CHECK_SECONDS, longer at low rates: until CHECK_OUTCOMES answers, at most this."""
    CONFIRM_SECONDS = 1.0
    NOISE_TTL_SECONDS = NoiseEstimate.TTL_SECONDS  # rule 4's expiry, named here for the tests and docs
    MIN_NOISE_CHANGE = 0.1
    SLOW_HALF_LIFE = 2.0
    LATE_SECONDS = 10.0
    """Successes later than this are not waited for: the request timeout's default."""
    BURST_SECONDS = 0.05  # calls unused in the last 50 ms may go at once: smooths the dispatcher's ticks

    def __init__(self, max_rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_rate = max_rate
        self.rate = max_rate
        self.throttled_share = 0.0
        """The last complete window's throttled share, for the metrics."""
        self._clock = clock
        self._floor = max_rate * self.MIN_FRACTION
        self._next_slot = 0.0
        """Never moves earlier: a dispatcher held by the quota sleeps until it (worker/flow/pipeline.py)."""
        now = clock()
        # Probing: the rate grows by step * 2 ** ((now - since) / doubling) per second, up to max_rate
        # (`_grown` is that power at `_probed_at`, the last update).
        self._step = max_rate * self.PROBE_PER_SECOND
        self._gain = self._step * self.PROBE_DOUBLING_SECONDS / math.log(2)
        self._growth = math.log(2) / self.PROBE_DOUBLING_SECONDS
        self._probing, self._since, self._probed_at, self._grown = False, now, now, 1.0
        # The open window: calls by send time since the last judgment or cut (worker/personalize/ratetally.py).
        self._tally = SendTally(now)
        self._window_length = self.WINDOW_SECONDS
        # The last success: when it came, when its call was sent, and the slowest recent round trip.
        self._last_success, self._success_sent, self._slowest = now, now, 0.0
        self._noise = NoiseEstimate(self.WINDOW_SECONDS)
        # The cut being checked: the window that caused it (share, answers, sent rate), whether it was
        # measured at a steady rate, the noise the cut assumed, and the probe to resume on an undo.
        self._checking = False
        self._cause = (0.0, 1, max_rate)
        self._cause_steady = True
        self._before = 0.0  # the throttled share of the window before the last
        self._cut_noise = 0.0
        self._undo = (max_rate, now, now)  # rate, probe start, time of the cut
        self._chained = False

    @property
    def noise(self) -> float:
        """The throttled share that does not follow our rate (rule 4; for the metrics)."""
        return self._noise.share

    @noise.setter
    def noise(self, share: float) -> None:
        self._noise.share = share  # a test's wrong belief, to see it expire

    # --- the slots -------------------------------------------------------------------------------

    def reserve(self) -> float:
        """Claim the next send slot; returns how long to wait for it."""
        now = self._clock()
        if self._probing:
            self._probe(now)
        earliest = now - self.BURST_SECONDS
        slot = self._next_slot if self._next_slot > earliest else earliest  # not max(): per call, it adds up
        self._next_slot = slot + 1.0 / self.rate
        self._tally.sent(slot)
        self._settle(now)  # also without answers (an outage): the tally keeps only calls still out
        return slot - now if slot > now else 0.0

    def available(self) -> tuple[int, float]:
        """(calls that could start now without waiting, seconds until the next one could)."""
        now = self._clock()
        if self._probing:
            self._probe(now)
        first = max(self._next_slot, now - self.BURST_SECONDS)
        if first > now:
            return 0, first - now
        return int((now - first) * self.rate) + 1, 0.0

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)

    def _probe(self, now: float) -> None:
        grown = math.exp(self._growth * min(now - self._since, 60.0))  # 2**30: past any maximum
        if self._noise.share:
            rate = self.rate + self._step * (now - self._probed_at)  # rule 4: no acceleration
        else:
            rate = self.rate + self._gain * (grown - self._grown)
        self._probed_at, self._grown = now, grown
        if rate >= self.max_rate:
            rate = self.max_rate
            self._probing = False
        self.rate = rate

    def _probe_from(self, rate: float, since: float, now: float) -> None:
        """Probe upwards from `rate`, as fast as a probe started at `since` would by now."""
        self.rate = min(rate, self.max_rate)
        self._since, self._probed_at = since, now
        self._grown = math.exp(self._growth * min(now - since, 60.0))
        self._probing = self.rate < self.max_rate

    # --- the answers -----------------------------------------------------------------------------

    def throttled(self, latency: float = 0.0) -> None:
        """A call was throttled. `latency`: its round trip in seconds, so that the answer is counted
        for when the call was sent (after a cut, only answers to calls sent after it count)."""
        self._answer(1, latency)

    def succeeded(self, latency: float = 0.0) -> None:
        """A call got through the quota."""
        self._answer(0, latency)

    def _answer(self, throttled: int, latency: float) -> None:
        now = self._clock()
        self._noise.heard(now, 1.0 / self.rate)
        if not throttled:
            slowest = self._slowest
            if latency < slowest:
                slowest = max(latency, slowest * 0.5 ** ((now - self._last_success) / self.SLOW_HALF_LIFE))
            self._slowest, self._last_success = max(latency, slowest), now
            self._success_sent = max(self._success_sent, now - latency)
        tally = self._tally
        if not tally.answered(now - latency, throttled):
            return  # to a call sent before the window (before a cut: at the old rate)
        self._settle(now)
        needed = self.PROBING_OUTCOMES if self._probing else self.WINDOW_OUTCOMES
        long_enough = tally.settled_seconds >= self._window_length
        if tally.settled_seconds > self.LONGEST_CHECK_SECONDS and tally.span() > self.LONGEST_CHECK_SECONDS:
            # Few calls (near the floor of a small maximum): a decision in bounded time on what there
            # is; with hardly any answers (an outage) nothing to judge, and less to keep.
            if tally.answers >= self.FEWEST_OUTCOMES:
                self._window_length = 0.0
                self._close_window(now, tally.settled_seconds)
            elif not self._checking:
                tally.drop_settled()
        elif tally.answers >= needed and long_enough:
            self._close_window(now, tally.settled_seconds)
        else:
            answers, throttles = tally.run()
            if answers >= self.WINDOW_OUTCOMES:
                rate = max(tally.calls, answers) / max(tally.run_span(), self.BURST_SECONDS)
                tally.mark()
                self._early(now, answers, throttles / answers, rate)

    def _early(self, now: float, answers: int, share: float, rate: float) -> None:
        """Every WINDOW_OUTCOMES answers, the run of them alone: far over the quota (a start at the
        maximum, a quota that just shrank), cut now rather than at the window's end, whose earlier
        answers, from before a token bucket's burst ran out, would dilute it."""
        far_over = share - self._threshold(now, answers) > self.Z_EARLY * spread(share, answers)
        if self._checking:
            # A share that rose far since the cut (a burst ran out, others kept sending): congestion,
            # no need to wait for the check's window.
            cause, cause_answers, _ = self._cause
            error = math.hypot(spread(cause, cause_answers), spread(share, answers))
            if not (far_over and share - cause > self.Z_EARLY * error):
                return
            self._checking, self._chained, self._since = False, False, now
        elif not (far_over or self._noise.refuted(share, answers, self.Z_EARLY)):  # (noise refuted: rule 4)
            return
        self._judge(now, 0.0, answers, share, at_once=True, early=True, rate=rate)

    def _close_window(self, now: float, elapsed: float) -> None:
        answers, share = self._tally.answers, self._tally.throttles / self._tally.answers
        if not self._checking:
            self._judge(now, elapsed, answers, share, at_once=self._probing)
            return
        verdict = self._verdict(share, answers, elapsed)
        if verdict is None:
            self._window_length += self.WINDOW_SECONDS  # not clear yet: a bigger sample
            return
        self._checking = False
        log.debug("rate check", extra={"verdict": verdict, "share": round(share, 3), "cause": round(self._cause[0], 3)})
        if verdict in ("congestion", "assumed"):
            self._since = now  # held until this window is judged, then probing from the start
            # An assumed congestion that cuts again keeps the first cut's undo: should the next check
            # find noise, neither cut was needed.
            self._chained = verdict == "assumed"
            self._judge(now, elapsed, answers, share, at_once=True)
            return
        self._close(share)
        # Undone: the probe as it was at the cut, paused while the check ran; calls at the restored
        # rate are a new sample.
        rate, since, cut_at = self._undo
        if verdict == "noise":
            cause, cause_answers, _ = self._cause
            lost = self._noise.found((cause * cause_answers + share * answers) / (cause_answers + answers), now)
            if lost is not None and lost[0] > rate:
                rate, since, cut_at = lost  # the same noise that expired: every cut since was for it (rule 4)
            self._noise.confirming = (share, answers)
            self._window_length = self.CONFIRM_SECONDS
        self._probe_from(rate, since + (now - cut_at), now)
        self._tally.restart(now)
        if verdict == "unclear" and 0.0 < share < self._noise.share:
            self._noise.refine(share, elapsed, self.rate)

    def _judge(
        self,
        now: float,
        elapsed: float,
        answers: int,
        share: float,
        at_once: bool,
        early: bool = False,
        rate: float = 0.0,
    ) -> None:
        """Rules 1 and 2, and the confirmation of rule 4, for one window of `elapsed` seconds (or an
        early run sent at `rate`). `at_once`: over the threshold, cut without a bigger sample
        (congestion is known, or our rising rate is the likely cause)."""
        if self._noise.confirming is not None:
            self._noise.confirm(share, answers, self.Z_NOISE, self.rate)
        noise = self._noise_now(now)
        threshold = self._threshold(now, answers)
        if share > threshold:
            overwhelming = share - threshold > self.Z_EARLY * spread(share, answers)
            if not (at_once or overwhelming) and answers < self.CAUSE_OUTCOMES and elapsed < self.MAX_CAUSE_SECONDS:
                self._window_length += self.WINDOW_SECONDS
                return
            self._close(share)
            self._cut(now, rate or self._tally.sent_rate(answers, self.BURST_SECONDS), share, answers, noise, early)
            return
        self._close(share)
        self._chained = False
        if noise > 0.0 and (share < noise or self.rate >= self.max_rate):
            self._noise.refine(share, elapsed, self.rate)
        if not self._probing and self.rate < self.max_rate:
            self._probe_from(self.rate, self._since, now)  # a hold ends

    def _noise_now(self, now: float) -> float:
        """The noise estimate; it expires NOISE_TTL_SECONDS of traffic after a check last found it (rule 4)."""
        if self._noise.expired(now, self._undo if self._checking else (self.rate, self._since, now)):
            self._noise.report(self.rate)
        return self._noise.share

    def _threshold(self, now: float, answers: int) -> float:
        """The throttled share over which a window of `answers` answers says the quota is exceeded."""
        noise = self._noise_now(now)
        return noise + max(self.MARGIN, self.Z_TRIGGER * spread(noise, answers))

    def _settle(self, now: float) -> None:
        """Let the tally take in the calls that have answered, and those that never will.

        A call unanswered for `_overdue()` is taken as never answering (errors are not reported), but
        only if sent before the last success's call: in a latency spike throttles come back at once
        and successes after the work, and calls taken without their successes would show throttles
        alone (a 2 s spike under 30 % noise cut the rate by half, back only after a minute). Not
        forever: after LATE_SECONDS without a success none is coming."""
        before = now
        if now - self._last_success < self.LATE_SECONDS and self._success_sent < now:
            before = self._success_sent
        self._tally.settle(now, before - self._overdue())

    def _overdue(self) -> float:
        """How long a call may stay unanswered before it is taken as never answering. From the slowest
        recent success, fading slowly: when a spike ends, the fast answers to new calls come back
        before the slow ones to old calls, which an average would already have written off."""
        overdue = 2.0 * self._slowest
        return overdue if overdue > self.WINDOW_SECONDS else self.WINDOW_SECONDS

    def _close(self, share: float) -> None:
        self._tally.drop_settled()
        self._window_length = self.WINDOW_SECONDS
        self._before, self.throttled_share = self.throttled_share, share

    def _verdict(self, share: float, answers: int, elapsed: float) -> Verdict | None:
        """Rule 3 on the check's sample so far; None while it cannot tell yet."""
        cause, cause_answers, cause_rate = self._cause
        moved = abs(cause - share)
        error = math.hypot(spread(cause, cause_answers), spread(share, answers))
        if moved > self.Z * error:
            return "congestion"
        # A quota of our own: the accepted rate stays, so the share at the new rate is what that leaves.
        own_quota = max(
            self._cut_noise, 1.0 - (1.0 - cause) * cause_rate / self._tally.sent_rate(answers, self.BURST_SECONDS)
        )
        fall = cause - own_quota
        unmoved = moved + self.Z_NOISE * error < fall / 2.0
        midway = math.hypot(spread(cause, cause_answers) / 2.0, spread(share, answers))
        stayed_up = share - (cause + own_quota) / 2.0 > self.Z_NOISE * midway
        plausible = self._cause_steady and cause - self._cut_noise >= self.MIN_NOISE_CHANGE
        if plausible and share <= NoiseEstimate.MAX and (unmoved or stayed_up):
            return "noise"
        if elapsed < self.MAX_CHECK_SECONDS or (
            answers < self.CHECK_OUTCOMES and elapsed <= self.LONGEST_CHECK_SECONDS
        ):
            return None
        # Still unclear. Without a noise estimate this is classic AIMD's case: a cut for a throttled
        # share that did not clearly go away (replicas sharing a quota each see a partial effect of
        # their own cut). With one, an unclear excess over it is most likely a chance high: undone.
        return "assumed" if cause - share > fall / 2.0 or not self._cut_noise else "unclear"

    def _cut(self, now: float, sent_rate: float, share: float, answers: int, noise: float, early: bool) -> None:
        # A short run (an early cut) may have caught a transient, and so may a first throttled window
        # after none: the burst a token bucket saved while we were below it running out. Only a
        # share already there the window before can be told from such a transient.
        self._cause_steady = not (self._probing or early) and self._before > self.MARGIN
        if self._probing:
            self._probe(now)
        if not self._chained:
            self._undo = (self.rate, self._since, now)
        self._chained = False
        factor = min(self.DECREASE, (1.0 - share) / (1.0 - noise))
        log.debug("rate cut", extra={"share": round(share, 3), "answers": answers, "from": round(self.rate, 1)})
        self.rate = max(self._floor, min(self.rate, sent_rate) * factor)
        self._probing = False  # held while the check runs: a clean measurement of the new rate
        self._checking = True
        self._cause = (share, answers, sent_rate)
        self._cut_noise = noise
        self._tally.restart(now)  # only calls sent from now on count for the check
        # Re-space the queue at the new rate instead of letting reserved slots burst out.
        self._next_slot = max(self._next_slot, now + 1.0 / self.rate)
