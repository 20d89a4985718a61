"""The Kafka side: the consumer, pause/resume, rebalances, and the one place that commits offsets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, OffsetMetadataTooLargeError
from aiokafka.structs import OffsetAndMetadata

from worker.config import Settings
from worker.flow.items import Record
from worker.flow.pipeline import Pipeline
from worker.kafka import commit_metadata
from worker.kafka.connection import CoordinatorNotReadyYet, kafka_security
from worker.kafka.positions import known_positions, lag, pass_gaps
from worker.kafka.room import wait_for_room
from worker.kafka.topics import RECHECK_SECONDS, WATCH_SECONDS, TopicWatch, exact_pattern, keep_watching_every_topic
from worker.observe.metrics import Metrics

if TYPE_CHECKING:
    from worker.flow.fanout import Routes
    from worker.flow.offsets import PartitionOffsets
    from worker.mapping.schemas import Schemas, TopicSchemas


log = logging.getLogger("worker.source")  # the pre-move name: log filters match it

COMMIT_TIMEOUT_SECONDS = 10.0
HELD_LOG_SECONDS = 60.0
"""A hot session is held and released many times a second while draining: say so once a minute at most."""
HELD_POLL_SECONDS = 0.05
"""With every partition held for crowded sessions, look again this often whether one is released."""
INGEST_SLICE = 200
"""Records mapped between two turns of the event loop (~4 ms of work)."""
GAP_CHECK_SECONDS = 1.0
"""How often every owned partition's commit point is moved past offsets that hold no record for us."""


def _log_failure(where: str, error: BaseException) -> None:
    log.error("worker failed", extra={"where": where, "error": repr(error)}, exc_info=error)


