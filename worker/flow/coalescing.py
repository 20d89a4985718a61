"""`operations.coalesce.Coalescer` behind the face the pipeline's dispatcher knows from `batching.Batcher`.

Upserts (PutItems, PutUsers, PutActions) are coalesced by id instead of deduplicated and batched by
session; the pipeline then drives both the same way: add, take ready calls, report each call done.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

from worker.personalize.operations.coalesce import Call, Coalescer

T = TypeVar("T")
D = TypeVar("D", bound=Hashable)


class CoalescingBatcher(Generic[D, T]):
    """A Batcher look-alike: `take` hands out `Call`s (`.key`, `.items`), `done` takes the call back."""

    crowded: frozenset[D] = frozenset()
    """Never crowded: one destination is one "session" here, bounded by the buffer cap instead."""

    def __init__(self, max_records: int, window: float) -> None:
        self.coalescer: Coalescer[D, T] = Coalescer(max_records, window)
        self.max_events = max_records
        self._flushing = False
        self._lagging = False

    @property
    def buffered(self) -> int:
        return self.coalescer.buffered

    def add(self, destination: D, record_id: str, item: T, partition: Hashable, offset: int, now: float) -> T | None:
        """Queue an update; returns the one it supersedes (finished as `superseded` by the caller)."""
        return self.coalescer.add(destination, record_id, item, partition, offset, now)

    def has_full(self) -> bool:
        return self.coalescer.ready() >= self.coalescer.max_records

    def oldest_open(self) -> float | None:
        """When the oldest ready id started waiting; else nothing to send before a window ends (the
        dispatcher looks again within half a second at most)."""
        oldest = None
        for queue in self.coalescer._ready.values():
            for entry in queue.values():
                oldest = entry.since if oldest is None else min(oldest, entry.since)
                break
        return oldest

    def take(self, now: float, linger: float, limit: int, max_wait: float | None = None) -> list[Call[D, T]]:
        return self.coalescer.take(now, limit, linger)

    def done(self, call: Call[D, T]) -> None:
        self.coalescer.done(call)

    def flush(self) -> None:
        """Drain: windows hold nothing until `unflush` (shutdown, revocation)."""
        self._flushing = True
        self.coalescer.draining = True

    def unflush(self) -> None:
        self._flushing = False
        self.coalescer.draining = self._lagging

    def lagging(self, on: bool) -> None:
        """While a partition of the route is paused at `worker.max_commit_lag_records`, windows hold nothing
        either: a held update holds its partition's commit point, and the window only saves quota."""
        self._lagging = on
        self.coalescer.draining = on or self._flushing

    def drop(self, keep: Callable[[T], bool]) -> list[T]:
        return self.coalescer.drop(keep)

    def items(self) -> Iterator[T]:
        return self.coalescer.items()

    def held(self, key: D) -> Iterator[T]:
        return iter(())
