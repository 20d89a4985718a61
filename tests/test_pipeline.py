"""The pipeline and the committer with a fake sink, fake dead letters and a fake consumer.

The case that needs this level: a partition revoked while its batch is in flight, whose call completes
after the hand-off. Its late result must never be committed (the tracker's `retired` state), because
the new owner may already have committed further.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from worker.config import Settings
from worker.flow.items import DeadLetter, Flag
from worker.flow.pipeline import Pipeline
from worker.kafka.source import Source
from worker.observe.metrics import Metrics
from worker.personalize.ratelimit import RateLimiter
from worker.personalize.retry import Rejection


@dataclass(frozen=True)
class FakeRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


class GatedSink:
    """Holds every call until released, as a slow PutEvents would."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sessions: list[str] = []

    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        self.sessions.append(session_id)
        await self.release.wait()
        return []


@dataclass
class Letters:
    written: list[DeadLetter] = field(default_factory=list)

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        self.written.extend(letters)


@dataclass
class FakeConsumer:
    owned: set[TopicPartition]
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})


def records(partition: int, count: int) -> list[FakeRecord]:
    return [
        FakeRecord(
            "t",
            partition,
            offset,
            b"k",
            orjson.dumps(
                {
                    "session_id": f"s{partition}",
                    "event_type": "click",
                    "timestamp": 1_790_000_000 + offset,
                    "event_id": f"e-{partition}-{offset}",
                }
            ),
        )
        for offset in range(count)
    ]


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_late_result_of_a_revoked_partition_is_never_committed() -> None:
    settings = Settings.model_validate(
        {
            "personalize": {"tracking_id": "t"},
            "batching": {"linger_ms": 0},
            "worker": {"rebalance_timeout_seconds": 0.2},
        }
    )
    sink = GatedSink()
    metrics = Metrics()
    pipeline = Pipeline(settings, sink, Letters(), metrics, quota=RateLimiter(1000))
    source = Source(settings, pipeline, metrics)
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    consumer = FakeConsumer({tp0, tp1})
    await source.consumer.stop()  # never started: closed only so it warns of nothing
    source.consumer = consumer
    await source.on_partitions_assigned([tp0, tp1])
    pipeline.ingest(tp0, records(0, 3))
    pipeline.ingest(tp1, records(1, 3))
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    try:
        await wait_for(lambda: len(sink.sessions) == 2)  # both partitions' batches are in flight

        await source.on_partitions_revoked([tp0])  # the budget runs out while tp0's call is in flight
        consumer.owned.discard(tp0)
        assert pipeline.tracker.get(tp0) is None
        assert all(commit.get(tp0, 0) == 0 for commit in consumer.commits), "nothing of tp0 was final yet"

        sink.release.set()  # the late result arrives after the hand-off
        await wait_for(lambda: pipeline.outstanding == 0)
        await source.commit()
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)

    assert consumer.commits[-1] == {tp1: 3}, "the owned partition commits its delivered records"
    assert all(commit.get(tp0, 0) == 0 for commit in consumer.commits), "the revoked partition's late result"
    assert pipeline.tracker.to_commit() == {}
    assert len(pipeline.dedup) == 6, "the late delivery still counts for dedup"


class SelectiveSink:
    """Delivers at once, except the sessions it holds (a call that never returns before the crash)."""

    def __init__(self, held: set[str]) -> None:
        self.held = held
        self.delivered: list[str] = []

    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        if session_id in self.held:
            await asyncio.Event().wait()
        self.delivered.extend(orjson.loads(event)["eventId"] for event in events)
        return []


@dataclass
class Coordinator:
    committed: dict[TopicPartition, OffsetAndMetadata]

    async def fetch_committed_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, Any]:
        return {tp: self.committed.get(tp) for tp in partitions}


@dataclass
class RememberingConsumer(FakeConsumer):
    metadata: dict[TopicPartition, OffsetAndMetadata] = field(default_factory=dict)

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        await super().commit(offsets)
        self.metadata.update(offsets)


def session_records(sessions: list[str]) -> list[FakeRecord]:
    return [
        FakeRecord(
            "t",
            0,
            offset,
            b"k",
            orjson.dumps(
                {"session_id": s, "event_type": "click", "timestamp": 1_790_000_000, "event_id": f"e{offset}"}
            ),
        )
        for offset, s in enumerate(sessions)
    ]


