"""Upserts waiting for a call, coalesced by id: the newest update of an id replaces the older ones.

Pure state, like `batching.Batcher`: the caller passes `now`, takes calls to send and reports when each
is done. PutItems, PutUsers and PutActions replace the whole record of an id, and their quota is small
(10 requests/s by default), so sending every update of a busy id would spend the quota on states that
are replaced a moment later. Here:

- an id waits at most once: a newer update replaces the waiting one, which is handed back to be finished
  as `superseded` (its offset may then be committed: the newer update, unfinished, holds the commit
  point below itself, so a crash replays it and nothing is lost);
- a call carries up to `max_records` distinct ids of one destination;
- an id is sent at most once per `window` seconds: an update of an id sent less than `window` ago waits
  for the window to pass, so a burst of 100,000 updates over 5,000 ids costs about 5,000 records a window;
- an id in flight is not sent again until its call is done: the update in flight finishes as sent (or
  dead-lettered, on its own merits); the newer one waits, then goes. So per id, updates reach Personalize
  in offset order and never two at once.

A call's outcome does not change the rules: a record rejected for good is dead-lettered by the caller,
and the newer update of its id is sent when its window passes, like any other.

Memory: one entry per waiting id, plus the send time of each id sent within the last window (at most
`max_remembered`; beyond it the oldest are forgotten, which only lets those ids go sooner).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

D = TypeVar("D", bound=Hashable)
"""A destination: records of one call share it (a dataset ARN)."""
T = TypeVar("T")
"""What the caller keeps per record (its partition, offset, serialized member, ...)."""


class _Entry(Generic[T]):
    """The one update of an id that waits; replaced in place by a newer one."""

    __slots__ = ("item", "offset", "partition", "release_at", "since")

    def __init__(self, item: T, partition: Hashable, offset: int, since: float) -> None:
        self.item = item
        self.partition = partition
        self.offset = offset
        self.since = since
        """When this id started waiting (a replacement keeps it: a busy id is not pushed back)."""
        self.release_at: float | None = None
        """Held by the window until then; None: held by a call in flight (or not held)."""


class Call(Generic[D, T]):
    """One request: distinct ids of one destination."""

    __slots__ = ("created_at", "destination", "ids", "items")

    def __init__(self, destination: D, created_at: float) -> None:
        self.destination = destination
        self.created_at = created_at
        self.ids: list[str] = []
        self.items: list[T] = []

    @property
    def key(self) -> D:
        """The batch key, as `batching.Batch` names it (the pipeline delivers both alike)."""
        return self.destination


class Coalescer(Generic[D, T]):
    """Not thread-safe; driven from one event loop."""

    def __init__(self, max_records: int, window: float, max_remembered: int = 1_000_000) -> None:
        self.max_records = max_records
        self.window = window
        self._max_remembered = max_remembered
        self._ready: dict[D, OrderedDict[str, _Entry[T]]] = {}
        """Ids that may go now, per destination, in the order they became ready."""
        self._held: dict[tuple[D, str], _Entry[T]] = {}
        """Ids waiting for their window or for their call in flight."""
        self._timers: list[tuple[float, int, D, str]] = []
        """Heap of window releases; an entry no longer held (dropped, released) is skipped when popped."""
        self._sequence = itertools.count()
        self._in_flight: set[tuple[D, str]] = set()
        self._sent: dict[tuple[D, str], float] = {}
        """When each id recently sent was taken: the start of its window."""
        self._sent_order: deque[tuple[float, D, str]] = deque()
        self.draining = False
        """While set, the window holds nothing (a call in flight still does): shutdown and revocation send
        everything they can instead of waiting out windows. Set it too while a partition is paused at its
        commit-distance bound: a held update holds its partition's commit point for up to a window, and
        the window only saves quota, which must not cost progress."""
        self.buffered = 0
        """Ids waiting here (ready or held), one record each; calls taken are the caller's."""

    def add(self, destination: D, record_id: str, item: T, partition: Hashable, offset: int, now: float) -> T | None:
        """Queue one update; returns the record it makes obsolete (to finish as `superseded`), if any.

        Of two updates of an id, the later offset of one partition wins; across partitions (an id keyed
        to several), arrival order decides, as no order between them exists.
        """
        key = (destination, record_id)
        ready = self._ready.get(destination)
        entry = ready.get(record_id) if ready is not None else None
        if entry is None:
            entry = self._held.get(key)
        if entry is not None:
            if partition == entry.partition and offset < entry.offset:
                return item  # older than the update already waiting (a replay): it changes nothing
            replaced = entry.item
            entry.item, entry.partition, entry.offset = item, partition, offset
            return replaced
        entry = _Entry(item, partition, offset, now)
        self.buffered += 1
        if key in self._in_flight:
            self._held[key] = entry
            return None
        sent_at = self._sent.get(key)
        if sent_at is not None and not self.draining and sent_at + self.window > now:
            self._hold(key, entry, sent_at + self.window)
            return None
        self._ready_queue(destination)[record_id] = entry
        return None

    def take(self, now: float, limit: int, linger: float = 0.0) -> list[Call[D, T]]:
        """Up to `limit` calls to send now: full ones first (while calls are scarce each carries the most
        records), then partial ones whose oldest id has waited `linger` or more, oldest first."""
        self._release(now)
        self._forget(now)
        calls: list[Call[D, T]] = []
        while len(calls) < limit and self._ready:
            destination = self._next_destination(now - linger)
            if destination is None:
                break
            calls.append(self._call(destination, now))
        return calls

    def done(self, call: Call[D, T]) -> None:
        """The call finished, whatever its outcome: a newer update of its ids waits out their window."""
        release_at = call.created_at + self.window
        for record_id in call.ids:
            key = (call.destination, record_id)
            self._in_flight.discard(key)
            entry = self._held.get(key)
            if entry is not None and entry.release_at is None:
                self._hold(key, entry, release_at)

    def next_release(self) -> float | None:
        """When the earliest window hold ends (the dispatcher's next wake-up), or None."""
        timers = self._timers
        while timers:
            release_at, _, destination, record_id = timers[0]
            entry = self._held.get((destination, record_id))
            if entry is not None and entry.release_at == release_at:
                return release_at
            heapq.heappop(timers)
        return None

    def ready(self) -> int:
        """Ids that may go now (before any window ends)."""
        return sum(len(queue) for queue in self._ready.values())

    def drop(self, keep: Callable[[T], bool]) -> list[T]:
        """Remove the waiting records the caller no longer owns (a revoked partition's); returns them.
        Calls in flight are the caller's; their ids stay in flight until `done`."""
        dropped: list[T] = []
        for destination, queue in list(self._ready.items()):
            for record_id in [r for r, entry in queue.items() if not keep(entry.item)]:
                dropped.append(queue.pop(record_id).item)
            if not queue:
                del self._ready[destination]
        for key in [k for k, entry in self._held.items() if not keep(entry.item)]:
            dropped.append(self._held.pop(key).item)
        self.buffered -= len(dropped)
        return dropped

    def items(self) -> Iterator[T]:
        """Every waiting record, in no particular order (for the watchdog, not the hot path)."""
        for queue in self._ready.values():
            for entry in queue.values():
                yield entry.item
        for entry in self._held.values():
            yield entry.item

    def __len__(self) -> int:
        return self.buffered

    # --- internals --------------------------------------------------------------------------------

    def _ready_queue(self, destination: D) -> OrderedDict[str, _Entry[T]]:
        queue = self._ready.get(destination)
        if queue is None:
            queue = self._ready[destination] = OrderedDict()
        return queue

    def _hold(self, key: tuple[D, str], entry: _Entry[T], release_at: float) -> None:
        entry.release_at = release_at
        self._held[key] = entry
        heapq.heappush(self._timers, (release_at, next(self._sequence), key[0], key[1]))

    def _release(self, now: float) -> None:
        """Window holds that ended (all of them while draining) become ready, oldest release first."""
        timers, held = self._timers, self._held
        while timers and (self.draining or timers[0][0] <= now):
            release_at, _, destination, record_id = heapq.heappop(timers)
            key = (destination, record_id)
            entry = held.get(key)
            if entry is None or entry.release_at != release_at:
                continue  # dropped, or released already
            del held[key]
            entry.release_at = None
            self._ready_queue(destination)[record_id] = entry

    def _forget(self, now: float) -> None:
        """Send times older than the window, or beyond `max_remembered`, are no longer needed."""
        order, sent = self._sent_order, self._sent
        horizon = now - self.window
        while order and (order[0][0] <= horizon or len(sent) > self._max_remembered):
            sent_at, destination, record_id = order.popleft()
            key = (destination, record_id)
            if sent.get(key) == sent_at:
                del sent[key]

    def _next_destination(self, lingered_by: float) -> D | None:
        """The destination with a full call, else the one whose first ready id waited longest."""
        best: D | None = None
        best_since = lingered_by
        for destination, queue in self._ready.items():
            if len(queue) >= self.max_records:
                return destination
            since = next(iter(queue.values())).since
            if since < best_since or (best is None and since == best_since):
                best, best_since = destination, since
        return best

    def _call(self, destination: D, now: float) -> Call[D, T]:
        queue = self._ready[destination]
        call: Call[D, T] = Call(destination, now)
        while queue and len(call.ids) < self.max_records:
            record_id, entry = queue.popitem(last=False)
            key = (destination, record_id)
            call.ids.append(record_id)
            call.items.append(entry.item)
            self._in_flight.add(key)
            self._sent[key] = now
            self._sent_order.append((now, destination, record_id))
        if not queue:
            del self._ready[destination]
        self.buffered -= len(call.ids)
        return call
