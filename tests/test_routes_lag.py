"""A coalescing window never trades commit progress for quota: while a partition is paused at
`worker.max_commit_lag_records`, its route's windows release what they hold (pure, then the real broker)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.kafka_support import TopicFactory, produce
from tests.stack import EmulatorProcess, WorkerFactory
from tests.test_chaos import metric
from tests.test_e2e import wait_committed
from tests.test_routes_e2e import records, routes_toml
from worker.flow.coalescing import CoalescingBatcher

ITEMS_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/ITEMS"
WINDOW = 600.0


def test_lagging_releases_held_updates_and_outlives_a_flush() -> None:
    batcher: CoalescingBatcher[str, str] = CoalescingBatcher(10, WINDOW)
    batcher.add("d", "x", "x@0", "p", 0, now=0.0)
    (call,) = batcher.take(0.0, 0.0, 5)
    batcher.done(call)
    batcher.add("d", "x", "x@1", "p", 1, now=1.0)
    assert batcher.take(2.0, 0.0, 5) == [], "held by the window"
    batcher.lagging(True)
    assert [c.items for c in batcher.take(3.0, 0.0, 5)] == [["x@1"]], "released while the partition lags"
    batcher.flush()
    batcher.unflush()
    assert batcher.coalescer.draining, "the end of a flush does not end the lag"
    batcher.lagging(False)
    assert not batcher.coalescer.draining
    batcher.flush()
    batcher.lagging(False)
    assert batcher.coalescer.draining, "nor the end of a lag a flush"


@pytest.mark.kafka
async def test_a_window_holding_the_commit_point_is_released_at_the_lag_bound(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess, tmp_path: Path
) -> None:
    """Item x is updated twice at the head of the partition: the second update waits out a 10-minute window
    and holds the commit point while 1,000 other items flow behind it. At the bound (100 records) the
    partition pauses, the window lets x go, and the commit point reaches the end in well under the window."""
    emulator.configure(quotas={"items": 0})
    bootstrap = worker_factory.broker.bootstrap
    topic, dlq = await topic_factory(partitions=1), await topic_factory(partitions=1)
    first: dict[str, Any] = {"item_id": "x", "price": 1}
    rows: list[dict[str, Any]] = [{"item_id": "x", "price": 2}] + [
        {"item_id": f"y{n}", "price": n} for n in range(1000)
    ]
    await produce(bootstrap, topic, [(b"x", orjson.dumps(first))])
    group = f"{topic}-group"
    sections = worker_factory.config(
        topic, dlq, group, worker={"max_commit_lag_records": 100}, kafka={"max_poll_records": 50}
    )
    sections["personalize"].pop("tracking_id")
    del sections["kafka"]["topics"], sections["mapping"], sections["dead_letter"]
    route = {
        "name": "catalog",
        "topics": [topic],
        "operation": "items",
        "dataset_arn": ITEMS_ARN,
        "mapping": {"properties": ["price"]},
        "coalesce_window_seconds": WINDOW,
        "max_requests_per_second": 200,
        "dead_letter_topic": dlq,
    }
    worker = worker_factory(sections, start=False)
    worker.config.write_text(worker.config.read_text(encoding="utf-8") + "\n" + routes_toml([route]), encoding="utf-8")
    worker.start()
    await wait_committed(bootstrap, group, topic, timeout=120)  # x sent: its window starts
    started = time.monotonic()
    await produce(bootstrap, topic, [(r["item_id"].encode(), orjson.dumps(r)) for r in rows])
    await wait_committed(bootstrap, group, topic, timeout=WINDOW / 4)
    print(f"committed to the end {time.monotonic() - started:.1f} s later, with a {WINDOW:.0f} s window")
    assert metric(worker, "paused_partitions") == 0
    upserts = records(emulator, "items")
    assert [orjson.loads(r["properties"])["price"] for r in upserts if r["itemId"] == "x"] == [1, 2]
    assert len(upserts) == 1002
