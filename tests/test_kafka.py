"""The local Kafka broker and the test helpers work against it (aiokafka, the real protocol)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer

from tests.kafka_support import (
    KafkaBroker,
    TopicFactory,
    committed_offsets,
    consume_all,
    create_topic,
    end_offsets,
    free_port,
    produce,
)

pytestmark = pytest.mark.kafka


def _java_pids(state_dir: Path) -> list[int]:
    """Java processes whose command line names this state dir (what `stop` must leave none of)."""
    proc = subprocess.run(
        ["pgrep", "-f", f"kafka.Kafka {state_dir}/server.properties"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [int(p) for p in proc.stdout.split()]


async def test_produce_consume_round_trip(kafka_broker: KafkaBroker, topic_factory: TopicFactory) -> None:
    topic = await topic_factory(partitions=1)
    headers = [("event-type", b"click")]
    sent = await produce(
        kafka_broker.bootstrap,
        topic,
        [("k1", "v1", headers), (b"k2", b"v2"), "v3", ("k4", None)],  # k4: a tombstone
    )
    assert [m.offset for m in sent] == [0, 1, 2, 3]

    records = await consume_all(kafka_broker.bootstrap, topic)
    assert [(r.key, r.value) for r in records] == [
        (b"k1", b"v1"),
        (b"k2", b"v2"),
        (None, b"v3"),
        (b"k4", None),
    ]
    assert list(records[0].headers) == headers
    assert await end_offsets(kafka_broker.bootstrap, topic) == {0: 4}


async def test_topic_factory_partitions_and_spread(kafka_broker: KafkaBroker, topic_factory: TopicFactory) -> None:
    topic = await topic_factory(partitions=6)
    assert await end_offsets(kafka_broker.bootstrap, topic) == dict.fromkeys(range(6), 0)

    # Keyed records hash across partitions; an explicit partition pins them.
    sent = await produce(kafka_broker.bootstrap, topic, [(f"user-{i}", f"e{i}") for i in range(600)])
    await produce(kafka_broker.bootstrap, topic, ["pinned"] * 5, partition=3)
    assert {m.partition for m in sent} == set(range(6))

    ends = await end_offsets(kafka_broker.bootstrap, topic)
    assert set(ends) == set(range(6))
    assert all(n > 0 for n in ends.values())
    assert sum(ends.values()) == 605
    records = await consume_all(kafka_broker.bootstrap, topic)
    assert len(records) == 605
    assert {r.partition for r in records} == set(range(6))
    assert sum(1 for r in records if r.value == b"pinned" and r.partition == 3) == 5


async def test_consumer_group_commits_are_visible(kafka_broker: KafkaBroker, topic_factory: TopicFactory) -> None:
    topic = await topic_factory(partitions=2)
    await produce(kafka_broker.bootstrap, topic, [(str(i), str(i)) for i in range(20)])
    group = f"g-{uuid.uuid4().hex[:8]}"
    assert await committed_offsets(kafka_broker.bootstrap, group, topic) == {}

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_broker.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        seen = 0
        while seen < 20:
            batch = await consumer.getmany(timeout_ms=1000)
            seen += sum(len(v) for v in batch.values())
        await consumer.commit()
    finally:
        await consumer.stop()
    assert await committed_offsets(kafka_broker.bootstrap, group, topic) == await end_offsets(
        kafka_broker.bootstrap, topic
    )


async def test_consume_all_min_records_returns_partial_on_timeout(
    kafka_broker: KafkaBroker, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory(partitions=1)
    await produce(kafka_broker.bootstrap, topic, ["only"])
    records = await consume_all(kafka_broker.bootstrap, topic, timeout=1.0, min_records=2)
    assert [r.value for r in records] == [b"only"]


def test_session_broker_status(kafka_broker: KafkaBroker) -> None:
    assert kafka_broker.is_running()
    assert len(_java_pids(kafka_broker.dir)) == 1


@pytest_asyncio.fixture
async def own_broker(tmp_path: Path) -> AsyncIterator[KafkaBroker]:
    """A second broker this test may stop and start without disturbing the session one."""
    broker = KafkaBroker(port=free_port(), dir=tmp_path / "kafka")
    try:
        yield broker
    finally:
        await broker.astop()
        assert _java_pids(broker.dir) == []


async def test_restart_keeps_data_and_stop_leaves_no_java(own_broker: KafkaBroker) -> None:
    assert not own_broker.is_running()  # never started: status says stopped
    await own_broker.astart()
    assert own_broker.is_running()
    assert own_broker.last_start_seconds is not None
    print(f"broker start took {own_broker.last_start_seconds:.2f}s")

    topic = await create_topic(own_broker.bootstrap, "durable", partitions=3)
    await produce(own_broker.bootstrap, topic, [(f"k{i}", f"v{i}") for i in range(30)])
    group = "restart-group"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=own_broker.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        seen = 0
        while seen < 30:
            batch = await consumer.getmany(timeout_ms=1000)
            seen += sum(len(v) for v in batch.values())
        await consumer.commit()
    finally:
        await consumer.stop()
    before = await consume_all(own_broker.bootstrap, topic)
    commits = await committed_offsets(own_broker.bootstrap, group, topic)

    await own_broker.astop()
    assert not own_broker.is_running()
    assert _java_pids(own_broker.dir) == []
    await own_broker.astop()  # idempotent

    await own_broker.astart()
    assert own_broker.is_running()
    await own_broker.astart()  # already running: a no-op, still one process
    assert len(_java_pids(own_broker.dir)) == 1

    after = await consume_all(own_broker.bootstrap, topic, timeout=30)
    assert [(r.partition, r.offset, r.key, r.value) for r in after] == [
        (r.partition, r.offset, r.key, r.value) for r in before
    ]
    assert await committed_offsets(own_broker.bootstrap, group, topic) == commits
    assert sum(commits.values()) == 30
