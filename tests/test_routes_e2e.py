"""Four routes in one worker (`run --until-drained`), against the real broker and the emulator: events to two
trackers by a record field, items from a Debezium topic (coalesced; deletes and tombstones), users, action
interactions. Exact delivery per destination, dead letters per route, every topic committed to its end."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.kafka_support import TopicFactory, committed_offsets, consume_all, end_offsets, produce
from tests.stack import EmulatorProcess, WorkerFactory, _http, _toml_value

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

ITEMS_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/ITEMS"
USERS_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/USERS"
TRACKERS = {"a": "tracker-a", "b": "tracker-b"}
INTERACTIONS_TRACKER = "tracker-actions"


def records(emulator: EmulatorProcess, kind: str) -> list[dict[str, Any]]:
    raw = _http(f"{emulator.url}/_emulator/{kind}", timeout=60)
    return [orjson.loads(line) for line in raw.splitlines() if line]


def routes_toml(routes: list[dict[str, Any]]) -> str:
    lines = []
    for route in routes:
        lines.append("[[routes]]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in route.items())
        lines.append("")
    return "\n".join(lines)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


async def test_four_routes_deliver_exactly_with_dead_letters_and_commits(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess, tmp_path: Path
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    clicks, items, users, actions = [await topic_factory(partitions=2) for _ in range(4)]
    dlqs = [await topic_factory(partitions=1) for _ in range(4)]
    now = time.time()

    events: list[dict[str, Any]] = [
        {
            "event_id": f"e{n}",
            "session_id": f"s{n % 5}",
            "user_id": f"u{n % 5}",
            "event_type": "click",
            "item_id": f"i{n % 7}",
            "timestamp": now - 100 + n,
            "site": "a" if n % 3 else "b",
        }
        for n in range(60)
    ]
    bad_clicks = [dumps({**events[0], "event_id": "x1", "site": "nowhere"}), b"{not json"]
    await produce(
        bootstrap, clicks, [(e["session_id"].encode(), dumps(e)) for e in events] + [(b"s", v) for v in bad_clicks]
    )

    # Debezium: three versions of each of 20 items (the last wins), deletes and tombstones of others, one bad op.
    changes: list[tuple[bytes, bytes | None]] = []
    for version in range(3):
        for n in range(20):
            row = {"item_id": f"item-{n}", "price": version * 100 + n, "category": f"c{version}"}
            changes.append((f"item-{n}".encode(), dumps({"op": "c" if version == 0 else "u", "after": row})))
    for n in range(20, 25):
        changes.append((f"item-{n}".encode(), dumps({"payload": {"op": "d", "before": {"item_id": f"item-{n}"}}})))
        changes.append((f"item-{n}".encode(), None))
    changes.append((b"item-bad", dumps({"op": "x", "after": {}})))
    await produce(bootstrap, items, changes)

    user_rows = [{"user_id": f"u{n}", "tier": "gold" if n % 2 else "silver"} for n in range(15)]
    await produce(
        bootstrap, users, [(r["user_id"].encode(), dumps(r)) for r in user_rows] + [(b"u", dumps({"tier": "x"}))]
    )

    interactions = [
        {
            "action_id": f"act-{n % 4}",
            "session_id": f"s{n % 3}",
            "user_id": f"u{n % 3}",
            "event_type": "Taken" if n % 2 else "viewed",
            "timestamp": now - 50 + n,
            "event_id": f"ai{n}",
        }
        for n in range(25)
    ]
    bad_interaction = dumps({**interactions[0], "event_id": "ai-bad", "event_type": "Purchased"})
    await produce(bootstrap, actions, [(b"k", dumps(r)) for r in interactions] + [(b"k", bad_interaction)])

    group = f"{clicks}-group"
    sections = worker_factory.config(clicks, dlqs[0], group)
    sections["personalize"].pop("tracking_id")
    del sections["kafka"]["topics"], sections["mapping"], sections["dead_letter"]
    routes: list[dict[str, Any]] = [
        {
            "name": "clicks",
            "topics": [clicks],
            "operation": "events",
            "tracking_id_field": "site",
            "trackers": TRACKERS,
            "dead_letter_topic": dlqs[0],
        },
        {
            "name": "catalog",
            "topics": [items],
            "operation": "items",
            "dataset_arn": ITEMS_ARN,
            "envelope": "debezium",
            "mapping": {"properties": "*"},
            "coalesce_window_seconds": 0.2,
            "dead_letter_topic": dlqs[1],
        },
        {
            "name": "people",
            "topics": [users],
            "operation": "users",
            "dataset_arn": USERS_ARN,
            "mapping": {"properties": ["tier"]},
            "dead_letter_topic": dlqs[2],
        },
        {
            "name": "actions",
            "topics": [actions],
            "operation": "action_interactions",
            "tracking_id": INTERACTIONS_TRACKER,
            "mapping": {"impression": "", "recommendation_id": ""},
            "dead_letter_topic": dlqs[3],
        },
    ]
    worker = worker_factory(sections, until_drained=True, start=False)
    worker.config.write_text(worker.config.read_text(encoding="utf-8") + "\n" + routes_toml(routes), encoding="utf-8")
    worker.start()
    assert await worker.await_exit(180) == 0, worker.log_tail()

    sent = records(emulator, "events")
    assert sorted(e["eventId"] for e in sent) == sorted(e["event_id"] for e in events), "each event exactly once"
    by_id = {e["event_id"]: e for e in events}
    calls: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for event in sent:
        assert event["trackingId"] == TRACKERS[by_id[event["eventId"]]["site"]]
        calls[event["request_id"]].add((event["trackingId"], event["sessionId"]))
    assert all(len(keys) == 1 for keys in calls.values()), "a call carries one tracker and one session"

    upserts = records(emulator, "items")
    assert {r["datasetArn"] for r in upserts} == {ITEMS_ARN}
    last: dict[str, dict[str, Any]] = {}
    for record in upserts:  # in arrival order: per id, updates go one at a time, in offset order
        last[record["itemId"]] = orjson.loads(record["properties"])
    assert last == {f"item-{n}": {"price": 200 + n, "category": "c2"} for n in range(20)}
    assert len(upserts) <= 60

    people = records(emulator, "users")
    assert sorted((r["userId"], orjson.loads(r["properties"])["tier"]) for r in people) == sorted(
        (r["user_id"], r["tier"]) for r in user_rows
    )
    assert {r["datasetArn"] for r in people} == {USERS_ARN}

    taken = records(emulator, "action-interactions")
    assert sorted(r["eventId"] for r in taken) == sorted(r["event_id"] for r in interactions)
    assert {r["trackingId"] for r in taken} == {INTERACTIONS_TRACKER}
    assert {r["eventType"] for r in taken} == {"Taken", "Viewed"}

    letters = [await consume_all(bootstrap, dlq, timeout=30) for dlq in dlqs]
    reasons = [sorted(dict(r.headers).get("dlq.error.reason", b"").decode() for r in batch) for batch in letters]
    assert [len(batch) for batch in letters] == [2, 1, 1, 1], reasons
    assert sorted(r.value or b"" for r in letters[0]) == sorted(bad_clicks)
    for topic in (clicks, items, users, actions):
        assert await committed_offsets(bootstrap, group, topic) == await end_offsets(bootstrap, topic)
