"""A hot session (a bot reusing one sessionId): several full calls in flight, oldest batches first, and a
per-session bound that stops fetching only the partitions feeding it.

The batcher with an explicit clock; the pipeline and the source with a fake sink and consumer; then the
CLI against the real broker and the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from tests.kafka_support import TopicFactory, end_offsets
from tests.stack import EmulatorProcess, WorkerFactory
from tests.test_chaos import RssWatch, figures, log_lines, received, valid_ids
from tests.test_e2e import load
from worker.commands.sample import HOT_SESSION_ID, generate
from worker.config import Settings
from worker.flow.batching import Batch, Batcher
from worker.flow.pipeline import Pipeline
from worker.kafka.source import Source
from worker.observe.metrics import Metrics
from worker.personalize.ratelimit import RateLimiter
from worker.personalize.retry import Rejection

LINGER = 0.5
MANY = 1000


def items(batches: list[Batch[str, str]]) -> list[list[str]]:
    return [batch.items for batch in batches]


def fill(batcher: Batcher[str, str], key: str, count: int, now: float = 0.0, start: int = 0) -> None:
    for n in range(start, start + count):
        batcher.add(key, f"{key}{n}", now)


# --- the batcher --------------------------------------------------------------------------------


def test_a_busy_session_runs_up_to_max_calls_full_calls_at_once() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=2, max_calls=3)
    fill(batcher, "hot", 9)
    taken = batcher.take(now=0.0, linger=LINGER, limit=MANY)
    assert items(taken) == [["hot0", "hot1"], ["hot2", "hot3"], ["hot4", "hot5"]], "three calls, in order"
    assert batcher.take(now=0.0, linger=LINGER, limit=MANY) == [], "the fourth full batch waits for a call"
    batcher.done("hot")  # any of the three: calls of one session may finish in any order
    assert items(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == [["hot6", "hot7"]]
    assert batcher.buffered == 1, "hot8 keeps filling while the session has calls out"
    assert batcher.take(now=10.0, linger=LINGER, limit=MANY) == []
    batcher.done("hot")
    batcher.done("hot")
    assert batcher.take(now=10.0, linger=LINGER, limit=MANY) == [], "a partial batch waits for every call"
    batcher.done("hot")
    assert items(batcher.take(now=10.0, linger=LINGER, limit=MANY)) == [["hot8"]], "then lingers as usual"


def test_a_quiet_session_still_sends_one_call_at_a_time() -> None:
    """Extra calls are for full batches only: a trickle fills its next call while one is out."""
    batcher: Batcher[str, str] = Batcher(max_events=10, max_calls=4)
    batcher.add("s", "a", now=0.0)
    assert items(batcher.take(now=0.0, linger=0.0, limit=MANY)) == [["a"]]
    for n, item in enumerate("bcd"):
        batcher.add("s", item, now=0.1 * n)
    assert batcher.take(now=5.0, linger=0.0, limit=MANY) == [], "no second, partial call beside the first"
    batcher.done("s")
    assert items(batcher.take(now=5.0, linger=0.0, limit=MANY)) == [["b", "c", "d"]]


def test_one_call_per_session_is_still_available() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=2, max_calls=1)
    fill(batcher, "hot", 6)
    assert items(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == [["hot0", "hot1"]]
    assert batcher.take(now=0.0, linger=LINGER, limit=MANY) == []


def test_a_batch_that_waited_for_its_sessions_call_goes_before_batches_filled_since() -> None:
    """Ready batches go lowest order first (here the default, creation time): a hot session whose next
    batch waited for one of its calls keeps pace instead of queueing behind everything filled later."""
    batcher: Batcher[str, str] = Batcher(max_events=2, max_calls=1)
    fill(batcher, "hot", 4, now=1.0)  # hot0-1 ready, hot2-3 wait for its call
    assert items(batcher.take(now=1.0, linger=LINGER, limit=1)) == [["hot0", "hot1"]]
    for n in range(5):
        fill(batcher, f"s{n}", 2, now=2.0 + n)  # five full batches of other sessions, younger
    batcher.done("hot")
    assert items(batcher.take(now=9.0, linger=LINGER, limit=2)) == [["hot2", "hot3"], ["s00", "s01"]]
    assert items(batcher.take(now=9.0, linger=LINGER, limit=MANY)) == [[f"s{n}0", f"s{n}1"] for n in range(1, 5)]


def test_ready_batches_go_in_the_order_of_their_first_event() -> None:
    """The pipeline passes sentAt: in a backlog every session advances through time together."""
    batcher: Batcher[str, str] = Batcher(max_events=1, max_calls=1)
    batcher.add("late", "l", now=0.0, order=1_790_000_050.0)
    batcher.add("early", "e", now=1.0, order=1_790_000_010.0)
    batcher.add("middle", "m", now=2.0, order=1_790_000_030.0)
    assert items(batcher.take(now=2.0, linger=LINGER, limit=MANY)) == [["e"], ["m"], ["l"]]


def test_a_sessions_calls_start_in_arrival_order_whatever_their_events_times() -> None:
    """A later batch whose first event is older (clock skew, a replay) still goes after the earlier one."""
    batcher: Batcher[str, str] = Batcher(max_events=2, max_calls=3)
    for n, order in enumerate((50.0, 51.0, 10.0, 11.0, 60.0, 61.0)):
        batcher.add("s", f"s{n}", now=0.0, order=order)
    batcher.add("t", "t0", now=0.0, order=40.0)
    batcher.add("t", "t1", now=0.0, order=40.0)
    taken = items(batcher.take(now=0.0, linger=LINGER, limit=MANY))
    assert taken == [["t0", "t1"], ["s0", "s1"], ["s2", "s3"], ["s4", "s5"]]


def test_a_session_over_its_bound_is_crowded_until_half_of_it() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=10, max_calls=2, max_held=40)
    fill(batcher, "hot", 20)  # two calls' worth: ready, holding both calls
    fill(batcher, "cold", 5)
    fill(batcher, "hot", 40, start=20)
    assert batcher.crowded == set(), "40 waiting: at the bound, not over it"
    fill(batcher, "hot", 10, start=60)
    assert batcher.crowded == {"hot"}
    assert list(batcher.held("hot")) == [f"hot{n}" for n in range(20, 70)], "what waits beyond its calls"
    assert list(batcher.held("cold")) == []
    assert len(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == 2
    for _ in range(2):
        batcher.done("hot")
    assert batcher.crowded == {"hot"}, "30 waiting: still above half the bound"
    assert len(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == 2
    batcher.done("hot")
    assert batcher.crowded == set(), "20 waiting: half the bound, fed again"


def test_dropping_a_crowded_sessions_records_releases_it() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=10, max_calls=1, max_held=20)
    fill(batcher, "hot", 50)
    assert batcher.crowded == {"hot"}
    dropped = batcher.drop(lambda item: int(item[3:]) < 20)
    assert len(dropped) == 30
    assert batcher.crowded == set()
    assert list(batcher.held("hot")) == [f"hot{n}" for n in range(10, 20)]


def test_flush_sends_a_busy_sessions_partial_batch_at_once_when_it_has_a_call_to_spare() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=10, max_calls=2)
    fill(batcher, "s", 10)
    assert len(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == 1
    fill(batcher, "s", 3, start=10)
    batcher.flush()
    assert items(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == [["s10", "s11", "s12"]]


# --- the pipeline and the source ----------------------------------------------------------------


class HeldSink:
    """Every call waits until the test releases it; counts each session's calls in flight."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], asyncio.Future[None]]] = []
        self.in_flight: dict[str, int] = defaultdict(int)
        self.most_in_flight: dict[str, int] = defaultdict(int)

    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.calls.append((session_id, [orjson.loads(e)["eventId"] for e in events], gate))
        self.in_flight[session_id] += 1
        self.most_in_flight[session_id] = max(self.most_in_flight[session_id], self.in_flight[session_id])
        try:
            await gate
        finally:
            self.in_flight[session_id] -= 1
        return []

    def release_all(self) -> int:
        waiting = [gate for _, _, gate in self.calls if not gate.done()]
        for gate in waiting:
            gate.set_result(None)
        return len(waiting)


