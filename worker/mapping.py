"""Raw message bytes → (session key, PutEvents event), checked against every PutEvents rule.

Pure: no I/O, no clock. A record that cannot become a valid event raises `InvalidRecord` with a
reason; nothing is repaired silently. `Mapper.map` runs for every record, so it is written for the
common case: each member is checked inline, and anything unusual goes to the member's function,
which gives the same value or the same error as it always did. A few microseconds per record.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from hashlib import blake2b
from typing import Any

import orjson

from worker import limits
from worker.config import MappingSettings, camel_case
from worker.errors import WorkerError

SessionKey = tuple[str, str | None]
"""(sessionId, userId): with the worker's one trackingId, the key of a PutEvents call."""

# Epoch seconds up to the end of year 9999: beyond it no datetime (and no real click) exists.
MAX_EPOCH_SECONDS = 253_402_300_799.0
# In `auto` mode a number above this is taken as milliseconds (1e11 s is year 5138; 1e11 ms is 1973).
_AUTO_MS_THRESHOLD = 1e11
EVENT_ID_PREFIX = "pw1-"
# Length bounds of the members checked inline on the hot path, where a call costs more than the check.
_EVENT_TYPE_MIN, _EVENT_TYPE_MAX = limits.EVENT_TYPE.min, limits.EVENT_TYPE.max
_SESSION_ID_MIN, _SESSION_ID_MAX = limits.SESSION_ID.min, limits.SESSION_ID.max
_USER_ID_MIN, _USER_ID_MAX = limits.USER_ID.min, limits.USER_ID.max
_ITEM_ID_MIN, _ITEM_ID_MAX = limits.ITEM_ID.min, limits.ITEM_ID.max
_EVENT_ID_MIN, _EVENT_ID_MAX = limits.EVENT_ID.min, limits.EVENT_ID.max
_IMPRESSION_ITEM_MIN, _IMPRESSION_ITEM_MAX = limits.IMPRESSION_ITEM.min, limits.IMPRESSION_ITEM.max
_PROPERTIES_MIN, _PROPERTIES_MAX = limits.PROPERTIES.min, limits.PROPERTIES.max


class InvalidRecord(WorkerError):
    """A record that can never be sent; `stage` and `reason` go to the dead-letter headers and metrics."""

    def __init__(self, stage: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.reason = reason
        self.message = message


def _missing(member: str, path: str) -> InvalidRecord:
    return InvalidRecord("mapping", "missing_field", f"{member}: required field {path!r} is missing")


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
        if not limit.min <= len(text) <= limit.max:
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
    seconds = _round_ms(seconds)
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_EPOCH_SECONDS):
        # Cut short: the message becomes a dead-letter header, and the value can be any size.
        shown = repr(value)[:64]
        raise InvalidRecord("validation", "bad_timestamp", f"{member}: {shown} is outside 1970..9999")
    return seconds


def _round_ms(seconds: float) -> float:
    """`round(seconds, 3) if math.isfinite(seconds) else seconds`, a few times cheaper for real instants.

    round() goes through decimal digit strings. Within 1970..9999, seconds·1000 is below 2**48, so its
    rounding error is at most 1/64: unless it lies within 1/32 of a half, the whole number nearest to
    it is the exact product's nearest, and n / 1000.0 is the double nearest n ms, as round() returns.
    """
    if 0.0 < seconds <= MAX_EPOCH_SECONDS:
        scaled = seconds * 1000.0
        fraction = scaled % 1.0
        if fraction < 0.46875:
            return (scaled - fraction) / 1000.0
        if fraction > 0.53125:
            return (scaled - fraction + 1.0) / 1000.0
    return round(seconds, 3) if math.isfinite(seconds) else seconds


