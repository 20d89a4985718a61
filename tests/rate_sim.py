"""A deterministic simulation of `RateLimiter` against a PutEvents quota, on a fake clock.

The service is the emulator's: a token bucket of `quota` calls/s with a one-second burst (every call
that reaches it takes a token), then `noise`, a share of calls throttled at random whatever the rate,
and optionally another producer sending `other` calls/s open-loop on the same bucket. Our side is a
backlog (or `demand` calls/s): every slot the limiter grants is used, answers come back after
`latency`. The hostile parts: a share of `errors` (5xx, timeouts) or an `outage`, which the sink does
not report to the limiter; throttles answered after `throttle_latency` while successes take `latency`;
a replica restarting; the process frozen for seconds (a clock jump). Seeded RNG, 1 ms steps: the same
numbers on every run, whatever the machine's load.
"""

from __future__ import annotations

import heapq
import random
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
    errors: float = 0.0
    """Share of calls that fail without an answer the limiter hears of (5xx, timeouts)."""
    outage: bool = False
    latency: float | None = None
    """Round trip of an answer; None: `simulate`'s `latency`."""
    throttle_latency: float | None = None
    """Round trip of a throttle; None: the same as a success's."""
    demand: float | None = None
    """Calls/s our side wants to send; None: a backlog, every slot used."""
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

    def answer(self) -> bool | None:
        """One call arrives: True when it is throttled, None when it fails unheard of (error, outage)."""
        if self.outage or (self.errors > 0.0 and self.rng.random() < self.errors):
            return None
        return self.throttles()

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
    buckets: int = 0
    """The most buckets the limiter's tally held in the second: its memory."""


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
    restarts: dict[int, int] | None = None,
    pauses: dict[int, float] | None = None,
) -> Trace:
    """Run `seconds` of a backlog through `limiter` against `service`; `events[s]` runs at second s.

    A call reaches the service after a random part of `jitter` (concurrent senders interleave there,
    as on a real network) and its answer comes back `latency` after it was sent. With several limiters
    (replicas sharing the quota) the trace is the first one's and `Trace.others` holds the rest.
    `restarts[s]`: that replica restarts at second s (a new limiter, its calls in flight unanswered);
    `pauses[s]`: the process freezes for that many seconds at second s (the clock jumps, the quota's
    bucket refills; answers due meanwhile arrive together). Time in the trace is the process's."""
    limiters = list(limiter) if isinstance(limiter, list) else [limiter]
    traces = [Trace([Second() for _ in range(seconds)]) for _ in limiters]
    answers: list[list[tuple[float, int, float, bool]]] = [[] for _ in limiters]  # (due, sequence, trip, throttled)
    arriving: list[tuple[float, int, int]] = []  # (arrival time, sequence, sender; -1 = the other producer)
    sequence = other_sent = 0
    rng = service.rng
    steps_per_second = round(1.0 / step)
    start = clock.now
    wanted = 0.0
    for tick in range(seconds * steps_per_second):
        second, now = divmod(tick, steps_per_second)
        if now == 0 and events and second in events:
            events[second](service)
        if now == 0 and restarts and second in restarts:
            index = restarts[second]
            limiters[index] = RateLimiter(limiters[index].max_rate, clock)
            answers[index].clear()
            arriving = [call for call in arriving if call[2] != index]
            heapq.heapify(arriving)
        if now == 0 and pauses and second in pauses:
            start += pauses[second]
            service.refill(pauses[second])
        clock.now = start + tick * step
        for index, one in enumerate(limiters):
            pending = answers[index]
            while pending and pending[0][0] <= clock.now:
                _, _, trip, throttled = heapq.heappop(pending)
                if throttled:
                    one.throttled(trip)
                else:
                    one.succeeded(trip)
            calls, _ = one.available()
            if service.demand is not None:
                wanted = min(wanted + service.demand * step, max(1.0, service.demand))  # a queue, bounded
                calls = min(calls, int(wanted))
                wanted -= calls
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
        round_trip = latency if service.latency is None else service.latency
        throttle_trip = round_trip if service.throttle_latency is None else service.throttle_latency
        while arriving and arriving[0][0] <= clock.now:
            _, call, index = heapq.heappop(arriving)
            if index >= 0:
                answer = service.answer()
                bin_ = traces[index].seconds[second]
                bin_.sent += 1
                bin_.accepted += answer is False
                if answer is not None:  # the round trip counted from the arrival, as before the trips could differ
                    trip = throttle_trip if answer else round_trip
                    heapq.heappush(answers[index], (clock.now + trip, call, trip, answer))
            else:
                throttled = service.throttles()
                bin_ = traces[0].seconds[second]
                bin_.other_sent += 1
                bin_.other_accepted += not throttled
        for one, trace in zip(limiters, traces, strict=True):
            bin_ = trace.seconds[second]
            bin_.rate = one.rate
            bin_.buckets = max(bin_.buckets, len(one._tally._buckets))
    traces[0].others = traces[1:]
    return traces[0]
