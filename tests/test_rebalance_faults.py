"""A bug inside the rebalance callbacks must stop the worker loudly, like a bug in any of its loops.

aiokafka calls `on_partitions_revoked` / `on_partitions_assigned` and, should they raise, logs the
exception and goes on with the rebalance: the revoked partitions would stay in the offset tracker (their
late results still committed, their gauges exported) and nothing would say so but a traceback line.
"""

from __future__ import annotations

import pytest
from aiokafka.structs import TopicPartition

from tests.test_pipeline import FakeConsumer, GatedSink, Letters, records
from worker.config import Settings
from worker.flow.pipeline import Pipeline
from worker.kafka.source import Source
from worker.observe.metrics import Metrics
from worker.personalize.ratelimit import RateLimiter

TP0, TP1 = TopicPartition("t", 0), TopicPartition("t", 1)


async def build() -> tuple[Pipeline, Source, FakeConsumer, list[tuple[str, BaseException]]]:
    settings = Settings.model_validate({"personalize": {"tracking_id": "t"}, "batching": {"linger_ms": 0}})
    metrics = Metrics()
    pipeline = Pipeline(settings, GatedSink(), Letters(), metrics, quota=RateLimiter(1000))
    source = Source(settings, pipeline, metrics)
    await source.consumer.stop()  # never started: closed only so it warns of nothing
    consumer = FakeConsumer({TP0, TP1})
    source.consumer = consumer
    failures: list[tuple[str, BaseException]] = []
    source.on_failure = lambda where, error: failures.append((where, error))
    await source.on_partitions_assigned([TP0, TP1])
    return pipeline, source, consumer, failures


async def test_a_bug_while_handing_partitions_over_is_reported_and_they_are_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline, source, consumer, failures = await build()
    pipeline.ingest(TP0, records(0, 3))

    async def broken(partitions: object, timeout: float) -> bool:
        raise KeyError("a bug in the hand-over")

    monkeypatch.setattr(pipeline, "settle_partitions", broken)
    await source.on_partitions_revoked([TP0])  # aiokafka would swallow what escapes here

    assert [(where, type(error)) for where, error in failures] == [("rebalance", KeyError)]
    assert pipeline.tracker.get(TP0) is None, "a revoked partition's state never outlives the revocation"
    consumer.owned.discard(TP0)
    await source.commit()
    assert all(TP0 not in commit for commit in consumer.commits)


async def test_a_bug_while_taking_partitions_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, source, _, failures = await build()

    def broken(partition: object, now: float = 0.0) -> object:
        raise ValueError("a bug in the assignment")

    monkeypatch.setattr(pipeline.tracker, "assign", broken)
    await source.on_partitions_assigned([TopicPartition("t", 2)])
    assert [(where, type(error)) for where, error in failures] == [("rebalance", ValueError)]
