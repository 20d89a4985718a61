"""Routes reading schema-registry formats (`run --until-drained`, real broker, Apicurio registry, emulator): an
Avro route with one tracker, an Avro route choosing its tracker by a decoded field, and a JSON route in the
same worker. Each record is delivered field for field or dead-lettered with stage `decode` on its route."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest

from tests.formats_support import AVRO_V1, avro_object, avro_serializer, check_event, context, frame, produced
from tests.kafka_support import TopicFactory, committed_offsets, consume_all, end_offsets, produce
from tests.registry_support import SchemaRegistry
from tests.stack import TRACKING_ID, EmulatorProcess, WorkerFactory
from tests.test_formats_e2e import UNKNOWN_ID, sources
from tests.test_routes_e2e import routes_toml

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

DEVICES = {"web": "tracker-web", "ios": "tracker-ios", "android": "tracker-android"}
JSON_TRACKER = "tracker-json"


async def test_avro_routes_beside_a_json_route(
    topic_factory: TopicFactory,
    worker_factory: WorkerFactory,
    emulator: EmulatorProcess,
    schema_registry: SchemaRegistry,
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    avro, by_device, plain = [await topic_factory(partitions=2) for _ in range(3)]
    dlqs = [await topic_factory(partitions=1) for _ in range(3)]
    objects = sources(900, seed=5)
    first, second, third = objects[:300], objects[300:600], objects[600:]
    with schema_registry.client() as client:
        v1 = avro_serializer(client, AVRO_V1)
        avro_values = [produced(v1(avro_object(s, with_value=False), context(avro))) for s in first]
        device_values = [produced(v1(avro_object(s, with_value=False), context(by_device))) for s in second]
    schema_id = int.from_bytes(avro_values[0][1:5], "big")
    bad = [frame(UNKNOWN_ID, avro_values[0][5:]), orjson.dumps(first[0]), frame(schema_id, avro_values[1][5:-3])]
    await produce(bootstrap, avro, [(s["session_id"].encode(), v) for s, v in zip(first, avro_values, strict=True)])
    await produce(bootstrap, avro, [(b"bad", v) for v in bad])
    await produce(
        bootstrap, by_device, [(s["session_id"].encode(), v) for s, v in zip(second, device_values, strict=True)]
    )
    await produce(bootstrap, plain, [(s["session_id"].encode(), orjson.dumps(s)) for s in third])

    group = f"{avro}-group"
    sections = worker_factory.config(avro, dlqs[0], group, schema_registry={"url": schema_registry.url})
    sections["personalize"].pop("tracking_id")
    del sections["kafka"]["topics"], sections["mapping"], sections["dead_letter"]
    properties = ["ctx.page_category", "ctx.device_type"]
    routes: list[dict[str, Any]] = [
        {
            "name": "avro_clicks",
            "topics": [avro],
            "tracking_id": TRACKING_ID,
            "mapping": {"format": "avro", "properties": properties},
            "dead_letter_topic": dlqs[0],
        },
        {
            "name": "avro_devices",
            "topics": [by_device],
            "tracking_id_field": "ctx.device_type",
            "trackers": DEVICES,
            "mapping": {"format": "avro", "properties": properties},
            "dead_letter_topic": dlqs[1],
        },
        {
            "name": "json_clicks",
            "topics": [plain],
            "tracking_id": JSON_TRACKER,
            "mapping": {"properties": properties},
            "dead_letter_topic": dlqs[2],
        },
    ]
    worker = worker_factory(sections, until_drained=True, start=False)
    worker.config.write_text(worker.config.read_text(encoding="utf-8") + "\n" + routes_toml(routes), encoding="utf-8")
    worker.start()
    assert await worker.await_exit(180) == 0, worker.log_tail()

    events = await asyncio.to_thread(emulator.events)
    assert Counter(e["eventId"] for e in events) == Counter(s["event_id"] for s in objects), "each exactly once"
    by_id = {e["eventId"]: e for e in events}
    for source in first:
        check_event(by_id[source["event_id"]], source, with_value=False)
    for source in second:
        event = by_id[source["event_id"]]
        assert event["trackingId"] == DEVICES[source["ctx"]["device_type"]]
        check_event({**event, "trackingId": TRACKING_ID}, source, with_value=False)
    assert {by_id[s["event_id"]]["trackingId"] for s in third} == {JSON_TRACKER}

    letters = await consume_all(bootstrap, dlqs[0], timeout=30, min_records=3)
    reasons = sorted(dict(r.headers)["dlq.error.reason"].decode() for r in letters)
    assert reasons == ["bad_payload", "not_framed", "unknown_schema"]
    assert {dict(r.headers)["dlq.error.stage"] for r in letters} == {b"decode"}
    for topic in (avro, by_device, plain):
        assert await committed_offsets(bootstrap, group, topic) == await end_offsets(bootstrap, topic)
