"""End to end through the CLI (`run --until-drained`), the real broker and the emulator: a Snowplow enriched
TSV stream (page views, structured events, a link click as an unstructured event) through `preset = "snowplow"`,
delivered field for field; lines that are not enriched events are dead letters with their reason."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime
from typing import Any

import orjson
import pytest

from tests.kafka_support import TopicFactory, committed_offsets, consume_all, end_offsets, produce
from tests.stack import EmulatorProcess, WorkerFactory
from tests.test_e2e import check_calls, header
from worker.mapping.snowplow import FIELDS

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

CONTEXTS = {
    "schema": "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0",
    "data": [{"schema": "iglu:com.snowplowanalytics.snowplow/web_page/jsonschema/1-0-0", "data": {"id": "wp-1"}}],
}


def enriched(**values: str) -> bytes:
    """One enriched event as enrich writes it: the 131 fields in order, tab-separated, empty when absent."""
    assert set(values) <= set(FIELDS)
    return "\t".join(values.get(name, "") for name in FIELDS).encode()


def epoch(stamp: str) -> float:
    """`2024-05-31 16:08:37.383` (UTC, as enrich writes it) → seconds since the epoch."""
    return datetime.fromisoformat(stamp.replace(" ", "T") + "+00:00").timestamp()


def snowplow_stream(sessions: int) -> tuple[list[tuple[str, bytes]], dict[str, dict[str, Any]]]:
    """(key, value) records and, by event_id, the event each must become."""
    records: list[tuple[str, bytes]] = []
    expected: dict[str, dict[str, Any]] = {}
    for s in range(sessions):
        session = f"2b15e5c8-d3b1-11e4-b9d6-{s:012x}"
        common = {
            "app_id": "shop",
            "platform": "web",
            "etl_tstamp": "2024-05-31 16:09:00.001",
            "name_tracker": "sp",
            "v_tracker": "js-3.23.0",
            "v_collector": "ssc-3.2.0-kafka",
            "v_etl": "snowplow-enrich-kafka-4.1.0",
            "domain_userid": f"bc2e92ec{s:08x}",
            "domain_sessionidx": "3",
            "network_userid": f"ecdff4d0-9175-40ac-a8bb-{s:012x}",
            "page_url": f"https://shop.example.com/products/g-{s}",
            "page_urlpath": f"/products/g-{s}",
            "page_title": "Monopoly",
            "contexts": orjson.dumps(CONTEXTS).decode(),
            "useragent": "Mozilla/5.0 (X11; Linux x86_64)",
            "domain_sessionid": session,
            "event_vendor": "com.snowplowanalytics.snowplow",
            "event_format": "jsonschema",
            "event_version": "1-0-0",
        }
        if s % 2:
            common["user_id"] = f"user-{s}@example.com"
        minute = f"2024-05-31 16:{s % 60:02d}"
        page_view = {
            **common,
            "event": "page_view",
            "event_name": "page_view",
            "event_id": f"00000000-0000-4000-8000-{s:08x}0001",
            "collector_tstamp": f"{minute}:01.000",
            "dvce_created_tstamp": f"{minute}:00.900",
            "derived_tstamp": f"{minute}:00.950",
        }
        # A structured event without derived_tstamp (older trackers): collector_tstamp is the time.
        struct = {
            **common,
            "event": "struct",
            "event_name": "event",
            "event_id": f"00000000-0000-4000-8000-{s:08x}0002",
            "se_category": "shop",
            "se_action": "add-to-basket",
            "se_label": f"G-{s}",
            "se_property": "colour:red",
            "se_value": f"{s}.5",
            "collector_tstamp": f"{minute}:02.125",
        }
        link = {
            "schema": "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0",
            "data": {
                "schema": "iglu:com.snowplowanalytics.snowplow/link_click/jsonschema/1-0-1",
                "data": {"targetUrl": f"https://shop.example.com/products/g-{s + 1}", "elementId": f"G-{s + 1}"},
            },
        }
        click = {
            **common,
            "event": "unstruct",
            "event_name": "link_click",
            "event_id": f"00000000-0000-4000-8000-{s:08x}0003",
            "unstruct_event": orjson.dumps(link).decode(),
            "collector_tstamp": f"{minute}:03.000",
            "derived_tstamp": f"{minute}:02.999",
        }
        for fields in (page_view, struct, click):
            records.append((session, enriched(**fields)))
            item = fields.get("se_label") or (f"G-{s + 1}" if fields is click else None)
            event: dict[str, Any] = {
                "eventType": fields.get("se_action") or fields["event_name"],
                "sessionId": session,
                "userId": fields.get("user_id"),
                "sentAt": round(epoch(fields.get("derived_tstamp") or fields["collector_tstamp"]), 3),
                "itemId": item,
                "eventValue": float(fields["se_value"]) if "se_value" in fields else None,
                "properties": {"pageUrlpath": f"/products/g-{s}"},
            }
            expected[fields["event_id"]] = event
        # The Kafka producer retried: the same enriched event again, delivered once by its event_id.
        records.append(records[-3])
    return records, expected


async def test_snowplow_enriched_stream_through_the_preset(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=3)
    dlq = await topic_factory(partitions=1)
    records, expected = snowplow_stream(40)
    # A line cut short (a truncated copy) and a line whose unstruct_event is not JSON: dead letters with reasons.
    records.append(("cut", b"shop\tweb\t2024-05-31 16:09:00.001\tpage_view"))
    broken = {"event": "unstruct", "event_name": "link_click", "event_id": "bad-json", "domain_sessionid": "s-x"}
    records.append(("s-x", enriched(**broken, unstruct_event='{"schema": "iglu:x", "data": {')))
    await produce(bootstrap, topic, records, linger_ms=20)
    group = f"{topic}-group"
    mapping = {
        "preset": "snowplow",
        # The link click's element is the item; page views have none.
        "item_id": "ti_sku || se_label || unstruct_event.data.data.elementId",
        "properties": ["page_urlpath"],
    }
    config = worker_factory.config(topic, dlq, group, mapping=mapping)
    worker = worker_factory(config, until_drained=True)
    assert await worker.await_exit(180) == 0, worker.log_tail()
    assert await committed_offsets(bootstrap, group, topic) == await end_offsets(bootstrap, topic)

    events = await asyncio.to_thread(emulator.events)
    by_id = Counter(e["eventId"] for e in events)
    assert set(by_id) == set(expected) and max(by_id.values()) == 1, "each enriched event once, by its event_id"
    check_calls(events)
    for event in events:
        want = expected[event["eventId"]]
        got = {name: event.get(name) for name in want}
        got["properties"] = orjson.loads(event["properties"])
        assert got == want, event["eventId"]

    dead = await consume_all(bootstrap, dlq, timeout=30)
    reasons = sorted((header(d, "dlq.error.stage"), header(d, "dlq.error.reason")) for d in dead)
    assert reasons == [("decode", "not_enriched_tsv"), ("decode", "not_json")]
    messages = sorted(header(d, "dlq.error.message") for d in dead)
    assert "expected 131 tab-separated fields, got 4" in messages[0]
    assert "unstruct_event is not JSON" in messages[1]
    assert b"shop\tweb\t2024-05-31 16:09:00.001\tpage_view" in [d.value for d in dead], "the line kept verbatim"