class NothingCommitted:
    async def fetch_committed_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, Any]:
        return dict.fromkeys(partitions)


@dataclass
class FetchingConsumer:
    """Records which partitions each getmany asks for; fetches nothing (the test ingests by hand)."""

    owned: set[TopicPartition]
    asked: list[set[TopicPartition] | None] = field(default_factory=list)
    """Per getmany, the partitions it was limited to (None: all assigned ones)."""
    paused: set[TopicPartition] = field(default_factory=set)
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)
    _coordinator: NothingCommitted = field(default_factory=NothingCommitted)

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int, max_records: int) -> dict[Any, Any]:
        assert set(partitions) <= self.owned
        self.asked.append(set(partitions) if partitions else None)
        return {}

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused.difference_update(partitions)

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})


@dataclass(frozen=True)
class FakeRecord:
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


def session_records(session: str, first: int, count: int, tag: str = "") -> list[FakeRecord]:
    return [
        FakeRecord(
            offset,
            session.encode(),
            orjson.dumps(
                {
                    "session_id": session,
                    "event_type": "click",
                    "timestamp": 1_790_000_000 + offset,
                    "event_id": f"{session}-{tag}{offset}",
                }
            ),
        )
        for offset in range(first, first + count)
    ]


class NoLetters:
    async def write(self, letters: Sequence[Any]) -> None:
        raise AssertionError("nothing here is invalid")


