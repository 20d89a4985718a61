"""The record lifecycle: fetched → mapped → deduplicated → batched → delivered → final.

Every record ends in exactly one final state — sent, duplicate, filtered or dead-lettered — and only
then is its offset finished. This module knows neither Kafka clients nor aioboto3: it is handed the
fetched records, a sink and a dead-letter writer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
from aiokafka.structs import TopicPartition

from worker.config import MappingSettings, Settings
from worker.errors import ConfigError
from worker.flow.batching import Batch, Batcher
from worker.flow.coalescing import CoalescingBatcher
from worker.flow.dedup import NEW, SEEN, Dedup
from worker.flow.destinations import DestinationBatcher
from worker.flow.offsets import OffsetTracker, PartitionOffsets
from worker.kafka.deadletter import DeadLetter
from worker.mapping.mapper import InvalidRecord, Mapper
from worker.observe.metrics import Metrics
from worker.personalize.operations.coalesce import Call
from worker.personalize.operations.spec import EVENTS
from worker.personalize.retry import Rejection

if TYPE_CHECKING:
    from worker.flow.routes import Quotas, Route
    from worker.mapping.schemas import Schemas

log = logging.getLogger("worker.pipeline")  # the pre-move name: log filters match it

RATE_SECONDS = 0.5
"""Time constant of the call-rate average that sets the linger: short, so a drain's start fills calls soon."""
LINGER_FROM = 0.5
LINGER_FULL = 0.8
"""Linger grows from zero at half the quota's call rate to `batching.linger_ms` at 80 % of it."""
MAX_WAIT_LINGERS = 4
"""While full batches take every call, a partial one waits at most this many lingers, then goes first:
bounds the latency of a session's last events and the commit lag behind them."""


class Record(Protocol):
    """What the pipeline needs of a Kafka record (aiokafka's ConsumerRecord has it)."""

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class Delivery(Protocol):
    async def deliver(
        self, session_id: str, user_id: str | None, events: list[str], sent_at: float
    ) -> list[Rejection]: ...


class LetterWriter(Protocol):
    async def write(self, letters: Sequence[DeadLetter]) -> None: ...


class Quota(Protocol):
    """The sink's rate limit, as the dispatcher sees it (`ratelimit.RateLimiter`)."""

    @property
    def rate(self) -> float:
        """Calls per second allowed now."""
        ...

    def available(self) -> tuple[int, float]:
        """(calls that could start now, seconds until the next one could)."""
        ...


Item = tuple[int, int, Any, str, float, str, bytes | None, bytes | None, Sequence[tuple[str, bytes]]]
"""One mapped record on its way to Personalize: (partition serial, offset, session, eventId, sentAt,
the event as JSON, and the record's key, value and headers for a dead letter). `OffsetTracker.owners`
resolves the serial.

A plain tuple of strings, bytes, numbers and tuples, not an object and without a dict, for the cyclic
garbage collector: such a tuple leaves the collector's lists within a young collection or two. As objects
holding their ConsumerRecord and event dict, the ~50,000 buffered items were ~100,000 of the ~113,000
objects every full collection scanned: stalls of 50-140 ms every ~2 s. The event is serialized here
rather than at call time, so this costs no extra work; kept as a str, because each bytes object
orjson returns pins ~4 KB of the C heap (its output buffer, shrunk in place): 200 MB per 50,000."""
OWNER: Final = 0
OFFSET: Final = 1
SESSION: Final = 2
EVENT_ID: Final = 3
SENT_AT: Final = 4
EVENT: Final = 5
KEY: Final = 6
VALUE: Final = 7
HEADERS: Final = 8