async def start(sink: Any, consumer: Any) -> tuple[Pipeline, Source, asyncio.Task[None]]:
    settings = Settings.model_validate({"personalize": {"tracking_id": "t"}, "batching": {"linger_ms": 0}})
    metrics = Metrics()
    pipeline = Pipeline(settings, sink, Letters(), metrics, quota=RateLimiter(1000))
    source = Source(settings, pipeline, metrics)
    await source.consumer.stop()  # never started: closed only so it warns of nothing
    source.consumer = consumer
    return pipeline, source, asyncio.create_task(pipeline.run_dispatcher())


async def test_the_next_owner_skips_what_the_previous_one_delivered_beyond_its_commit() -> None:
    tp = TopicPartition("t", 0)
    stream = session_records(["slow", "fast", "fast", "other", "slow", "other"])
    first = RememberingConsumer({tp})
    pipeline, source, dispatcher = await start(SelectiveSink(held={"slow"}), first)
    try:
        await source.on_partitions_assigned([tp])
        pipeline.ingest(tp, stream)
        await wait_for(lambda: pipeline.outstanding == 2)  # offsets 0 and 4 are held
        await source.commit()
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
    assert first.commits[-1] == {tp: 0}, "offset 0 is unfinished: the commit point cannot pass it"

    # The worker dies. The next owner reads the commit, and its metadata.
    second = FakeConsumer({tp})
    second._coordinator = Coordinator(first.metadata)  # type: ignore[attr-defined]
    sink = SelectiveSink(held=set())
    pipeline, source, dispatcher = await start(sink, second)
    try:
        await source.on_partitions_assigned([tp])
        pipeline.ingest(tp, stream)
        await wait_for(lambda: pipeline.outstanding == 0)
        await source.commit()
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
    assert sorted(sink.delivered) == ["e0", "e4"], "only what the first owner never delivered"
    assert second.commits[-1] == {tp: 6}


class FixedQuota:
    rate = 1000.0

    def available(self) -> tuple[int, float]:
        return 1000, 0.0


def test_linger_grows_as_the_call_rate_nears_the_quota_and_falls_back() -> None:
    """Far below the quota a partial batch goes at once; near it, it waits up to linger_ms to fill."""
    now = [100.0]
    settings = Settings.model_validate({"personalize": {"tracking_id": "t"}, "batching": {"linger_ms": 400}})
    pipeline = Pipeline(settings, GatedSink(), Letters(), Metrics(), quota=FixedQuota(), clock=lambda: now[0])

    def run_at(calls_per_second: int, seconds: float) -> float:
        for _ in range(int(seconds * 100)):
            now[0] += 0.01
            pipeline._count_calls(now[0], calls_per_second // 100)
        return pipeline.linger(now[0])

    assert pipeline.linger(now[0]) == 0.0, "idle: nothing to wait for"
    assert run_at(300, 5) == 0.0, "30 % of the quota: at once"
    assert run_at(900, 5) == pytest.approx(0.4), "90 %: the whole linger"
    assert 0.1 < run_at(650, 5) < 0.3, "65 %: in between"
    now[0] += 2.0
    assert pipeline.linger(now[0]) == 0.0, "the rate decays when calls stop"


async def test_buffered_items_leave_the_garbage_collector() -> None:
    """Tens of thousands of buffered items must cost the full collections nothing (see pipeline.Item):
    once collected, an item holding a dict, a record or any other object the collector must keep
    tracking would stay in its lists."""
    settings = Settings.model_validate({"personalize": {"tracking_id": "t"}})
    pipeline = Pipeline(settings, GatedSink(), Letters(), Metrics(), quota=RateLimiter(1000))
    tp = TopicPartition("t", 0)
    stream = [
        FakeRecord("t", 0, n, b"k", value, (("trace", b"x"),))
        for n, value in enumerate(
            orjson.dumps(
                {
                    "session_id": "s",
                    "user_id": "u",
                    "event_type": "click",
                    "timestamp": 1_790_000_000,
                    "event_id": f"e{n}",
                    "item_id": "i",
                    "properties": {"page_category": "shoes"},
                }
            )
            for n in range(5)
        )
    ]
    pipeline.ingest(tp, stream)
    # A tuple is untracked at a collection that finds what it holds untracked already; the collector's
    # order of visits may leave that to the next one.
    gc.collect()
    gc.collect()
    items = [item for batch in pipeline.batcher.take(1e9, 0.0, 10) for item in batch.items]
    assert len(items) == 5
    assert not any(gc.is_tracked(item) for item in items)


class SlicedConsumer(FakeConsumer):
    """getmany hands out one poll; while the fetch lets the loop go, the partition is reassigned."""

    def __init__(self, owned: set[TopicPartition], poll: dict[TopicPartition, list[FakeRecord]]) -> None:
        super().__init__(owned)
        self.poll = poll

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[FakeRecord]]:
        poll, self.poll = self.poll, {}
        return poll

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    def last_stable_offset(self, partition: TopicPartition) -> int | None:
        return None  # no fetch answer seen: the end is asked for

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, 1000)

    async def position(self, partition: TopicPartition) -> int:
        return 1000  # past the whole poll as soon as getmany returned it


