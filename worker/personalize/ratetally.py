"""Calls and their answers counted by when each call was sent: the rate limiter's evidence.

Counting answers as they arrive lies whenever the round trip changes: throttles are answered at
once, successes only after the work, so in a latency spike the first answers back are the throttles
and the share looks high. Counted by send time (the arrival time minus the round trip the caller
reports), and read only over send times whose calls have answered, the share is the share.
"""

from __future__ import annotations

import math
from collections import deque


class SendTally:
    """Calls sent, answers and throttles per BUCKET seconds of send time, from `start` on.

    The settled run is the longest run of past buckets from `start` whose calls have answered
    (ANSWERED of them, or all that will: a bucket more than `overdue` seconds old is taken as it is —
    errors the caller does not report never answer). Its totals are kept as it grows, late answers
    to it included, so an answer costs O(1).
    """

    BUCKET = 0.05
    ANSWERED = 0.75
    """A bucket is settled once this share of its calls has answered."""

    def __init__(self, start: float) -> None:
        self.restart(start)

    def restart(self, start: float) -> None:
        """Forget everything: count calls sent from `start` on (after a cut, the new rate's)."""
        self.start = start
        self._buckets: deque[list[float]] = deque()  # [sent, answers, throttles, first and last send]
        self._settled = self._mark = 0
        self.calls = self.answers = self.throttles = 0
        """Over the settled buckets."""
        self._mark_answers = self._mark_throttles = 0

    def sent(self, at: float) -> None:
        """A call goes out at `at` (its slot)."""
        if at >= self.start:
            self._bucket(at)[0] += 1

    def answered(self, at: float, throttled: int) -> bool:
        """The call sent at `at` was answered; False if it was sent before `start` (not counted)."""
        if at < self.start:
            return False
        bucket = self._bucket(at)
        bucket[1] += 1
        bucket[2] += throttled
        if int((at - self.start) / self.BUCKET) < self._settled:  # late, its bucket still in the window
            self.answers += 1
            self.throttles += throttled
        return True

    def settle(self, now: float, overdue: float) -> None:
        """Extend the settled run as far as the answers allow (never to send times still to come)."""
        buckets, settled = self._buckets, self._settled
        past = int((now - self.start) / self.BUCKET)
        old_enough = int((now - overdue - self.start) / self.BUCKET)
        while settled < min(len(buckets), past):
            sent, answers, throttles, _, _ = buckets[settled]
            if answers < self.ANSWERED * sent and settled >= old_enough:
                break
            self.calls += int(sent)
            self.answers += int(answers)
            self.throttles += int(throttles)
            settled += 1
        self._settled = settled

    @property
    def settled_seconds(self) -> float:
        """Send time the settled buckets cover (cheap: for "long enough yet?")."""
        return self._settled * self.BUCKET

    def span(self) -> float:
        """From the first settled call's send to the last's: what a rate is measured over."""
        return self._span(0)

    def drop_settled(self) -> None:
        """Start over after the settled buckets: the unsettled ones (calls still out) carry on."""
        for _ in range(self._settled):
            self._buckets.popleft()
        self.start += self._settled * self.BUCKET
        self._settled = self._mark = 0
        self.calls = self.answers = self.throttles = self._mark_answers = self._mark_throttles = 0

    def run(self) -> tuple[int, int]:
        """(answers, throttles) settled since the last `mark`."""
        return self.answers - self._mark_answers, self.throttles - self._mark_throttles

    def sent_rate(self, answers: int, shortest: float) -> float:
        """Calls sent per second: counted at `sent`, else (a caller that never reserves) the answers, over
        the time from the first call sent to the last (at least `shortest` seconds)."""
        return max(self.calls, answers) / max(self.span(), shortest)

    def run_span(self) -> float:
        return self._span(self._mark)

    def mark(self) -> None:
        self._mark, self._mark_answers, self._mark_throttles = self._settled, self.answers, self.throttles

    def _span(self, first: int) -> float:
        """From the first send to the last in the settled buckets from index `first` on."""
        used = [b for b in (self._buckets[i] for i in range(first, self._settled)) if b[0] or b[1]]
        return used[-1][4] - used[0][3] if used else 0.0

    def _bucket(self, at: float) -> list[float]:
        index = int((at - self.start) / self.BUCKET)
        buckets = self._buckets
        while len(buckets) <= index:
            buckets.append([0, 0, 0, at, at])
        bucket = buckets[index]
        if not (bucket[0] or bucket[1]):
            bucket[3] = bucket[4] = at
        else:
            bucket[3], bucket[4] = min(bucket[3], at), max(bucket[4], at)
        return bucket


def spread(share: float, answers: int) -> float:
    """Standard error of a share measured over `answers` calls, at least one call's worth."""
    p = min(max(share, 1.0 / answers), 1.0 - 1.0 / answers)
    return math.sqrt(p * (1.0 - p) / answers)
