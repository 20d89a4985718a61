"""A full buffer waits for room without pausing the partitions (worker.kafka.room): pausing makes aiokafka drop
the records it prefetched, and every resume read them from the broker again. A fake consumer for the logic;
the real broker for what is read from it."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiokafka.consumer import fetcher
from aiokafka.structs import TopicPartition

from tests.kafka_support import KafkaBroker, TopicFactory, produce
from tests.test_hot_session import FetchingConsumer, HeldSink, NoLetters, gauge, session_records, start, until
from worker.config import Settings
from worker.flow.pipeline import Pipeline
from worker.kafka import room
from worker.kafka.source import Source
from worker.observe.metrics import Metrics
from worker.personalize.ratelimit import RateLimiter
from worker.personalize.retry import Rejection


def full_buffer_settings() -> Settings:
    return Settings.model_validate(
        {"personalize": {"tracking_id": "t"}, "batching": {"linger_ms": 0, "max_buffered_events": 100}}
    )


async def filled(settings: Settings) -> tuple[Pipeline, Source, FetchingConsumer, HeldSink, asyncio.Task[None]]:
    """100 records (the cap) of 10 sessions, each session's one call of 10 held in flight."""
    sink = HeldSink()
    tp = TopicPartition("t", 0)
    pipeline, source = await start(settings, sink, tp)
    consumer = source.consumer
    assert isinstance(consumer, FetchingConsumer)
    pipeline.ingest(tp, [r for n in range(10) for r in session_records(f"s{n}", n * 10, 10)])
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    await until(lambda: len(sink.calls) == 10, "ten calls in flight")
    assert pipeline.outstanding == 100
    return pipeline, source, consumer, sink, dispatcher


async def test_a_full_buffer_waits_unpolled_and_unpaused_until_a_tenth_of_it_is_free() -> None:
    _, source, consumer, sink, dispatcher = await filled(full_buffer_settings())
    try:
        fetching = asyncio.create_task(source.fetch_once(timeout_ms=0))
        await asyncio.sleep(0.3)
        assert not fetching.done(), "full: no poll"
        assert consumer.asked == []
        assert consumer.paused == set(), "not paused: the prefetched records keep their place"
        assert gauge(source, "consumption_paused") == 1, "the gauges still say consumption waits"
        assert gauge(source, "paused_partitions") == 1

        sink.calls[0][2].set_result(None)  # one call of 10 back: 90 buffered, a tenth free
        await asyncio.wait_for(fetching, 5)
        assert consumer.asked == [None], "one poll, of every partition"
        assert consumer.paused == set()
        assert gauge(source, "consumption_paused") == 0
        assert gauge(source, "paused_partitions") == 0
    finally:
        sink.release_all()
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)


async def test_a_buffer_that_stays_full_pauses_as_before_and_resumes_once_there_is_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An outage holds the buffer full: after the wait the partitions are paused, and getmany, which keeps the
    group membership alive, goes on being called."""
    monkeypatch.setattr(room, "ROOM_WAIT_SECONDS", 0.05)
    pipeline, source, consumer, sink, dispatcher = await filled(full_buffer_settings())
    try:
        await asyncio.wait_for(source.fetch_once(timeout_ms=0), 5)
        assert consumer.paused == {TopicPartition("t", 0)}
        assert consumer.asked == [None]
        assert gauge(source, "consumption_paused") == 1

        sink.release_all()
        await until(lambda: pipeline.outstanding == 0, "every call back")
        await asyncio.wait_for(source.fetch_once(timeout_ms=0), 5)
        assert consumer.paused == set()
        assert gauge(source, "consumption_paused") == 0
    finally:
        sink.release_all()
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)


class SlowSink:
    """Accepts every call after a short while; keeps the eventIds it was given."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        await asyncio.sleep(0.002)
        self.ids.extend(orjson.loads(e)["eventId"] for e in events)
        return []


@pytest.mark.kafka
async def test_at_a_full_buffer_each_record_is_read_from_the_broker_about_once(
    kafka_broker: KafkaBroker, topic_factory: TopicFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4,000 records of ~1 KB on 2 partitions through a 300-event buffer: aiokafka prefetches up to 1 MB per
    partition. Pausing at the cap dropped those prefetched records at every pause and read them again at
    every resume (~5x the topic's bytes here); waiting unpaused reads them once."""
    topic = await topic_factory(2)
    pad = "x" * 900
    values = [
        orjson.dumps(
            {
                "session_id": f"s{n % 40}",
                "event_type": "click",
                "timestamp": 1_790_000_000 + n,
                "event_id": f"e{n}",
                "pad": pad,
            }
        )
        for n in range(4000)
    ]
    await produce(kafka_broker.bootstrap, topic, [(f"s{n % 40}", v) for n, v in enumerate(values)])
    produced = sum(len(v) for v in values)

    fetched = [0]
    unwrapped = fetcher.PartitionRecords.__init__

    def counting(self: Any, tp: Any, records: Any, *args: Any) -> None:
        fetched[0] += records.size_in_bytes()
        unwrapped(self, tp, records, *args)

    monkeypatch.setattr(fetcher.PartitionRecords, "__init__", counting)
    settings = Settings.model_validate(
        {
            "kafka": {"bootstrap_servers": kafka_broker.bootstrap, "topics": [topic], "group_id": f"{topic}-g"},
            "personalize": {"tracking_id": "t"},
            "batching": {"linger_ms": 0, "max_buffered_events": 300},
        }
    )
    metrics, sink = Metrics(), SlowSink()
    pipeline = Pipeline(settings, sink, NoLetters(), metrics, quota=RateLimiter(100_000))
    source = Source(settings, pipeline, metrics)
    await source.start()
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    try:
        consumed = 0
        for _ in range(3000):
            consumed += await source.fetch_once(timeout_ms=100)
            if consumed >= len(values) and not pipeline.outstanding:
                break
        assert consumed == len(values) and not pipeline.outstanding, (consumed, pipeline.outstanding)
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
        await source.stop()
    assert sorted(sink.ids) == sorted(f"e{n}" for n in range(4000)), "every record sent once"
    assert fetched[0] < 1.5 * produced, f"read {fetched[0] / produced:.1f}x the topic's bytes from the broker"
