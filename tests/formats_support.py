"""Test data in the schema registry's wire formats, made with confluent-kafka's official serializers.

The worker's decoders never touch these bytes on the way in: the serializers (and, for .proto text
registered by "another language", the Confluent framing written out here by hand) are the independent side.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from tests.stack import TRACKING_ID

CONTEXT = {
    "type": "record",
    "name": "Context",
    "fields": [{"name": "page_category", "type": "string"}, {"name": "device_type", "type": "string"}],
}
AVRO_V1: dict[str, Any] = {
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
        {"name": "ctx", "type": CONTEXT},
    ],
}
AVRO_V2: dict[str, Any] = {
    **AVRO_V1,
    "fields": [*AVRO_V1["fields"], {"name": "event_value", "type": ["null", "double"], "default": None}],
}
JSON_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Click",
    "type": "object",
    "properties": {
        "event_id": {"type": "string"},
        "session_id": {"type": "string"},
        "user_id": {"type": "string"},
        "event_type": {"type": "string"},
        "item_id": {"type": "string"},
        "timestamp": {"type": "number"},
        "event_value": {"type": "number"},
        "ctx": {
            "type": "object",
            "properties": {"page_category": {"type": "string"}, "device_type": {"type": "string"}},
        },
    },
    "required": ["session_id", "event_type", "timestamp"],
}
COMMON_PROTO = """syntax = "proto3";
package shop.common;
message Context { string page_category = 1; string device_type = 2; }
"""
CLICK_PROTO = """syntax = "proto3";
package shop.events;
import "shop/common.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

// Not the first message of the file: frames carry the message index [1].
message Envelope { string source = 1; }
message Click {
  string event_id = 1;
  string session_id = 2;
  google.protobuf.StringValue user_id = 3;
  string event_type = 4;
  string item_id = 5;
  google.protobuf.Timestamp timestamp = 6;
  shop.common.Context ctx = 7;
  optional double event_value = 8;
  message Debug { string note = 1; }
}
"""


def context(topic: str) -> SerializationContext:
    return SerializationContext(topic, MessageField.VALUE)


def avro_serializer(client: SchemaRegistryClient, schema: dict[str, Any]) -> AvroSerializer:
    serializer: AvroSerializer = AvroSerializer(client, orjson.dumps(schema).decode())
    return serializer


def avro_object(source: dict[str, Any], *, with_value: bool) -> dict[str, Any]:
    """The clickstream object (worker.commands.sample) in the Avro schema's shape; timestamps in epoch ms."""
    obj = {
        "event_id": source["event_id"],
        "session_id": source["session_id"],
        "user_id": source.get("user_id"),
        "event_type": source["event_type"],
        "item_id": source["item_id"],
        "timestamp": round(source["timestamp"] * 1000),
        "ctx": dict(source["ctx"]),
    }
    if with_value:
        obj["event_value"] = source.get("event_value")
    return obj


def json_serializer(client: SchemaRegistryClient) -> JSONSerializer:
    serializer: JSONSerializer = JSONSerializer(orjson.dumps(JSON_SCHEMA).decode(), client)
    return serializer


_modules: dict[str, ModuleType] = {}


def click_pb2(root: Path) -> ModuleType:
    """The test's generated Protobuf module (protoc from grpcio-tools), once per process: generated modules
    register their files in the default descriptor pool, which refuses a second copy."""
    if "click" not in _modules:
        from grpc_tools import protoc  # type: ignore[import-untyped]

        src, out = root / "src", root / "out"
        (src / "shop").mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (src / "shop" / "common.proto").write_text(COMMON_PROTO)
        (src / "shop" / "click.proto").write_text(CLICK_PROTO)
        includes = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        args = ["protoc", f"-I{src}", f"-I{includes}", f"--python_out={out}", "shop/common.proto", "shop/click.proto"]
        assert protoc.main(args) == 0
        sys.path.insert(0, str(out))
        _modules["click"] = importlib.import_module("shop.click_pb2")
    return _modules["click"]


def click_message(module: ModuleType, source: dict[str, Any]) -> Any:
    message = module.Click(
        event_id=source["event_id"],
        session_id=source["session_id"],
        event_type=source["event_type"],
        item_id=source["item_id"],
    )
    if source.get("user_id") is not None:
        message.user_id.value = source["user_id"]
    message.timestamp.FromMilliseconds(round(source["timestamp"] * 1000))
    message.ctx.page_category = source["ctx"]["page_category"]
    message.ctx.device_type = source["ctx"]["device_type"]
    if "event_value" in source:
        message.event_value = source["event_value"]
    return message


def protobuf_serializer(client: SchemaRegistryClient, module: ModuleType) -> ProtobufSerializer:
    serializer: ProtobufSerializer = ProtobufSerializer(module.Click, client, {"use.deprecated.format": False})
    return serializer


def produced(value: bytes | None) -> bytes:
    """A serializer's output (None only for a None input)."""
    assert value is not None
    return value


def frame(schema_id: int, payload: bytes, indexes: bytes = b"") -> bytes:
    """Confluent framing written out by hand: magic byte 0, the id big-endian, Protobuf's index list."""
    return b"\x00" + schema_id.to_bytes(4, "big") + indexes + payload


def check_event(event: dict[str, Any], source: dict[str, Any], *, with_value: bool = True) -> None:
    """One delivered event against the object it came from, field for field."""
    assert event["trackingId"] == TRACKING_ID
    assert event["eventId"] == source["event_id"]
    assert event["sessionId"] == source["session_id"]
    assert event.get("userId") == source.get("user_id")
    assert event["eventType"] == source["event_type"]
    assert event["itemId"] == source["item_id"]
    assert event["sentAt"] == round(source["timestamp"], 3)
    assert event.get("eventValue") == (source.get("event_value") if with_value else None)
    assert orjson.loads(event["properties"]) == {
        "pageCategory": source["ctx"]["page_category"],
        "deviceType": source["ctx"]["device_type"],
    }
