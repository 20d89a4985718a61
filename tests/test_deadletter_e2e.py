"""Chaos: a record that fits its source topic (2 MiB) but not, once the dlq.* headers are added, the dead-letter
topic (the broker's default 1 MiB) or the worker's producer (dead_letter.max_message_bytes = 1 MiB). The CLI
drains the topic anyway: the big record's letter is written reduced, every later letter intact, every offset
committed. (Before the fix it retried the refused letter forever and nothing after it, in any partition, was
ever committed.)"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.kafka_support import TopicFactory, committed_offsets, consume_all, end_offsets, produce
from tests.stack import EmulatorProcess, WorkerFactory
from tests.test_chaos import RssWatch, figures, log_lines, received, valid_ids
from tests.test_e2e import header
from worker.commands.sample import generate

pytestmark = [pytest.mark.kafka, pytest.mark.e2e, pytest.mark.chaos]

MIB = 1024 * 1024
SMALL_BAD = [b'{"session_id": "s1", "event_type": ', b"[1, 2, 3]", b"", b"\xff\xfe", b"{}"]


@pytest.mark.parametrize(
    ("refused_by", "dlq_config", "producer_limit"),
    [
        ("topic", {}, 8 * MIB),  # the broker's default 1 MiB; the worker's default producer limit
        ("producer", {"max.message.bytes": str(4 * MIB)}, MIB),  # the topic would take it, the producer not
    ],
)
async def test_a_dead_letter_too_large_for_its_topic_is_reduced_and_blocks_nothing(
    topic_factory: TopicFactory,
    worker_factory: WorkerFactory,
    emulator: EmulatorProcess,
    refused_by: str,
    dlq_config: dict[str, str],
    producer_limit: int,
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=2, config={"max.message.bytes": str(2 * MIB)})
    dlq = await topic_factory(partitions=1, config=dlq_config)
    big = b"{" + b"x" * (3 * MIB // 2)
    stream = generate(300, seed=1104, duplicate_rate=0.0, malformed_rate=0.0)
    good = [(m.key, m.value) for m in stream.messages]
    first: list[tuple[bytes, bytes]] = [(b"bad-big", big)]
    first += [(f"bad-0-{n}".encode(), SMALL_BAD[n % len(SMALL_BAD)]) for n in range(20)] + good[:150]
    second = [(f"bad-1-{n}".encode(), SMALL_BAD[n % len(SMALL_BAD)]) for n in range(20)] + good[150:]
    produced = await produce(bootstrap, topic, first, partition=0, max_request_size=2 * MIB)
    produced += await produce(bootstrap, topic, second, partition=1)
    records = zip(first + second, produced, strict=True)
    bad = {(md.partition, md.offset): value for (key, value), md in records if key.startswith(b"bad-")}
    group = f"{topic}-group"

    started = time.monotonic()
    async with RssWatch(worker_factory) as rss:
        sections = worker_factory.config(topic, dlq, group, dead_letter={"max_message_bytes": producer_limit})
        worker = worker_factory(sections, until_drained=True)
        assert await worker.await_exit(180) == 0, "drained and exited: nothing blocked"
    elapsed = time.monotonic() - started

    assert await committed_offsets(bootstrap, group, topic) == await end_offsets(bootstrap, topic)
    counts = received(await asyncio.to_thread(emulator.events))
    assert set(counts) == valid_ids(stream), "the good neighbours of both partitions are delivered"
    dead = await consume_all(bootstrap, dlq, timeout=60)
    positions = [(int(header(r, "dlq.source.partition")), int(header(r, "dlq.source.offset"))) for r in dead]
    assert sorted(positions) == sorted(bad), "one letter for every bad record"
    for record, position in zip(dead, positions, strict=True):
        assert header(record, "dlq.source.topic") == topic and header(record, "dlq.error.reason")
        if position == (0, 0):
            assert record.key == b"bad-big" and record.value == b""
            assert header(record, "dlq.value.truncated") == "true"
            assert header(record, "dlq.value.original_size") == str(len(big))
            assert header(record, "dlq.letter.form") == "reduced"
            assert header(record, "dlq.letter.refused_by") == "MessageSizeTooLargeError"
            assert (header(record, "dlq.error.stage"), header(record, "dlq.error.reason")) == ("decode", "not_json")
        else:
            assert record.value == bad[position], "small letters intact, byte for byte"
            assert "dlq.letter.form" not in dict(record.headers)
    totals = log_lines(worker, "stopped")[-1]["totals"]
    assert totals["dead_letters_reduced"] == 1 and totals["dead_lettered"] == len(bad)
    figures(
        f"dead letter over the {refused_by}'s limit",
        len(produced),
        counts,
        len(dead),
        rss.peak_kib,
        reduced=1,
        drain_seconds=round(elapsed, 1),
    )
