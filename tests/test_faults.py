"""Faults that once stalled a partition silently or grew memory without bound, against the real broker.

Each scenario prints a `CHAOS-FIGURES` line like tests/test_chaos.py, for the README's chaos table.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.kafka_support import committed_offsets, consume_all, create_topic, produce
from tests.stack import EmulatorProcess
from tests.test_chaos import (
    RssWatch,
    dedicated_broker,
    figures,
    log_lines,
    metric,
    own_workers,
    readyz,
    received,
    until,
    valid_ids,
)
from tests.test_e2e import wait_committed
from worker.commands.sample import generate

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]


async def test_a_record_that_never_finishes_pauses_its_partition_and_says_why(
    emulator: EmulatorProcess, tmp_path: Path
) -> None:
    """One record waits on a dead-letter topic that cannot be written while the rest of its partition flows.

    The partition is paused once its commit point lags by `max_commit_lag_records` (the finalizer's state
    no longer grows); commits whose metadata changes but whose offset does not are not progress, so the
    watchdog reports the stall and names the record and what it waits on; and the broker's low
    `offset.metadata.max.bytes` (200) makes the worker shorten its commit metadata instead of retrying the
    same refused commit forever.
    """
    props = {"auto.create.topics.enable": "false", "offset.metadata.max.bytes": "200"}
    async with dedicated_broker(tmp_path, **props) as broker, own_workers(broker, emulator, tmp_path) as factory:
        bootstrap = broker.bootstrap
        topic = await create_topic(bootstrap, "source", 1)
        dlq = "source.dlq"  # not created yet: the bad record's dead letter cannot be written
        stream = generate(8_000, seed=909, duplicate_rate=0.0, malformed_rate=0.0)
        records: list[tuple[bytes, bytes]] = [(m.key, m.value) for m in stream.messages]
        first_bad, bound, poll = 1_000, 1_000, 200
        records.insert(first_bad, (b"k", b"not json"))
        await produce(bootstrap, topic, records)
        group = "stuck-group"
        config = factory.config(
            topic,
            dlq,
            group,
            worker={"max_commit_lag_records": bound, "stall_timeout_seconds": 3},
            kafka={"max_poll_records": poll},
        )
        async with RssWatch(factory) as rss:
            worker = factory(config)
            await until(lambda: metric(worker, "paused_partitions") == 1, 120, "the lagging partition paused")
            await until(lambda: metric(worker, "stalled") == 1, 60, "stalled = 1 despite metadata-only commits")
            delivered = int((await asyncio.to_thread(emulator.stats))["events"])
            assert first_bad <= delivered <= first_bad + bound + 2 * poll, "fetching stops at the commit-lag bound"
            await asyncio.sleep(2)
            assert int((await asyncio.to_thread(emulator.stats))["events"]) == delivered, "and stays stopped"
            status, reason = await asyncio.to_thread(readyz, worker)
            assert status == 503 and f"offset {first_bad}" in reason and "dead_letter" in reason, reason
            assert metric(worker, 'oldest_unfinished_waiting{on="dead_letter",partition="0",topic="source"}') == 1
            assert metric(worker, 'oldest_unfinished_age_seconds{partition="0",topic="source"}') >= 3
            committed = await committed_offsets(bootstrap, group, topic)
            assert committed.get(0) == first_bad, f"committed {committed}: up to the stuck record, metadata cut"
            assert log_lines(
                worker,
                "broker refused the commit metadata as too large; committing with shorter metadata "
                "(set kafka.commit_metadata_max_bytes below the broker's offset.metadata.max.bytes)",
            )
            assert 0 <= metric(worker, "commit_metadata_limit_bytes") < 200

            await create_topic(bootstrap, dlq, 1)
            await wait_committed(bootstrap, group, topic, timeout=120)
            await until(lambda: metric(worker, "stalled") == 0, 30, "stalled = 0")
            assert metric(worker, "paused_partitions") == 0
            assert (await asyncio.to_thread(readyz, worker))[0] == 200
        dead = await consume_all(bootstrap, dlq, timeout=30)
        assert [r.value for r in dead] == [b"not json"]
        counts = received(await asyncio.to_thread(emulator.events))
        assert set(counts) == valid_ids(stream) and max(counts.values()) == 1
    figures(
        "one record never finishes (dead letter blocked), metadata limit 200",
        len(records),
        counts,
        len(dead),
        rss.peak_kib,
        delivered_while_stuck=delivered,
    )
