"""An events route with several trackers (`tracking_id_field`): one `Batcher` and one in-flight share each.

Each tracker has its own AIMD limiter, so a throttled tracker's calls wait — in its limiter or in backoff —
while holding an in-flight slot. Out of one shared pool, those waiting calls would take every slot and the
trackers with quota to spare would send nothing. Here each tracker gets its own `max_in_flight` slots, and
a call starts only for a tracker whose own limiter has a call free now: a throttled tracker holds at most its
own share, never its neighbours'.

Seen from the pipeline this is a `Batcher` (batch keys are (trackingId, sessionId, userId)) and the
dispatcher's `Quota` at once: the calls it may start now are what every tracker may start, no more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from worker.flow.batching import Batch, Batcher

T = TypeVar("T")

MAX_WAIT = 0.5
"""Longest the dispatcher sleeps for a tracker's quota: a finished call or new records wake it sooner."""

Key = tuple[str, Any, Any]
"""(trackingId, sessionId, userId)."""


class Limiter(Protocol):
    """A tracker's rate limit (`sink.RateLimiter`)."""

    @property
    def rate(self) -> float: ...

    def available(self) -> tuple[int, float]: ...


class DestinationBatcher(Generic[T]):
    """Per tracker: a `Batcher`, an in-flight count bounded by `max_in_flight`, and its limiter."""

    def __init__(
        self, limiters: Mapping[str, Limiter], max_in_flight: int, batcher: Callable[[], Batcher[Any, T]]
    ) -> None:
        self._limiters = dict(limiters)
        self._batchers: dict[str, Batcher[Any, T]] = {name: batcher() for name in limiters}
        self._active = dict.fromkeys(limiters, 0)
        self._max_in_flight = max_in_flight
        self._order = list(limiters)
        self._first = 0
        """Who goes first in `take` rotates by one each time: no tracker is always served last when calls are
        scarce, nor always has its calls started (and its requests written) after the others'."""
        self.max_events = next(iter(self._batchers.values())).max_events

    # --- the dispatcher's quota ---------------------------------------------------------------------

    @property
    def rate(self) -> float:
        return float(sum(limiter.rate for limiter in self._limiters.values()))

    def allowance(self, destination: str) -> int:
        """Calls this tracker may start now: its free slots and its limiter's free calls, whichever is less."""
        slots = self._max_in_flight - self._active[destination]
        return min(slots, self._limiters[destination].available()[0]) if slots > 0 else 0

    def available(self) -> tuple[int, float]:
        """(calls the trackers with something to send may start now, seconds until one of them waiting for
        its quota could start one). An idle tracker's free calls are not counted: were they, the dispatcher
        would take them for calls it could still make and not wake for a throttled tracker's next one."""
        calls, wait = 0, MAX_WAIT
        for name, limiter in self._limiters.items():
            batcher = self._batchers[name]
            if self._active[name] >= self._max_in_flight or not (
                batcher.has_full() or batcher.oldest_open() is not None
            ):
                continue
            free, next_in = limiter.available()
            calls += free
            if not free:
                wait = min(wait, next_in)
        return calls, wait

    # --- the batcher ----------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return sum(b.buffered for b in self._batchers.values())

    @property
    def crowded(self) -> set[Any]:
        crowded: set[Any] = set()
        for batcher in self._batchers.values():
            crowded |= batcher.crowded
        return crowded

    def in_flight(self, destination: str) -> int:
        return self._active[destination]

    def add(self, key: Key, item: T, now: float, order: float | None = None) -> None:
        self._batchers[key[0]].add(key, item, now, order)

    def add_all(self, entries: Sequence[tuple[Key, T, float]], now: float) -> None:
        for key, item, order in entries:
            self._batchers[key[0]].add(key, item, now, order)

    def has_full(self) -> bool:
        """A full batch waits for a call at a tracker that has a slot for it."""
        return any(b.has_full() and self._active[name] < self._max_in_flight for name, b in self._batchers.items())

    def oldest_open(self) -> float | None:
        times = [t for t in (b.oldest_open() for b in self._batchers.values()) if t is not None]
        return min(times) if times else None

    def take(self, now: float, linger: float, limit: int, max_wait: float | None = None) -> list[Batch[Any, T]]:
        """Up to `limit` batches, each tracker's within its own allowance (see `allowance`)."""
        taken: list[Batch[Any, T]] = []
        order, first = self._order, self._first
        self._first = (first + 1) % len(order)
        for name in order[first:] + order[:first]:
            room = min(limit - len(taken), self.allowance(name))
            if room <= 0:
                continue
            batches = self._batchers[name].take(now, linger, room, max_wait)
            self._active[name] += len(batches)
            taken.extend(batches)
        return taken

    def done(self, key: Key) -> None:
        self._active[key[0]] -= 1
        self._batchers[key[0]].done(key)

    def flush(self) -> None:
        for batcher in self._batchers.values():
            batcher.flush()

    def drop(self, keep: Callable[[T], bool]) -> list[T]:
        """As `Batcher.drop`; a ready batch emptied there hands its call on through `Batcher.done`, which
        never started here, so the in-flight counts are untouched."""
        dropped: list[T] = []
        for batcher in self._batchers.values():
            dropped.extend(batcher.drop(keep))
        return dropped

    def items(self) -> Iterator[T]:
        for batcher in self._batchers.values():
            yield from batcher.items()

    def held(self, key: Key) -> Iterator[T]:
        return self._batchers[key[0]].held(key)
