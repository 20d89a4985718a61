"""`python -m tests.bench --mode decode`: CPU per record of decoding registry-framed values, in this process.

No broker, no registry: the records are made with confluent-kafka's serializers against its in-memory mock
registry, and the worker's decoders are handed the same schemas. CPU time (`time.process_time`), the
best of several repeats, so other load on the machine does not count (on a shared 2-core box wall-clock
timings of the same loop varied by 2x). Compared:

- `avro_decode`: the worker's Avro decode (fastavro `schemaless_reader`, schema parsed once) of a
  15-field clickstream record; target ≤ 10 µs.
- `avro_decode_and_map`: the same plus the mapping to a PutEvents event (what intake does per record).
- `json_map`: the JSON path on the same record as JSON (orjson + mapping), for comparison.
- `confluent_avro_deserializer`: confluent-kafka's AvroDeserializer on the same bytes, schema cached.
- `protobuf_decode`: the worker's Protobuf decode of the same record as a 15-field message.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import timeit
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import message_factory

from worker.config import Settings
from worker.mapping.avro import AvroDecoder
from worker.mapping.mapper import Mapper
from worker.mapping.protobuf import ProtobufDecoder, build_pool
from worker.mapping.schemas import Schemas
from worker.observe.metrics import Metrics

FIELDS_15 = {
    "type": "record",
    "name": "Click",
    "namespace": "shop.events",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "session_id", "type": "string"},
        {"name": "user_id", "type": ["null", "string"], "default": None},
        {"name": "event_type", "type": "string"},
        {"name": "item_id", "type": "string"},
        {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "event_value", "type": ["null", "double"], "default": None},
        {"name": "recommendation_id", "type": ["null", "string"], "default": None},
        {"name": "impression", "type": {"type": "array", "items": "string"}},
        {"name": "page_category", "type": "string"},
        {"name": "device_type", "type": "string"},
        {"name": "country", "type": "string"},
        {"name": "referrer", "type": ["null", "string"], "default": None},
        {"name": "position", "type": "int"},
        {"name": "is_bot", "type": "boolean"},
    ],
}
PROTO_15 = """syntax = "proto3";
package shop.events;
message Click {
  string event_id = 1; string session_id = 2; optional string user_id = 3; string event_type = 4;
  string item_id = 5; int64 timestamp = 6; optional double event_value = 7; optional string recommendation_id = 8;
  repeated string impression = 9; string page_category = 10; string device_type = 11; string country = 12;
  optional string referrer = 13; int32 position = 14; bool is_bot = 15;
}
"""
RECORD: dict[str, Any] = {
    "event_id": "evt-7-123456",
    "session_id": "sess-7-98765",
    "user_id": "user-4242",
    "event_type": "click",
    "item_id": "item-1717",
    "timestamp": 1_790_000_000_123,
    "event_value": 12.5,
    "recommendation_id": None,
    "impression": ["item-1", "item-2", "item-3"],
    "page_category": "shoes",
    "device_type": "ios",
    "country": "DE",
    "referrer": None,
    "position": 3,
    "is_bot": False,
}
TARGETS = {"avro_decode_us": "<= 10"}


def cpu_us(call: Callable[[], object], number: int, repeat: int) -> float:
    """Best-of-`repeat` CPU microseconds per call."""
    return min(timeit.repeat(call, number=number, repeat=repeat, timer=time.process_time)) / number * 1e6


def mode_decode(args: argparse.Namespace) -> dict[str, Any]:
    number, repeat = args.decode_calls, args.decode_repeats
    registry = SchemaRegistryClient.new_client({"url": "mock://bench"})  # confluent-kafka's in-memory registry
    topic = SerializationContext("bench", MessageField.VALUE)
    schema_text = orjson.dumps(FIELDS_15).decode()
    value = AvroSerializer(registry, schema_text)(RECORD, topic)
    assert value is not None
    decoder = AvroDecoder(1, schema_text)
    assert decoder.decode(value, 5) == RECORD

    settings = Settings.model_validate(
        {
            "personalize": {"tracking_id": "t"},
            "mapping": {"format": "avro", "properties": ["page_category", "device_type"]},
            "schema_registry": {"url": "http://unused"},
        }
    )
    schemas = Schemas(settings, Metrics())
    schema_id = int.from_bytes(value[1:5], "big")
    schemas.decoders[schema_id] = decoder
    framed_map = schemas.mapping(Mapper(settings.mapping))
    assert framed_map(value) is not None
    json_value = orjson.dumps({**RECORD, "timestamp": RECORD["timestamp"] / 1000})
    mapper = Mapper(settings.mapping)
    assert mapper.map(json_value) is not None

    deserializer = AvroDeserializer(registry)
    assert deserializer(value, topic)["event_id"] == RECORD["event_id"]  # its timestamp is a datetime

    pool, name = build_pool(2, PROTO_15, [])
    proto_decoder = ProtobufDecoder(2, pool, name)
    click = message_factory.GetMessageClass(proto_decoder.descriptor((0,)))
    message = click(**{k: v for k, v in RECORD.items() if v is not None})
    proto_value = ProtobufSerializer(click, registry, {"use.deprecated.format": False})(message, topic)
    assert proto_value is not None
    assert proto_decoder.decode(proto_value, 5) == {k: v for k, v in RECORD.items() if v is not None and v is not False}
    asyncio.run(schemas.close())

    return {
        "avro_payload_bytes": len(value),
        "avro_decode_us": round(cpu_us(lambda: decoder.decode(value, 5), number, repeat), 2),
        "avro_decode_and_map_us": round(cpu_us(lambda: framed_map(value), number, repeat), 2),
        "json_map_us": round(cpu_us(lambda: mapper.map(json_value), number, repeat), 2),
        "confluent_avro_deserializer_us": round(cpu_us(lambda: deserializer(value, topic), number, repeat), 2),
        "protobuf_decode_us": round(cpu_us(lambda: proto_decoder.decode(proto_value, 5), number, repeat), 2),
        "schema_text_compile_ms": round(cpu_us(lambda: build_pool(3, PROTO_15, []), 5, 3) / 1000, 2),
    }
