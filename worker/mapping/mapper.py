"""Raw message bytes → (session key, PutEvents event), checked against every PutEvents rule.

Pure: no I/O, no clock. A record that cannot become a valid event raises `InvalidRecord` with a
reason; nothing is repaired silently. `Mapper.map` runs for every record, so it is written for the
common case: each member is checked inline, and anything unusual goes to the member's function
(`worker.mapping.values`), which gives the same value or the same error as it always did. A few microseconds
per record with plain paths; a JMESPath member (`worker.mapping.expressions`) adds a fraction of one each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from worker.config import MappingSettings, property_sources
from worker.mapping import limits
from worker.mapping.expressions import KAFKA, Getter, Source, compile_source, is_truthy, literal_bytes, references_kafka
from worker.mapping.identity import EVENT_ID_PREFIX, derive_event_id, event_bytes, may_exceed_quota
from worker.mapping.interactions import PropertyField, check_value, load_schema
from worker.mapping.layouts import decode_record, kafka_fields
from worker.mapping.values import (
    AUTO_MS_THRESHOLD,
    MAX_EPOCH_SECONDS,
    InvalidRecord,
    attribution_source,
    check_length,
    excerpt,
    identifier,
    impression,
    missing,
    parse_sent_at,
    round_ms,
    to_float,
    type_name,
)

__all__ = ["EVENT_ID_PREFIX", "MAX_EPOCH_SECONDS", "InvalidRecord", "Mapper", "derive_event_id", "parse_sent_at"]

SessionKey = tuple[str, str | None]
"""(sessionId, userId): with the worker's one trackingId, the key of a PutEvents call."""

# Length bounds of the members checked inline on the hot path, where a call costs more than the check.
_EVENT_TYPE_MIN, _EVENT_TYPE_MAX = limits.EVENT_TYPE.min, limits.EVENT_TYPE.max
_SESSION_ID_MIN, _SESSION_ID_MAX = limits.SESSION_ID.min, limits.SESSION_ID.max
_USER_ID_MIN, _USER_ID_MAX = limits.USER_ID.min, limits.USER_ID.max
_ITEM_ID_MIN, _ITEM_ID_MAX = limits.ITEM_ID.min, limits.ITEM_ID.max
_EVENT_ID_MIN, _EVENT_ID_MAX = limits.EVENT_ID.min, limits.EVENT_ID.max
_IMPRESSION_ITEM_MIN, _IMPRESSION_ITEM_MAX = limits.IMPRESSION_ITEM.min, limits.IMPRESSION_ITEM.max
_PROPERTIES_MIN, _PROPERTIES_MAX = limits.PROPERTIES.min, limits.PROPERTIES.max


