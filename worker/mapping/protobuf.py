"""Protobuf payloads → plain dicts, with protobuf's runtime and descriptors built from the registry's schemas.

A registered Protobuf schema comes back in one of two forms, and both are handled: base64 of a serialized
FileDescriptorProto (what Confluent's serializers register, and what a registry returns for
`format=serialized`), or `.proto` text as stored (Apicurio returns every schema as it was stored, so a schema
a Java or Go producer registered as text stays text). Text is compiled with protoc itself, in process, from
grpcio-tools: 1-1.5 ms for a one-file schema, ~7 ms with imports (temp files included), once per schema
id and off the event loop, exact by construction. The pure-Python
proto-schema-parser took ~5.8 ms just to parse the same file and would still need an AST → descriptor
translation (name resolution, maps, oneofs, proto3 optional) written and kept here. References (the
registry's `references`, one per `import`) become files of the same descriptor pool; well-known types
(google/protobuf/*.proto) come from the runtime. Each schema id gets its own pool: two versions of one
.proto file name cannot share one.

The frame after the schema id is the message-index list (zig-zag varints: a count, then the index path;
a single 0 means the file's first message), so nested and non-first messages decode.

Values, as the mapping expects them (proto3 fields at their default value are absent, as in protobuf's
JSON mapping: use `optional` or a wrapper type where a 0 or "" must reach Personalize):

| Protobuf | value |
|---|---|
| integers (64-bit too), float, double, bool, string | the number / bool / text (64-bit integers stay numbers) |
| bytes | standard base64 text |
| enum | the value's name (its number if the schema does not know it) |
| google.protobuf.Timestamp | epoch milliseconds (int when whole, else float) |
| google.protobuf.Duration | seconds (float) |
| wrappers (StringValue, DoubleValue, Int64Value, BoolValue, ...) | the wrapped value |
| Struct, Value, ListValue | the JSON object / value / list they hold |
| message | a dict of its set fields; repeated → list; map → dict with text keys |
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import PurePosixPath
from typing import Any

from google.protobuf import (
    any_pb2,
    api_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    field_mask_pb2,
    json_format,
    message_factory,
    source_context_pb2,
    struct_pb2,
    timestamp_pb2,
    type_pb2,
    wrappers_pb2,
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

WELL_KNOWN_FILES = {
    module.DESCRIPTOR.name: module.DESCRIPTOR.serialized_pb
    for module in (
        any_pb2,
        api_pb2,
        descriptor_pb2,
        duration_pb2,
        empty_pb2,
        field_mask_pb2,
        source_context_pb2,
        struct_pb2,
        timestamp_pb2,
        type_pb2,
        wrappers_pb2,
    )
}
MAX_INDEXES = 32
_WRAPPERS = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String")
)
_JSON_VALUES = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})
_protoc_lock = threading.Lock()


class ProtobufSchemaError(ValueError):
    """The schema (or a file it imports) cannot become descriptors."""


class FrameError(ValueError):
    """The message-index list after the schema id is malformed or names no message of the schema."""


# --- schemas → descriptor pool -------------------------------------------------------------------------


def _serialized(text: str) -> descriptor_pb2.FileDescriptorProto | None:
    """The FileDescriptorProto if `text` is base64 of one; None when it is .proto text."""
    try:
        raw = base64.b64decode(text, validate=True)
        return descriptor_pb2.FileDescriptorProto.FromString(raw)
    except (binascii.Error, ValueError, DecodeError):
        return None


def _safe_name(name: str) -> str:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or not name.endswith(".proto"):
        raise ProtobufSchemaError(f"reference name {name[:100]!r} is not a relative .proto path")
    return name


def _compile_text(
    files: dict[str, str], serialized: Sequence[descriptor_pb2.FileDescriptorProto], main: str
) -> list[descriptor_pb2.FileDescriptorProto]:
    """protoc, in process, over .proto texts (written to a temp dir under their import names)."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # on first use: only text schemas need it

    includes = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    with tempfile.TemporaryDirectory(prefix="pw-proto-") as tmp:
        for name, text in files.items():
            target = os.path.join(tmp, "src", name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as out:
                out.write(text)
        args = ["protoc", f"-I{tmp}/src", f"-I{includes}", "--include_imports", f"--descriptor_set_out={tmp}/out.pb"]
        if serialized:
            with open(f"{tmp}/in.pb", "wb") as out:
                out.write(descriptor_pb2.FileDescriptorSet(file=list(serialized)).SerializeToString())
            args.append(f"--descriptor_set_in={tmp}/in.pb")
        with _protoc_lock:
            code = protoc.main([*args, main])
        if code != 0:
            raise ProtobufSchemaError("the .proto text does not compile (protoc's message is on the worker's stderr)")
        with open(f"{tmp}/out.pb", "rb") as result:
            return list(descriptor_pb2.FileDescriptorSet.FromString(result.read()).file)


def build_pool(schema_id: int, text: str, references: Iterable[tuple[str, str]]) -> tuple[Any, str]:
    """A descriptor pool holding the schema and every file it imports, and the schema's file name.

    `references`: (import name, schema text) of each referenced schema, transitively. Blocking (protoc, temp
    files): run it off the event loop."""
    texts: dict[str, str] = {}
    protos: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for name, ref_text in references:
        _safe_name(name)
        if name in WELL_KNOWN_FILES:
            continue
        proto = _serialized(ref_text)
        if proto is None:
            texts[name] = ref_text
        else:
            proto.name = name
            protos[name] = proto
    main = _serialized(text)
    if main is None:
        main_name = f"schema-{schema_id}.proto"
        texts[main_name] = text
    else:
        main_name = main.name or f"schema-{schema_id}.proto"
        main.name = main_name
        protos[main_name] = main
    if texts:
        compiled = _compile_text(texts, list(protos.values()), main_name)
        protos.update((proto.name, proto) for proto in compiled)
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str, depth: int) -> None:
        if name in added:
            return
        if depth > 64:
            raise ProtobufSchemaError("imports nest too deep (a cycle?)")
        proto = protos.get(name)
        if proto is None:
            if name not in WELL_KNOWN_FILES:
                raise ProtobufSchemaError(f"imports {name!r}, which is neither a reference nor a well-known type")
            proto = descriptor_pb2.FileDescriptorProto.FromString(WELL_KNOWN_FILES[name])
        for dep in proto.dependency:
            add(dep, depth + 1)
        try:
            pool.AddSerializedFile(proto.SerializeToString())
        except (TypeError, ValueError, KeyError) as error:
            raise ProtobufSchemaError(f"{name}: {error}"[:300]) from None
        added.add(name)

    add(main_name, 0)
    return pool, main_name


