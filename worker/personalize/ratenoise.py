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


class NoiseEstimate:
    """The noise share, believed only while the evidence holds.

    - A noise verdict sets it (`found`); windows within the threshold refine it (`refine`).
    - The answers after a verdict, back at the old rate, must not be throttled significantly more
      than in the check (`confirm`), else it is 0 again: the throttling followed our rate.
    - It expires TTL_SECONDS after a check last found it, so that a wrong estimate cannot hide a
      quota for long.
    """

    TTL_SECONDS = 60.0
    GAIN = 0.1  # how far each fine window moves the share toward its own (~5 s of memory)
    MAX = 0.9
    """No estimate above this: at least 1 call in 10 must get through before we stop cutting."""
    REPORT_STEP = 0.03  # the log line's hysteresis: the limiter's MARGIN

    def __init__(self, now: float, window: float) -> None:
        self.share = 0.0
        self._window = window  # the limiter's WINDOW_SECONDS: what GAIN is per
        self._found_at = now
        self._logged = 0.0
        self.confirming: tuple[float, int] | None = None
        """The noise verdict's check (share, answers) while the next window confirms it."""

    def expired(self, now: float) -> bool:
        """Drop an estimate past its TTL; True when this call dropped it."""
        if not self.share or now - self._found_at <= self.TTL_SECONDS:
            return False
        self.share = 0.0
        return True

    def found(self, share: float, now: float) -> None:
        """A check found noise: believe `share` (at most MAX) for TTL_SECONDS, once confirmed."""
        self.share = min(share, self.MAX)
        self._found_at = now

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
