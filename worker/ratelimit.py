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

log = logging.getLogger(__name__)

Verdict = Literal["noise", "congestion"]


class RateLimiter:
    """Calls per second: cut when the quota is exceeded, probe for free quota otherwise.

    Why not cut on every throttle: a throttle does not always mean *we* send too much. A service that
    sheds a share of calls whatever the rate, or a producer elsewhere that keeps the quota full,
    throttles a steady fraction that no rate of ours removes; cutting on each one drove the rate to
    its floor (~20 accepted calls/s of a 1,000 calls/s quota under 30 % random throttling).

    Answers are counted in windows (≥ WINDOW_SECONDS and ≥ WINDOW_OUTCOMES). `noise` estimates the
    throttled share that does not follow our rate; it starts at 0.

    1. A window whose throttled share `p` is within `noise` + max(MARGIN, Z standard errors) is fine:
       the rate keeps probing upwards, and `noise`, if any, moves a little toward `p` (only down
       while the rate rises: a share rising as we probe is a quota coming nearer, not noise).
    2. Above that, the quota looks exceeded: cut to the sent rate * min(DECREASE, (1 - p) / (1 - noise)).
       The second factor is the accepted rate, corrected for noise: the quota's size, reached in one
       step however far above it we were; DECREASE leaves headroom when we were only just above it.
    3. Then check that the throttling followed the cut. Had a quota of our own been exceeded, our
       accepted rate stays and the share falls by a predictable amount; noise stays where it was. A
       share that moved significantly (down, or further up: a token bucket's burst ran out) is
       congestion and the cut stands; one that stayed well within half the predicted fall is noise:
       `noise` becomes the share measured before and after the cut, and the cut is undone. The
       check's sample grows until one answer is shown, up to MAX_CHECK_SECONDS; still unclear, it is
       congestion — over-sending hurts whoever shares the quota, a needless cut costs a few seconds
       of probing.
    4. A noise verdict is confirmed by the next window at the restored rate: if the share jumps there,
       it does follow our rate after all, and `noise` reverts. An estimate older than NOISE_TTL_SECONDS
       is measured again: the next window above MARGIN cuts as if there were no noise, to the accepted
       rate, where whatever is still throttled is the noise; so a wrong estimate cannot hide a quota for
       long (it would otherwise hold the rate just where the share equals it).

    Probing adds PROBE_PER_SECOND of the maximum per second, doubling every PROBE_DOUBLING_SECONDS
    without a cut: slow near a quota just found (little overshoot even far below the maximum), and back
    from 10 % to the maximum within ~15 s once the quota is raised. Replicas sharing a quota see the
    same share, so they cut by the same factor and probe alike: AIMD converges on fair shares without
    them talking to each other.
    """

    DECREASE = 0.85
    MIN_FRACTION = 0.01
    """The floor, as a fraction of the maximum: some calls keep going to see the quota come back."""
    PROBE_PER_SECOND = 0.005
    """Additive increase right after a cut, as a fraction of the maximum per second."""
    PROBE_DOUBLING_SECONDS = 2.0
    WINDOW_SECONDS = 0.5
    WINDOW_OUTCOMES = 30
    MARGIN = 0.03
    """Throttled share above the noise tolerated before cutting: the steady-state overshoot."""
    Z = 3.0
    """Standard errors a share must move by to count: a false alarm about once in 700 windows."""
    Z_NOISE = 2.0
    """Standard errors for "the share did not follow the cut": a wrong "noise" is caught by rule 4."""
    CAUSE_OUTCOMES = 300
    MAX_CAUSE_SECONDS = 1.5
    """A window over the threshold grows to this many answers, or this long, before the cut."""
    MAX_CHECK_SECONDS = 2.0
    NOISE_TTL_SECONDS = 60.0
    NOISE_GAIN = 0.1
    """How far each fine window moves the noise estimate toward its share (~5 s of memory)."""
    MAX_NOISE = 0.9
    """No noise estimate above this: at least 1 call in 10 must get through before we stop cutting."""
    SETTLE_SECONDS = 0.1
    """After a cut, answers to calls sent before it are ignored for max(this, 2 round trips)."""
    BURST_SECONDS = 0.05
    """Calls unused in the last 50 ms may still go at once: smooths the dispatcher's ticks."""

    def __init__(self, max_rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_rate = max_rate
        self.rate = max_rate
        self.noise = 0.0
        """The throttled share that does not follow our rate (see the class docstring)."""
        self.throttled_share = 0.0
        """The last complete window's throttled share, for the metrics."""
        self._clock = clock
        self._floor = max_rate * self.MIN_FRACTION
        self._next_slot = 0.0
        now = clock()
        # Probing: rate = base + gain * (2 ** ((now - since) / doubling) - 1), up to max_rate.
        self._gain = max_rate * self.PROBE_PER_SECOND * self.PROBE_DOUBLING_SECONDS / math.log(2)
        self._growth = math.log(2) / self.PROBE_DOUBLING_SECONDS
        self._base, self._since, self._probing = max_rate, now, False
        # The open window; answers before `_ignore_until` belong to calls sent before a cut.
        self._window_start = 0.0
        self._window_length = self.WINDOW_SECONDS
        self._answers = self._throttles = 0
        self._ignore_until = -math.inf
        self._round_trip = 0.0
        self._noise_at = now
        self._noise_logged = 0.0
        # The cut being checked: the window that caused it, the noise it assumed, the probe to restore.
        self._checking = False
        self._cause = (0.0, 1, max_rate)  # share, answers, sent rate
        self._cut_noise = 0.0
        self._undo = (max_rate, now)
        self._confirming = False
        self._noise_before = 0.0

    # --- the slots -------------------------------------------------------------------------------

    def reserve(self) -> float:
        """Claim the next send slot; returns how long to wait for it."""
        now = self._clock()
        if self._probing:
            self._probe(now)
        slot = max(self._next_slot, now - self.BURST_SECONDS)
        self._next_slot = slot + 1.0 / self.rate
        return max(0.0, slot - now)

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
        elapsed = min(now - self._since, 60.0)  # 2**30 is past any maximum; no overflow after idling
        rate = self._base + self._gain * math.expm1(self._growth * elapsed)
        if rate >= self.max_rate:
            rate = self.max_rate
            self._probing = False
        self.rate = rate

    def _probe_from(self, base: float, since: float, now: float) -> None:
        self._base, self._since = base, since
        self.rate = base
        self._probing = base < self.max_rate
        if self._probing:
            self._probe(now)

    # --- the answers -----------------------------------------------------------------------------

    def throttled(self, latency: float = 0.0) -> None:
        """A call was throttled. `latency`: its round trip in seconds, if known (sets the settle time)."""
        self._answer(1, latency)

    def succeeded(self, latency: float = 0.0) -> None:
        """A call got through the quota."""
        self._answer(0, latency)

    def _answer(self, throttled: int, latency: float) -> None:
        now = self._clock()
        if latency > 0.0:
            self._round_trip += 0.1 * (latency - self._round_trip)
        if now < self._ignore_until:
            return
        if self._answers == 0:
            self._window_start = now
        self._answers += 1
        self._throttles += throttled
        elapsed = now - self._window_start
        if self._answers >= self.WINDOW_OUTCOMES and elapsed >= self._window_length:
            self._close_window(now, elapsed)

    def _close_window(self, now: float, elapsed: float) -> None:
        answers, share = self._answers, self._throttles / self._answers
        if self._checking:
            verdict = self._verdict(share, answers, elapsed)
            if verdict is None:
                self._window_length += self.WINDOW_SECONDS  # not clear yet: a bigger sample
                return
            self._checking = False
            if verdict == "noise":
                self._close(share)
                self._noise_before, self._confirming = self.noise, True
                cause, cause_answers, _ = self._cause
                self._set_noise((cause * cause_answers + share * answers) / (cause_answers + answers), now)
                self._probe_from(*self._undo, now)
                return
            if self._cut_noise < self.noise and share < self.noise:
                # A re-measurement (rule 4) cut to the accepted rate, and the share fell there: the
                # noise is at most what is left. Correct the cut for it.
                self._set_noise(share, now)
                self._report_noise()
                _, _, sent_rate = self._cause
                self.rate = max(self.rate, min(self.DECREASE * sent_rate, self.rate / (1.0 - share)))
            self._base, self._since = self.rate, now  # the cut stands; the rate is still held
        self._judge(now, elapsed, answers, share)

    def _judge(self, now: float, elapsed: float, answers: int, share: float) -> None:
        """Rules 1 and 2 for one window (the docstring's numbering)."""
        held = not self._probing  # at the maximum, or after a cut: the rate did not rise meanwhile
        stale = now - self._noise_at > self.NOISE_TTL_SECONDS
        noise = 0.0 if stale else self.noise
        if share > noise + max(self.MARGIN, self.Z * _spread(noise, answers)):
            if held and answers < self.CAUSE_OUTCOMES and elapsed < self.MAX_CAUSE_SECONDS:
                # Throttling at a steady rate: noise or not? A check would compare with this share,
                # so measure it on more calls first. (While probing, our rising rate is the likely
                # cause: cut at once.)
                self._window_length += self.WINDOW_SECONDS
                return
            self._close(share)
            if self._confirming:
                # Back at the rate of the cut, the share rose again: it follows our rate after all.
                self._confirming = False
                noise = self.noise = self._noise_before
                self._report_noise()
            self._cut(now, answers / elapsed, share, answers, noise)
            return
        self._close(share)
        if self._confirming:
            self._confirming = False
            self._report_noise()
        if noise > 0.0 and (share < noise or held):
            # Refine the estimate with fine windows: one check's sample is too small to set the
            # threshold on. Only down while probing: a rising share there is the quota nearing.
            gain = min(0.5, self.NOISE_GAIN * elapsed / self.WINDOW_SECONDS)
            self.noise = noise + gain * (share - noise)
            self._report_noise()
        if held and self.rate < self.max_rate:
            self._probe_from(self.rate, self._since, now)

    def _close(self, share: float) -> None:
        self._answers = self._throttles = 0
        self._window_length = self.WINDOW_SECONDS
        self.throttled_share = share

    def _verdict(self, share: float, answers: int, elapsed: float) -> Verdict | None:
        """Congestion once the share has moved significantly with the cut (or risen). Noise once it has moved
        significantly less than half what a quota of our own would show, or once it is significantly
        above what that would leave and has moved less than a quarter of it (a quota shared with
        replicas that did not cut shows about half). None while neither is shown; congestion if
        that lasts MAX_CHECK_SECONDS."""
        cause, cause_answers, cause_rate = self._cause
        moved = abs(cause - share)
        error = math.hypot(_spread(cause, cause_answers), _spread(share, answers))
        if moved > self.Z * error or share - cause > self.Z_NOISE * error:
            return "congestion"  # (a share that rose as we cut: a token bucket's burst ran out)
        # A quota of our own: the accepted rate stays, so the share at the new rate is what that leaves.
        own_quota = max(self._cut_noise, 1.0 - (1.0 - cause) * cause_rate * elapsed / answers)
        expected = cause - own_quota
        unmoved = moved + self.Z_NOISE * error < expected / 2.0
        stayed_up = share - own_quota > self.Z * _spread(share, answers) and moved < expected / 4.0
        if (unmoved or stayed_up) and share <= self.MAX_NOISE:
            return "noise"
        return "congestion" if elapsed >= self.MAX_CHECK_SECONDS else None

    def _cut(self, now: float, sent_rate: float, share: float, answers: int, noise: float) -> None:
        if self._probing:
            self._probe(now)
        self._undo = (self._base, self._since)
        factor = min(self.DECREASE, (1.0 - share) / (1.0 - noise))
        self.rate = max(self._floor, min(self.rate, sent_rate) * factor)
        self._probing = False  # held while the check runs: a clean measurement of the new rate
        self._checking = True
        self._cause = (share, answers, sent_rate)
        self._cut_noise = noise
        self._ignore_until = now + max(self.SETTLE_SECONDS, 2.0 * self._round_trip)
        # Re-space the queue at the new rate instead of letting reserved slots burst out.
        self._next_slot = max(self._next_slot, now + 1.0 / self.rate)

    def _set_noise(self, share: float, now: float) -> None:
        self.noise = min(share, self.MAX_NOISE)
        self._noise_at = now

    def _report_noise(self) -> None:
        """One log line when the (confirmed) noise estimate moves by a margin: why the worker is not
        backing off from throttling it sees, or that it is again."""
        if abs(self.noise - self._noise_logged) < self.MARGIN:
            return
        self._noise_logged = self.noise
        extra = {"noise_share": round(self.noise, 3), "rate_limit": round(self.rate, 1)}
        if self.noise >= self.MARGIN:
            log.warning("PutEvents throttling that does not follow our rate: not backing off for it", extra=extra)
        else:
            log.info("PutEvents throttling follows our rate again: backing off for all of it", extra=extra)


def _spread(share: float, answers: int) -> float:
    """Standard error of a share measured over `answers` calls, at least one call's worth."""
    p = min(max(share, 1.0 / answers), 1.0 - 1.0 / answers)
    return math.sqrt(p * (1.0 - p) / answers)