# --- frames and messages -------------------------------------------------------------------------------


def _varint(value: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(value) or shift > 63:
            raise FrameError("the message-index list is cut short")
        byte = value[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def message_indexes(value: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    """The index path after the schema id and where the payload starts."""
    if pos < len(value) and value[pos] == 0:
        return (0,), pos + 1  # the first message: one byte, the common case
    raw, pos = _varint(value, pos)
    count = _zigzag(raw)
    if not 0 < count <= MAX_INDEXES:
        raise FrameError(f"the message-index list claims {count} entries")
    path = []
    for _ in range(count):
        raw, pos = _varint(value, pos)
        index = _zigzag(raw)
        if index < 0:
            raise FrameError(f"the message-index list holds a negative index ({index})")
        path.append(index)
    return tuple(path), pos


class ProtobufDecoder:
    """One schema id: its pool, and per index path a message class and the dict converter."""

    def __init__(self, schema_id: int, pool: Any, main_name: str) -> None:
        self.schema_id = schema_id
        self._pool = pool
        # The index path counts messages in declaration order, which the file's proto form keeps.
        self._proto = descriptor_pb2.FileDescriptorProto()
        pool.FindFileByName(main_name).CopyToProto(self._proto)
        self._messages: dict[tuple[int, ...], tuple[Callable[[bytes], Message], Callable[[Message], Any]]] = {}
        self._converter = Converter()

    def descriptor(self, path: tuple[int, ...]) -> Descriptor:
        proto = self._proto
        try:
            node = proto.message_type[path[0]]
            name = f"{proto.package}.{node.name}" if proto.package else node.name
            for index in path[1:]:
                node = node.nested_type[index]
                name += "." + node.name
        except IndexError:
            raise FrameError(f"message index {list(path)} names no message of schema id {self.schema_id}") from None
        desc: Descriptor = self._pool.FindMessageTypeByName(name)
        return desc

    @property
    def message_count(self) -> int:
        """Top-level messages in the file (`check` compares the mapping with each)."""
        return len(self._proto.message_type)

    def decode(self, value: bytes, start: int) -> Any:
        path, start = message_indexes(value, start)
        entry = self._messages.get(path)
        if entry is None:
            desc = self.descriptor(path)
            entry = (message_factory.GetMessageClass(desc).FromString, self._converter.to_dict)
            self._messages[path] = entry
        parse, convert = entry
        return convert(parse(value[start:]))


def _timestamp(msg: Any) -> int | float:
    if msg.nanos % 1_000_000 == 0:
        return int(msg.seconds * 1000 + msg.nanos // 1_000_000)
    return float(msg.seconds * 1000 + msg.nanos / 1_000_000)


def _duration(msg: Any) -> float:
    return float(msg.seconds + msg.nanos / 1e9)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unwrap(msg: Any) -> Any:
    return msg.value


def _unwrap_bytes(msg: Any) -> str:
    return _b64(msg.value)


def _json_value(msg: Message) -> Any:
    return json_format.MessageToDict(msg)


class Converter:
    """Messages → dicts; one table of field converters per message type, built on first sight."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, Callable[[Any], Any] | None]] = {}

    def to_dict(self, msg: Message) -> dict[str, Any]:
        desc: Descriptor = msg.DESCRIPTOR  # type: ignore[assignment]  # the upb class is its runtime form
        table = self._tables.get(desc.full_name)
        if table is None:
            table = self._table(desc)
        out: dict[str, Any] = {}
        for field, value in msg.ListFields():
            name = field.name
            if name in table:
                convert = table[name]
                out[name] = value if convert is None else convert(value)
        return out

    def _table(self, desc: Descriptor) -> dict[str, Callable[[Any], Any] | None]:
        table: dict[str, Callable[[Any], Any] | None] = {}
        self._tables[desc.full_name] = table  # before the fields: a message may contain itself
        for field in desc.fields:
            table[field.name] = self._field(field)
        return table

    def _field(self, field: FieldDescriptor) -> Callable[[Any], Any] | None:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = field.message_type.fields_by_name["key"]
            value = self._single(field.message_type.fields_by_name["value"])
            text = str if key.type != FieldDescriptor.TYPE_STRING else None
            if value is None:
                return lambda entries: {(k if text is None else text(k)): v for k, v in entries.items()}
            return lambda entries: {(k if text is None else text(k)): value(v) for k, v in entries.items()}
        single = self._single(field)
        if field.is_repeated:
            if single is None:
                return list
            return lambda items: [single(item) for item in items]
        return single

    def _single(self, field: FieldDescriptor) -> Callable[[Any], Any] | None:
        kind = field.type
        if kind == FieldDescriptor.TYPE_BYTES:
            return _b64
        if kind == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
            names = {v.number: v.name for v in field.enum_type.values}
            return lambda number: names.get(number, number)
        if field.message_type is None:
            return None
        full_name = field.message_type.full_name
        if full_name == "google.protobuf.Timestamp":
            return _timestamp
        if full_name == "google.protobuf.Duration":
            return _duration
        if full_name == "google.protobuf.BytesValue":
            return _unwrap_bytes
        if full_name in _WRAPPERS:
            return _unwrap
        if full_name in _JSON_VALUES:
            return _json_value
        return self.to_dict


def field_paths(desc: Descriptor, prefix: str = "", depth: int = 0) -> set[str]:
    """Dotted paths of a message's fields (nested messages included), for `check`."""
    paths: set[str] = set()
    for field in desc.fields:
        path = prefix + field.name
        paths.add(path)
        nested = field.message_type
        if (
            nested is not None
            and depth < 8
            and not nested.GetOptions().map_entry
            and not nested.full_name.startswith("google.protobuf.")
        ):
            paths |= field_paths(nested, path + ".", depth + 1)
    return paths
