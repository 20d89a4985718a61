"""Intake: fetched records → members → deduplicated or coalesced → batches, one final state per record.

Every record of a poll ends here or in a batch: skipped (a previous owner finished it), dead-lettered
(`InvalidRecord`), dropped on purpose (filtered, a delete), a duplicate, superseded, or buffered for a
call. One loop serves every operation: the route's `Convert` says what a record becomes. Counts are per
poll, never per event.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka.structs import TopicPartition

from worker.flow.batching import Batcher
from worker.flow.coalescing import CoalescingBatcher
from worker.flow.convert import Convert
from worker.flow.dedup import NEW, SEEN, Dedup
from worker.flow.destinations import DestinationBatcher
from worker.flow.items import EVENT_ID, OFFSET, OWNER, SENT_AT, SESSION, DeadLetter, Flag, Item, Record
from worker.flow.offsets import OffsetTracker, PartitionOffsets
from worker.flow.routes import Route
from worker.mapping.mapper import InvalidRecord
from worker.observe.metrics import Metrics
from worker.personalize.operations.spec import EVENTS

AnyBatcher = Batcher[Any, Item] | CoalescingBatcher[Any, Item] | DestinationBatcher[Item]


class Intake:
    """The first half of a route's `Pipeline`: what it holds of each record until a call takes it."""

    def __init__(
        self,
        route: Route,
        convert: Convert,
        batcher: AnyBatcher,
        metrics: Metrics,
        clock: Callable[[], float],
        tracker: OffsetTracker[TopicPartition] | None,
    ) -> None:
        self.route = route
        self._convert = convert
        self._events = route.spec is EVENTS
        """Events drop filtered records; the other operations drop deletes (counted apart)."""
        self._coalescing = route.spec.coalesced
        self._metrics = metrics
        self._route_metrics = metrics.route(route.name)
        self._clock = clock
        self.tracker: OffsetTracker[TopicPartition] = tracker if tracker is not None else OffsetTracker()
        self.dedup: Dedup[Item] = Dedup(route.dedup_window_seconds, route.dedup_max_ids, clock)
        self.batcher: AnyBatcher = batcher
        self._fetched_at = time.time()
        """Wall time of the last intake: caps a batch's order (its sentAt) so a future sentAt goes no later
        than its fetch would put it."""
        self._dead: list[tuple[PartitionOffsets, DeadLetter]] = []
        self._writing: list[tuple[PartitionOffsets, DeadLetter]] = []
        self._dead_ready = asyncio.Event()
        self.wakeup = Flag()
        self.progress = Flag()
        """Set whenever records become final: waiters for a drain re-check then."""

    def ingest(self, partition: TopicPartition, records: Sequence[Record]) -> None:
        """Convert one partition's fetched records and hand each to dedup/coalescing and the batcher."""
        if not records:
            return
        now = self._clock()
        state = self.tracker.assign(partition, now)
        serial = state.serial
        state.track((r.offset for r in records), now)
        convert = self._convert
        self._fetched_at = fetched_at = time.time()
        batcher = self.batcher
        coalescer = batcher if isinstance(batcher, CoalescingBatcher) else None
        # `_admit` and `Dedup.admit` inline, their callees bound once: this loop runs for every record.
        delivered, in_flight, horizon = self.dedup.admission()
        park = self.dedup.park
        deduplicated = coalescer is None
        fresh: list[tuple[Any, Item, float]] = []
        """New items, for `add_all` after the loop: one call per poll, not one per record."""
        keep = fresh.append
        dropped = duplicates = superseded = 0
        invalid: Counter[str] | None = None
        skip = state.skip
        try:
            for record in records:
                offset = record.offset
                if skip and offset in skip:
                    # A previous owner finished it after its last commit point: sending it again would
                    # pay twice for nothing.
                    skip.discard(offset)
                    state.finish(offset)
                    duplicates += 1
                    continue
                try:
                    member = convert(record, partition)
                except InvalidRecord as error:
                    if invalid is None:
                        invalid = Counter()
                    invalid[error.reason] += 1
                    self._dead_letter(state, partition, offset, record.key, record.value, record.headers, error)
                    continue
                if member is None:
                    dropped += 1
                    state.finish(offset)
                    continue
                key, record_id, order, body = member
                item = (serial, offset, key, record_id, order, body, record.key, record.value, record.headers)
                if deduplicated:  # `_admit` inline (per record), `Dedup.admit` too: the three must agree
                    delivered_at = delivered.get(record_id)
                    if delivered_at is not None and delivered_at > horizon:  # seen (an expired ID is not)
                        state.finish(offset)
                        duplicates += 1
                    elif record_id in in_flight:
                        park(record_id, item)
                    else:
                        in_flight[record_id] = None
                        # Ready batches go in event time (see Batcher.take): a backlog drains evenly across sessions.
                        keep((key, item, order if order < fetched_at else fetched_at))
                else:
                    assert coalescer is not None
                    older = coalescer.add(key, record_id, item, serial, offset, now)
                    if older is not None:
                        superseded += 1
                        self._finish(older)
        finally:  # what the loop admitted is buffered even if a record raised a bug: it is in flight
            if fresh:
                assert not isinstance(batcher, CoalescingBatcher)
                batcher.add_all(fresh, now)
        self._count_intake(len(records), dropped, duplicates, superseded, invalid)

    def _count_intake(
        self, consumed: int, dropped: int, duplicates: int, superseded: int, invalid: Counter[str] | None
    ) -> None:
        m, r = self._metrics, self._route_metrics
        m.records_consumed.inc(consumed)
        r.consumed.inc(consumed)
        if dropped and self._events:
            m.filtered.inc(dropped)
            r.filtered.inc(dropped)
        elif dropped:
            r.deleted.inc(dropped)
        if superseded:
            r.superseded.inc(superseded)
        if duplicates:
            m.duplicates.inc(duplicates)
            r.duplicate.inc(duplicates)
        if invalid:
            for reason, count in invalid.items():
                m.invalid.labels(reason).inc(count)
            r.invalid.inc(sum(invalid.values()))
        m.buffered.set(self.batcher.buffered)
        self.wakeup.set()

    def _admit(self, item: Item, now: float) -> bool:
        """True when the item is a duplicate (finished here). `ingest` has this and `Dedup.admit` inline: change
        all three."""
        verdict = self.dedup.admit(item[EVENT_ID], item)
        if verdict == NEW:
            assert not isinstance(self.batcher, CoalescingBatcher)
            # Ready batches go in event time (see Batcher.take): a backlog drains evenly across sessions.
            sent_at, fetched_at = item[SENT_AT], self._fetched_at
            self.batcher.add(item[SESSION], item, now, sent_at if sent_at < fetched_at else fetched_at)
        elif verdict == SEEN:
            self._finish(item)
            return True
        return False  # parked behind the copy in flight

    def _finish(self, item: Item) -> None:
        owner = self.tracker.owners.get(item[OWNER])
        if owner is not None:  # else revoked: its result no longer counts
            owner[1].finish(item[OFFSET])

    def _dead_letter(
        self,
        state: PartitionOffsets,
        partition: TopicPartition,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        error: InvalidRecord,
    ) -> None:
        letter = DeadLetter(
            topic=partition.topic,
            partition=partition.partition,
            offset=offset,
            key=key,
            value=value,
            headers=list(headers or ()),
            stage=error.stage,
            reason=error.reason,
            message=error.message,
        )
        self._dead.append((state, letter))
        self._dead_ready.set()

    @property
    def outstanding(self) -> int:
        """Records fetched but not yet final: the bounded-memory measure that pauses fetching."""
        return self.tracker.outstanding

    @property
    def sessions_crowded(self) -> int:
        return len(self.batcher.crowded)

    def crowded_partitions(self) -> set[TopicPartition]:
        """The owned partitions feeding a session over `batching.max_session_events`: the source leaves
        them unfetched until the session's calls have worked its backlog down, while the others keep flowing.
        Read off the session's held records (at most about its bound), and only while one is crowded."""
        crowded = self.batcher.crowded
        if not crowded:
            return set()
        serials = {item[OWNER] for key in crowded for item in self.batcher.held(key)}
        owners = self.tracker.owners
        return {owners[serial][0] for serial in serials if serial in owners}

    def drop_unsent(self, partitions: Sequence[TopicPartition]) -> None:
        """Take the partitions' records that are in no call yet out of the batches. They stay unfinished,
        so the commit stops before them and their next owner sends them: once, as nothing here did."""
        revoked = {s.serial for s in (self.tracker.get(p) for p in partitions) if s is not None}

        def kept(item: Item) -> bool:
            return item[OWNER] not in revoked

        now = self._clock()
        for item in self.batcher.drop(kept):
            for parked in self.dedup.failed(item[EVENT_ID]):
                self._admit(parked, now)
        self._metrics.buffered.set(self.batcher.buffered)

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        """Drop all state of revoked partitions; their late results will change nothing."""
        for partition in partitions:
            self.tracker.revoke(partition)
        now = self._clock()

        owners = self.tracker.owners

        def owned(item: Item) -> bool:
            return item[OWNER] in owners

        self.dedup.forget_in_flight(owned)
        for item in self.batcher.drop(owned):
            # It will never be sent here: copies parked on it must go out themselves.
            for parked in self.dedup.failed(item[EVENT_ID]):
                self._admit(parked, now)
        self._dead = [(state, letter) for state, letter in self._dead if not state.retired]
        self._metrics.buffered.set(self.batcher.buffered)