async def test_a_partition_reassigned_while_a_poll_is_handed_over_takes_no_more_of_it() -> None:
    """The poll is ingested in slices with the loop let go between them: records fetched under the old
    assignment must not enter the new one (its position restarts from the commit: they come again)."""
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    consumer = SlicedConsumer({tp0, tp1}, {tp0: records(0, 1000), tp1: records(1, 1000)})
    pipeline, source, dispatcher = await start(GatedSink(), consumer)
    dispatcher.cancel()
    await asyncio.gather(dispatcher, return_exceptions=True)
    await source.on_partitions_assigned([tp0, tp1])
    first = pipeline.tracker.get(tp0)

    async def reassign_tp0() -> None:
        await asyncio.sleep(0)  # runs while the first slice is handed over
        pipeline.forget([tp0])
        pipeline.tracker.assign(tp0)

    reassigning = asyncio.create_task(reassign_tp0())
    fetched = await source.fetch_once()
    await reassigning
    second = pipeline.tracker.get(tp0)
    assert second is not None and second is not first
    assert second.outstanding == 0, "nothing fetched under the old assignment enters the new one"
    assert pipeline.tracker.get(tp1).outstanding == 1000  # type: ignore[union-attr]
    assert fetched < 2000


async def test_flag_wakes_its_waiters_times_out_and_never_swallows_a_cancellation() -> None:
    flag = Flag()
    loop = asyncio.get_running_loop()
    waiters = [asyncio.create_task(flag.wait(10.0)) for _ in range(2)]
    await asyncio.sleep(0)
    flag.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
    await flag.wait(10.0)  # still set: returns at once
    flag.clear()
    began = loop.time()
    await flag.wait(0.05)
    assert loop.time() - began >= 0.04, "unset, it waits out its timeout"
    waiting = asyncio.create_task(flag.wait(10.0))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not flag._waiters, "a cancelled wait leaves nothing behind"


async def test_drained_is_never_concluded_while_a_poll_is_being_handed_over() -> None:
    """The first slice finishes at once (a previous owner delivered it); the consumer's position is
    already past the whole poll. Concluding "drained" then would commit past 800 unseen records."""
    tp = TopicPartition("t", 0)
    consumer = SlicedConsumer({tp}, {tp: records(0, 1000)})
    pipeline, source, dispatcher = await start(GatedSink(), consumer)
    dispatcher.cancel()
    await asyncio.gather(dispatcher, return_exceptions=True)
    await source.on_partitions_assigned([tp])
    state = pipeline.tracker.get(tp)
    assert state is not None
    state.skip = set(range(200))
    checking = asyncio.create_task(source.drained())  # runs at the first turn the hand-over gives up
    assert await source.fetch_once() == 1000
    assert not await checking
    assert all(commit.get(tp, 0) <= 200 for commit in consumer.commits), consumer.commits
    assert pipeline.outstanding == 800