class Mapper:
    """Compiled `[mapping]`: call `map(value)` per record (`map_record` when `reads_record`)."""

    def __init__(self, settings: MappingSettings) -> None:
        self.settings = settings
        s = settings
        self._zone: tzinfo = UTC if s.timezone == "UTC" else ZoneInfo(s.timezone)
        # The configured text of each member, for errors (`eventValue: 'abc' at properties.price ...`).
        members = {
            "eventType": s.event_type,
            "sessionId": s.session_id,
            "userId": s.user_id,
            "sentAt": s.sent_at,
            "itemId": s.item_id,
            "eventValue": s.event_value,
            "recommendationId": s.recommendation_id,
            "impression": s.impression,
            "metricAttribution.eventAttributionSource": s.metric_attribution_source,
            "eventId": s.event_id,
        }
        self._texts = members
        # Config validation refuses bad paths and expressions and two sources with one key.
        named = property_sources(s)
        property_sources_compiled = [(key, _source(f"properties.{key}", text)) for key, text in named]
        plain = [src for _, src in property_sources_compiled if type(src) is tuple]
        # Properties usually sit side by side in one object: `_map` then reads it once, like a member,
        # and each property by its last segment. Otherwise each property reads its whole source.
        parents = {path[:-1] for path in plain}
        shared = parents.pop() if len(parents) == 1 and len(plain) == len(named) else None
        self._properties_at_top = shared == ()
        self._properties = tuple(
            (key, src[-1] if type(src) is tuple else "", None if shared is not None else _getter(src))
            for key, src in property_sources_compiled
        )
        self._property_texts = dict(named)
        # With `mapping.schema` or `schema_arn`: each property's field, whose type its values must have.
        self._fields = load_schema(s.schema_source) if s.schema_source else None
        sources: list[Source | None] = [_source(member, text) for member, text in members.items()]
        sources.append(shared or None)
        # A source is usually one key of the message, read with `obj.get`; only a mapping with a nested
        # path or an expression calls a getter per member (see `_map`). None is a key no JSON object has.
        self._flat = all(src is None or (type(src) is tuple and len(src) == 1) for src in sources)
        self._expressions: list[tuple[Getter, str, str]] = [
            (src, member, text)  # type: ignore[misc]  # the filter keeps the getters
            for (member, text), src in zip(
                [*members.items(), *((f"properties.{k}", t) for k, t in named)],
                [*sources[:-1], *(src for _, src in property_sources_compiled)],
                strict=True,
            )
            if src is not None and type(src) is not tuple
        ]
        """(getter, member, text) of each expression: `_culprit` finds the one that failed on a record."""
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
        ) = (src[0] if self._flat and type(src) is tuple else src if self._flat else _getter(src) for src in sources)
        self._where = _getter(_source("where", s.where)) if s.where else None
        if self._where is not None:
            self._expressions.append((self._where, "where", s.where))
        texts = [*members.values(), *(text for _, text in named), s.where]
        self.reads_record = s.layout != "json" or any(text and references_kafka(text) for text in texts)
        """Whether `map_record` must be used: the Kafka key, headers or metadata are read, or the layout needs them."""
        self._attributed = bool(s.metric_attribution_source or s.metric_attribution_source_value)
        self._attribution_value = None if s.metric_attribution_source else s.metric_attribution_source_value or None
        self._sent_at_format = s.sent_at_format
        self._numbers_are_epochs = s.sent_at_format != "iso8601"
        # A number above this is milliseconds (see parse_sent_at): never for epoch_s, always for epoch_ms.
        self._milliseconds_above = {"auto": AUTO_MS_THRESHOLD, "epoch_s": math.inf}.get(s.sent_at_format, -math.inf)
        self._renames = dict(s.event_types)
        self._only_listed = s.event_types_only
        factor, base = self._size_bound()
        # Up to this many bytes of message, the event is within the quota without serializing it.
        self._surely_fits = (limits.MAX_EVENT_BYTES - base) // factor if not self.reads_record else -1

    def map(self, value: bytes | None) -> tuple[SessionKey, dict[str, Any]] | None:
        """The session key and event for one message, or None when it is filtered out."""
        if not value:
            raise InvalidRecord("decode", "empty", "the message value is empty")
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise InvalidRecord("decode", "not_json", f"not valid JSON: {exc}") from None
        if type(obj) is not dict:
            raise InvalidRecord("decode", "not_object", f"expected a JSON object, got {type_name(obj)}")
        try:
            return self._map(obj, len(value) <= self._surely_fits)
        except Exception as error:
            raise self._culprit(obj, error) from None

    def map_record(self, record: Any, topic: str = "", partition: int = 0) -> tuple[SessionKey, dict[str, Any]] | None:
        """`map` for a whole Kafka record: its key, headers and metadata are readable as `_kafka.*`, and the
        layout (`cloudevents`, `snowplow_tsv`) may build the object from headers and value together."""
        headers: Sequence[tuple[str, bytes]] = record.headers or ()
        obj = decode_record(self.settings.layout, record.value, headers)
        obj[KAFKA] = kafka_fields(record, headers, topic, partition)
        try:
            return self._map(obj, False)
        except Exception as error:
            raise self._culprit(obj, error) from None

    def map_object(self, obj: dict[str, Any]) -> tuple[SessionKey, dict[str, Any]] | None:
        """`map` for an object decoded elsewhere."""
        try:
            return self._map(obj, False)
        except Exception as error:
            raise self._culprit(obj, error) from None

    def _culprit(self, obj: dict[str, Any], error: Exception) -> Exception:
        """The error to raise for `error` out of `_map`: an `InvalidRecord` as it is; any other is an
        expression failing on this record (jmespath's type errors, or its bugs: `contains('a', null)`),
        found by evaluating each again, so the hot path carries no handler per member."""
        if isinstance(error, InvalidRecord):
            return error
        for getter, member, text in self._expressions:
            try:
                getter(obj)
            except Exception as failure:
                # jmespath's message quotes the value it choked on: cut short, it may be any size.
                reason = (str(failure).splitlines() or [type(failure).__name__])[0][:120]
                return InvalidRecord("mapping", "expression_failed", f"{member}: {text} failed: {reason}")
        return error  # not an expression's: a bug, raised as it is

    def _map(self, obj: dict[str, Any], fits: bool) -> tuple[SessionKey, dict[str, Any]] | None:
        """`fits`: the event is known to be within the size quota, so it need not be serialized to check.

        The common case of each member (a string of valid length, a number) is checked inline; anything
        else goes to the member's function, which returns the same value or raises the reason.
        """
        if self._where is not None and not is_truthy(self._where(obj)):
            return None
        get: Callable[[Any], Any] = obj.get if self._flat else _call_with(obj)
        texts = self._texts
        event_type = get(self._event_type_key)
        if type(event_type) is not str or not _EVENT_TYPE_MIN <= len(event_type) <= _EVENT_TYPE_MAX:
            if event_type is None:
                raise missing("eventType", texts["eventType"])
            event_type = identifier(event_type, "eventType", limits.EVENT_TYPE, texts["eventType"])
        renamed = self._renames.get(event_type) if self._renames else None
        if renamed is not None:
            event_type = renamed
        elif self._only_listed:
            return None

        session_id = get(self._session_id_key)
        if type(session_id) is not str or not _SESSION_ID_MIN <= len(session_id) <= _SESSION_ID_MAX:
            if session_id is None:
                raise missing("sessionId", texts["sessionId"])
            session_id = identifier(session_id, "sessionId", limits.SESSION_ID, texts["sessionId"])
        user_id = get(self._user_id_key)
        if type(user_id) is not str or not _USER_ID_MIN <= len(user_id) <= _USER_ID_MAX:
            # An empty optional member is absent, not an error: producers send "" for "unknown".
            empty = user_id is None or user_id == ""
            user_id = None if empty else identifier(user_id, "userId", limits.USER_ID, texts["userId"])

        raw_sent_at = get(self._sent_at_key)
        kind = type(raw_sent_at)
        if (kind is float or kind is int) and self._numbers_are_epochs:
            seconds = float(raw_sent_at)
            if seconds > self._milliseconds_above:
                seconds /= 1000.0
            sent_at = round_ms(seconds)
            if not 0.0 < sent_at <= MAX_EPOCH_SECONDS:
                sent_at = self._sent_at(raw_sent_at)  # raises
        elif raw_sent_at is None:
            raise missing("sentAt", texts["sentAt"])
        else:
            sent_at = self._sent_at(raw_sent_at)
        event: dict[str, Any] = {"eventType": event_type, "sentAt": sent_at}

        item_id = get(self._item_id_key)
        if item_id is not None and item_id != "":
            if type(item_id) is not str or not _ITEM_ID_MIN <= len(item_id) <= _ITEM_ID_MAX:
                item_id = identifier(item_id, "itemId", limits.ITEM_ID, texts["itemId"])
            event["itemId"] = item_id
        value = get(self._event_value_key)
        if value is not None and value != "":
            event["eventValue"] = to_float(value, texts["eventValue"])
        value = get(self._recommendation_id_key)
        if value is not None and value != "":
            event["recommendationId"] = identifier(
                value, "recommendationId", limits.RECOMMENDATION_ID, texts["recommendationId"]
            )
        value = get(self._impression_key)
        if value is not None and value != "" and value != []:  # noqa: PLR1714 (a list is unhashable)
            event["impression"] = impression(value, texts["impression"])
        if self._properties:
            properties = self._properties_of(obj, get)
            if properties is not None:
                event["properties"] = properties
        if self._attributed:
            source = get(self._source_key) if self._attribution_value is None else self._attribution_value
            if source is not None and source != "":
                event["metricAttribution"] = {
                    "eventAttributionSource": attribution_source(
                        source, texts["metricAttribution.eventAttributionSource"]
                    )
                }

        event_id = get(self._event_id_key)
        if event_id is None or event_id == "":
            event_id = derive_event_id(session_id, user_id, event)
        elif type(event_id) is not str or not _EVENT_ID_MIN <= len(event_id) <= _EVENT_ID_MAX:
            event_id = identifier(event_id, "eventId", limits.EVENT_ID, texts["eventId"])
        event["eventId"] = event_id
        if not fits and may_exceed_quota(event) and event_bytes(event) > limits.MAX_EVENT_BYTES:
            raise InvalidRecord("validation", "too_large", f"event exceeds {limits.MAX_EVENT_BYTES} bytes")
        return (session_id, user_id), event

    def _sent_at(self, raw: Any) -> float:
        return parse_sent_at(raw, self._sent_at_format, source=self._texts["sentAt"], zone=self._zone)

    def _properties_of(self, obj: dict[str, Any], get: Callable[[Any], Any]) -> str | None:
        """The properties JSON string, or None when no property has a value."""
        # The object every property is in, when they share one (see `__init__`).
        parent = obj if self._properties_at_top else get(self._properties_key)
        if type(parent) is not dict:
            parent = {}
        found: dict[str, Any] = {}
        fields = self._fields
        for key, leaf, src in self._properties:
            value = parent.get(leaf) if src is None else src(obj)
            if fields is not None and value is not None:
                value = self._typed(key, value, fields[key])
            if type(value) is str:  # the common case, with one test
                found[key] = value
            elif value is not None:
                if type(value) is dict or type(value) is list:
                    source = self._property_texts[key]
                    message = f"properties.{key}: {excerpt(value)} at {source} is {type_name(value)}, not a scalar"
                    raise InvalidRecord("mapping", "wrong_type", message)
                found[key] = value
        if not found:
            return None
        properties = orjson.dumps(found).decode()
        if not _PROPERTIES_MIN <= len(properties) <= _PROPERTIES_MAX:
            check_length(properties, "properties", limits.PROPERTIES)
        return properties

    def _typed(self, key: str, value: Any, field: PropertyField) -> Any:
        try:
            return check_value(field, value)
        except ValueError as error:
            source = self._property_texts[key]
            message = f"properties.{key}: {excerpt(value)} at {source} {error}"
            raise InvalidRecord("mapping", "wrong_type", message) from None

    def _size_bound(self) -> tuple[int, int]:
        """(a, b) such that every event `map(raw)` returns serializes to at most a·len(raw) + b bytes.

        Every string member is one value of the raw message re-encoded, and orjson never encodes a
        string longer than any valid JSON encoding of it: so at most len(raw), plus 2 quotes if it was
        an integer. A float takes at most 24 bytes however it was written. `properties` is JSON inside a
        JSON string: escaping can double it. The rest is constants: names and punctuation, a derived
        eventId, the quotes impression items gain, rename targets, the attribution constant. An
        expression made of paths, fallbacks, indexes, projections, comparisons and literals still yields
        one value of the message (or a boolean, or a literal, counted in b); one that can build a
        longer value (`join`, `[a, a]`) gets no bound (a huge factor), and every event is measured.
        """
        s = self.settings
        texts = [s.event_type, s.item_id, s.recommendation_id, s.impression, s.event_id, s.metric_attribution_source]
        texts += [text for _, text in property_sources(s)]
        literals = [literal_bytes(text) if text else 0 for text in texts]
        if None in literals:
            return 1 << 40, 0  # an expression that can build a longer value: every event is measured
        literal_total = sum(n for n in literals if n is not None)
        a = sum(1 for path in (s.event_type, s.item_id, s.recommendation_id, s.impression, s.event_id) if path)
        b = 256 + 24 + 24 + 4 * 2 + 2 * limits.IMPRESSION_ITEMS[1] + len(EVENT_ID_PREFIX) + 32 + 2
        b += 2 * literal_total  # a literal may stand in a member (once) or in properties (escaped: twice)
        b += max((len(orjson.dumps(target)) for target in self._renames.values()), default=0)
        if s.metric_attribution_source:
            a += 1
        elif self._attribution_value is not None:
            b += len(orjson.dumps(self._attribution_value))
        if self._properties:
            a += 2 * len(self._properties)
            b += 2 * (2 + sum(len(orjson.dumps(key)) + 2 + 24 for key, _, _ in self._properties))
        return a, b


def _source(member: str, text: str) -> Source | None:
    """A member's compiled source: None when not mapped (config validation named any fault already)."""
    return compile_source(text) if text else None


def _getter(source: Source | None) -> Getter:
    """A source as a function of the object: a walk for a path, the closure itself for an expression."""
    if source is None:
        return _nothing
    if type(source) is tuple:
        path: tuple[str, ...] = source
        return lambda obj: _walk(obj, path)
    assert callable(source)
    return source


def _nothing(obj: Any) -> None:
    return None


def _call_with(obj: dict[str, Any]) -> Callable[[Getter], Any]:
    """`_map`'s reader when some source is nested or an expression: each member's getter on `obj`."""
    return lambda getter: getter(obj)


def _walk(value: Any, path: tuple[str, ...]) -> Any:
    """The value at `path` (an empty path: `value` itself), or None when a step is missing or not an object."""
    for part in path:
        if type(value) is not dict:
            return None
        value = value.get(part)
    return value


_round_ms = round_ms  # the name the tests knew
