"""The Avro and Protobuf decoders: frames, references, and the values a mapping gets (pure; no registry)."""

from __future__ import annotations

import base64
import io
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import fastavro
import orjson
import pytest
from google.protobuf import descriptor_pb2, message_factory

from worker.mapping.avro import AvroDecoder, AvroSchemaError, top_level_fields
from worker.mapping.protobuf import (
    FrameError,
    ProtobufDecoder,
    ProtobufSchemaError,
    build_pool,
    field_paths,
    message_indexes,
)

# --- Avro ------------------------------------------------------------------------------------------------

LOGICAL = {
    "type": "record",
    "name": "Logical",
    "namespace": "t",
    "fields": [
        {"name": "millis", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "micros", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "nanos", "type": {"type": "long", "logicalType": "timestamp-nanos"}},
        {"name": "local", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "time", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
        {
            "name": "amount",
            "type": {
                "type": "fixed",
                "name": "Amount",
                "size": 8,
                "logicalType": "decimal",
                "precision": 12,
                "scale": 3,
            },
        },
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "raw", "type": "bytes"},
        {"name": "tag", "type": {"type": "fixed", "name": "Tag", "size": 2}},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"]}},
        {"name": "maybe", "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}]},
        {"name": "blobs", "type": {"type": "array", "items": "bytes"}},
    ],
}


def avro_bytes(schema: dict[str, Any], record: dict[str, Any], named: dict[str, Any] | None = None) -> bytes:
    out = io.BytesIO(b"\x00\x00\x00\x00\x07")
    out.seek(5)
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema, named), record)
    return out.getvalue()


def test_avro_logical_types_become_the_values_a_mapping_expects() -> None:
    instant = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)
    value = avro_bytes(
        LOGICAL,
        {
            "millis": instant,
            "micros": instant,
            "nanos": 1_795_341_600_123_456_789,
            "local": datetime(2026, 11, 22, 10, 0, 0, 500),
            "day": date(2026, 11, 22),
            "time": 3_600_000,
            "price": Decimal("12.34"),
            "amount": Decimal("-1.500"),
            "id": str(uuid.UUID(int=7)),
            "raw": b"\x00\xff",
            "tag": b"ab",
            "kind": "B",
            "maybe": None,
            "blobs": [b"x", b"yz"],
        },
    )
    decoded = AvroDecoder(7, orjson.dumps(LOGICAL).decode()).decode(value, 5)
    assert decoded == {
        "millis": 1_795_341_600_123,
        "micros": 1_795_341_600_123.456,
        "nanos": pytest.approx(1_795_341_600_123.4568),
        "local": 1_795_341_600_000.5,
        "day": "2026-11-22",
        "time": 3_600_000,
        "price": 12.34,
        "amount": -1.5,
        "id": "00000000-0000-0000-0000-000000000007",
        "raw": base64.b64encode(b"\x00\xff").decode(),
        "tag": "YWI=",
        "kind": "B",
        "maybe": None,
        "blobs": ["eA==", "eXo="],
    }
    orjson.dumps(decoded)  # nothing a mapping could not serialize


def test_avro_conversions_do_not_change_fastavro_for_other_readers() -> None:
    """Our logical types are registered under our own names: other Avro code in the process is unaffected."""
    schema = fastavro.parse_schema({"type": "long", "logicalType": "timestamp-millis"})
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, 1_790_000_000_000)
    out.seek(0)
    assert isinstance(fastavro.schemaless_reader(out, schema), datetime)


def test_avro_references_supply_named_types() -> None:
    money = {"type": "record", "name": "Money", "namespace": "shop", "fields": [{"name": "cents", "type": "long"}]}
    click = {"type": "record", "name": "Click", "namespace": "shop", "fields": [{"name": "price", "type": "Money"}]}
    named: dict[str, Any] = {}
    fastavro.parse_schema(money, named)
    value = avro_bytes(click, {"price": {"cents": 250}}, named)
    decoder = AvroDecoder(7, orjson.dumps(click).decode(), [orjson.dumps(money).decode()])
    assert decoder.decode(value, 5) == {"price": {"cents": 250}}
    with pytest.raises(AvroSchemaError):
        AvroDecoder(8, orjson.dumps(click).decode())  # Money unknown without its reference


