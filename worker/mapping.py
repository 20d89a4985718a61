"""Raw message bytes → (session key, PutEvents event), checked against every PutEvents rule.

Pure: no I/O, no clock. A record that cannot become a valid event raises `InvalidRecord` with a
reason; nothing is repaired silently. The paths are compiled once into small getter closures so the
per-record cost stays a few microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from hashlib import blake2b
from typing import Any

import orjson

from worker import limits
from worker.config import MappingSettings
from worker.errors import WorkerError

Getter = Callable[[dict[str, Any]], Any]
SessionKey = tuple[str, str | None]
"""(sessionId, userId): with the worker's one trackingId, the key of a PutEvents call."""

# Epoch seconds up to the end of year 9999: beyond it no datetime (and no real click) exists.
MAX_EPOCH_SECONDS = 253_402_300_799.0
# In `auto` mode a number above this is taken as milliseconds (1e11 s is year 5138; 1e11 ms is 1973).
_AUTO_MS_THRESHOLD = 1e11
EVENT_ID_PREFIX = "pw1-"


class InvalidRecord(WorkerError):
    """A record that can never be sent; `stage` and `reason` go to the dead-letter headers and metrics."""

    def __init__(self, stage: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.reason = reason
        self.message = message


def compile_path(path: str) -> Getter | None:
    """`a.b.c` → a getter returning None when any step is missing or not an object."""
    if not path:
        return None
    parts = tuple(path.split("."))
    if len(parts) == 1:
        key = parts[0]
        return lambda obj: obj.get(key)

    def get(obj: dict[str, Any]) -> Any:
        value: Any = obj
        for part in parts:
            if type(value) is not dict:
                return None
            value = value.get(part)
        return value

    return get


def camel_case(segment: str) -> str:
    """`page_category` → `pageCategory`: Personalize wants camelCase keys matching the schema's fields."""
    words = [w for w in segment.replace("-", "_").split("_") if w]
    if not words:
        return segment
    first = words[0][0].lower() + words[0][1:]
    return first + "".join(w[0].upper() + w[1:] for w in words[1:])


def _check_length(value: str, member: str, limit: limits.StringLimit) -> None:
    if len(value) > limit.max:
        raise InvalidRecord("validation", "too_long", f"{member}: length {len(value)} exceeds {limit.max}")
    if len(value) < limit.min:
        raise InvalidRecord("validation", "too_short", f"{member}: length {len(value)} is below {limit.min}")


def _identifier(value: Any, member: str, limit: limits.StringLimit) -> str:
    """IDs are strings; integer IDs are common in clickstreams and map to their decimal text."""
    kind = type(value)
    if kind is str:
        if limit.min <= len(value) <= limit.max:  # the common case, without a call
            return value  # type: ignore[no-any-return]
        _check_length(value, member, limit)
    if kind is int:
        text = str(value)
        _check_length(text, member, limit)
        return text
    raise InvalidRecord("mapping", "wrong_type", f"{member}: expected a string, got {_type_name(value)}")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", float: "a number", int: "a number"}.get(
        type(value), "null" if value is None else "a string"
    )


def _epoch_number(value: Any, member: str) -> float:
    if type(value) in (int, float):
        return float(value)
    if type(value) is str:
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise InvalidRecord("mapping", "bad_timestamp", f"{member}: {_type_name(value)} is not an epoch number")


def _iso(value: Any, member: str) -> float:
    if type(value) is not str:
        raise InvalidRecord("mapping", "bad_timestamp", f"{member}: expected an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRecord("mapping", "bad_timestamp", f"{member}: not an ISO 8601 timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def parse_sent_at(value: Any, fmt: str, member: str = "sentAt") -> float:
    """Epoch seconds (with fractions) from the configured format; absurd values are rejected, not clamped."""
    if fmt == "epoch_s":
        seconds = _epoch_number(value, member)
    elif fmt == "epoch_ms":
        seconds = _epoch_number(value, member) / 1000.0
    elif fmt == "iso8601" or (
        type(value) is str and value and not value.strip().lstrip("-").replace(".", "", 1).isdigit()
    ):
        seconds = _iso(value, member)
    else:
        seconds = _epoch_number(value, member)
        if seconds > _AUTO_MS_THRESHOLD:
            seconds /= 1000.0
    # Milliseconds are what clickstreams carry and what the wire format keeps (see sink.request_body).
    seconds = round(seconds, 3) if math.isfinite(seconds) else seconds
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_EPOCH_SECONDS):
        # Cut short: the message becomes a dead-letter header, and the value can be any size.
        shown = repr(value)[:64]
        raise InvalidRecord("validation", "bad_timestamp", f"{member}: {shown} is outside 1970..9999")
    return seconds


