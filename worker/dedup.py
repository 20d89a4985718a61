"""A bounded, time-limited window of delivered eventIds, plus the copies waiting on one in flight.

An ID counts as seen only once it is delivered. A copy that arrives while the first is in flight is
parked on it: when the first is delivered the copies are duplicates; when the first fails, they are
handed back to be sent, so nothing is lost and nothing is paid for twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

NEW = 0
SEEN = 1
PARKED = 2


class Dedup(Generic[T]):
    """Not thread-safe; one instance per worker process, driven from the event loop."""

    def __init__(self, window_seconds: float, max_ids: int, clock: Callable[[], float]) -> None:
        self._window = window_seconds
        self._max_ids = max_ids
        self._clock = clock
        # Insertion order is delivery order, so the oldest entries sit at the front for O(1) eviction.
        self._delivered: OrderedDict[str, float] = OrderedDict()
        self._in_flight: dict[str, list[T] | None] = {}
        """eventId in flight → the copies parked on it; None until one is (a list per event costs)."""

    @property
    def enabled(self) -> bool:
        return self._window > 0 and self._max_ids > 0

    def __len__(self) -> int:
        return len(self._delivered)

    def admit(self, event_id: str, item: T) -> int:
        """NEW (caller must send it), SEEN (a duplicate: finalize it), or PARKED (wait for the first)."""
        delivered_at = self._delivered.get(event_id)
        if delivered_at is not None:
            if delivered_at > self._clock() - self._window:
                return SEEN
            # Eviction runs only on delivery: in a quiet spell an expired ID would otherwise stay seen.
            del self._delivered[event_id]
        in_flight = self._in_flight
        if event_id in in_flight:
            waiting = in_flight[event_id]
            if waiting is None:
                in_flight[event_id] = [item]
            else:
                waiting.append(item)
            return PARKED
        in_flight[event_id] = None
        return NEW

    def delivered(self, event_ids: Iterable[str]) -> list[T]:
        """Record delivery; returns the parked copies, which are now duplicates."""
        now = self._clock()
        duplicates: list[T] = []
        remember = self.enabled
        in_flight, entries = self._in_flight, self._delivered
        for event_id in event_ids:
            parked = in_flight.pop(event_id, None)
            if parked:
                duplicates.extend(parked)
            if remember:
                if event_id in entries:  # seen before and expired: it moves to the young end
                    entries.move_to_end(event_id)
                entries[event_id] = now
        self._evict(now)
        return duplicates

    def failed(self, event_id: str) -> list[T]:
        """The first copy will never be delivered: its parked copies must now be sent themselves."""
        return self._in_flight.pop(event_id, None) or []

    def forget_in_flight(self, keep: Callable[[T], bool]) -> None:
        """Drop parked copies the caller no longer owns (a revoked partition's records)."""
        for event_id, parked in self._in_flight.items():
            if parked:
                self._in_flight[event_id] = [item for item in parked if keep(item)] or None

    def _evict(self, now: float) -> None:
        entries = self._delivered
        while len(entries) > self._max_ids:
            entries.popitem(last=False)
        horizon = now - self._window
        while entries:
            oldest = next(iter(entries.values()))
            if oldest > horizon:
                break
            entries.popitem(last=False)
