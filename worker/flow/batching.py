"""Per-session micro-batches: one PutEvents call carries one session, up to `max_events` events.

Pure state: the caller passes `now`, takes batches to send and reports when a session's call is done.

A session has at most `max_calls` calls in flight. While one is out, the session's next batch keeps
filling: full, it goes at once if the session has a call to spare, else it waits for one; partial, it
waits until all the session's calls have returned, then lingers on like any partial batch. So a quiet
session sends one call at a time, as full as its traffic allows, and only a busy one (a bot, a backlog)
runs several calls at once, each of them full.

Order: the events of one call are in arrival order, and a session's calls start in arrival order. Calls
in flight together may land in any order (a retried one after a later one), so with `max_calls` > 1 a
session's events can reach Personalize out of arrival order; with 1 they never do. Personalize orders a
session's interactions by `sentAt`, not by arrival, and an eventId keeps a replay harmless.

Bound: a session whose waiting batches hold more than `max_held` events is `crowded` until they hold
half of that; the caller stops feeding it meanwhile (the source stops fetching its partitions), so one hot
session cannot take the whole buffer while its calls work through its backlog.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Batch(Generic[K, T]):
    __slots__ = ("created_at", "items", "key", "order")

    def __init__(self, key: K, created_at: float, order: float) -> None:
        self.key = key
        self.created_at = created_at
        self.order = order
        """Where it goes among ready batches, lowest first: its first item's `order` (see `Batcher.take`)."""
        self.items: list[T] = []


