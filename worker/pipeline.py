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
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import orjson
from aiokafka.structs import TopicPartition

from worker.batching import Batch, Batcher
from worker.config import Settings
from worker.deadletter import DeadLetter
from worker.dedup import NEW, SEEN, Dedup
from worker.mapping import InvalidRecord, Mapper, SessionKey
from worker.metrics import Metrics
from worker.offsets import OffsetTracker, PartitionOffsets
from worker.sink import Rejection

log = logging.getLogger(__name__)

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


Item = tuple[int, int, SessionKey, str, float, str, bytes | None, bytes | None, Sequence[tuple[str, bytes]]]
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
        quota: Quota,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._mapper = Mapper(settings.mapping)
        self._sink = sink
        self._letters = dead_letters
        self._metrics = metrics
        self._quota = quota
        self._clock = clock
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.dedup: Dedup[Item] = Dedup(settings.dedup.window_seconds, settings.dedup.max_ids, clock)
        self.batcher: Batcher[SessionKey, Item] = Batcher(settings.batching.max_events)
        self._linger = settings.batching.linger_ms / 1000.0
        self._max_wait = MAX_WAIT_LINGERS * self._linger
        self._call_rate = 0.0
        """Calls started per second, averaged over the last ~RATE_SECONDS: how busy the quota is."""
        self._call_rate_at = clock()
        self._max_in_flight = settings.personalize.max_in_flight
        self._active: set[asyncio.Task[None]] = set()
        self._dead: list[tuple[PartitionOffsets, DeadLetter]] = []
        self._dead_ready = asyncio.Event()
        self.wakeup = Flag()
        self.progress = Flag()
        """Set whenever records become final: waiters for a drain re-check then."""

    # --- intake -------------------------------------------------------------------------------

    def ingest(self, partition: TopicPartition, records: Sequence[Record]) -> None:
        """Map one partition's fetched records; counts are per batch, never per event."""
        if not records:
            return
        state = self.tracker.assign(partition)
        serial = state.serial
        state.track(r.offset for r in records)
        mapper_map = self._mapper.map
        dumps = orjson.dumps
        now = self._clock()
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
                mapped = mapper_map(record.value)
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
        m = self._metrics
        m.records_consumed.inc(len(records))
        if filtered:
            m.filtered.inc(filtered)
        if duplicates:
            m.duplicates.inc(duplicates)
        if invalid:
            for reason, count in invalid.items():
                m.invalid.labels(reason).inc(count)
        m.buffered.set(self.batcher.buffered)
        self.wakeup.set()

    def _admit(self, item: Item, now: float) -> bool:
        """True when the item is a duplicate (finished here)."""
        verdict = self.dedup.admit(item[EVENT_ID], item)
        if verdict == NEW:
            self.batcher.add(item[SESSION], item, now)
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
                    self._active.add(task)
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
        self._active.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a delivery failure (those never raise): the records stay unfinished, so the
            # partition stops committing and the stall watchdog reports it instead of losing them.
            log.error("delivery task failed", exc_info=task.exception())

    async def _deliver(self, batch: Batch[SessionKey, Item]) -> None:
        items = batch.items
        session_id, user_id = batch.key
        try:
            rejected = await self._sink.deliver(session_id, user_id, [item[EVENT] for item in items], items[0][SENT_AT])
        finally:
            self.batcher.done(batch.key)
            self.wakeup.set()
        self._settle(items, rejected)

    def _settle(self, items: list[Item], rejected: list[Rejection]) -> None:
        now = self._clock()
        bad = dict(rejected)
        delivered_ids = []
        owners = self.tracker.owners
        for index, item in enumerate(items):
            if index in bad:
                continue
            owner = owners.get(item[OWNER])  # `_finish` inline: this runs for every event sent
            if owner is not None:  # else revoked: its result no longer counts
                owner[1].finish(item[OFFSET])
            delivered_ids.append(item[EVENT_ID])
        duplicates = self.dedup.delivered(delivered_ids)
        for copy in duplicates:
            self._finish(copy)
        if duplicates:
            self._metrics.duplicates.inc(len(duplicates))
        for index, message in bad.items():
            item = items[index]
            owner = owners.get(item[OWNER])
            if owner is not None:  # a revoked partition's new owner dead-letters it itself
                partition, state = owner
                error = InvalidRecord("personalize", "rejected", message)
                self._dead_letter(state, partition, item[OFFSET], item[KEY], item[VALUE], item[HEADERS], error)
            self._metrics.invalid.labels("rejected").inc()
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
            await self._letters.write([letter for _, letter in pending])
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
        while any(s.outstanding for s in states):
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            self.progress.clear()
            await self.progress.wait(min(remaining, 0.05))
        return True

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