class Mapper:
    """Compiled `[mapping]`: call `map(value)` per record."""

    def __init__(self, settings: MappingSettings) -> None:
        self.settings = settings
        # Config validation refuses empty paths and two paths with one key (check, map and run agree).
        keys = [camel_case(path.rsplit(".", 1)[-1]) for path in settings.properties]
        property_paths = [tuple(path.split(".")) for path in settings.properties]
        # Properties usually sit side by side in one object: `_map` then reads it once, like a member,
        # and each property by its last segment. Otherwise each property walks its whole path.
        parents = {path[:-1] for path in property_paths}
        shared = parents.pop() if len(parents) == 1 else None
        self._properties_at_top = shared == ()
        self._properties = tuple(
            (key, path[-1], None if shared is not None else path)
            for key, path in zip(keys, property_paths, strict=True)
        )
        paths = [
            tuple(path.split(".")) if path else None
            for path in (
                settings.event_type,
                settings.session_id,
                settings.user_id,
                settings.sent_at,
                settings.item_id,
                settings.event_value,
                settings.recommendation_id,
                settings.impression,
                settings.metric_attribution_source,
                settings.event_id,
            )
        ]
        paths.append(shared or None)
        # A path is usually one key of the message, read with `obj.get`; only a mapping with a nested
        # path pays for walking them all (see `_map`). None is a key no JSON object has: not mapped.
        self._flat = all(path is None or len(path) == 1 for path in paths)
        (
            self._event_type_key,
            self._session_id_key,
            self._user_id_key,
            self._sent_at_key,
            self._item_id_key,
            self._event_value_key,
            self._recommendation_id_key,
            self._impression_key,
            self._source_key,
            self._event_id_key,
            self._properties_key,
        ) = (path[0] if self._flat and path is not None else path for path in paths)
        self._attributed = bool(settings.metric_attribution_source or settings.metric_attribution_source_value)
        self._attribution_value = (
            None if settings.metric_attribution_source else settings.metric_attribution_source_value or None
        )
        self._sent_at_format = settings.sent_at_format
        self._numbers_are_epochs = settings.sent_at_format != "iso8601"
        # A number above this is milliseconds (see parse_sent_at): never for epoch_s, always for epoch_ms.
        self._milliseconds_above = {"auto": _AUTO_MS_THRESHOLD, "epoch_s": math.inf}.get(
            settings.sent_at_format, -math.inf
        )
        self._renames = dict(settings.event_types)
        self._only_listed = settings.event_types_only
        factor, base = self._size_bound()
        # Up to this many bytes of message, the event is within the quota without serializing it.
        self._surely_fits = (limits.MAX_EVENT_BYTES - base) // factor

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
        return self._map(obj, len(value) <= self._surely_fits)

    def map_object(self, obj: dict[str, Any]) -> tuple[SessionKey, dict[str, Any]] | None:
        """`map` for an object decoded elsewhere."""
        return self._map(obj, False)

    def _map(self, obj: dict[str, Any], fits: bool) -> tuple[SessionKey, dict[str, Any]] | None:
        """`fits`: the event is known to be within the size quota, so it need not be serialized to check.

        The common case of each member (a string of valid length, a number) is checked inline; anything
        else goes to the member's function, which returns the same value or raises the reason.
        """
        get: Callable[[Any], Any] = obj.get if self._flat else partial(_lookup, obj)
        event_type = get(self._event_type_key)
        if type(event_type) is not str or not _EVENT_TYPE_MIN <= len(event_type) <= _EVENT_TYPE_MAX:
            if event_type is None:
                raise _missing("eventType", self.settings.event_type)
            event_type = _identifier(event_type, "eventType", limits.EVENT_TYPE)
        renamed = self._renames.get(event_type) if self._renames else None
        if renamed is not None:
            event_type = renamed
        elif self._only_listed:
            return None

        session_id = get(self._session_id_key)
        if type(session_id) is not str or not _SESSION_ID_MIN <= len(session_id) <= _SESSION_ID_MAX:
            if session_id is None:
                raise _missing("sessionId", self.settings.session_id)
            session_id = _identifier(session_id, "sessionId", limits.SESSION_ID)
        user_id = get(self._user_id_key)
        if type(user_id) is not str or not _USER_ID_MIN <= len(user_id) <= _USER_ID_MAX:
            user_id = None if user_id is None else _identifier(user_id, "userId", limits.USER_ID)

        raw_sent_at = get(self._sent_at_key)
        kind = type(raw_sent_at)
        if (kind is float or kind is int) and self._numbers_are_epochs:
            seconds = float(raw_sent_at)
            if seconds > self._milliseconds_above:
                seconds /= 1000.0
            sent_at = _round_ms(seconds)
            if not 0.0 < sent_at <= MAX_EPOCH_SECONDS:
                sent_at = parse_sent_at(raw_sent_at, self._sent_at_format)  # raises
        elif raw_sent_at is None:
            raise _missing("sentAt", self.settings.sent_at)
        else:
            sent_at = parse_sent_at(raw_sent_at, self._sent_at_format)
        event: dict[str, Any] = {"eventType": event_type, "sentAt": sent_at}

        item_id = get(self._item_id_key)
        if item_id is not None:
            if type(item_id) is not str or not _ITEM_ID_MIN <= len(item_id) <= _ITEM_ID_MAX:
                item_id = _identifier(item_id, "itemId", limits.ITEM_ID)
            event["itemId"] = item_id
        value = get(self._event_value_key)
        if value is not None:
            event["eventValue"] = _float(value)
        value = get(self._recommendation_id_key)
        if value is not None:
            event["recommendationId"] = _identifier(value, "recommendationId", limits.RECOMMENDATION_ID)
        value = get(self._impression_key)
        if value is not None:
            event["impression"] = _impression(value)
        if self._properties:
            # The object every property is in, when they share one (see `__init__`).
            parent = obj if self._properties_at_top else get(self._properties_key)
            if type(parent) is not dict:
                parent = {}
            found: dict[str, Any] = {}
            for key, leaf, path in self._properties:
                value = parent.get(leaf) if path is None else _walk(obj, path)
                if type(value) is str:  # the common case, with one test
                    found[key] = value
                elif value is not None:
                    if type(value) is dict or type(value) is list:
                        raise InvalidRecord("mapping", "wrong_type", f"properties.{key}: expected a scalar value")
                    found[key] = value
            if found:
                properties = orjson.dumps(found).decode()
                if not _PROPERTIES_MIN <= len(properties) <= _PROPERTIES_MAX:
                    _check_length(properties, "properties", limits.PROPERTIES)
                event["properties"] = properties
        if self._attributed:
            source = get(self._source_key) if self._attribution_value is None else self._attribution_value
            if source is not None:
                event["metricAttribution"] = {"eventAttributionSource": _attribution_source(source)}

        event_id = get(self._event_id_key)
        if event_id is None:
            event_id = derive_event_id(session_id, user_id, event)
        elif type(event_id) is not str or not _EVENT_ID_MIN <= len(event_id) <= _EVENT_ID_MAX:
            event_id = _identifier(event_id, "eventId", limits.EVENT_ID)
        event["eventId"] = event_id
        if not fits and _may_exceed_quota(event) and _event_bytes(event) > limits.MAX_EVENT_BYTES:
            raise InvalidRecord("validation", "too_large", f"event exceeds {limits.MAX_EVENT_BYTES} bytes")
        return (session_id, user_id), event

    def _size_bound(self) -> tuple[int, int]:
        """(a, b) such that every event `map(raw)` returns serializes to at most a·len(raw) + b bytes.

        Every string member is one value of the raw message re-encoded, and orjson never encodes a
        string longer than any valid JSON encoding of it: so at most len(raw), plus 2 quotes if it was
        an integer. A float takes at most 24 bytes however it was written. `properties` is JSON inside a
        JSON string: escaping can double it. The rest is constants: names and punctuation, a derived
        eventId, the quotes impression items gain, rename targets, the attribution constant.
        """
        s = self.settings
        a = sum(1 for path in (s.event_type, s.item_id, s.recommendation_id, s.impression, s.event_id) if path)
        b = 256 + 24 + 24 + 4 * 2 + 2 * limits.IMPRESSION_ITEMS[1] + len(EVENT_ID_PREFIX) + 32 + 2
        b += max((len(orjson.dumps(target)) for target in self._renames.values()), default=0)
        if s.metric_attribution_source:
            a += 1
        elif self._attribution_value is not None:
            b += len(orjson.dumps(self._attribution_value))
        if self._properties:
            a += 2 * len(self._properties)
            b += 2 * (2 + sum(len(orjson.dumps(key)) + 2 + 24 for key, _, _ in self._properties))
        return a, b


