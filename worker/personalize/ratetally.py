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
    (ANSWERED of them, or all that will: a bucket sent before `settle`'s `before` is taken as it is —
    errors the caller does not report never answer). Only its totals and first and last send are
    kept, late answers to it included, so an answer costs O(1) and memory is the unsettled buckets
    alone: those with calls still out, never the time passed. (Kept bucket by bucket, an outage
    without answers, or an idle hour before the next call, grew the tally by 20 buckets a second.)
    """

    BUCKET = 0.05
    ANSWERED = 0.75
    """A bucket is settled once this share of its calls has answered."""

    def __init__(self, start: float) -> None:
        self.restart(start)

    def restart(self, start: float) -> None:
        """Forget everything: count calls sent from `start` on (after a cut, the new rate's)."""
        self.start = self._origin = start
        # Buckets with calls or answers, in send order, not yet settled: [index, sent, answers,
        # throttles, first and last send]; indexes count BUCKETs from `_origin`, gaps are empty.
        self._buckets: deque[list[float]] = deque()
        self._first_index = self._settled = 0
        self.calls = self.answers = self.throttles = 0
        """Over the settled buckets."""
        self._first: float | None = None
        self._last = 0.0
        self._mark_answers = self._mark_throttles = 0
        self._mark_first: float | None = None

    def sent(self, at: float) -> None:
        """A call goes out at `at` (its slot)."""
        if at >= self.start:
            index = int((at - self._origin) / self.BUCKET)  # `_index` inline: this and `answered` run per call
            if index >= self._settled:
                self._bucket(index, at)[1] += 1

    def answered(self, at: float, throttled: int) -> bool:
        """The call sent at `at` was answered; False if it was sent before `start` (not counted)."""
        if at < self.start:
            return False
        index = int((at - self._origin) / self.BUCKET)
        if index < self._settled:  # late, its bucket already in the window
            self.answers += 1
            self.throttles += throttled
            return True
        bucket = self._bucket(index, at)
        bucket[2] += 1
        bucket[3] += throttled
        return True

    def settle(self, now: float, before: float) -> None:
        """Extend the settled run as far as the answers allow (never to send times still to come);
        buckets sent before `before` are taken as they are."""
        buckets = self._buckets
        origin, width = self._origin, self.BUCKET
        past = int((now - origin) / width)
        old_enough = int((before - origin) / width)
        while buckets and buckets[0][0] < past:
            index, sent, answers, throttles, first, last = buckets[0]
            if answers < self.ANSWERED * sent and index >= old_enough:
                break
            buckets.popleft()
            self.calls += int(sent)
            self.answers += int(answers)
            self.throttles += int(throttles)
            if self._first is None:
                self._first = first
            if self._mark_first is None:
                self._mark_first = first
            self._last = last
            self._settled = int(index) + 1
        if buckets:  # the empty buckets before the first unsettled one are settled too
            self._settled = max(self._settled, min(int(buckets[0][0]), past))

    @property
    def settled_seconds(self) -> float:
        """Send time the settled buckets cover (cheap: for "long enough yet?")."""
        return (self._settled - self._first_index) * self.BUCKET

    def span(self) -> float:
        """From the first settled call's send to the last's: what a rate is measured over."""
        return self._last - self._first if self._first is not None else 0.0

    def drop_settled(self) -> None:
        """Start over after the settled buckets: the unsettled ones (calls still out) carry on."""
        self._first_index = self._settled
        self.start = self._origin + self._settled * self.BUCKET
        self.calls = self.answers = self.throttles = self._mark_answers = self._mark_throttles = 0
        self._first = self._mark_first = None

    def run(self) -> tuple[int, int]:
        """(answers, throttles) settled since the last `mark`."""
        return self.answers - self._mark_answers, self.throttles - self._mark_throttles

    def sent_rate(self, answers: int, shortest: float) -> float:
        """Calls sent per second: counted at `sent`, else (a caller that never reserves) the answers, over
        the time from the first call sent to the last (at least `shortest` seconds)."""
        return max(self.calls, answers) / max(self.span(), shortest)

    def run_span(self) -> float:
        return self._last - self._mark_first if self._mark_first is not None else 0.0

    def mark(self) -> None:
        self._mark_answers, self._mark_throttles, self._mark_first = self.answers, self.throttles, None

    def _bucket(self, index: int, at: float) -> list[float]:
        """The unsettled bucket `index` (of send time `at`), made if it has none yet. Sends come in order,
        answers to the oldest calls out: both ends of a short queue, each looked at first."""
        buckets = self._buckets
        if not buckets or buckets[-1][0] < index:
            bucket = [index, 0, 0, 0, at, at]
            buckets.append(bucket)
            return bucket
        bucket = buckets[-1]
        if bucket[0] != index:
            position = 0
            while buckets[position][0] < index:
                position += 1
            bucket = buckets[position]
            if bucket[0] != index:
                bucket = [index, 0, 0, 0, at, at]
                buckets.insert(position, bucket)
        if at < bucket[4]:  # not min()/max(): two builtin calls per call were a tenth of this class's time
            bucket[4] = at
        elif at > bucket[5]:
            bucket[5] = at
        return bucket


def spread(share: float, answers: int) -> float:
    """Standard error of a share measured over `answers` calls, at least one call's worth."""
    p = min(max(share, 1.0 / answers), 1.0 - 1.0 / answers)
    return math.sqrt(p * (1.0 - p) / answers)