class Mapper:
    """Compiled `[mapping]`: call `map(value)` per record."""

    def __init__(self, settings: MappingSettings) -> None:
        self.settings = settings
        self._user_id = compile_path(settings.user_id)
        self._session_id = compile_path(settings.session_id)
        self._event_id = compile_path(settings.event_id)
        self._event_type = compile_path(settings.event_type)
        self._event_value = compile_path(settings.event_value)
        self._item_id = compile_path(settings.item_id)
        self._sent_at = compile_path(settings.sent_at)
        self._impression = compile_path(settings.impression)
        self._recommendation_id = compile_path(settings.recommendation_id)
        self._attribution = compile_path(settings.metric_attribution_source)
        self._attribution_value = settings.metric_attribution_source_value or None
        self._sent_at_format = settings.sent_at_format
        self._renames = dict(settings.event_types)
        self._only_listed = settings.event_types_only
        self._properties: list[tuple[str, Getter]] = []
        seen: dict[str, str] = {}
        for path in settings.properties:
            key = camel_case(path.rsplit(".", 1)[-1])
            if key in seen:
                raise ValueError(f"mapping.properties: {seen[key]!r} and {path!r} both become key {key!r}")
            seen[key] = path
            getter = compile_path(path)
            assert getter is not None
            self._properties.append((key, getter))

    def map(self, value: bytes | None) -> tuple[SessionKey, dict[str, Any]] | None:
        """The session key and event for one message, or None when the event type is filtered out."""
        if not value:
            raise InvalidRecord("decode", "empty", "the message value is empty")
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise InvalidRecord("decode", "not_json", f"not valid JSON: {exc}") from None
        if type(obj) is not dict:
            raise InvalidRecord("decode", "not_object", f"expected a JSON object, got {_type_name(obj)}")
        return self.map_object(obj)

    def map_object(self, obj: dict[str, Any]) -> tuple[SessionKey, dict[str, Any]] | None:
        s = self.settings
        raw_type = self._required(obj, self._event_type, s.event_type, "eventType")
        event_type = _identifier(raw_type, "eventType", limits.EVENT_TYPE)
        renamed = self._renames.get(event_type)
        if renamed is not None:
            event_type = renamed
        elif self._only_listed:
            return None

        session_id = _identifier(
            self._required(obj, self._session_id, s.session_id, "sessionId"), "sessionId", limits.SESSION_ID
        )
        user_id = self._optional_id(obj, self._user_id, "userId", limits.USER_ID)
        sent_at = parse_sent_at(self._required(obj, self._sent_at, s.sent_at, "sentAt"), self._sent_at_format)
        event: dict[str, Any] = {"eventType": event_type, "sentAt": sent_at}

        item_id = self._optional_id(obj, self._item_id, "itemId", limits.ITEM_ID)
        if item_id is not None:
            event["itemId"] = item_id
        if self._event_value is not None:
            value = self._event_value(obj)
            if value is not None:
                event["eventValue"] = _float(value)
        recommendation_id = self._optional_id(
            obj, self._recommendation_id, "recommendationId", limits.RECOMMENDATION_ID
        )
        if recommendation_id is not None:
            event["recommendationId"] = recommendation_id
        if self._impression is not None:
            impression = self._impression(obj)
            if impression is not None:
                event["impression"] = _impression(impression)
        if self._properties:
            properties = self._properties_text(obj)
            if properties is not None:
                event["properties"] = properties
        source = self._attribution(obj) if self._attribution is not None else self._attribution_value
        if source is not None:
            event["metricAttribution"] = {"eventAttributionSource": _attribution_source(source)}

        event_id = self._optional_id(obj, self._event_id, "eventId", limits.EVENT_ID)
        event["eventId"] = event_id if event_id is not None else derive_event_id(session_id, user_id, event)
        if _may_exceed_quota(event) and _event_bytes(event) > limits.MAX_EVENT_BYTES:
            raise InvalidRecord("validation", "too_large", f"event exceeds {limits.MAX_EVENT_BYTES} bytes")
        return (session_id, user_id), event

    @staticmethod
    def _required(obj: dict[str, Any], getter: Getter | None, path: str, member: str) -> Any:
        value = getter(obj) if getter is not None else None
        if value is None:
            raise InvalidRecord("mapping", "missing_field", f"{member}: required field {path!r} is missing")
        return value

    @staticmethod
    def _optional_id(obj: dict[str, Any], getter: Getter | None, member: str, limit: limits.StringLimit) -> str | None:
        if getter is None:
            return None
        value = getter(obj)
        return None if value is None else _identifier(value, member, limit)

    def _properties_text(self, obj: dict[str, Any]) -> str | None:
        found: dict[str, Any] = {}
        for key, getter in self._properties:
            value = getter(obj)
            if value is None:
                continue
            if type(value) in (dict, list):
                raise InvalidRecord("mapping", "wrong_type", f"properties.{key}: expected a scalar value")
            found[key] = value
        if not found:
            return None
        text = orjson.dumps(found).decode()
        _check_length(text, "properties", limits.PROPERTIES)
        return text


