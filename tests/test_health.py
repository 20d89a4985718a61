"""The stall watchdog: progress is a committed offset moving, and a stuck record says what it waits on.

Pipeline, finalizer and watchdog are real; the sink, the dead-letter writer and the clock are fakes, so
each place a record can wait in is reached on purpose and the clock is moved by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
from aiokafka.structs import TopicPartition

from tests.test_pipeline import FakeRecord, GatedSink, Letters, records, wait_for
from worker.config import Settings
from worker.flow.batching import Batch
from worker.flow.items import DeadLetter, Item
from worker.flow.pipeline import Pipeline
from worker.mapping.mapper import SessionKey
from worker.observe.health import RELOCATE_SECONDS, Watchdog
from worker.observe.metrics import PREFIX, WAITING_AFTER_SECONDS, Metrics
from worker.personalize.ratelimit import RateLimiter
from worker.personalize.retry import Rejection

TP0, TP1 = TopicPartition("t", 0), TopicPartition("t", 1)
STALL_AFTER = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Causes:
    def __init__(self) -> None:
        self.blocked: str | None = None
        self.failing: str | None = None
        self.retrying = False

    def dead_letters_blocked(self) -> str | None:
        return self.blocked

    def calls_failing(self) -> str | None:
        return self.failing

    def is_retrying(self, batch: Batch[SessionKey, Item]) -> bool:
        return self.retrying

    def handing_over(self) -> bool:
        return False


class BuggySink:
    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        raise KeyError("a bug, not a delivery failure")


class BlockedLetters:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        await self.release.wait()


def build(
    sink: object, letters: object = None, linger_ms: int = 0
) -> tuple[Pipeline, Watchdog, Metrics, Clock, Causes]:
    settings = Settings.model_validate({"personalize": {"tracking_id": "t"}, "batching": {"linger_ms": linger_ms}})
    metrics, clock, causes = Metrics(), Clock(), Causes()
    pipeline = Pipeline(settings, sink, letters or Letters(), metrics, quota=RateLimiter(1000), clock=clock)  # type: ignore[arg-type]
    return pipeline, Watchdog(pipeline, metrics, causes, STALL_AFTER, clock), metrics, clock, causes


def waiting(metrics: Metrics, tp: TopicPartition) -> dict[str, float]:
    samples = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == f"{PREFIX}_oldest_unfinished_waiting" and sample.labels["partition"] == str(tp.partition):
                samples[sample.labels["on"]] = sample.value
    return {on: value for on, value in samples.items() if value}


def age(metrics: Metrics, tp: TopicPartition) -> float:
    value = metrics.registry.get_sample_value(
        f"{PREFIX}_oldest_unfinished_age_seconds", {"topic": tp.topic, "partition": str(tp.partition)}
    )
    return value if value is not None else -1.0


async def test_a_delivery_task_that_fails_with_a_bug_is_reported_at_once() -> None:
    pipeline, watchdog, metrics, clock, _ = build(BuggySink())
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    try:
        pipeline.ingest(TP0, records(0, 3))
        await wait_for(lambda: pipeline.failure is not None)
        watchdog.check({TP0: 3})
        assert watchdog.reason is not None and "delivery task failed" in watchdog.reason
        assert metrics.registry.get_sample_value(f"{PREFIX}_delivery_task_failures_total") == 1
        clock.now += WAITING_AFTER_SECONDS + 1
        watchdog.check({TP0: 3})
        assert waiting(metrics, TP0) == {"lost": 1.0}, "its records are nowhere: the gauge says so"
        assert pipeline.outstanding == 3, "never finished, so never committed past"
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)


async def test_metadata_only_commits_are_not_progress_and_the_stuck_record_is_named() -> None:
    sink = GatedSink()
    pipeline, watchdog, metrics, clock, causes = build(sink)
    pipeline.tracker.assign(TP0, clock.now)
    pipeline.ingest(TP0, records(0, 1))
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    try:
        await wait_for(lambda: len(sink.sessions) == 1)
        state = pipeline.tracker.get(TP0)
        assert state is not None
        for minute in range(5):  # the rest of the partition flows: offsets finish above the stuck one
            clock.now += 10
            state.track([1 + minute], clock.now)
            state.finish(1 + minute)
            assert pipeline.tracker.to_commit() == {TP0: 0}
            pipeline.tracker.mark_committed({TP0: 0}, clock.now)  # metadata changed, offset did not
            watchdog.check({TP0: 6})
        assert age(metrics, TP0) >= 50
        assert waiting(metrics, TP0) == {"call": 1.0}
        causes.retrying, causes.failing = True, "PutEvents failing: InternalFailure"
        clock.now += 1
        watchdog.check({TP0: 6})
        assert waiting(metrics, TP0) == {"retry": 1.0}
        assert watchdog.reason is not None
        assert "t-0" in watchdog.reason and "offset 0" in watchdog.reason and "retry" in watchdog.reason
        assert "InternalFailure" in watchdog.reason
        assert metrics.registry.get_sample_value(f"{PREFIX}_stalled") == 1

        sink.release.set()
        await wait_for(lambda: pipeline.outstanding == 0)
        offsets = pipeline.tracker.to_commit()
        assert pipeline.tracker.mark_committed(offsets, clock.now), "the offset moved: progress"
        watchdog.check({TP0: 0})
        assert watchdog.reason is None and metrics.registry.get_sample_value(f"{PREFIX}_stalled") == 0
        assert waiting(metrics, TP0) == {} and age(metrics, TP0) == 0
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)


async def test_records_waiting_on_a_dead_letter_a_copy_or_a_batch_are_told_apart() -> None:
    sink, letters = GatedSink(), BlockedLetters()
    pipeline, watchdog, metrics, clock, causes = build(sink, letters)
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    writer = asyncio.create_task(pipeline.run_dead_letters())
    try:
        pipeline.ingest(TP0, [FakeRecord("t", 0, 0, b"k", b"not json")])
        first = records(1, 1)
        pipeline.ingest(TP1, first)
        await wait_for(lambda: len(sink.sessions) == 1)
        # The same event again on another partition while the first is in flight: parked on it.
        tp2 = TopicPartition("t", 2)
        pipeline.ingest(tp2, [FakeRecord("t", 2, 0, b"k", first[0].value)])
        clock.now += WAITING_AFTER_SECONDS + 1
        causes.blocked = "dead-letter topic 'dlq' is not writable"
        watchdog.check({TP0: 1, TP1: 1, tp2: 1})
        assert waiting(metrics, TP0) == {"dead_letter": 1.0}
        assert waiting(metrics, TP1) == {"call": 1.0}
        assert waiting(metrics, tp2) == {"parked": 1.0}
        letters.release.set()
        sink.release.set()
        await wait_for(lambda: pipeline.outstanding == 0)
    finally:
        dispatcher.cancel()
        writer.cancel()
        await asyncio.gather(dispatcher, writer, return_exceptions=True)

    batched, watchdog, metrics, clock, _ = build(GatedSink())  # no dispatcher: records stay in batches
    batched.ingest(TP0, [FakeRecord("t", 0, 0, b"k", orjson.dumps(_event("b-1")))])
    clock.now += WAITING_AFTER_SECONDS + 1
    watchdog.check({TP0: 1})
    assert waiting(metrics, TP0) == {"batch": 1.0}


def _event(event_id: str) -> dict[str, object]:
    return {"session_id": "s", "event_type": "click", "timestamp": 1_790_000_000, "event_id": event_id}


async def test_a_record_found_in_a_batch_is_searched_for_again_only_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Searching the batches is a pass over everything held (~15 ms at a full buffer, at every tick of a backlog
    drain): a record found there is taken to be there for RELOCATE_SECONDS while the calls, the only place it
    can go next, are looked at every tick. A record a bug lost is still reported, once that time is up."""
    sink = GatedSink()
    pipeline, watchdog, metrics, clock, _ = build(sink)
    searches: list[bool] = []
    search = pipeline.where

    def spy(wanted: dict[int, int], retrying: Callable[[Any], bool], deep: bool = True) -> dict[int, str]:
        searches.append(deep)
        return search(wanted, retrying, deep)

    monkeypatch.setattr(pipeline, "where", spy)
    pipeline.ingest(TP0, [FakeRecord("t", 0, 0, b"k", orjson.dumps(_event("b-1")))])
    pipeline.ingest(TP1, [FakeRecord("t", 1, 0, b"k2", orjson.dumps({**_event("b-2"), "session_id": "s2"}))])
    clock.now += WAITING_AFTER_SECONDS + 1
    watchdog.check({TP0: 1, TP1: 1})
    assert waiting(metrics, TP0) == {"batch": 1.0} and waiting(metrics, TP1) == {"batch": 1.0}
    assert searches == [False, True], "the calls, then the batches"

    searches.clear()
    clock.now += 1
    watchdog.check({TP0: 1, TP1: 1})
    assert waiting(metrics, TP0) == {"batch": 1.0}
    assert searches == [False], "only the calls looked at"

    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    try:
        await wait_for(lambda: len(sink.sessions) == 2)
        pipeline.batcher.flush()
        clock.now += 1
        watchdog.check({TP0: 1, TP1: 1})
        assert waiting(metrics, TP0) == {"call": 1.0}, "into a call: seen at the next tick"
        assert waiting(metrics, TP1) == {"call": 1.0}
    finally:
        sink.release.set()
        await wait_for(lambda: pipeline.outstanding == 0)
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)

    lost, watchdog, metrics, clock, _ = build(GatedSink())
    lost.ingest(TP0, [FakeRecord("t", 0, 0, b"k", orjson.dumps(_event("b-3")))])
    clock.now += WAITING_AFTER_SECONDS + 1
    watchdog.check({TP0: 1})
    assert waiting(metrics, TP0) == {"batch": 1.0}
    lost.batcher.drop(lambda item: False)  # a bug losing a batch: its record never finishes
    clock.now += 1
    watchdog.check({TP0: 1})
    assert waiting(metrics, TP0) == {"batch": 1.0}, "taken to be there still"
    clock.now += RELOCATE_SECONDS
    watchdog.check({TP0: 1})
    assert waiting(metrics, TP0) == {"lost": 1.0}
