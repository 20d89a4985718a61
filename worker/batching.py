"""Per-session micro-batches: one PutEvents call carries one session, up to `max_events` events.

Pure state: the caller passes `now`, takes batches to send and reports when a session's call is done.
A session has at most one call in flight, so its events reach Personalize in order even across
retries; while its call is out, its next batch keeps filling: once the call returns it goes at once if
full, else it lingers on like any partial batch.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Batch(Generic[K, T]):
    __slots__ = ("created_at", "items", "key")

    def __init__(self, key: K, created_at: float) -> None:
        self.key = key
        self.created_at = created_at
        self.items: list[T] = []


class Batcher(Generic[K, T]):
    """Idle sessions' batches are open; busy sessions' batches fill and wait; ready batches go first."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        # Sessions with no call in flight, ordered by creation time: lingered batches lead.
        self._open: OrderedDict[K, Batch[K, T]] = OrderedDict()
        # Sessions with a call in flight: the batch they fill meanwhile, and any full ones queued.
        self._filling: dict[K, Batch[K, T]] = {}
        self._waiting: dict[K, deque[Batch[K, T]]] = {}
        self._busy: set[K] = set()
        self._ready: deque[Batch[K, T]] = deque()
        self.buffered = 0
        """Events held here (open, filling, waiting or ready), not counting batches in flight."""

    def add(self, key: K, item: T, now: float) -> None:
        busy = key in self._busy
        batches = self._filling if busy else self._open
        batch = batches.get(key)
        if batch is None:
            batch = batches[key] = Batch(key, now)
        batch.items.append(item)
        self.buffered += 1
        if len(batch.items) >= self.max_events:
            del batches[key]
            if busy:
                self._waiting.setdefault(key, deque()).append(batch)
            else:
                self._busy.add(key)
                self._ready.append(batch)

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
        2. full batches: while calls are scarce, each one carries the most events,
        3. partial batches open for `linger` or more, oldest first.

        The caller's `limit` is what the quota and the in-flight cap allow right now, and its `linger`
        follows how busy the quota is: zero far below it, so a partial batch goes at once; longer near
        it, so partial batches wait to fill while full ones take the scarce calls.
        """
        taken: list[Batch[K, T]] = []
        if max_wait is not None and max_wait > linger:
            self._take_open(taken, limit, now - max_wait)
        while self._ready and len(taken) < limit:
            batch = self._ready.popleft()
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
            self._busy.add(key)
            self.buffered -= len(batch.items)
            taken.append(batch)

    def done(self, key: K) -> None:
        """The session's call finished (whatever its outcome): a full next batch is ready now; a partial
        one becomes open again, to fill and linger like any other (from its creation: it may be a call's
        round trip older than the open batches ahead of it, so it goes that much late at most)."""
        waiting = self._waiting.get(key)
        if waiting:
            self._ready.append(waiting.popleft())
            if not waiting:
                del self._waiting[key]
            return
        self._busy.discard(key)
        filling = self._filling.pop(key, None)
        if filling is not None:
            self._open[key] = filling

    def flush(self) -> None:
        """Send everything regardless of linger: shutdown and revocation drain. Open batches are ready
        now; busy sessions' filling batches are queued to go as soon as their call returns."""
        while self._open:
            key, batch = self._open.popitem(last=False)
            self._busy.add(key)
            self._ready.append(batch)
        for key, batch in self._filling.items():
            self._waiting.setdefault(key, deque()).append(batch)
        self._filling.clear()

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
            if not self._waiting[key]:
                del self._waiting[key]
        ready: deque[Batch[K, T]] = deque()
        emptied: list[K] = []
        for batch in self._ready:
            if prune(batch):
                ready.append(batch)
            else:
                emptied.append(batch.key)
        self._ready = ready
        # An emptied ready batch never runs: hand its session slot on as if it had finished.
        for key in emptied:
            self.done(key)
        self.buffered -= len(dropped)
        return dropped

    def items(self) -> Iterator[T]:
        """Every item held, in no particular order (for the watchdog, not the hot path)."""
        for batches in (self._open.values(), self._filling.values(), self._ready):
            for batch in batches:
                yield from batch.items
        for waiting in self._waiting.values():
            for batch in waiting:
                yield from batch.items

    def __len__(self) -> int:
        waiting = sum(len(w) for w in self._waiting.values())
        return len(self._open) + len(self._filling) + len(self._ready) + waiting