async def until(condition: Any, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what}: not within {timeout}s")


async def start(settings: Settings, sink: HeldSink, *partitions: TopicPartition) -> tuple[Pipeline, Source]:
    metrics = Metrics()
    pipeline = Pipeline(settings, sink, NoLetters(), metrics, quota=RateLimiter(1000))
    source = Source(settings, pipeline, metrics)
    await source.consumer.stop()  # never started: closed only so it warns of nothing
    source.consumer = FetchingConsumer(set(partitions))
    await source.on_partitions_assigned(list(partitions))
    return pipeline, source


def gauge(source: Source, name: str) -> float:
    value = source._metrics.registry.get_sample_value(f"personalize_worker_{name}")
    assert value is not None
    return value


async def test_a_hot_session_holds_only_its_partition_until_its_calls_catch_up() -> None:
    settings = Settings.model_validate(
        {
            "personalize": {"tracking_id": "t"},
            "batching": {"linger_ms": 0, "max_calls_per_session": 3, "max_session_events": 50},
        }
    )
    sink = HeldSink()
    hot_tp, cold_tp = TopicPartition("t", 0), TopicPartition("t", 1)
    pipeline, source = await start(settings, sink, hot_tp, cold_tp)
    consumer = source.consumer
    assert isinstance(consumer, FetchingConsumer)
    pipeline.ingest(hot_tp, session_records("hot", 0, 200))
    pipeline.ingest(cold_tp, session_records("cold", 0, 15))
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    try:
        await until(lambda: len(sink.calls) == 4, "three hot calls and a cold one in flight")
        assert sink.most_in_flight == {"hot": 3, "cold": 1}, "the hot session runs three calls at once"
        assert [ids for s, ids, _ in sink.calls if s == "hot"] == [
            [f"hot-{n}" for n in range(start, start + 10)] for start in (0, 10, 20)
        ], "each call in order, the calls started in order"

        await source.fetch_once(timeout_ms=0)
        assert consumer.asked[-1] == {cold_tp}, "170 hot events wait: over 50, its partition is left alone"
        assert consumer.paused == set(), "not paused: its prefetched records keep their place"
        assert gauge(source, "partitions_held") == 1
        assert gauge(source, "sessions_crowded") == 1
        assert gauge(source, "consumption_paused") == 0, "not a buffer-wide pause"

        while pipeline.batcher.crowded:
            sink.release_all()
            await asyncio.sleep(0.01)
        await source.fetch_once(timeout_ms=0)
        assert consumer.asked[-1] is None, "down to half its bound: every partition fetched again"
        assert gauge(source, "partitions_held") == 0

        pipeline.ingest(hot_tp, session_records("hot", 200, 5))
        while pipeline.outstanding:
            sink.release_all()
            await asyncio.sleep(0.01)
        await source.commit()
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
    hot_calls = [ids for s, ids, _ in sink.calls if s == "hot"]
    assert [event for call in hot_calls for event in call] == [f"hot-{n}" for n in range(205)], (
        "every hot event once, the calls started in arrival order"
    )
    assert all(len(call) == 10 for call in hot_calls[:-1])
    assert max(sink.most_in_flight.values()) <= 3
    assert consumer.commits[-1] == {hot_tp: 205, cold_tp: 15}


async def test_when_every_partition_feeds_a_crowded_session_nothing_is_fetched() -> None:
    """getmany() without partitions would fetch them all: with none wanted, no getmany at all."""
    settings = Settings.model_validate(
        {"personalize": {"tracking_id": "t"}, "batching": {"max_calls_per_session": 1, "max_session_events": 10}}
    )
    first, second = TopicPartition("t", 0), TopicPartition("t", 1)
    pipeline, source = await start(settings, HeldSink(), first, second)
    consumer = source.consumer
    assert isinstance(consumer, FetchingConsumer)
    pipeline.ingest(first, session_records("hot", 0, 40))
    await source.fetch_once(timeout_ms=0)
    assert consumer.asked == [{second}]
    pipeline.ingest(second, session_records("hot", 0, 40, tag="b"))
    assert await source.fetch_once(timeout_ms=0) == 0
    assert consumer.asked == [{second}], "both partitions feed it: nothing asked for"
    pipeline.forget([first])  # revoked: its records leave the session, which is still over its bound
    consumer.owned.discard(first)
    assert pipeline.crowded_partitions() == {second}, "a revoked partition is never named"
    assert await source.fetch_once(timeout_ms=0) == 0
    assert consumer.asked == [{second}]