class Flag:
    """asyncio.Event's set/clear with a timed wait that costs one future and one timer handle.

    The dispatcher waits once per finished call: under `asyncio.timeout` (a Timeout object, its
    reschedule and exit) that was ~2% of the worker's CPU. (`wait_for` is not used: on 3.11 it can
    swallow a cancellation.)"""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()

    def clear(self) -> None:
        self._set = False

    async def wait(self, timeout: float) -> None:
        """Until set, or for `timeout` seconds."""
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        sink: Delivery,
        dead_letters: LetterWriter,
        metrics: Metrics,
        quota: Quota | Quotas,
        clock: Callable[[], float] = time.monotonic,
        schemas: Schemas | None = None,
        *,
        route: Route | None = None,
        tracker: OffsetTracker[TopicPartition] | None = None,
        sinks: Mapping[str, Delivery] | None = None,
    ) -> None:
        """`route`: which flow this is (default: the single flow of `settings`); `tracker`: shared by every
        route's pipeline, so one committer sees all partitions; `sinks`: an events route's sink per tracking
        id (its batch keys start with the tracking id), instead of the one `sink`."""
        from worker.flow.routes import Quotas, converter, resolve, tracked_events

        self.route = route = route or resolve(settings)[0]
        self._settings = settings
        self._route_metrics = metrics.route(route.name)
        self._convert = None if route.spec is EVENTS else converter(route)
        self._coalescing = route.spec.coalesced
        self._destination = route.destinations[0][1]
        self._sinks = sinks
        self._map_record: Callable[[Record, str, int], Any] | None = None
        if isinstance(route.mapping, MappingSettings):
            self._mapper = Mapper(route.mapping)
            # Schema-registry formats decode with the writer's schema first (`Source` resolved it before intake).
            self._map = self._mapper.map if schemas is None else schemas.mapping(self._mapper)
            if route.tracking_id_field:
                decode = None if schemas is None else schemas.objects()
                self._map = tracked_events(self._mapper, route.tracking_id_field, dict(route.destinations), decode)
            # A mapping reading `_kafka.*` or a layout built from headers is handed the whole record.
            self._map_record = self._mapper.map_record if self._mapper.reads_record else None
            if self._map_record is not None and route.tracking_id_field:
                raise ConfigError(f"route {route.name}: tracking_id_field with _kafka.* or a layout is not supported")
        self._sink = sink
        self._letters = dead_letters
        self._metrics = metrics
        self._clock = clock
        self.tracker: OffsetTracker[TopicPartition] = tracker if tracker is not None else OffsetTracker()
        self.dedup: Dedup[Item] = Dedup(route.dedup_window_seconds, route.dedup_max_ids, clock)
        self.batcher: Batcher[Any, Item] | CoalescingBatcher[Any, Item] | DestinationBatcher[Item] = (
            CoalescingBatcher(route.max_records, route.coalesce_window_seconds)
            if self._coalescing
            else Batcher(route.max_records, route.max_calls_per_session, route.max_session_events)
        )
        self._max_in_flight = route.max_in_flight
        self._quota: Quota
        if isinstance(quota, Quotas):  # several trackers: each its own batcher, in-flight share and quota
            per_tracker: DestinationBatcher[Item] = DestinationBatcher(
                quota.limiters,
                route.max_in_flight,
                lambda: Batcher(route.max_records, route.max_calls_per_session, route.max_session_events),
            )
            self.batcher = self._quota = per_tracker
            self._max_in_flight = route.max_in_flight * len(quota.limiters)
        else:
            self._quota = quota
        self._fetched_at = time.time()
        """Wall time of the last intake: caps a batch's order (its sentAt) so a future sentAt goes no later
        than its fetch would put it."""
        self._linger = route.linger_ms / 1000.0
        self._max_wait = MAX_WAIT_LINGERS * self._linger
        self._call_rate = 0.0
        """Calls started per second, averaged over the last ~RATE_SECONDS: how busy the quota is."""
        self._call_rate_at = clock()
        self._active: dict[asyncio.Task[None], Batch[Any, Item] | Call[Any, Item]] = {}
        """Calls under way and their batches (where an unfinished record may be)."""
        self.failure: str | None = None
        """The first delivery task that failed with a bug: its records stay unfinished (see `where`)."""
        self._dead: list[tuple[PartitionOffsets, DeadLetter]] = []
        self._writing: list[tuple[PartitionOffsets, DeadLetter]] = []
        self._dead_ready = asyncio.Event()
        self.wakeup = Flag()
        self.progress = Flag()
        """Set whenever records become final: waiters for a drain re-check then."""

    # --- intake -------------------------------------------------------------------------------

    def ingest(self, partition: TopicPartition, records: Sequence[Record]) -> None:
        """Map one partition's fetched records; counts are per batch, never per event."""
        if not records:
            return
        if self._convert is not None:
            self._ingest_members(partition, records)
            return
        now = self._clock()
        state = self.tracker.assign(partition, now)
        serial = state.serial
        state.track((r.offset for r in records), now)
        mapper_map = self._map
        map_record = self._map_record
        dumps = orjson.dumps
        self._fetched_at = time.time()
        filtered = duplicates = 0
        invalid: Counter[str] | None = None
        skip = state.skip
        for record in records:
            if skip and record.offset in skip:
                # A previous owner finished it after its last commit point: sending it again would
                # pay twice for nothing.
                skip.discard(record.offset)
                state.finish(record.offset)
                duplicates += 1
                continue
            try:
                if map_record is None:
                    mapped = mapper_map(record.value)
                else:
                    mapped = map_record(record, partition.topic, partition.partition)
            except InvalidRecord as error:
                if invalid is None:
                    invalid = Counter()
                invalid[error.reason] += 1
                self._dead_letter(state, partition, record.offset, record.key, record.value, record.headers, error)
                continue
            if mapped is None:
                filtered += 1
                state.finish(record.offset)
                continue
            key, event = mapped
            item = (
                serial,
                record.offset,
                key,
                event["eventId"],
                event["sentAt"],
                dumps(event).decode(),
                record.key,
                record.value,
                record.headers,
            )
            if self._admit(item, now):
                duplicates += 1
        self._count_intake(len(records), filtered, duplicates, invalid)

    def _count_intake(self, consumed: int, filtered: int, duplicates: int, invalid: Counter[str] | None) -> None:
        m, r = self._metrics, self._route_metrics
        m.records_consumed.inc(consumed)
        r.consumed.inc(consumed)
        if filtered:
            m.filtered.inc(filtered)
            r.filtered.inc(filtered)
        if duplicates:
            m.duplicates.inc(duplicates)
            r.duplicate.inc(duplicates)
        if invalid:
            for reason, count in invalid.items():
                m.invalid.labels(reason).inc(count)
            r.invalid.inc(sum(invalid.values()))
        m.buffered.set(self.batcher.buffered)
        self.wakeup.set()

    def _ingest_members(self, partition: TopicPartition, records: Sequence[Record]) -> None:
        """`ingest` for items, users, actions (coalesced by id) and action interactions (deduplicated)."""
        now = self._clock()
        state = self.tracker.assign(partition, now)
        serial = state.serial
        state.track((r.offset for r in records), now)
        convert = self._convert
        assert convert is not None
        self._fetched_at = time.time()
        destination = self._destination
        coalescer = self.batcher if isinstance(self.batcher, CoalescingBatcher) else None
        duplicates = deleted = superseded = 0
        invalid: Counter[str] | None = None
        skip = state.skip
        for record in records:
            if skip and record.offset in skip:
                skip.discard(record.offset)
                state.finish(record.offset)
                duplicates += 1
                continue
            try:
                converted = convert(record.value)
            except InvalidRecord as error:
                if invalid is None:
                    invalid = Counter()
                invalid[error.reason] += 1
                self._dead_letter(state, partition, record.offset, record.key, record.value, record.headers, error)
                continue
            if converted is None:
                deleted += 1
                state.finish(record.offset)
                continue
            record_id, order, member = converted
            item = (
                serial,
                record.offset,
                destination,
                record_id,
                order,
                member,
                record.key,
                record.value,
                record.headers,
            )
            if coalescer is not None:
                older = coalescer.add(destination, record_id, item, serial, record.offset, now)
                if older is not None:
                    superseded += 1
                    self._finish(older)
            elif self._admit(item, now):
                duplicates += 1
        if deleted:
            self._route_metrics.deleted.inc(deleted)
        if superseded:
            self._route_metrics.superseded.inc(superseded)
        self._count_intake(len(records), 0, duplicates, invalid)

    def _admit(self, item: Item, now: float) -> bool:
        """True when the item is a duplicate (finished here)."""
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

    def where(self, wanted: dict[int, int], retrying: Callable[[Any], bool]) -> dict[int, str]:
        """Where each wanted record (partition serial → offset) waits (see `metrics.WAITING_ON`).

        One pass over everything held, run by the watchdog for records unfinished for a while only: the
        hot path keeps no per-record state for it."""
        found: dict[int, str] = {}

        def look(items: Iterable[Item], place: str) -> None:
            for item in items:
                if wanted.get(item[OWNER]) == item[OFFSET] and item[OWNER] not in found:
                    found[item[OWNER]] = place

        for state, letter in (*self._writing, *self._dead):
            if wanted.get(state.serial) == letter.offset:
                found.setdefault(state.serial, "dead_letter")
        for batch in self._active.values():
            look(batch.items, "retry" if retrying(batch) else "call")
        look(self.dedup.parked(), "parked")
        look(self.batcher.items(), "batch")
        return found

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

    # --- dispatch -----------------------------------------------------------------------------

    async def run_dispatcher(self) -> None:
        """Start as many calls as the quota and the in-flight cap allow; sleep until that changes."""
        while True:
            now = self._clock()
            linger = self.linger(now)
            slots = self._max_in_flight - len(self._active)
            calls, wait = self._quota.available()
            started = 0
            if min(slots, calls) > 0:
                for batch in self.batcher.take(now, linger, min(slots, calls), self._max_wait):
                    task = asyncio.create_task(self._deliver(batch))
                    self._active[task] = batch
                    task.add_done_callback(self._delivery_done)
                    started += 1
            self._count_calls(now, started)
            self._metrics.buffered.set(self.batcher.buffered)
            # New records or a finished call set `wakeup`; otherwise look again when the quota frees a
            # call for a batch that waits only for one, or when the oldest partial batch lingers out.
            timeout = 0.5
            if len(self._active) < self._max_in_flight:
                oldest = self.batcher.oldest_open()
                due = self.batcher.has_full() or (oldest is not None and oldest + linger <= now)
                if due and calls <= started:
                    timeout = max(0.001, wait)
                elif oldest is not None:
                    # Linger shrinks as the call rate falls: re-check at least every 50 ms.
                    timeout = min(0.05, max(0.001, oldest + linger - now))
            self.wakeup.clear()
            await self.wakeup.wait(timeout)

    def linger(self, now: float) -> float:
        """How long a partial batch waits to fill: not at all while calls are plentiful (below half
        the quota), up to `batching.linger_ms` as the call rate nears the quota and calls get scarce."""
        rate = self._quota.rate
        busy = self._decayed_call_rate(now) / rate if rate > 0 else 1.0
        share = (busy - LINGER_FROM) / (LINGER_FULL - LINGER_FROM)
        return self._linger * min(1.0, max(0.0, share))

    def _decayed_call_rate(self, now: float) -> float:
        return self._call_rate * math.exp((self._call_rate_at - now) / RATE_SECONDS)

    def _count_calls(self, now: float, started: int) -> None:
        """An exponentially weighted rate: each call adds 1/RATE_SECONDS, decaying with that time constant."""
        self._call_rate = self._decayed_call_rate(now) + started / RATE_SECONDS
        self._call_rate_at = now

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        self._active.pop(task, None)
        # Again here: woken by `_deliver` alone, the dispatcher may run before this callback and still
        # count the call as in flight (then, with every slot taken, it slept half a second).
        self.wakeup.set()
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a delivery failure (those never raise): the records stay unfinished, so the
            # partition stops committing; the watchdog reports it at once (readiness, metric), and the
            # oldest unfinished record of the partition shows as waiting on nothing ("lost").
            error = task.exception()
            self._metrics.delivery_failures.inc()
            if self.failure is None:
                self.failure = f"a delivery task failed (a bug; restart to re-send its records): {error!r}"[:300]
            log.error("delivery task failed", exc_info=error)

    async def _deliver(self, batch: Batch[Any, Item] | Call[Any, Item]) -> None:
        items = batch.items
        key = batch.key
        records = [item[EVENT] for item in items]
        try:
            if self._convert is not None:  # one destination per route; no sessions in the call
                rejected = await self._sink.deliver(key, None, records, items[0][SENT_AT])
            elif self._sinks is not None:  # (trackingId, sessionId, userId)
                rejected = await self._sinks[key[0]].deliver(key[1], key[2], records, items[0][SENT_AT])
            else:
                rejected = await self._sink.deliver(key[0], key[1], records, items[0][SENT_AT])
        finally:
            if isinstance(batch, Batch):
                self.batcher.done(batch.key)
            else:
                assert isinstance(self.batcher, CoalescingBatcher)
                self.batcher.done(batch)
            self.wakeup.set()
        self._settle(items, rejected)

    def _settle(self, items: list[Item], rejected: list[Rejection]) -> None:
        now = self._clock()
        bad = {rejection.position: rejection for rejection in rejected}
        delivered_ids = []
        owners = self.tracker.owners
        for index, item in enumerate(items):
            if index in bad:
                continue
            owner = owners.get(item[OWNER])  # `_finish` inline: this runs for every event sent
            if owner is not None:  # else revoked: its result no longer counts
                owner[1].finish(item[OFFSET])
            delivered_ids.append(item[EVENT_ID])
        duplicates = [] if self._coalescing else self.dedup.delivered(delivered_ids)
        for copy in duplicates:
            self._finish(copy)
        if duplicates:
            self._metrics.duplicates.inc(len(duplicates))
            self._route_metrics.duplicate.inc(len(duplicates))
        for index, rejection in bad.items():
            item = items[index]
            owner = owners.get(item[OWNER])
            if owner is not None:  # a revoked partition's new owner dead-letters it itself
                partition, state = owner
                error = InvalidRecord("personalize", rejection.reason, rejection.message)
                self._dead_letter(state, partition, item[OFFSET], item[KEY], item[VALUE], item[HEADERS], error)
            self._metrics.invalid.labels(rejection.reason).inc()
            self._route_metrics.invalid.inc()
            for parked in self.dedup.failed(item[EVENT_ID]):
                self._admit(parked, now)
        self.progress.set()

    # --- dead letters -------------------------------------------------------------------------

    async def run_dead_letters(self) -> None:
        """Write dead letters in order; a record is final only once the broker has acknowledged it."""
        while True:
            await self._dead_ready.wait()
            self._dead_ready.clear()
            pending, self._dead = self._dead, []
            if not pending:
                continue
            self._writing = pending
            await self._letters.write([letter for _, letter in pending])
            self._writing = []
            self._route_metrics.dead_lettered.inc(len(pending))
            for state, letter in pending:
                state.finish(letter.offset)
            self.progress.set()

    # --- rebalance and drain ------------------------------------------------------------------

    async def settle_partitions(self, partitions: Sequence[TopicPartition], timeout: float) -> bool:
        """Flush and wait until the partitions have nothing outstanding; False if the budget ran out."""
        states = [s for s in (self.tracker.get(p) for p in partitions) if s is not None]
        self.batcher.flush()
        self.wakeup.set()
        deadline = self._clock() + timeout
        try:
            while any(s.outstanding for s in states):
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                self.progress.clear()
                await self.progress.wait(min(remaining, 0.05))
            return True
        finally:
            if isinstance(self.batcher, CoalescingBatcher):
                self.batcher.unflush()  # windows apply again to what the partitions left keep sending

    def lagging(self, partitions: Collection[TopicPartition]) -> None:
        """The route's partitions paused at the commit-lag bound (see `Source._apply_backpressure`): while
        there are some, coalescing windows release what they hold, so the commit point moves again."""
        if isinstance(self.batcher, CoalescingBatcher):
            self.batcher.lagging(bool(partitions))
            if partitions:
                self.wakeup.set()

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

    async def finish_in_flight(self, timeout: float) -> bool:
        """Wait (bounded) for the calls already started; False if some are still running."""
        if self._active:
            await asyncio.wait(list(self._active), timeout=timeout)
        return not self._active

    async def cancel_in_flight(self) -> None:
        for task in list(self._active):
            task.cancel()
        await asyncio.gather(*self._active, return_exceptions=True)
