"""Offsets that hold no record the worker ever sees, against the real broker and emulator.

A transactional producer ends every transaction with a control record (a commit or abort marker) that
takes an offset of its own; an aborted transaction's records are skipped under read_committed. The
consumer's position passes them, the pipeline never sees them: the commit point must still reach the
end of the partition, or an idle, fully processed partition looks one record behind forever and the
stall watchdog raises a false alarm.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from tests.kafka_support import KafkaBroker, TopicFactory, committed_offsets, end_offsets
from tests.stack import EmulatorProcess, WorkerFactory
from tests.test_chaos import metric, readyz, received, until
from tests.test_e2e import wait_committed
from worker.commands.sample import generate

pytestmark = [pytest.mark.kafka]


async def produce_transactions(bootstrap: str, topic: str, batches: list[list[bytes]], *, abort_last: bool) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"review-{topic}", acks="all")
    await producer.start()
    try:
        for index, values in enumerate(batches):
            await producer.begin_transaction()
            for value in values:
                await producer.send(topic, value=value, partition=0)
            if abort_last and index == len(batches) - 1:
                await producer.abort_transaction()
            else:
                await producer.commit_transaction()
    finally:
        await producer.stop()


async def test_transaction_markers_are_committed_past_and_an_idle_partition_is_not_stalled(
    kafka_broker: KafkaBroker, topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    """Two committed transactions, then an aborted one: every committed event is delivered once, the
    aborted ones never, the group's commit reaches the partition's end (markers included), and the
    worker stays ready with `stalled` 0 well past its stall timeout."""
    topic = await topic_factory(1)
    stream = generate(60, seed=1101, duplicate_rate=0.0, malformed_rate=0.0)
    values = [m.value for m in stream.messages]
    batches = [values[:20], values[20:40], values[40:]]
    await produce_transactions(kafka_broker.bootstrap, topic, batches, abort_last=True)
    ends = await end_offsets(kafka_broker.bootstrap, topic)
    assert ends[0] == len(values) + 3, ends  # three markers

    group = f"{topic}-group"
    stall = 2.0
    config = worker_factory.config(
        topic, f"{topic}.dlq", group, worker={"stall_timeout_seconds": stall, "commit_interval_seconds": 0.3}
    )
    worker = worker_factory(config)
    wanted = {m.source["event_id"] for m in stream.messages[:40] if m.source}
    await until(lambda: set(received(emulator.events())) >= wanted, 60, "the committed transactions delivered")
    await wait_committed(kafka_broker.bootstrap, group, topic, timeout=30)
    # Idle and fully processed, well past the stall timeout: no alarm.
    await asyncio.sleep(stall * 3)
    assert metric(worker, "stalled") == 0
    assert metric(worker, 'consumer_lag{partition="0",topic="' + topic + '"}') == 0
    status, reason = await asyncio.to_thread(readyz, worker)
    assert status == 200, reason
    counts = received(await asyncio.to_thread(emulator.events))
    assert set(counts) == wanted and max(counts.values()) == 1, "aborted records never sent, the rest once"
    assert await committed_offsets(kafka_broker.bootstrap, group, topic) == ends