# --- the CLI, the real broker and the emulator ----------------------------------------------------

LATENCY_S = 0.15


def event_number(event_id: str) -> int:
    return int(event_id.rsplit("-", 1)[1])


@pytest.mark.kafka
@pytest.mark.chaos
async def test_a_hot_session_runs_calls_side_by_side_and_is_bounded_while_the_others_flow(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    """Half of the records belong to one session, all on one partition (keyed by session). At 150 ms a
    call it needs several calls at once; over its bound its partition is held while the others drain."""
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=3)
    dlq = await topic_factory(partitions=1)
    stream = generate(
        4_000, seed=1111, concurrent_sessions=30, duplicate_rate=0.0, malformed_rate=0.0, hot_session_share=0.5
    )
    placed = await load(bootstrap, topic, stream)
    hot_partition = {p for m, p, _ in placed if m.source and m.source["session_id"] == HOT_SESSION_ID}
    assert len(hot_partition) == 1
    ends = await end_offsets(bootstrap, topic)
    others = {p: end for p, end in ends.items() if p not in hot_partition}
    await asyncio.to_thread(emulator.configure, latency_ms=LATENCY_S * 1000, jitter_ms=0)
    bound, poll = 50, 100
    sections = worker_factory.config(
        topic,
        dlq,
        f"{topic}-group",
        kafka={"max_poll_records": poll},
        batching={"max_calls_per_session": 4, "max_session_events": bound},
    )
    samples: list[dict[str, float]] = []
    async with RssWatch(worker_factory) as rss:
        worker = worker_factory(sections, until_drained=True)

        async def watch() -> None:
            while worker.running:
                with contextlib.suppress(OSError):
                    samples.append(await asyncio.to_thread(worker.metrics))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        assert await worker.await_exit(180) == 0
        await watcher

    events = await asyncio.to_thread(emulator.events)
    counts = received(events)
    assert set(counts) == valid_ids(stream) and max(counts.values()) == 1, "every event once"

    calls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        if event["sessionId"] == HOT_SESSION_ID:
            calls[event["request_id"]].append(event)
    hot_calls = sorted(calls.values(), key=lambda call: event_number(call[0]["eventId"]))
    numbers = [[event_number(e["eventId"]) for e in call] for call in hot_calls]
    expected = sorted(
        event_number(m.source["event_id"])
        for m in stream.valid
        if m.source and m.source["session_id"] == HOT_SESSION_ID
    )
    assert [n for call in numbers for n in call] == expected, "each call a run of the session in arrival order"
    # One call at a time, the next call of the session reaches the emulator at least a round trip
    # (150 ms of its latency) after the previous one; side by side, most arrive together.
    arrivals = sorted(call[0]["received_at"] for call in hot_calls)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    close = sum(gap < LATENCY_S / 2 for gap in gaps)
    assert close >= len(gaps) / 4, f"{close} of {len(gaps)} hot calls arrived within half a round trip of another"

    prefix = "personalize_worker_"
    assert any(s.get(prefix + "partitions_held") == 1 for s in samples), "its partition was held"
    held = log_lines(
        worker, "a session holds more than batching.max_session_events; holding its partitions until it catches up"
    )
    assert len(held) == 1, "said once (a minute at most), not at every hold"
    assert held[0]["partitions"] == [f"{topic}-{p}" for p in hot_partition]

    def others_done(sample: dict[str, float]) -> bool:
        return all(
            sample.get(f'{prefix}committed_offset{{partition="{p}",topic="{topic}"}}') == end
            for p, end in others.items()
        )

    after = [s for s in samples if others_done(s)]
    hot_left = [s for s in after if s.get(prefix + "partitions_held") == 1]
    assert hot_left, "the other partitions were drained while the hot one was still held"
    # Then all that is buffered is the hot partition's: the hot session's bound, what one poll can add
    # past it, its calls' batches and the few partial batches of the partition's other sessions.
    most = max(s[prefix + "events_buffered"] for s in after)
    assert most <= bound + poll + 4 * 10 + 150, f"{most} events buffered: the hot session was not bounded"
    figures(
        "hot session: 50% of records in one session, 150 ms calls",
        len(stream.messages),
        counts,
        0,
        rss.peak_kib,
        hot_events=len(expected),
        hot_calls=len(hot_calls),
        most_buffered_after_the_others=most,
    )
