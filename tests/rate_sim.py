"""A deterministic simulation of `RateLimiter` against a PutEvents quota, on a fake clock.

The service is the emulator's: a token bucket of `quota` calls/s with a one-second burst (every call
that reaches it takes a token), then `noise`, a share of calls throttled at random whatever the rate,
and optionally another producer sending `other` calls/s open-loop on the same bucket. Our side is a
backlog: every slot the limiter grants is used, answers come back after `latency`. Seeded RNG, 1 ms
steps: the same numbers on every run, whatever the machine's load.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.personalize.ratelimit import RateLimiter


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Service:
    quota: float | None = None
    noise: float = 0.0
    other: float = 0.0
    seed: int = 1
    tokens: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.set_quota(self.quota)

    def set_quota(self, quota: float | None) -> None:
        """Like the emulator's `max_tps` change: a new bucket, full."""
        self.quota = quota
        self.tokens = max(quota or 0.0, 1.0)

    def refill(self, dt: float) -> None:
        if self.quota is not None:
            self.tokens = min(max(self.quota, 1.0), self.tokens + dt * self.quota)

    def throttles(self) -> bool:
        """One call arrives: True when it is throttled."""
        if self.quota is not None:
            if self.tokens < 1.0:
                return True
            self.tokens -= 1.0
        return self.noise > 0.0 and self.rng.random() < self.noise


@dataclass
class Second:
    sent: int = 0
    accepted: int = 0
    throttled: int = 0
    other_sent: int = 0
    other_accepted: int = 0
    rate: float = 0.0


@dataclass
class Trace:
    seconds: list[Second]
    others: list[Trace] = field(default_factory=list)

    def window(self, start: int, end: int) -> tuple[float, float, float]:
        """(accepted calls/s, throttled share of our calls, other producer's accepted calls/s) over [start, end) s."""
        part = self.seconds[start:end]
        sent = sum(s.sent for s in part)
        accepted = sum(s.accepted for s in part)
        other = sum(s.other_accepted for s in part)
        return accepted / len(part), (sent - accepted) / sent if sent else 0.0, other / len(part)

    def settled_at(self, rate: float, tolerance: float = 0.1) -> int:
        """First second from which every second's accepted calls stay within `tolerance` of `rate`."""
        for start in range(len(self.seconds)):
            if all(abs(s.accepted - rate) <= tolerance * rate for s in self.seconds[start:]):
                return start
        return len(self.seconds)


def simulate(
    limiter: RateLimiter | list[RateLimiter],
    clock: Clock,
    service: Service,
    seconds: int,
    latency: float = 0.03,
    jitter: float = 0.01,
    step: float = 0.001,
    events: dict[int, Callable[[Service], None]] | None = None,
) -> Trace:
    """Run `seconds` of a backlog through `limiter` against `service`; `events[s]` runs at second s.

    A call reaches the service after a random part of `jitter` (concurrent senders interleave there,
    as on a real network) and its answer comes back `latency` after it was sent. With several limiters
    (replicas sharing the quota) the trace is the first one's and `Trace.others` holds the rest."""
    limiters = limiter if isinstance(limiter, list) else [limiter]
    traces = [Trace([Second() for _ in range(seconds)]) for _ in limiters]
    answers: list[deque[tuple[float, bool]]] = [deque() for _ in limiters]
    arriving: list[tuple[float, int, int]] = []  # (arrival time, sequence, sender; -1 = the other producer)
    sequence = other_sent = 0
    rng = service.rng
    steps_per_second = round(1.0 / step)
    start = clock.now
    for tick in range(seconds * steps_per_second):
        second, now = divmod(tick, steps_per_second)
        if now == 0 and events and second in events:
            events[second](service)
        clock.now = start + tick * step
        for index, one in enumerate(limiters):
            pending = answers[index]
            while pending and pending[0][0] <= clock.now:
                _, throttled = pending.popleft()
                if throttled:
                    one.throttled(latency)
                else:
                    one.succeeded(latency)
            calls, _ = one.available()
            for _ in range(calls):
                one.reserve()
                sequence += 1
                heapq.heappush(arriving, (clock.now + rng.random() * jitter, sequence, index))
        due = int(service.other * (tick + 1) * step) - other_sent
        other_sent += due
        for _ in range(due):
            sequence += 1
            heapq.heappush(arriving, (clock.now + rng.random() * jitter, sequence, -1))
        service.refill(step)
        while arriving and arriving[0][0] <= clock.now:
            _, _, index = heapq.heappop(arriving)
            throttled = service.throttles()
            if index >= 0:
                bin_ = traces[index].seconds[second]
                bin_.sent += 1
                bin_.accepted += not throttled
                answers[index].append((clock.now + latency, throttled))
            else:
                bin_ = traces[0].seconds[second]
                bin_.other_sent += 1
                bin_.other_accepted += not throttled
        for one, trace in zip(limiters, traces, strict=True):
            trace.seconds[second].rate = one.rate
    traces[0].others = traces[1:]
    return traces[0]