async def test_a_partition_being_revoked_takes_no_more_of_a_poll() -> None:
    """Records handed over after its revocation began would be sent by the old owner while the new
    one reads them again: quota paid twice. They are left to the new owner."""
    tp = TopicPartition("t", 0)
    consumer = SlicedConsumer({tp}, {tp: records(0, 1000)})
    sink = SelectiveSink(held=set())
    _, source, dispatcher = await start(sink, consumer)
    try:
        await source.on_partitions_assigned([tp])
        revoking = asyncio.create_task(source.on_partitions_revoked([tp]))
        fetched = await source.fetch_once()
        await revoking
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
    assert fetched == 200, "only the slice handed over before the revocation began"
    assert len(sink.delivered) == 200
    assert consumer.commits[-1] == {tp: 200}


class RejectingSink:
    """Refuses the second event of every call with the reason it is given."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        return [Rejection(1, self.reason, "failed alone 10 times ...; last error: InternalFailure: boom")]


@pytest.mark.parametrize("reason", ["retries_exhausted", "rejected", "too_large"])
async def test_a_rejection_becomes_a_dead_letter_with_its_reason_then_a_commit(reason: str) -> None:
    settings = Settings.model_validate({"personalize": {"tracking_id": "t"}, "batching": {"linger_ms": 0}})
    metrics, letters = Metrics(), Letters()
    pipeline = Pipeline(settings, RejectingSink(reason), letters, metrics, quota=RateLimiter(1000))
    tp = TopicPartition("t", 0)
    pipeline.ingest(tp, records(0, 3))
    tasks = [asyncio.create_task(pipeline.run_dispatcher()), asyncio.create_task(pipeline.run_dead_letters())]
    try:
        await wait_for(lambda: pipeline.outstanding == 0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert [(x.offset, x.stage, x.reason) for x in letters.written] == [(1, "personalize", reason)]
    assert "InternalFailure" in letters.written[0].message
    assert metrics.registry.get_sample_value("personalize_worker_records_invalid_total", {"reason": reason}) == 1
    assert pipeline.tracker.to_commit() == {tp: 3}


class CountingQuota:
    """A real limiter whose `available` calls are counted: one per dispatcher wake-up."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.looks = 0

    @property
    def rate(self) -> float:
        return self.limiter.rate

    def available(self) -> tuple[int, float]:
        self.looks += 1
        return self.limiter.available()


class PacedSink:
    """Takes the limiter's slot as the real sink does, then answers after a PutEvents-like round trip."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.calls = 0

    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        await self.limiter.acquire()
        self.calls += 1
        await asyncio.sleep(0.02)
        return []


async def test_at_the_quota_the_dispatcher_wakes_per_tick_not_per_call_and_keeps_the_rate() -> None:
    """A backlog held back by the quota alone: new records and finished calls cannot start a call sooner,
    so the dispatcher sleeps until the quota frees a few. It woke ~1.4 times per call before; the rate
    must stay the quota's (never above it beyond the limiter's burst, not far below it)."""
    settings = Settings.model_validate({"personalize": {"tracking_id": "t"}})
    limiter = RateLimiter(500)
    quota = CountingQuota(limiter)
    sink = PacedSink(limiter)
    pipeline = Pipeline(settings, sink, Letters(), Metrics(), quota=quota)
    tp = TopicPartition("t", 0)
    await Source(settings, pipeline, Metrics()).consumer.stop()
    pipeline.tracker.assign(tp, 0.0)
    values = ({"session_id": f"s{n % 400}", "event_type": "e", "timestamp": 1e9 + n} for n in range(40_000))
    backlog = [FakeRecord("t", 0, n, None, orjson.dumps(value)) for n, value in enumerate(values)]
    for start in range(0, len(backlog), 500):
        pipeline.ingest(tp, backlog[start : start + 500])
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    try:
        await asyncio.sleep(0.3)  # past the limiter's initial burst
        loop = asyncio.get_running_loop()
        calls, looks, began = sink.calls, quota.looks, loop.time()
        await asyncio.sleep(1.5)
        calls, looks, elapsed = sink.calls - calls, quota.looks - looks, loop.time() - began
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
        await pipeline.cancel_in_flight()
    assert looks < 0.5 * calls, (looks, calls)
    assert 0.8 * 500 * elapsed <= calls <= 500 * (elapsed + RateLimiter.BURST_SECONDS) + 1, (calls, elapsed)