class Batcher(Generic[K, T]):
    """Idle sessions' batches are open; busy sessions' batches fill and wait; ready batches go first."""

    def __init__(self, max_events: int, max_calls: int = 1, max_held: int | None = None) -> None:
        self.max_events = max_events
        self.max_calls = max_calls
        # Sessions with no call in flight, ordered by creation time: lingered batches lead.
        self._open: OrderedDict[K, Batch[K, T]] = OrderedDict()
        # Sessions with calls in flight: the batch they fill meanwhile, and full ones waiting for a call.
        self._filling: dict[K, Batch[K, T]] = {}
        self._waiting: dict[K, deque[Batch[K, T]]] = {}
        self._calls: dict[K, int] = {}
        """Per busy session, its calls in flight or ready to go (a ready batch holds its call)."""
        self._ready: list[tuple[float, int, Batch[K, T]]] = []
        """Batches that hold a call and wait only for the quota: a heap by order (see `take`)."""
        self._serial = itertools.count()
        self._floor: dict[K, float] = {}
        """Per busy session, the order of its last ready batch: its next one never goes before it."""
        self.buffered = 0
        """Events held here (open, filling, waiting or ready), not counting batches in flight."""
        held = max_held if max_held is not None else 1 << 62
        self._crowd_above = max(1, held // max_events)
        self._uncrowd_at = self._crowd_above // 2
        """Waiting batches above which a session is crowded, and at which it is not any more."""
        self.crowded: set[K] = set()
        """Sessions over their bound: whoever feeds them should hold back until they leave the set."""

    def add(self, key: K, item: T, now: float, order: float | None = None) -> None:
        """`order` places the batch this item opens among ready ones (default `now`: creation order)."""
        batches = self._filling if key in self._calls else self._open
        batch = batches.get(key)
        if batch is None:
            batch = batches[key] = Batch(key, now, now if order is None else order)
        batch.items.append(item)
        self.buffered += 1
        if len(batch.items) >= self.max_events:
            del batches[key]
            self._queue(key, batch)

    def add_all(self, entries: Sequence[tuple[K, T, float]], now: float) -> None:
        """`add` of each (key, item, order) in turn: a poll's new items in one call, not a call per record."""
        calls, filling, opened, max_events = self._calls, self._filling, self._open, self.max_events
        for key, item, order in entries:
            batches = filling if key in calls else opened
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = Batch(key, now, order)
            items = batch.items
            items.append(item)
            if len(items) >= max_events:
                del batches[key]
                self._queue(key, batch)
        self.buffered += len(entries)

    def _queue(self, key: K, batch: Batch[K, T]) -> None:
        """A full (or flushed) batch goes now if its session has a call to spare, else waits for one."""
        calls = self._calls.get(key, 0)
        if calls < self.max_calls:
            self._calls[key] = calls + 1
            self._make_ready(batch)
            return
        waiting = self._waiting.get(key)
        if waiting is None:
            waiting = self._waiting[key] = deque()
        waiting.append(batch)
        if len(waiting) > self._crowd_above:
            self.crowded.add(key)

    def _make_ready(self, batch: Batch[K, T]) -> None:
        order, floor = batch.order, self._floor.get(batch.key)
        if floor is not None and order < floor:
            order = floor  # an earlier batch of the session is still ready: it goes first
        self._floor[batch.key] = order
        heapq.heappush(self._ready, (order, next(self._serial), batch))

    def held(self, key: K) -> Iterator[T]:
        """The items of a session's waiting batches: what a crowded session holds beyond its calls."""
        return (item for batch in self._waiting.get(key, ()) for item in batch.items)

    def has_full(self) -> bool:
        """Whether a full batch (or a busy session's next one) waits only for a call."""
        return bool(self._ready)

    def oldest_open(self) -> float | None:
        """Creation time of the oldest batch that may be sent: when the next linger deadline falls."""
        for batch in self._open.values():
            return batch.created_at
        return None

    def take(self, now: float, linger: float, limit: int, max_wait: float | None = None) -> list[Batch[K, T]]:
        """Up to `limit` batches to send now, in this order:

        1. partial batches open for `max_wait` or more: even at the quota nothing waits longer,
        2. full batches, lowest order first (the pipeline's order is the first event's sentAt, at most
           its fetch time): while calls are scarce, each one carries the most events; and in a backlog
           every session and partition advances through time together, so a hot session's next batch,
           older than what the others have reached, goes first and its partition is no tail,
        3. partial batches open for `linger` or more, oldest first.

        The caller's `limit` is what the quota and the in-flight cap allow right now, and its `linger`
        follows how busy the quota is: zero far below it, so a partial batch goes at once; longer near
        it, so partial batches wait to fill while full ones take the scarce calls.
        """
        taken: list[Batch[K, T]] = []
        if max_wait is not None and max_wait > linger:
            self._take_open(taken, limit, now - max_wait)
        ready = self._ready
        while ready and len(taken) < limit:
            batch = heapq.heappop(ready)[2]
            self.buffered -= len(batch.items)
            taken.append(batch)
        self._take_open(taken, limit, now - linger)
        return taken

    def _take_open(self, taken: list[Batch[K, T]], limit: int, created_by: float) -> None:
        while self._open and len(taken) < limit:
            key, batch = next(iter(self._open.items()))
            if batch.created_at > created_by:
                return
            del self._open[key]
            self._calls[key] = 1
            self.buffered -= len(batch.items)
            taken.append(batch)

    def done(self, key: K) -> None:
        """One of the session's calls finished (whatever its outcome): its call passes to the next waiting
        batch, if any. Once its last call is back, a partial next batch becomes open again, to fill and
        linger like any other (from its creation: it may be a call's round trip older than the open
        batches ahead of it, so it goes that much late at most)."""
        waiting = self._waiting.get(key)
        if waiting:
            self._make_ready(waiting.popleft())
            if len(waiting) <= self._uncrowd_at:
                self.crowded.discard(key)
                if not waiting:
                    del self._waiting[key]
            return
        calls = self._calls[key] - 1
        if calls:
            self._calls[key] = calls
            return
        del self._calls[key]
        self._floor.pop(key, None)
        filling = self._filling.pop(key, None)
        if filling is not None:
            self._open[key] = filling

    def flush(self) -> None:
        """Send everything regardless of linger: shutdown and revocation drain. Open batches are ready
        now; busy sessions' filling batches go as soon as the session has a call to spare."""
        while self._open:
            key, batch = self._open.popitem(last=False)
            self._calls[key] = 1
            self._make_ready(batch)
        filling, self._filling = self._filling, {}
        for key, batch in filling.items():
            self._queue(key, batch)

    def drop(self, keep: Callable[[T], bool]) -> list[T]:
        """Remove the items the caller no longer owns (a revoked partition's); returns them."""
        dropped: list[T] = []

        def prune(batch: Batch[K, T]) -> bool:
            kept = [item for item in batch.items if keep(item)]
            if len(kept) != len(batch.items):
                dropped.extend(item for item in batch.items if not keep(item))
                batch.items = kept
            return bool(kept)

        for batches in (self._open, self._filling):
            for key in [k for k, batch in batches.items() if not prune(batch)]:
                del batches[key]
        for key in list(self._waiting):
            self._waiting[key] = deque(b for b in self._waiting[key] if prune(b))
            if len(self._waiting[key]) <= self._uncrowd_at:
                self.crowded.discard(key)
            if not self._waiting[key]:
                del self._waiting[key]
        ready: list[tuple[float, int, Batch[K, T]]] = []
        emptied: list[K] = []
        for entry in self._ready:
            if prune(entry[2]):
                ready.append(entry)
            else:
                emptied.append(entry[2].key)
        heapq.heapify(ready)
        self._ready = ready
        # An emptied ready batch never runs: hand its session slot on as if it had finished.
        for key in emptied:
            self.done(key)
        self.buffered -= len(dropped)
        return dropped

    def items(self) -> Iterator[T]:
        """Every item held, in no particular order (for the watchdog, not the hot path)."""
        for batches in (self._open.values(), self._filling.values(), (entry[2] for entry in self._ready)):
            for batch in batches:
                yield from batch.items
        for waiting in self._waiting.values():
            for batch in waiting:
                yield from batch.items

    def __len__(self) -> int:
        waiting = sum(len(w) for w in self._waiting.values())
        return len(self._open) + len(self._filling) + len(self._ready) + waiting