def _lookup(obj: dict[str, Any], path: tuple[str, ...] | None) -> Any:
    """`_map`'s reader when some path is nested: every path is then a tuple, or None when not mapped."""
    return None if path is None else _walk(obj, path)


def _walk(value: Any, path: tuple[str, ...]) -> Any:
    """The value at `path` (an empty path: `value` itself), or None when a step is missing or not an object."""
    for part in path:
        if type(value) is not dict:
            return None
        value = value.get(part)
    return value


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
    items = [item.strip() if type(item) is str else item for item in items]
    for item in items:
        if type(item) is not str or not _IMPRESSION_ITEM_MIN <= len(item) <= _IMPRESSION_ITEM_MAX:
            # Not all strings of valid length: convert or reject each in order, as `_identifier` does.
            return [_identifier(item, "impression", limits.IMPRESSION_ITEM) for item in items]
    return items


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


# Copied per event ID: cheaper than a new blake2b, whose parameters would be parsed every time.
_EVENT_ID_HASH = blake2b(digest_size=16)


def derive_event_id(session_id: str, user_id: str | None, event: dict[str, Any]) -> str:
    """A content hash, so a replay after a crash or rebalance yields the same ID and Personalize ignores it."""
    digest = _EVENT_ID_HASH.copy()
    digest.update(orjson.dumps((session_id, user_id, event), option=orjson.OPT_SORT_KEYS))
    return EVENT_ID_PREFIX + digest.hexdigest()