def _float(value: Any) -> float:
    if type(value) in (int, float):
        number = float(value)
    elif type(value) is str:
        try:
            number = float(value)
        except ValueError:
            raise InvalidRecord("mapping", "wrong_type", "eventValue: not a number") from None
    else:
        raise InvalidRecord("mapping", "wrong_type", f"eventValue: expected a number, got {_type_name(value)}")
    if not math.isfinite(number) or abs(number) > 3.4e38:
        raise InvalidRecord("validation", "out_of_range", "eventValue: not a finite float")
    return number


def _impression(value: Any) -> list[str]:
    if type(value) is str:
        items: list[Any] = value.split(",")
    elif type(value) is list:
        items = value
    else:
        raise InvalidRecord("mapping", "wrong_type", f"impression: expected a list, got {_type_name(value)}")
    low, high = limits.IMPRESSION_ITEMS
    if not low <= len(items) <= high:
        raise InvalidRecord("validation", "too_long" if items else "too_short", f"impression: {len(items)} items")
    return [
        _identifier(item.strip() if type(item) is str else item, "impression", limits.IMPRESSION_ITEM) for item in items
    ]


def _attribution_source(value: Any) -> str:
    if type(value) is not str:
        raise InvalidRecord("mapping", "wrong_type", "metricAttribution.eventAttributionSource: not a string")
    limit = limits.ATTRIBUTION_SOURCE
    _check_length(value, "metricAttribution.eventAttributionSource", limit)
    if limit.pattern is not None and not limit.pattern.match(value):
        raise InvalidRecord("validation", "bad_value", "metricAttribution.eventAttributionSource: not printable ASCII")
    return value


def _may_exceed_quota(event: dict[str, Any]) -> bool:
    """A cheap upper bound first: JSON escaping grows a character to at most 6 bytes."""
    if "impression" in event:
        return True
    text = sum(len(v) for v in event.values() if type(v) is str)
    attribution = event.get("metricAttribution")
    if attribution is not None:
        text += len(attribution["eventAttributionSource"])
    return 6 * text + 256 > limits.MAX_EVENT_BYTES


def _event_bytes(event: dict[str, Any]) -> int:
    return len(orjson.dumps(event))


def derive_event_id(session_id: str, user_id: str | None, event: dict[str, Any]) -> str:
    """A content hash, so a replay after a crash or rebalance yields the same ID and Personalize ignores it."""
    digest = blake2b(orjson.dumps((session_id, user_id, event), option=orjson.OPT_SORT_KEYS), digest_size=16)
    return EVENT_ID_PREFIX + digest.hexdigest()