class Source(ConsumerRebalanceListener):  # type: ignore[misc]
    """Fetches into the pipeline and commits what it says is final; nobody else commits."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline | Routes,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        schemas: Schemas | TopicSchemas | None = None,
        topics: Sequence[str] | None = None,
    ) -> None:
        """`pipeline`: one Pipeline, or every route's (`fanout.Routes`) routed by topic; `topics`: what to
        subscribe to (default: `kafka.topics`, the single flow's)."""
        k = settings.kafka
        self._topics = list(topics if topics is not None else k.topics)
        self._settings = settings
        self._pipeline = pipeline
        self._metrics = metrics
        self._clock = clock
        self.consumer = AIOKafkaConsumer(
            group_id=k.group_id,
            group_instance_id=k.group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset=k.auto_offset_reset,
            max_poll_records=k.max_poll_records,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=min(3000, k.session_timeout_ms // 3),
            isolation_level="read_committed",
            **kafka_security(k),
        )
        keep_watching_every_topic(self.consumer._client)
        self._commit_lock = asyncio.Lock()
        self._paused: set[TopicPartition] = set()
        self.metadata_limit = k.commit_metadata_max_bytes
        """Commit metadata length in force: the setting, shortened when the broker refuses it."""
        self.assigned_once = asyncio.Event()
        self._revoking: set[TopicPartition] = set()
        """Partitions whose revocation is under way: a poll being handed over gives them no more records."""
        self._handing_over = False
        """A poll is being handed to the pipeline a slice at a time (see `fetch_once`)."""
        self._held: set[TopicPartition] = set()
        """Partitions left out of fetching for a crowded session (see `_getmany`)."""
        self._lagging: set[TopicPartition] = set()
        """Partitions paused at `worker.max_commit_lag_records` (the pipeline was told)."""
        self._held_logged = -HELD_LOG_SECONDS
        self._schemas = schemas
        self._held_poll: (
            tuple[dict[TopicPartition, list[Record]], dict[TopicPartition, PartitionOffsets | None]] | None
        ) = None
        """A poll whose schemas the registry has not given yet: every partition stays paused until it has."""
        self.topics = TopicWatch(self._topics, metrics)
        self._coordinator_filter = CoordinatorNotReadyYet(self.assigned_once)
        self._gaps_checked = -GAP_CHECK_SECONDS
        self.on_failure: Callable[[str, BaseException], None] = _log_failure
        """Told of a bug in a rebalance callback (the worker stops on it): aiokafka would only log it."""

    async def start(self) -> None:
        """Join the group. A missing source topic is waited for, never created (see worker.kafka.topics)."""
        logging.getLogger("aiokafka.consumer.group_coordinator").addFilter(self._coordinator_filter)
        self.consumer.subscribe(pattern=exact_pattern(self._topics), listener=self)
        await self.consumer.start()

    async def stop(self) -> None:
        logging.getLogger("aiokafka.consumer.group_coordinator").removeFilter(self._coordinator_filter)
        await self.consumer.stop()

    async def watch_topics(self) -> None:
        """Re-check the source topics, often while one is missing: the forced metadata refresh is also what
        lets the pattern subscription take a new topic now rather than at aiokafka's next refresh (5 min)."""
        client = self.consumer._client  # aiokafka has no public call that refreshes the consumer's metadata
        while True:
            if self.topics.missing:
                await asyncio.sleep(RECHECK_SECONDS)
                await client.force_metadata_update()
            else:
                await asyncio.sleep(WATCH_SECONDS)
            self.topics.update(client.cluster.topics())

    # --- rebalance listener (aiokafka awaits these during a rebalance) -------------------------

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        """Flush the partitions' work within a budget, commit, then forget them."""
        if not revoked:
            return
        self._revoking.update(revoked)
        try:
            await self._hand_over(revoked)
        except Exception as error:  # a bug: aiokafka would log it and go on with the partitions still tracked
            self.on_failure("rebalance", error)
            self._pipeline.forget(list(revoked))  # so no later commit or gauge touches them
            for tp in revoked:
                self._metrics.forget_partition(tp.topic, tp.partition)
        finally:
            self._revoking.difference_update(revoked)

    async def _hand_over(self, revoked: Sequence[TopicPartition]) -> None:
        budget = self._settings.worker.rebalance_timeout_seconds
        grace = min(budget / 2, self._settings.personalize.request_timeout_seconds)
        settled = await self._pipeline.settle_partitions(list(revoked), budget - grace)
        if not settled:
            # Out of time to send it all: keep the unsent for the new owner, but let the calls in flight
            # finish and count, or the new owner would send their events a second time.
            self._pipeline.drop_unsent(list(revoked))
            finished = await self._pipeline.finish_in_flight(grace)
            log.warning(
                "revoked partitions still had unsent records; they will be re-read by the new owner",
                extra={"partitions": len(revoked), "calls_finished": finished},
            )
        await self.commit()
        self._pipeline.forget(list(revoked))
        for tp in revoked:
            self._metrics.forget_partition(tp.topic, tp.partition)
        self._metrics.assigned.set(len(self.consumer.assignment()) - len(revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        try:
            await self._take_over(assigned)
        except Exception as error:  # a bug: aiokafka would log it and go on
            self.on_failure("rebalance", error)

    async def _take_over(self, assigned: Sequence[TopicPartition]) -> None:
        ahead = await commit_metadata.committed_ahead(
            self.consumer, assigned, self._settings.worker.max_commit_lag_records
        )
        now = self._clock()
        for tp in assigned:
            state = self._pipeline.tracker.assign(tp, now)
            state.skip = ahead.get(tp, set())
        self._metrics.assigned.set(len(assigned))
        self.assigned_once.set()
        log.info(
            "partitions assigned",
            extra={"partitions": sorted(f"{tp.topic}-{tp.partition}" for tp in assigned)},
        )

    # --- fetching -------------------------------------------------------------------------------

    async def fetch_once(self, timeout_ms: int = 200) -> int:
        """One getmany into the pipeline, honouring backpressure; returns the records fetched.

        The records are handed over a slice at a time with the loop let go in between: a poll of 2,000
        mapped in one go held the loop ~40 ms, and calls that wait that long miss the quota's slots.
        """
        if self._held_poll is None and self._pipeline.outstanding >= self._settings.batching.max_buffered_events:
            await self._wait_for_room()
        self._apply_backpressure()
        tracker = self._pipeline.tracker
        if self._held_poll is not None:
            batches, owned = self._held_poll
            # Everything is paused: this poll only keeps the group membership alive (max.poll.interval.ms).
            # A partition assigned meanwhile starts unpaused; its records join the held poll.
            for tp, records in (await self.consumer.getmany(timeout_ms=0)).items():
                batches[tp], owned[tp] = records, tracker.get(tp)
        else:
            # Never fetch past the cap: a full poll on top of a nearly full buffer would overshoot it by a poll.
            room = self._settings.batching.max_buffered_events - self._pipeline.outstanding
            limit = max(1, min(self._settings.kafka.max_poll_records, room))
            batches = await self._getmany(timeout_ms, limit)
            # Ownership as it was when these records were fetched: a partition being revoked, or revoked (and
            # perhaps assigned again, to a new state) while the loop was let go takes no more of them; its
            # next owner reads them.
            owned = {tp: tracker.get(tp) for tp in batches}
        # Read with the poll, before the loop is let go: positions past exactly what this poll returned.
        now = self._clock()
        positions = None
        if now - self._gaps_checked >= GAP_CHECK_SECONDS:
            positions, self._gaps_checked = known_positions(self.consumer, tracker), now
        if self._schemas is not None and batches:
            # Held (not mapped, not tracked) until its schemas are in hand: `drained` must not take the
            # consumer's position for done meanwhile, and nothing commits past it.
            self._held_poll = (batches, owned)
            if not await self._schemas.resolve(batches, timeout_ms / 1000):
                self._apply_backpressure()
                return 0
        self._held_poll = None
        count = 0
        self._handing_over = True  # the position is past records the pipeline has not seen yet
        try:
            for tp, records in batches.items():
                for start in range(0, len(records), INGEST_SLICE):
                    if count:
                        await asyncio.sleep(0)
                    state = owned[tp]
                    if state is None or tracker.get(tp) is not state or tp in self._revoking:
                        positions = None if positions is None else {p: v for p, v in positions.items() if p != tp}
                        break
                    chunk = records[start : start + INGEST_SLICE]
                    self._pipeline.ingest(tp, chunk)
                    count += len(chunk)
        finally:
            self._handing_over = False
        if positions is not None:
            pass_gaps(positions, tracker, self._revoking)
        if count:
            self._metrics.last_fetch.set(time.time())
        return count

    async def _wait_for_room(self) -> None:
        """A full buffer: wait for room unpolled, not paused (see `worker.kafka.room`); the gauges count the
        partitions as paused meanwhile. Still full after the wait, `_apply_backpressure` pauses them."""
        self._show_paused(len(self.consumer.assignment()))
        try:
            await wait_for_room(self._pipeline, self._settings.batching.max_buffered_events, self._settings.kafka)
        finally:
            self._show_paused(len(self._paused))

    def _show_paused(self, partitions: int) -> None:
        self._metrics.paused.set(int(partitions > 0))
        self._metrics.paused_partitions.set(partitions)

    def _apply_backpressure(self) -> None:
        """Pause every partition while the buffer is full, and each partition whose commit point lags its
        highest fetched offset by `worker.max_commit_lag_records`: one record that never finishes must
        not let the rest of its partition grow the finalizer's state without bound."""
        assignment = self.consumer.assignment()
        if self._held_poll is not None or self._pipeline.outstanding >= self._settings.batching.max_buffered_events:
            wanted = set(assignment)
        else:
            bound = self._settings.worker.max_commit_lag_records
            tracker = self._pipeline.tracker
            wanted = set()
            for tp in assignment:
                state = tracker.get(tp)
                if state is not None and state.commit_lag >= bound:
                    wanted.add(tp)
            if wanted != self._lagging:
                # Coalescing windows stop holding while their partition waits on the commit point.
                self._lagging = wanted
                self._pipeline.lagging(wanted)
        # Newly assigned partitions start unpaused, so pausing is re-applied, never assumed.
        if wanted:
            self.consumer.pause(*wanted)
        resume = self._paused - wanted
        if resume:
            self.consumer.resume(*(tp for tp in resume if tp in assignment))
        if wanted != self._paused:
            self._paused = wanted
            self._show_paused(len(wanted))

    async def _getmany(self, timeout_ms: int, limit: int) -> dict[TopicPartition, list[Any]]:
        """getmany, leaving alone the partitions that feed a session over `batching.max_session_events`
        until it is back under half of it, while the others keep flowing.

        Not a pause: pausing drops the partition's prefetched records, and once resumed its next fetch
        queues behind every other partition's (aiokafka hands fetched partitions out in arrival order),
        so at a full buffer a hot session ran dry for seconds. Left out of getmany, its prefetched
        records wait in place (one fetch, `max_partition_fetch_bytes`, at most) and go first when wanted."""
        crowded = self._pipeline.crowded_partitions()
        if crowded or self._held:
            self._hold(crowded)
        if not crowded:
            return await self.consumer.getmany(timeout_ms=timeout_ms, max_records=limit)  # type: ignore[no-any-return]
        wanted = self.consumer.assignment() - crowded
        if not wanted:
            await asyncio.sleep(HELD_POLL_SECONDS)  # getmany() without partitions would take them all
            return {}
        return await self.consumer.getmany(*wanted, timeout_ms=timeout_ms, max_records=limit)  # type: ignore[no-any-return]

    def _hold(self, crowded: set[TopicPartition]) -> None:
        """Metrics, and one log line when holding starts (once a minute at most: it flaps while draining)."""
        now = self._clock()
        if crowded and not self._held and now - self._held_logged >= HELD_LOG_SECONDS:
            self._held_logged = now
            log.warning(
                "a session holds more than batching.max_session_events; holding its partitions until it catches up",
                extra={
                    "partitions": sorted(f"{tp.topic}-{tp.partition}" for tp in crowded),
                    "sessions": self._pipeline.sessions_crowded,
                },
            )
        self._held = crowded
        self._metrics.partitions_held.set(len(crowded))
        self._metrics.sessions_crowded.set(self._pipeline.sessions_crowded)

    # --- committing -----------------------------------------------------------------------------

    async def commit(self) -> None:
        """Commit each owned partition's contiguous prefix of final records.

        The pipeline finishes a record only after its event was delivered, dropped as a duplicate or
        filtered, or after the dead-letter topic acknowledged it; so committing the tracker's offsets
        here never skips an unfinished record, and late results of revoked partitions are not in it.
        """
        async with self._commit_lock:
            tracker = self._pipeline.tracker
            offsets = tracker.to_commit()
            if not offsets:
                return
            while True:
                try:
                    # aiokafka retries a commit until the broker answers; bounded here so the commit loop
                    # (and the stall watchdog that runs in it) keeps going through a broker outage.
                    async with asyncio.timeout(COMMIT_TIMEOUT_SECONDS):
                        await self.consumer.commit(
                            {
                                tp: OffsetAndMetadata(offset, tracker.ahead_metadata(tp, self.metadata_limit))
                                for tp, offset in offsets.items()
                            }
                        )
                except OffsetMetadataTooLargeError:
                    if not self._shorten_metadata():
                        return
                    continue
                except (KafkaError, TimeoutError) as error:
                    log.warning("offset commit failed; retrying at the next interval", extra={"error": repr(error)})
                    return
                break
            if tracker.mark_committed(offsets, self._clock()):
                self._metrics.last_commit.set(time.time())
            for tp, offset in offsets.items():
                self._metrics.committed.labels(tp.topic, str(tp.partition)).set(offset)

    def _shorten_metadata(self) -> bool:
        """The broker refused the metadata as too large: commit with less (see `commit_metadata.shorter`)."""
        shorter = commit_metadata.shorter(self.metadata_limit)
        if shorter is None:
            return False
        self.metadata_limit = shorter
        self._metrics.commit_metadata_limit.set(shorter)
        return True

    def lag(self) -> dict[TopicPartition, int]:
        return lag(self.consumer, self._pipeline.tracker, self._metrics)

    @property
    def handing_over(self) -> bool:
        return self._handing_over

    async def drained(self) -> bool:
        """Every assigned partition read to its end and committed: the exit condition of `--until-drained`."""
        assignment = self.consumer.assignment()
        if not assignment or self._pipeline.outstanding:
            return False
        # The ends (LSOs) from the latest fetch answers: asking queues behind the long-polling fetch (0.25-0.5 s).
        ends = {tp: self.consumer.last_stable_offset(tp) for tp in assignment}
        if any(end is None or end < 0 for end in ends.values()):  # not fetched yet, or -1: the broker did not say
            ends = await self.consumer.end_offsets(list(assignment))
        positions = {tp: await self.consumer.position(tp) for tp in assignment}
        # Re-checked after the awaits: the consumer's position runs ahead of a poll still being handed
        # over (or held for its schemas), and advancing to it then would commit past records the pipeline
        # has not seen.
        if self._handing_over or self._held_poll is not None or self._pipeline.outstanding:
            return False
        states = {tp: self._pipeline.tracker.get(tp) for tp in assignment}
        for tp, state in states.items():
            if state is None or positions[tp] < ends[tp]:
                return False
        for tp, state in states.items():
            if state is not None:
                state.advance(positions[tp])
        await self.commit()
        return not self._pipeline.tracker.to_commit()
