"""One route's destination throttled hard by the emulator (its per-destination quota far below the route's
rate) while two other routes run (`run --until-drained`, the real broker and emulator): the others deliver
at their solo rate, measured from the emulator's receive times, and everything is delivered and committed.

The two measured routes are bounded by their own `max_requests_per_second` (below the emulator's quota),
so their rates are set by the worker, not by the shared machine; the bound is still generous (70 %)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.kafka_support import TopicFactory, committed_offsets, end_offsets, produce
from tests.stack import EmulatorProcess, WorkerFactory
from tests.test_routes_e2e import records, routes_toml

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

ITEMS_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/ITEMS"
USERS_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/USERS"
TRACKER = "tracker-clicks"
CLICKS, SESSIONS, USERS, ITEMS = 2400, 80, 240, 24


def rate(received: list[float]) -> float:
    """Records per second between the first and the last accepted call."""
    span = max(received) - min(received)
    return (len(received) - 1) / span if span > 0 else float("inf")


async def run(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess, *, neighbour: bool
) -> tuple[float, float, dict[str, Any]]:
    """One drain of the clicks and people routes (and the throttled catalog route with `neighbour`);
    returns the clicks and people delivery rates and the emulator's stats."""
    emulator.reset()
    bootstrap = worker_factory.broker.bootstrap
    clicks, users, items = [await topic_factory(partitions=2) for _ in range(3)]
    dlqs = [await topic_factory(partitions=1) for _ in range(3)]
    now = time.time()
    events: list[dict[str, Any]] = [
        {
            "event_id": f"e{n}",
            "session_id": f"s{n % SESSIONS}",
            "event_type": "click",
            "item_id": f"i{n % 50}",
            "timestamp": now - 600 + n / 10,
        }
        for n in range(CLICKS)
    ]
    await produce(bootstrap, clicks, [(e["session_id"].encode(), orjson.dumps(e)) for e in events])
    people: list[dict[str, Any]] = [{"user_id": f"u{n}", "tier": "gold"} for n in range(USERS)]
    await produce(bootstrap, users, [(p["user_id"].encode(), orjson.dumps(p)) for p in people])
    catalog: list[dict[str, Any]] = [{"item_id": f"item-{n}", "price": n} for n in range(ITEMS)]
    await produce(bootstrap, items, [(c["item_id"].encode(), orjson.dumps(c)) for c in catalog])

    group = f"{clicks}-group"
    sections = worker_factory.config(clicks, dlqs[0], group)
    sections["personalize"].pop("tracking_id")
    del sections["kafka"]["topics"], sections["mapping"], sections["dead_letter"]
    routes: list[dict[str, Any]] = [
        {
            "name": "clicks",
            "topics": [clicks],
            "tracking_id": TRACKER,
            "max_requests_per_second": 40,  # the emulator allows 1,000: the worker sets this route's pace
            "dead_letter_topic": dlqs[0],
        },
        {
            "name": "people",
            "topics": [users],
            "operation": "users",
            "dataset_arn": USERS_ARN,
            "mapping": {"properties": ["tier"]},
            "max_requests_per_second": 6,  # the emulator allows 10
            "dead_letter_topic": dlqs[1],
        },
    ]
    if neighbour:
        routes.append(
            {
                "name": "catalog",
                "topics": [items],
                "operation": "items",
                "dataset_arn": ITEMS_ARN,
                "mapping": {"properties": ["price"]},
                "coalesce_window_seconds": 0.0,
                "max_requests_per_second": 50,  # the emulator allows 1: throttled all along
                "max_records_per_call": 2,
                "dead_letter_topic": dlqs[2],
            }
        )
    worker = worker_factory(sections, until_drained=True, start=False)
    worker.config.write_text(worker.config.read_text(encoding="utf-8") + "\n" + routes_toml(routes), encoding="utf-8")
    worker.start()
    assert await worker.await_exit(240) == 0, worker.log_tail()

    sent = records(emulator, "events")
    assert sorted(e["eventId"] for e in sent) == sorted(e["event_id"] for e in events)
    upserts = records(emulator, "users")
    assert sorted(u["userId"] for u in upserts) == sorted(p["user_id"] for p in people)
    for topic in (clicks, users, *([items] if neighbour else [])):
        assert await committed_offsets(bootstrap, group, topic) == await end_offsets(bootstrap, topic)
    if neighbour:
        assert sorted(r["itemId"] for r in records(emulator, "items")) == sorted(c["item_id"] for c in catalog)
    return rate([e["received_at"] for e in sent]), rate([u["received_at"] for u in upserts]), emulator.stats()


async def test_a_throttled_route_does_not_slow_the_others(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess, tmp_path: Path
) -> None:
    emulator.configure(quotas={"items": 1})
    clicks_solo, people_solo, _ = await run(topic_factory, worker_factory, emulator, neighbour=False)
    clicks_busy, people_busy, stats = await run(topic_factory, worker_factory, emulator, neighbour=True)
    throttled = stats["destinations"]["PutItems"][ITEMS_ARN]["throttled"]
    print(
        f"clicks {clicks_solo:.0f} -> {clicks_busy:.0f} events/s, people {people_solo:.1f} -> {people_busy:.1f} "
        f"users/s, catalog throttled {throttled} times"
    )
    assert throttled >= 5, "the neighbour was throttled hard while the others ran"
    assert not stats["destinations"]["PutEvents"][TRACKER]["throttled"]
    assert not stats["destinations"]["PutUsers"][USERS_ARN]["throttled"]
    assert clicks_busy >= 0.7 * clicks_solo
    assert people_busy >= 0.7 * people_solo