@pytest.mark.parametrize(
    "text",
    ["not json", '{"type": "record", "name": "A", "fields": [{"name": "a", "type": "Missing"}]}', '{"type": "nope"}'],
)
def test_avro_unusable_schemas_are_refused(text: str) -> None:
    with pytest.raises(AvroSchemaError):
        AvroDecoder(1, text)


def test_avro_payload_written_with_another_schema_does_not_pass_silently() -> None:
    schema = {"type": "record", "name": "A", "fields": [{"name": "a", "type": "string"}]}
    value = avro_bytes(schema, {"a": "hello"})
    decoder = AvroDecoder(1, orjson.dumps(schema).decode())
    with pytest.raises(ValueError, match="bytes left"):
        decoder.decode(value + b"\x02", 5)
    with pytest.raises(EOFError):
        decoder.decode(value[:-2], 5)


def test_avro_field_paths_for_check() -> None:
    paths = top_level_fields(
        orjson.dumps(
            {
                "type": "record",
                "name": "A",
                "fields": [
                    {"name": "a", "type": "string"},
                    {
                        "name": "ctx",
                        "type": ["null", {"type": "record", "name": "C", "fields": [{"name": "x", "type": "int"}]}],
                    },
                ],
            }
        ).decode()
    )
    assert paths == {"a", "ctx", "ctx.x"}
    assert top_level_fields('"string"') is None


# --- Protobuf --------------------------------------------------------------------------------------------

COMMON = 'syntax = "proto3";\npackage shop.common;\nmessage Context { string page_category = 1; }\n'
EVENTS = """syntax = "proto3";
package shop.events;
import "shop/common.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/wrappers.proto";
import "google/protobuf/struct.proto";

message First { string x = 1; }
message Click {
  enum Kind { KIND_UNSPECIFIED = 0; ORGANIC = 1; }
  message Inner { string note = 1; }
  string session_id = 1;
  google.protobuf.Timestamp at = 2;
  google.protobuf.Duration took = 3;
  google.protobuf.StringValue user = 4;
  google.protobuf.Int64Value big = 5;
  google.protobuf.BytesValue blob = 6;
  bytes raw = 7;
  Kind kind = 8;
  map<int32, string> tags = 9;
  repeated string items = 10;
  shop.common.Context ctx = 11;
  google.protobuf.Struct extra = 12;
  optional double value = 13;
  int64 count = 14;
  repeated Inner inners = 15;
}
"""


def text_decoder() -> ProtobufDecoder:
    pool, name = build_pool(5, EVENTS, [("shop/common.proto", COMMON)])
    return ProtobufDecoder(5, pool, name)


@pytest.mark.parametrize(
    ("frame", "path", "start"),
    [
        (b"\x00rest", (0,), 1),
        (b"\x02\x02rest", (1,), 2),
        (b"\x04\x02\x00rest", (1, 0), 3),
        (b"\x02\x80\x01rest", (64,), 3),
    ],
)
def test_message_indexes_are_zigzag_varints(frame: bytes, path: tuple[int, ...], start: int) -> None:
    assert message_indexes(frame, 0) == (path, start)


@pytest.mark.parametrize("frame", [b"", b"\x02", b"\x02\x03", b"\x82", b"\xfe\x01" + b"\x00" * 200])
def test_malformed_message_indexes_are_frame_errors(frame: bytes) -> None:
    with pytest.raises(FrameError):
        message_indexes(frame, 0)


