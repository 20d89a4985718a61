"""The rate limiter's noise estimate: the throttled share that does not follow our rate (its rule 4).

A class of its own because its lifetime rules are separate from the AIMD rules that use it: the
limiter asks "how much throttling is noise?" and the estimate answers, expiring, refining and being
confirmed or refuted on its own terms (worker/personalize/ratelimit.py's class docstring, rule 4).
"""

from __future__ import annotations

import logging
import math

from worker.personalize.ratetally import spread

log = logging.getLogger("worker.ratelimit")  # the limiter's logger: its log filters and alerts match it

Undo = tuple[float, float, float]
"""A rate to return to, as the limiter keeps it: (rate, its probe's start, when it was left)."""


class NoiseEstimate:
    """The noise share, believed only while the evidence holds.

    - A noise verdict sets it (`found`); windows within the threshold refine it (`refine`).
    - The answers after a verdict, back at the old rate, must not be throttled significantly more
      than in the check (`confirm`), else it is 0 again: the throttling followed our rate.
    - It expires TTL_SECONDS of traffic after a check last found it, so that a wrong estimate cannot
      hide a quota for long. Only time with answers counts (`heard`): an idle minute (or an outage)
      is no evidence either way, and expiring in it made the first windows after it re-find the
      noise from nothing, where a chance-high share cut and a chance-low one called that congestion
      and cut again: the rate stayed low for a minute (rule 4's slow probe). The same can happen to
      an estimate that expires in traffic, so a check that finds the same noise again (within
      SAME) within TTL_SECONDS of its expiry hands back the rate the lost estimate allowed: every
      cut made while re-finding it was for noise too.
    """

    TTL_SECONDS = 60.0
    GAIN = 0.1  # how far each fine window moves the share toward its own (~5 s of memory)
    MAX = 0.9
    """No estimate above this: at least 1 call in 10 must get through before we stop cutting."""
    IDLE_GAP_SECONDS = 1.0
    """A gap between answers longer than this (and than two calls' spacing) is not traffic: not counted."""
    SAME = 0.1  # the limiter's MIN_NOISE_CHANGE: a re-found share this close is the noise that expired
    REPORT_STEP = 0.03  # the log line's hysteresis: the limiter's MARGIN

    def __init__(self, window: float) -> None:
        self.share = 0.0
        self._window = window  # the limiter's WINDOW_SECONDS: what GAIN is per
        self._age = 0.0  # seconds of traffic since a check last found the noise
        self._heard_at: float | None = None
        self._lost: tuple[float, float, Undo] | None = None  # at the last expiry: share, time, the rate allowed
        self._logged = 0.0
        self.confirming: tuple[float, int] | None = None
        """The noise verdict's check (share, answers) while the next window confirms it."""

    def heard(self, now: float, spacing: float) -> None:
        """An answer came at `now`, calls being `spacing` seconds apart at our rate: traffic time
        passes. Cheap, for it runs on every answer."""
        if self._heard_at is not None:
            self._age += min(now - self._heard_at, max(self.IDLE_GAP_SECONDS, 2.0 * spacing))
        self._heard_at = now

    def expired(self, now: float, allowed: Undo) -> bool:
        """Drop an estimate past its TTL; True when this call dropped it. `allowed`: the limiter's rate
        then, as its undo (rate, probe start, time), for `found` to hand back."""
        if not self.share or self._age <= self.TTL_SECONDS:
            return False
        self._lost = (self.share, now, allowed)
        self.share = 0.0
        return True

    def found(self, share: float, now: float) -> Undo | None:
        """A check found noise: believe `share` (at most MAX) for TTL_SECONDS of traffic, once confirmed.
        Returns the rate the estimate allowed when it expired, if that was the same noise, recently."""
        lost, self._lost = self._lost, None
        self.share = min(share, self.MAX)
        self._age = 0.0
        if lost is None or now - lost[1] > self.TTL_SECONDS or abs(lost[0] - self.share) > self.SAME:
            return None
        return lost[2]

    def refine(self, share: float, elapsed: float, rate: float) -> None:
        """Move toward the `share` of a fine window of `elapsed` seconds, by GAIN per window's length."""
        self.share += min(0.5, self.GAIN * elapsed / self._window) * (share - self.share)
        self.report(rate)

    def refuted(self, share: float, answers: int, z: float) -> bool:
        """While a noise verdict is being confirmed: the share rose `z` errors over the check's."""
        if self.confirming is None:
            return False
        checked, checked_answers = self.confirming
        return share - checked > z * math.hypot(spread(checked, checked_answers), spread(share, answers))

    def confirm(self, share: float, answers: int, z: float, rate: float) -> None:
        """The window after a noise verdict: a share risen `z` errors follows our rate, not noise."""
        if self.refuted(share, answers, z):
            self.share = 0.0
        self.confirming = None
        self.report(rate)

    def report(self, rate: float) -> None:
        """One log line when the (confirmed) estimate moves by REPORT_STEP: why the worker is not
        backing off from throttling it sees, or that it is again."""
        if abs(self.share - self._logged) < self.REPORT_STEP:
            return
        self._logged = self.share
        extra = {"noise_share": round(self.share, 3), "rate_limit": round(rate, 1)}
        if self.share >= self.REPORT_STEP:
            log.warning("PutEvents throttling that does not follow our rate: not backing off for it", extra=extra)
        else:
            log.info("PutEvents throttling follows our rate again: backing off for all of it", extra=extra)
