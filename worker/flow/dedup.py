"""A bounded, time-limited window of delivered eventIds, plus the copies waiting on one in flight.

An ID counts as seen only once it is delivered. A copy that arrives while the first is in flight is
parked on it: when the first is delivered the copies are duplicates; when the first fails, they are
handed back to be sent, so nothing is lost and nothing is paid for twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

NEW = 0
SEEN = 1
PARKED = 2

CHUNK = 1024
"""Delivered IDs are kept in order in tuples of this many (see `Dedup._order`)."""


class Dedup(Generic[T]):
    """Not thread-safe; one instance per worker process, driven from the event loop."""

    def __init__(self, window_seconds: float, max_ids: int, clock: Callable[[], float]) -> None:
        self._window = window_seconds
        self._max_ids = max_ids
        self._clock = clock
        self._delivered: dict[str, float] = {}
        """eventId → when it was delivered."""
        # Delivery order, for eviction from the oldest: full chunks, then the one filling. Not an
        # OrderedDict: a dict of strings and floats and tuples of strings are not tracked by the cyclic
        # GC, while an OrderedDict's linked nodes are walked by every full collection (~40 ms per
        # 200,000 IDs; the window holds up to a million). Nor a deque of IDs: one pointer per ID to visit.
        self._order: deque[tuple[str, ...]] = deque()
        self._filling: list[str] = []
        self._head = 0
        """Position in `_order[0]` up to which its IDs are evicted."""
        self._repeats: dict[str, int] = {}
        """IDs delivered again while still remembered: their older place in `_order` is skipped."""
        self._in_flight: dict[str, list[T] | None] = {}
        """eventId in flight → the copies parked on it; None until one is (a list per event costs)."""

    @property
    def enabled(self) -> bool:
        return self._window > 0 and self._max_ids > 0

    def __len__(self) -> int:
        return len(self._delivered)

    def admit(self, event_id: str, item: T) -> int:
        """NEW (caller must send it), SEEN (a duplicate: finalize it), or PARKED (wait for the first).

        The intake's loop has this inline (see `admission`): change both."""
        delivered_at = self._delivered.get(event_id)
        # An expired ID is not seen, whether or not a delivery has evicted it yet.
        if delivered_at is not None and delivered_at > self._clock() - self._window:
            return SEEN
        in_flight = self._in_flight
        if event_id in in_flight:
            self.park(event_id, item)
            return PARKED
        in_flight[event_id] = None
        return NEW

    def admission(self) -> tuple[dict[str, float], dict[str, list[T] | None], float]:
        """What `admit` reads, for a caller admitting a poll's records inline (a call per record cost more
        than the admitting): (eventId → when delivered, eventId in flight → parked copies or None, the
        horizon: delivered after it is seen). The dicts are live; the horizon holds for this poll."""
        return self._delivered, self._in_flight, self._clock() - self._window

    def park(self, event_id: str, item: T) -> None:
        """A copy of an eventId in flight waits for the first (`admit`'s PARKED)."""
        waiting = self._in_flight[event_id]
        if waiting is None:
            self._in_flight[event_id] = [item]
        else:
            waiting.append(item)

    def delivered(self, event_ids: Iterable[str]) -> list[T]:
        """Record delivery; returns the parked copies, which are now duplicates."""
        now = self._clock()
        duplicates: list[T] = []
        remember = self.enabled
        in_flight, entries, filling = self._in_flight, self._delivered, self._filling
        for event_id in event_ids:
            parked = in_flight.pop(event_id, None)
            if parked:
                duplicates.extend(parked)
            if remember:
                if event_id in entries:  # delivered before (and expired): it moves to the young end
                    self._repeats[event_id] = self._repeats.get(event_id, 0) + 1
                entries[event_id] = now
                filling.append(event_id)
        if len(filling) >= CHUNK:
            self._order.append(tuple(filling))
            filling.clear()
        self._evict(now)
        return duplicates

    def failed(self, event_id: str) -> list[T]:
        """The first copy will never be delivered: its parked copies must now be sent themselves."""
        return self._in_flight.pop(event_id, None) or []

    def parked(self) -> Iterator[T]:
        """Every copy parked on an eventId in flight (for the watchdog, not the hot path)."""
        for waiting in self._in_flight.values():
            if waiting:
                yield from waiting

    def forget_in_flight(self, keep: Callable[[T], bool]) -> None:
        """Drop parked copies the caller no longer owns (a revoked partition's records)."""
        for event_id, parked in self._in_flight.items():
            if parked:
                self._in_flight[event_id] = [item for item in parked if keep(item)] or None

    def _evict(self, now: float) -> None:
        """Forget the oldest IDs while there are too many or they are older than the window."""
        entries, order, repeats = self._delivered, self._order, self._repeats
        horizon = now - self._window
        while entries:
            if not order:  # everything left is in the filling chunk
                order.append(tuple(self._filling))
                self._filling.clear()
            chunk, index = order[0], self._head
            while index < len(chunk):
                event_id = chunk[index]
                if repeats and event_id in repeats:  # remembered from a later delivery
                    if repeats[event_id] == 1:
                        del repeats[event_id]
                    else:
                        repeats[event_id] -= 1
                elif len(entries) <= self._max_ids and entries[event_id] > horizon:
                    self._head = index
                    return
                else:
                    del entries[event_id]
                index += 1
            order.popleft()
            self._head = 0
