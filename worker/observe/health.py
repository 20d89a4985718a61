"""The stall watchdog: is every partition making progress, and if not, what its oldest record waits on.

Progress means a partition's committed offset moving forward — not fetching, and not a commit whose
offset stays put while its metadata changes. A partition that is behind its high watermark and has not
advanced for `worker.stall_timeout_seconds` is stalled: `personalize_worker_stalled`, a `/readyz` reason
naming the partition and the cause, and one log line. The age of each partition's oldest unfinished
record is exported every tick, and what it waits on once it is a few seconds old.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from aiokafka.structs import TopicPartition

from worker.observe.metrics import WAITING_AFTER_SECONDS, Metrics

log = logging.getLogger("worker.health")  # the pre-move name: log filters match it

RELOCATE_SECONDS = 10.0
"""A record found in a batch is taken to be there still for this long while it stays its partition's oldest
unfinished one and is in no call: a batch's records leave it only for a call, and the calls are looked at every
tick. Searching the batches (`Pipeline.where`, deep) took ~15 ms at a full buffer, at every tick of a backlog
drain (~5% of the worker's CPU); searching again after this long still finds a record that a bug lost."""


class Causes(Protocol):
    """What the rest of the worker knows about why records might not finish."""

    def dead_letters_blocked(self) -> str | None: ...
    def calls_failing(self) -> str | None: ...
    def is_retrying(self, batch: Any) -> bool: ...
    def handing_over(self) -> bool: ...


class PartitionProgress(Protocol):
    """One partition's offset state, as the watchdog reads it (`flow.offsets.PartitionOffsets`)."""

    @property
    def serial(self) -> int: ...
    @property
    def advanced_at(self) -> float: ...
    def oldest_unfinished(self) -> tuple[int, float] | None: ...


class Progress(Protocol):
    """Owned partitions and their offset states (`flow.offsets.OffsetTracker`)."""

    def __iter__(self) -> Iterator[tuple[TopicPartition, PartitionProgress]]: ...


class Watched(Protocol):
    """What the watchdog watches (a route's `flow.pipeline.Pipeline`, or every route's `flow.fanout.Routes`):
    declared here, so the watchdog knows no flow internals and the flow never depends on it."""

    @property
    def tracker(self) -> Progress: ...
    @property
    def failure(self) -> str | None: ...
    def where(self, wanted: dict[int, int], retrying: Callable[[Any], bool], deep: bool = ...) -> dict[int, str]: ...


class Watchdog:
    def __init__(
        self,
        pipeline: Watched,
        metrics: Metrics,
        causes: Causes,
        stall_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pipeline = pipeline
        self._metrics = metrics
        self._causes = causes
        self._stall_after = stall_after
        self._clock = clock
        self.reason: str | None = None
        """Why the worker is not making progress, for /readyz; None while it is."""
        self._waiting: dict[TopicPartition, str] = {}
        self._batched: dict[int, tuple[int, float]] = {}
        """Partition serial → (offset, when found) of an oldest unfinished record last found in a batch."""

    def check(self, behind: dict[TopicPartition, int]) -> None:
        """One tick: `behind` is each owned partition's distance from committed offset to high watermark."""
        now = self._clock()
        pipeline = self._pipeline
        oldest: dict[TopicPartition, tuple[int, int, float]] = {}
        stalled: list[tuple[float, TopicPartition]] = []
        for tp, state in pipeline.tracker:
            unfinished = state.oldest_unfinished()
            age = 0.0
            if unfinished is not None:
                offset, fetched_at = unfinished
                age = max(0.0, now - fetched_at)
                if age >= WAITING_AFTER_SECONDS:
                    oldest[tp] = (state.serial, offset, age)
            self._metrics.oldest_unfinished.labels(tp.topic, str(tp.partition)).set(round(age, 3))
            idle = now - state.advanced_at
            if behind.get(tp, 0) > 0 and idle > self._stall_after:
                stalled.append((idle, tp))
        places = self._locate(oldest, now)
        self._export_waiting(places, {tp for tp, _ in pipeline.tracker})
        reason = None
        if pipeline.failure is not None:
            reason = pipeline.failure
        elif stalled:
            idle, tp = max(stalled)
            why = self._why(tp, oldest.get(tp), places.get(tp))
            reason = (
                f"stalled: {len(stalled)} partition(s) behind with no committed progress; "
                f"{tp.topic}-{tp.partition} for {idle:.0f}s: {why}"
            )
        if reason is not None and self.reason is None:
            log.error(
                "stall detected",
                extra={"partitions": len(stalled), "why": reason, "behind": sum(behind.values())},
            )
        elif reason is None and self.reason is not None:
            log.info("progress resumed")
        self.reason = reason
        self._metrics.stalled.set(int(bool(stalled)))

    def _locate(self, oldest: dict[TopicPartition, tuple[int, int, float]], now: float) -> dict[TopicPartition, str]:
        if not oldest:
            self._batched = {}
            return {}
        wanted = {serial: offset for serial, offset, _ in oldest.values()}
        retrying = self._causes.is_retrying
        found = self._pipeline.where(wanted, retrying, deep=False)
        known, rest = self._batched, {}
        for serial, offset in wanted.items():
            if serial not in found:
                cached = known.get(serial)
                if cached is not None and cached[0] == offset and now - cached[1] < RELOCATE_SECONDS:
                    found[serial] = "batch"
                else:
                    rest[serial] = offset
        if rest:
            found.update(self._pipeline.where(rest, retrying))
        self._batched = {
            serial: (wanted[serial], now) if serial in rest else known[serial]
            for serial, place in found.items()
            if place == "batch"
        }
        unplaced = "intake" if self._causes.handing_over() else "lost"
        return {tp: found.get(serial, unplaced) for tp, (serial, _, _) in oldest.items()}

    def _export_waiting(self, places: dict[TopicPartition, str], owned: set[TopicPartition]) -> None:
        gauge = self._metrics.waiting_on
        for tp in self._waiting.keys() - places.keys():
            if tp in owned:  # a revoked partition's series are gone with it (Metrics.forget_partition)
                gauge.labels(tp.topic, str(tp.partition), self._waiting[tp]).set(0)
        for tp, place in places.items():
            previous = self._waiting.get(tp)
            if previous != place:
                if previous is not None:
                    gauge.labels(tp.topic, str(tp.partition), previous).set(0)
                gauge.labels(tp.topic, str(tp.partition), place).set(1)
        self._waiting = places

    def _why(self, tp: TopicPartition, oldest: tuple[int, int, float] | None, place: str | None) -> str:
        causes = self._causes
        blocked = causes.dead_letters_blocked()
        failing = causes.calls_failing()
        cause = blocked if blocked and (place == "dead_letter" or not failing) else failing
        if oldest is not None:
            _, offset, age = oldest
            where = f"oldest unfinished record (offset {offset}, {age:.0f}s old) waits on {place}"
            return f"{where}: {cause}" if cause else where
        return cause or "nothing fetched and no offsets committed"
