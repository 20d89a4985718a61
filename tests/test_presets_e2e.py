"""End to end through the CLI (`run --until-drained`), the real broker and the emulator: a Segment
stream through `preset = "segment"` and a CloudEvents stream in binary mode (ce_* headers)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest

from tests.kafka_support import TopicFactory, committed_offsets, consume_all, end_offsets, produce
from tests.stack import EmulatorProcess, WorkerFactory
from tests.test_e2e import check_calls, header

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]


def segment_stream(sessions: int) -> tuple[list[tuple[str, bytes]], dict[str, dict[str, Any]], int, int]:
    """(key, value) records; the messages that must arrive by messageId; how many are filtered, how many bad."""
    records: list[tuple[str, bytes]] = []
    expected: dict[str, dict[str, Any]] = {}
    filtered = bad = 0
    for s in range(sessions):
        anonymous = f"anon-{s:04d}"
        base: dict[str, Any] = {"anonymousId": anonymous, "context": {"library": {"name": "analytics.js"}}}
        if s % 2:
            base["userId"] = f"user-{s}"
        if s % 3 == 0:
            base["context"] = {"sessionId": f"sess-{s}"}
        messages = [
            {"type": "page", "name": "Home", "properties": {"path": "/"}},
            {"type": "track", "event": "Product Viewed", "properties": {"product_id": f"p-{s}", "price": 9.5}},
            {
                "type": "track",
                "event": "Product List Viewed",
                "properties": {"list_id": "deals", "products": [{"product_id": f"p-{s}"}, {"product_id": "p-x"}]},
            },
            {"type": "identify", "traits": {"email": "someone@example.com"}},
            {"type": "screen", "name": "Cart"},
        ]
        for n, fields in enumerate(messages):
            assert isinstance(fields, dict)
            message = {**base, **fields, "messageId": f"m-{s}-{n}", "timestamp": f"2024-05-31T16:{s % 60:02d}:0{n}Z"}
            records.append((anonymous, orjson.dumps(message)))
            if fields["type"] == "identify":
                filtered += 1
            else:
                expected[message["messageId"]] = message
        # Segment retries a message with the same messageId: Personalize must see it once.
        records.append(records[-2])
    # A track call without an event name: a dead letter naming eventType, never a silent drop.
    records.append(("anon-bad", orjson.dumps({"type": "track", "anonymousId": "a", "messageId": "bad-1"})))
    bad += 1
    return records, expected, filtered, bad


async def test_segment_stream_through_the_preset(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=3)
    dlq = await topic_factory(partitions=1)
    records, expected, _, bad = segment_stream(60)
    await produce(bootstrap, topic, records, linger_ms=20)
    group = f"{topic}-group"
    config = worker_factory.config(topic, dlq, group, mapping={"preset": "segment", "properties": []})
    worker = worker_factory(config, until_drained=True)
    assert await worker.await_exit(180) == 0, worker.log_tail()
    assert await committed_offsets(bootstrap, group, topic) == await end_offsets(bootstrap, topic)

    events = await asyncio.to_thread(emulator.events)
    by_id = Counter(e["eventId"] for e in events)
    assert set(by_id) == set(expected) and max(by_id.values()) == 1, "each message once, by its messageId"
    check_calls(events)
    for event in events:
        source = expected[event["eventId"]]
        session = (source.get("context") or {}).get("sessionId") or source["anonymousId"]
        assert (event["sessionId"], event.get("userId")) == (session, source.get("userId"))
        kind = source.get("event") or {"page": "Page Viewed", "screen": "Screen Viewed"}[source["type"]]
        assert event["eventType"] == kind
        if kind == "Product Viewed":
            assert (event["itemId"], event["eventValue"]) == (source["properties"]["product_id"], 9.5)
        if kind == "Product List Viewed":
            assert event["impression"] == [p["product_id"] for p in source["properties"]["products"]]

    dead = await consume_all(bootstrap, dlq, timeout=30)
    assert len(dead) == bad
    assert header(dead[0], "dlq.error.stage") == "mapping"
    assert header(dead[0], "dlq.error.message").startswith("eventType: required field")


def cloud_events(count: int) -> tuple[list[tuple[str, bytes, list[tuple[str, bytes]]]], dict[str, dict[str, Any]]]:
    records: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []
    expected: dict[str, dict[str, Any]] = {}
    for n in range(count):
        data = {"sessionId": f"s-{n % 17}", "userId": f"u-{n % 5}", "itemId": f"sku-{n}"}
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", f"evt-{n}".encode()),
            ("ce_source", b"/shop/web"),
            ("ce_type", b"com.example.product.viewed"),
            ("ce_time", f"2024-05-31T16:08:{n % 60:02d}Z".encode()),
            ("content-type", b"application/json"),
        ]
        records.append((data["sessionId"], orjson.dumps(data), headers))
        expected[f"evt-{n}"] = data
    return records, expected


async def test_cloudevents_binary_mode_stream_from_headers(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=2)
    dlq = await topic_factory(partitions=1)
    records, expected = cloud_events(200)
    # One without ce_id: a dead letter (never an invented id), with the record's own headers kept.
    no_id = [h for h in records[0][2] if h[0] != "ce_id"]
    records.append(("s-x", orjson.dumps({"sessionId": "s-x"}), no_id))
    await produce(bootstrap, topic, records, linger_ms=20)
    group = f"{topic}-group"
    config = worker_factory.config(topic, dlq, group, mapping={"preset": "cloudevents", "properties": []})
    worker = worker_factory(config, until_drained=True)
    assert await worker.await_exit(180) == 0, worker.log_tail()
    assert await committed_offsets(bootstrap, group, topic) == await end_offsets(bootstrap, topic)

    events = await asyncio.to_thread(emulator.events)
    assert sorted(e["eventId"] for e in events) == sorted(expected)
    check_calls(events)
    for event in events:
        data = expected[event["eventId"]]
        assert (event["sessionId"], event["userId"], event["itemId"]) == (
            data["sessionId"],
            data["userId"],
            data["itemId"],
        )
        assert event["eventType"] == "com.example.product.viewed"

    dead = await consume_all(bootstrap, dlq, timeout=30)
    assert len(dead) == 1
    assert (header(dead[0], "dlq.error.stage"), header(dead[0], "ce_type")) == ("decode", "com.example.product.viewed")
    assert "required attribute 'id'" in header(dead[0], "dlq.error.message")