def test_protobuf_from_text_with_references_converts_every_kind_of_field() -> None:
    decoder = text_decoder()
    click = message_factory.GetMessageClass(decoder.descriptor((1,)))
    message: Any = click(session_id="s", kind=1, raw=b"\x01\x02", items=["a", "b"], value=0.0)
    message.at.FromMilliseconds(1_790_000_000_123)
    message.took.FromMilliseconds(1500)
    message.user.value = "u"
    message.big.value = 2**62
    message.blob.value = b"z"
    message.tags[3] = "three"
    message.ctx.page_category = "shoes"
    message.extra.update({"a": 1, "b": [True, None]})
    message.inners.add(note="n")
    decoded = decoder.decode(b"\x02\x02" + message.SerializeToString(), 0)
    assert decoded == {
        "session_id": "s",
        "at": 1_790_000_000_123,
        "took": 1.5,
        "user": "u",
        "big": 2**62,
        "blob": "eg==",
        "raw": "AQI=",
        "kind": "ORGANIC",
        "tags": {"3": "three"},
        "items": ["a", "b"],
        "ctx": {"page_category": "shoes"},
        "extra": {"a": 1.0, "b": [True, None]},
        "value": 0.0,  # `optional`: present at its default
        "inners": [{"note": "n"}],
    }
    assert "count" not in decoded, "proto3 fields at their default are absent, as in protobuf's JSON mapping"
    orjson.dumps(decoded)


def test_protobuf_odd_values() -> None:
    decoder = text_decoder()
    click = message_factory.GetMessageClass(decoder.descriptor((1,)))
    message: Any = click(kind=5)  # a number the schema does not name
    message.at.seconds, message.at.nanos = 1_790_000_000, 1_500_000
    assert decoder.decode(b"\x02\x02" + message.SerializeToString(), 0) == {"kind": 5, "at": 1_790_000_000_001.5}
    inner = message_factory.GetMessageClass(decoder.descriptor((1, 0)))(note="deep")
    assert decoder.decode(b"\x04\x02\x00" + inner.SerializeToString(), 0) == {"note": "deep"}
    with pytest.raises(FrameError, match=r"\[2\]"):
        decoder.decode(b"\x02\x04", 0)
    with pytest.raises(FrameError, match=r"\[1, 5\]"):
        decoder.decode(b"\x04\x02\x0a", 0)


def test_protobuf_serialized_descriptors_and_mixed_forms_give_the_same_pool() -> None:
    text_pool, name = build_pool(5, EVENTS, [("shop/common.proto", COMMON)])
    events, common = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    text_pool.FindFileByName(name).CopyToProto(events)
    text_pool.FindFileByName("shop/common.proto").CopyToProto(common)
    b64 = [base64.b64encode(p.SerializeToString()).decode() for p in (events, common)]
    serialized = ProtobufDecoder(6, *build_pool(6, b64[0], [("shop/common.proto", b64[1])]))
    mixed = ProtobufDecoder(7, *build_pool(7, EVENTS, [("shop/common.proto", b64[1])]))
    click = message_factory.GetMessageClass(text_decoder().descriptor((1,)))
    frame = b"\x02\x02" + click(session_id="s", ctx={"page_category": "c"}).SerializeToString()
    expected = {"session_id": "s", "ctx": {"page_category": "c"}}
    assert serialized.decode(frame, 0) == mixed.decode(frame, 0) == expected
    assert "ctx.page_category" in field_paths(serialized.descriptor((1,)))


@pytest.mark.parametrize(
    ("text", "references", "match"),
    [
        ('syntax = "proto3";\nmessage A { strin x = 1; }\n', [], "does not compile"),
        (EVENTS, [], "does not compile"),  # its import is missing
        ('syntax = "proto3";\nmessage A {}\n', [("../evil.proto", COMMON)], "not a relative .proto path"),
    ],
)
def test_protobuf_unusable_schemas_are_refused(text: str, references: list[tuple[str, str]], match: str) -> None:
    with pytest.raises(ProtobufSchemaError, match=match):
        build_pool(9, text, references)


def test_protobuf_serialized_schema_with_a_missing_import_is_refused() -> None:
    proto = descriptor_pb2.FileDescriptorProto(name="a.proto", dependency=["shop/missing.proto"])
    with pytest.raises(ProtobufSchemaError, match="neither a reference nor a well-known type"):
        build_pool(9, base64.b64encode(proto.SerializeToString()).decode(), [])
