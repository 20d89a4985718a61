"""A whole Kafka record → the object a mapping reads, for mappings that read more than the value.

`mapping.layout` says how the record's parts form that object: `json` (the value), `cloudevents` (the
Kafka protocol binding, both content modes), `snowplow_tsv` (an enriched event from Snowplow enrich).
Every mapping that reads the record also sees `_kafka` (see `kafka_fields`). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson

from worker.mapping.values import InvalidRecord, excerpt, type_name

CE_REQUIRED: Final = ("id", "source", "specversion", "type")
"""The attributes every CloudEvent has (CloudEvents 1.0 §3.1): one missing is a dead letter, never made up."""
CE_PREFIX: Final = "ce_"
STRUCTURED: Final = "application/cloudevents"
"""A `content-type` starting so (any case) marks structured mode; anything else is binary mode (§3)."""


def decode_record(layout: str, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    """The object of one record; an `InvalidRecord` (stage decode) says why there is none."""
    if layout == "cloudevents":
        return cloud_event(value, headers)
    if layout == "snowplow_tsv":
        from worker.mapping.snowplow import decode_enriched

        return decode_enriched(value)
    return json_object(value)


def json_object(value: bytes | None, what: str = "the message value") -> dict[str, Any]:
    if not value:
        raise InvalidRecord("decode", "empty", f"{what} is empty")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRecord("decode", "not_json", f"{what}: not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise InvalidRecord("decode", "not_object", f"{what}: expected a JSON object, got {type_name(obj)}")
    return obj


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidRecord("decode", "not_utf8", f"{what} is not UTF-8 text") from None


def header_texts(headers: Sequence[tuple[str, bytes]]) -> dict[str, str | None]:
    """Header name → text (a later header of one name wins, as Kafka Connect's `lastWithName`); a value
    that is not UTF-8 reads as null rather than failing records whose mapping never looks at it."""
    texts: dict[str, str | None] = {}
    for name, raw in headers:
        try:
            texts[name] = raw.decode() if raw is not None else None
        except UnicodeDecodeError:
            texts[name] = None
    return texts


def kafka_fields(record: Any, headers: Sequence[tuple[str, bytes]], topic: str, partition: int) -> dict[str, Any]:
    """What `_kafka.*` reads: key (text), headers (name → text), topic, partition, offset, timestamp (ms)."""
    key = record.key
    return {
        "key": None if key is None else key.decode(errors="replace"),
        "headers": header_texts(headers),
        "topic": topic or getattr(record, "topic", ""),
        "partition": getattr(record, "partition", partition),
        "offset": record.offset,
        "timestamp": getattr(record, "timestamp", None),
    }


def cloud_event(value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    """The event in the JSON format's shape (attributes at the top, `data`), from either content mode.

    Structured mode (content-type application/cloudevents+json): the value is that object. Binary mode:
    each `ce_<name>` header is attribute <name>, `content-type` is `datacontenttype`, the value is `data`,
    decoded as JSON when the content type is JSON (or absent), kept as text otherwise."""
    texts = header_texts(headers)
    content_type = texts.get("content-type") or ""
    if content_type.lower().startswith(STRUCTURED):
        if not content_type.lower().startswith(STRUCTURED + "+json"):
            kind = excerpt(content_type)
            raise InvalidRecord("decode", "unsupported_format", f"CloudEvents structured mode: {kind} is not JSON")
        event = json_object(value, "the CloudEvent (structured mode)")
        mode = "structured mode: member"
    else:
        event = {name[len(CE_PREFIX) :]: text for name, text in texts.items() if name.startswith(CE_PREFIX)}
        if content_type:
            event["datacontenttype"] = content_type
        event["data"] = _data(value, content_type)
        mode = f"binary mode: header {CE_PREFIX}"
    for attribute in CE_REQUIRED:
        present = event.get(attribute)
        if type(present) is not str or not present:
            where = f"{mode}{attribute}"
            raise InvalidRecord(
                "decode", "missing_attribute", f"CloudEvents: required attribute {attribute!r} is missing ({where})"
            )
    return event


def _data(value: bytes | None, content_type: str) -> Any:
    if not value:
        return None  # binary mode without data (§3.2.2)
    media = content_type.split(";", 1)[0].strip().lower()
    if not media or media == "application/json" or media.endswith("+json"):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            kind = media or "no content-type"
            raise InvalidRecord("decode", "not_json", f"CloudEvents data ({kind}): {exc}") from None
    return _text(value, f"CloudEvents data ({media})")


class LineRecord:
    """A line given to `personalize-worker map` as if it were a record: no key, no headers, except that
    with the cloudevents layout a line is a structured-mode event (it has no headers to be binary)."""

    __slots__ = ("headers", "key", "offset", "timestamp", "value")

    def __init__(self, value: bytes, offset: int, layout: str) -> None:
        self.value = value
        self.key: bytes | None = None
        self.offset = offset
        self.timestamp: int | None = None
        self.headers: tuple[tuple[str, bytes], ...] = (
            (("content-type", b"application/cloudevents+json"),) if layout == "cloudevents" else ()
        )
