"""Avro payloads → plain dicts, with fastavro and the writer's schema.

fastavro's `schemaless_reader` with a schema parsed once per schema id: 7.4 µs of CPU for a 15-field
clickstream record on the 2-core box (8.5-10.5 µs while other test suites loaded it to a load average of
7-8; `python -m tests.bench --mode decode`): ~1.6 µs per call plus ~0.45 µs per field. The JSON path maps
the same record, parse included, in about half of that. Calling fastavro's private `_read_data` directly
saved nothing measurable, so the public API is used.

Values become what the mapping expects, converted inside fastavro's read (custom logical types, its
documented extension point: `LOGICAL_READERS`), so a schema without them costs nothing extra:

| Avro | value |
|---|---|
| timestamp-millis, local-timestamp-millis | epoch milliseconds (int), as written |
| timestamp-micros, local-timestamp-micros | epoch milliseconds (float) |
| timestamp-nanos, local-timestamp-nanos | epoch milliseconds (float) |
| date | ISO 8601 date text, "2026-11-22" |
| time-millis, time-micros | the number: ms or µs since midnight |
| decimal (bytes or fixed) | float |
| uuid (string or fixed 16) | its text |
| other bytes and fixed (duration included) | standard base64 text |
| enum | the symbol's name |

Local timestamps are taken as UTC. Records decode with the writer's schema only: a field added later
with a default is absent (not defaulted) in records written before it.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable, Iterable
from datetime import date, timedelta
from decimal import Decimal
from io import BytesIO
from typing import Any
from uuid import UUID

import orjson
from fastavro import parse_schema, schemaless_reader
from fastavro.read import LOGICAL_READERS

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_EPOCH_DATE = date(1970, 1, 1)
_PREFIX = "pw-"
"""Our own logical type names: registered beside fastavro's, never replacing them (other code in the process
may read Avro too)."""


def _millis_from_micros(data: int, *_: Any) -> float:
    return data / 1000.0


def _millis_from_nanos(data: int, *_: Any) -> float:
    return data / 1_000_000.0


def _iso_date(data: int, *_: Any) -> str:
    return (_EPOCH_DATE + timedelta(days=data)).isoformat()


def _decimal(data: bytes, writer_schema: dict[str, Any] | None, *_: Any) -> float:
    unscaled = int.from_bytes(data, "big", signed=True)
    return float(Decimal(unscaled).scaleb(-int((writer_schema or {}).get("scale", 0))))


def _uuid(data: bytes, *_: Any) -> str:
    return str(UUID(bytes=bytes(data)))


def _base64(data: bytes, *_: Any) -> str:
    return base64.b64encode(data).decode("ascii")


LOGICAL_READERS.update(
    {
        "long-pw-ms-from-micros": _millis_from_micros,
        "long-pw-ms-from-nanos": _millis_from_nanos,
        "int-pw-date": _iso_date,
        "bytes-pw-decimal": _decimal,
        "fixed-pw-decimal": _decimal,
        "fixed-pw-uuid": _uuid,
        "bytes-pw-base64": _base64,
        "fixed-pw-base64": _base64,
    }
)

_RENAMED = {
    ("long", "timestamp-micros"): "ms-from-micros",
    ("long", "local-timestamp-micros"): "ms-from-micros",
    ("long", "timestamp-nanos"): "ms-from-nanos",
    ("long", "local-timestamp-nanos"): "ms-from-nanos",
    ("int", "date"): "date",
    ("bytes", "decimal"): "decimal",
    ("fixed", "decimal"): "decimal",
    ("fixed", "uuid"): "uuid",
}


class AvroSchemaError(ValueError):
    """The schema text is not a usable Avro schema."""


def _rewrite(schema: Any) -> Any:
    """The schema with each logical type replaced by the conversion above (or dropped: the raw value is it)."""
    if isinstance(schema, str):
        return {"type": "bytes", "logicalType": _PREFIX + "base64"} if schema == "bytes" else schema
    if isinstance(schema, list):
        return [_rewrite(branch) for branch in schema]
    if not isinstance(schema, dict):
        return schema
    kind = schema.get("type")
    if isinstance(kind, (dict, list)):  # {"type": {"type": "long", ...}}: a wrapped type
        return {**schema, "type": _rewrite(kind)}
    out = dict(schema)
    if kind in {"record", "error"} and isinstance(schema.get("fields"), list):
        out["fields"] = [{**field, "type": _rewrite(field.get("type"))} for field in schema["fields"]]
    elif kind == "array":
        out["items"] = _rewrite(schema["items"])
    elif kind == "map":
        out["values"] = _rewrite(schema["values"])
    elif kind in ("bytes", "fixed", "int", "long", "string"):
        logical = out.pop("logicalType", None)
        renamed = _RENAMED.get((kind, logical)) if isinstance(logical, str) else None
        if renamed is not None:
            out["logicalType"] = _PREFIX + renamed
        elif kind in ("bytes", "fixed"):
            out["logicalType"] = _PREFIX + "base64"
    return out


class AvroDecoder:
    """One writer's schema, parsed once; `decode(value, start)` reads the payload from `start` on."""

    __slots__ = ("_schema", "schema_id")

    def __init__(self, schema_id: int, text: str, references: Iterable[str] = ()) -> None:
        """`references`: the texts of the schemas this one names types from, dependencies first."""
        self.schema_id = schema_id
        named: dict[str, Any] = {}
        try:
            for reference in references:
                parse_schema(_rewrite(orjson.loads(reference)), named)
            parsed = parse_schema(_rewrite(orjson.loads(text)), named)
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise AvroSchemaError(f"not a usable Avro schema: {type(error).__name__}: {error}"[:300]) from None
        # Referenced named types are needed at read time too; fastavro keeps them in the parsed schema only
        # for the types it defines, so they are carried in a copy.
        self._schema = _with_named(parsed, named)

    def decode(self, value: bytes, start: int) -> Any:
        stream = BytesIO(value)
        stream.seek(start)
        data = schemaless_reader(stream, self._schema)
        left = len(value) - stream.tell()
        if left:
            raise ValueError(f"{left} bytes left after the record: written with another schema?")
        return data


def _with_named(parsed: Any, named: dict[str, Any]) -> Any:
    if not isinstance(parsed, dict) or "__named_schemas" not in parsed:
        return parsed
    out = copy.copy(parsed)
    out["__named_schemas"] = {**named, **parsed["__named_schemas"]}
    return out


def top_level_fields(text: str) -> set[str] | None:
    """Dotted paths of the record fields (nested records included), for `check`; None if not a record."""
    try:
        schema = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    paths: set[str] = set()

    def walk(node: Any, prefix: str, depth: int) -> None:
        if depth > 8:
            return
        if isinstance(node, list):
            for branch in node:
                walk(branch, prefix, depth)
        elif isinstance(node, dict):
            if node.get("type") == "record":
                for field in node.get("fields", ()):
                    path = f"{prefix}{field['name']}"
                    paths.add(path)
                    walk(field.get("type"), path + ".", depth + 1)
            elif isinstance(node.get("type"), (dict, list)):
                walk(node["type"], prefix, depth)

    walk(schema, "", 0)
    return paths if isinstance(schema, dict) and schema.get("type") == "record" else None


Reader = Callable[[bytes, int], Any]
