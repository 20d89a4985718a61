"""Delivery: batches → calls → final states, and the route's `Pipeline` (its intake and its delivery).

Every record ends in exactly one final state — sent, duplicate, filtered, superseded or dead-lettered — and
only then is its offset finished. The flow knows neither Kafka clients nor aioboto3: it is handed the fetched
records, a sink per destination and a dead-letter writer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from aiokafka.structs import TopicPartition

from worker.config import Settings
from worker.flow.batching import Batch, Batcher
from worker.flow.coalescing import CoalescingBatcher
from worker.flow.convert import record_converter
from worker.flow.destinations import DestinationBatcher
from worker.flow.intake import AnyBatcher, Intake
from worker.flow.items import EVENT, EVENT_ID, HEADERS, KEY, OFFSET, OWNER, SENT_AT, VALUE, Item, LetterWriter
from worker.flow.offsets import OffsetTracker
from worker.flow.routes import Quotas, Route, resolve
from worker.mapping.mapper import InvalidRecord
from worker.observe.metrics import Metrics
from worker.personalize.operations.coalesce import Call
from worker.personalize.retry import Rejection

if TYPE_CHECKING:
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
QUOTA_TICK = 0.005
"""Shortest sleep of a dispatcher held by the quota alone: at 1,000 calls/s it starts ~5 calls per wake."""
MAX_QUOTA_SLEEP = 0.1
"""Longest such sleep (a 10 calls/s quota's spacing): nothing but a bug in the quota can hold it longer."""


class Delivery(Protocol):
    async def deliver(
        self, session_id: str, user_id: str | None, events: list[str], sent_at: float
    ) -> list[Rejection]: ...


class Quota(Protocol):
    """The sink's rate limit, as the dispatcher sees it (`ratelimit.RateLimiter`)."""

    @property
    def rate(self) -> float:
        """Calls per second allowed now."""
        ...

    def available(self) -> tuple[int, float]:
        """(calls that could start now, seconds until the next one could)."""
        ...


def session_of(key: Any) -> str:
    """The first argument a batch's call gives `Delivery.deliver` (see `Pipeline._deliver`): the session of
    (sessionId, userId) or (trackingId, sessionId, userId), or an items/users/actions route's destination.
    The sink marks a call being retried by it, which is how the watchdog tells a retried batch."""
    return key if isinstance(key, str) else key[1] if len(key) == 3 else key[0]


class Pipeline(Intake):
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
        route = route or resolve(settings)[0]
        batcher: AnyBatcher = (
            CoalescingBatcher(route.max_records, route.coalesce_window_seconds)
            if route.spec.coalesced
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
            batcher = self._quota = per_tracker
            self._max_in_flight = route.max_in_flight * len(quota.limiters)
        else:
            self._quota = quota
        self._one_quota = not isinstance(quota, Quotas)
        """One limiter: when it holds the next call back, nothing else can start one sooner. (With a quota
        per tracker, another tracker's new records may.)"""
        super().__init__(route, record_converter(route, schemas), batcher, metrics, clock, tracker)
        self._sink = sink
        self._sinks = sinks
        self._letters = dead_letters
        self._linger = route.linger_ms / 1000.0
        self._max_wait = MAX_WAIT_LINGERS * self._linger
        self._call_rate = 0.0
        """Calls started per second, averaged over the last ~RATE_SECONDS: how busy the quota is."""
        self._call_rate_at = clock()
        self._active: dict[asyncio.Task[None], Batch[Any, Item] | Call[Any, Item]] = {}
        """Calls under way and their batches (where an unfinished record may be)."""
        self.failure: str | None = None
        """The first delivery task that failed with a bug: its records stay unfinished (see `where`)."""

    def where(self, wanted: dict[int, int], retrying: Callable[[Any], bool], deep: bool = True) -> dict[int, str]:
        """Where each wanted record (partition serial → offset) waits (see `metrics.WAITING_ON`).

        Run by the watchdog for records unfinished for a while only: the hot path keeps no per-record state
        for it. A pass over everything held, stopped once each wanted record is placed; without `deep`, only
        the dead letters and the calls are looked at: the parked copies and the batches are the bulk (at a
        full buffer of 50,000 events a pass over them took ~15 ms, see `health.RELOCATE_SECONDS`)."""
        found: dict[int, str] = {}

        def look(items: Iterable[Item], place: str) -> bool:
            """True once every wanted record is placed; the first place found wins (the order below)."""
            for item in items:
                if wanted.get(item[OWNER]) == item[OFFSET] and item[OWNER] not in found:
                    found[item[OWNER]] = place
                    if len(found) == len(wanted):
                        return True
            return False

        for state, letter in (*self._writing, *self._dead):
            if wanted.get(state.serial) == letter.offset:
                found.setdefault(state.serial, "dead_letter")
        if len(found) == len(wanted):
            return found
        for batch in self._active.values():
            if look(batch.items, "retry" if retrying(batch) else "call"):
                return found
        if deep and not look(self.dedup.parked(), "parked"):
            look(self.batcher.items(), "batch")
        return found

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
            quota_bound = False
            if len(self._active) < self._max_in_flight:
                oldest = self.batcher.oldest_open()
                due = self.batcher.has_full() or (oldest is not None and oldest + linger <= now)
                if due and calls <= started:
                    # Only the quota holds the next call back: wake a tick after it frees the next one, to
                    # start a tick's worth at once (within the limiter's burst), not one call per wake.
                    timeout = wait + QUOTA_TICK
                    quota_bound = self._one_quota
                elif oldest is not None:
                    # Linger shrinks as the call rate falls: re-check at least every 50 ms.
                    timeout = min(0.05, max(0.001, oldest + linger - now))
            self.wakeup.clear()
            if quota_bound:
                # New records and finished calls cannot start a call before the quota frees one: waking
                # for each of them cost ~1.4 loops per call at the quota.
                # Bounded all the same: it relies on the limiter never moving its next slot earlier.
                await asyncio.sleep(min(timeout, MAX_QUOTA_SLEEP))
            else:
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
            if not self._events:  # one destination per route; no sessions in the call
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
        owners = self.tracker.owners
        sent = [item for index, item in enumerate(items) if index not in bad] if bad else items
        # `_finish` inline, its lookups bound once per call: this runs for every event sent.
        serial: int | None = None
        state = None
        for item in sent:
            if item[OWNER] != serial:  # a call's events are one session's: nearly always one partition's
                serial = item[OWNER]
                owner = owners.get(serial)
                state = owner[1] if owner is not None else None  # None: revoked, its result no longer counts
            if state is not None:
                state.finish(item[OFFSET])
        delivered_ids = [item[EVENT_ID] for item in sent]
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

    async def finish_in_flight(self, timeout: float) -> bool:
        """Wait (bounded) for the calls already started; False if some are still running."""
        if self._active:
            await asyncio.wait(list(self._active), timeout=timeout)
        return not self._active

    async def cancel_in_flight(self) -> None:
        for task in list(self._active):
            task.cancel()
        await asyncio.gather(*self._active, return_exceptions=True)
