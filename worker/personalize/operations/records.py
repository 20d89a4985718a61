"""A decoded record (a dict) → one request member of PutItems, PutUsers, PutActions or PutActionInteractions.

Pure: no I/O, no clock. A record that cannot become a member the model accepts raises `InvalidRecord`
(stages `mapping` and `validation`, as PutEvents' mapper uses, so dead-letter consumers see one
vocabulary) naming the member, the source path and — unless the model marks the value sensitive — a short
excerpt of it. Nothing is repaired silently: integer ids become their decimal text, as in PutEvents, and
categorical lists are joined with `|`, as the model's documentation prescribes; everything else is kept
or refused.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from worker.mapping.identity import derive_event_id
from worker.mapping.mapper import InvalidRecord, parse_sent_at
from worker.personalize.operations.settings import (
    MAPPINGS,
    ActionInteractionsMapping,
    OperationMapping,
    Properties,
    canonical_event_type,
    property_key,
    reserved_keys,
)
from worker.personalize.operations.spec import ACTION_INTERACTIONS, Member, OperationSpec

Mapped = tuple[str, dict[str, Any]]
"""(key, member): the key is the record's id (coalesced operations) or its eventId (deduplicated)."""

CATEGORY_SEPARATOR = "|"
"""How the model's documentation says several categories of one field travel in one string."""
EXCERPT_CHARS = 40
MAX_REMEMBERED_FIELDS = 4096


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", float: "a number", int: "a number"}.get(
        type(value), "null" if value is None else "a string"
    )


def _shown(value: Any, member: Member) -> str:
    """What an error may say about a value: an excerpt, or only its size when the model marks it sensitive."""
    if member.sensitive:
        return f"{_type_name(value)} of {len(value)} characters" if type(value) is str else _type_name(value)
    text = repr(value)
    return f"{_type_name(value)} {text[:EXCERPT_CHARS]}{'…' if len(text) > EXCERPT_CHARS else ''}"


def _walk(value: Any, path: tuple[str, ...]) -> Any:
    """The value at `path`, or None when a step is missing or not an object."""
    for part in path:
        if type(value) is not dict:
            return None
        value = value.get(part)
    return value


def _missing(member: Member, path: str) -> InvalidRecord:
    return InvalidRecord("mapping", "missing_field", f"{member.name}: required field {path!r} is missing")


def _string(value: Any, member: Member, path: str) -> str:
    """A string member within the model's bounds; integer ids map to their decimal text."""
    if type(value) is int:
        value = str(value)
    elif type(value) is not str:
        raise InvalidRecord(
            "mapping", "wrong_type", f"{member.name} (from {path!r}): expected a string, got {_shown(value, member)}"
        )
    text: str = value
    limit = member.limit
    assert limit is not None, f"{member.name} is not a string member"
    if len(text) > limit.max:
        raise InvalidRecord(
            "validation", "too_long", f"{member.name} (from {path!r}): {_shown(text, member)} exceeds {limit.max}"
        )
    if len(text) < max(limit.min, 1):
        raise InvalidRecord("validation", "too_short", f"{member.name} (from {path!r}): empty")
    if limit.pattern is not None and not limit.pattern.search(text):  # none today; the model may add one
        raise InvalidRecord("validation", "bad_value", f"{member.name} (from {path!r}): not {limit.pattern.pattern!r}")
    return text


def _category(value: Any, key: str, path: str) -> str:
    if type(value) is int:
        return str(value)
    if type(value) is not str:
        raise InvalidRecord(
            "mapping", "wrong_type", f"properties.{key} (from {path!r}): a category list holds {_type_name(value)}"
        )
    if not value or CATEGORY_SEPARATOR in value:
        # Empty, or holding the separator: it would reach Personalize as other categories than it is.
        raise InvalidRecord(
            "validation", "bad_value", f"properties.{key} (from {path!r}): a category is empty or contains '|'"
        )
    return value


def _property(value: Any, key: str, path: str) -> Any:
    """A property's JSON value: strings, numbers and booleans as they are, a list of categories joined;
    None (null, or an empty list) is not sent."""
    kind = type(value)
    if kind is str or kind is bool or kind is int or value is None:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise InvalidRecord("validation", "out_of_range", f"properties.{key} (from {path!r}): not a finite number")
        return value
    if kind is list:
        return CATEGORY_SEPARATOR.join(_category(item, key, path) for item in value) if value else None
    raise InvalidRecord(
        "mapping",
        "wrong_type",
        f"properties.{key} (from {path!r}): expected a scalar or a list, got {_type_name(value)}",
    )


class PropertiesMapper:
    """The `properties` JSON string of one record: listed paths, or every field beside the record's id."""

    def __init__(self, spec: OperationSpec, selection: Properties, parent: tuple[str, ...], taken: set[str]) -> None:
        """`parent`: the object `"*"` reads (the id's); `taken`: its fields other members already use."""
        self.member = spec.properties
        self._reserved = reserved_keys(spec)
        self._every = selection == "*"
        self._parent = parent
        self._taken = frozenset(taken)
        self._paths = (
            ()
            if selection == "*"
            else tuple((property_key(p.rsplit(".", 1)[-1]), tuple(p.split(".")), p) for p in selection)
        )
        assert self.member.limit is not None
        self._max = self.member.limit.max
        self._keys: dict[str, str] = dict.fromkeys(self._taken, "")
        """Field name → property key ("" for a taken field), for `"*"`: the same few names every record."""

    def _key(self, name: str) -> str:
        """The property key of a field under `"*"`, remembered while few; refused when unusable."""
        key = property_key(name)
        if not key:
            raise InvalidRecord(
                "validation", "bad_property_key", f"properties: field {name[:EXCERPT_CHARS]!r} has no name"
            )
        if key.lower() in self._reserved:
            raise InvalidRecord(
                "validation",
                "reserved_key",
                f"properties: field {name[:EXCERPT_CHARS]!r} becomes {key!r}, a name Personalize reserves",
            )
        if len(self._keys) < MAX_REMEMBERED_FIELDS:  # untrusted input may name fields without end
            self._keys[name] = key
        return key

    def build(self, obj: dict[str, Any]) -> str | None:
        """The properties as a JSON string, or None when the record has none to send."""
        found: dict[str, Any] = {}
        if self._every:
            fields = _walk(obj, self._parent)
            if type(fields) is not dict:
                return None
            seen: set[str] = set()
            """Keys of fields that sent nothing (null, an empty list): still taken for the duplicate check."""
            keys = self._keys
            for name, raw in fields.items():
                key = keys.get(name)
                if key is None:
                    key = self._key(name)
                if not key:  # a field another member reads
                    continue
                if key in found or key in seen:
                    raise InvalidRecord(
                        "validation",
                        "duplicate_key",
                        f"properties: field {name[:EXCERPT_CHARS]!r} becomes {key!r}, the key of another field too",
                    )
                kind = type(raw)
                if kind is str or kind is int or kind is bool:  # the common case, without a call
                    found[key] = raw
                    continue
                seen.add(key)
                value = _property(raw, key, name)
                if value is not None:
                    found[key] = value
        else:
            for key, path, text in self._paths:
                raw = _walk(obj, path)
                if raw is not None:
                    value = _property(raw, key, text)
                    if value is not None:
                        found[key] = value
        if not found:
            return None
        try:
            text = orjson.dumps(found).decode()
        except TypeError:  # an integer beyond 64 bits: no JSON number Personalize reads
            raise InvalidRecord("validation", "out_of_range", "properties: an integer beyond 64 bits") from None
        if len(text) > self._max:
            raise InvalidRecord("validation", "too_long", f"properties: {len(text)} characters exceed {self._max}")
        return text


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


class UpsertMapper:
    """PutItems, PutUsers, PutActions: `{<id>: ..., "properties": "..."}`, keyed by the id for coalescing."""

    def __init__(self, spec: OperationSpec, id_path: str, properties: Properties) -> None:
        assert spec.coalesced, f"{spec.name} records are events, not upserts"
        self.spec = spec
        self._id = spec.members[spec.id_member]
        self._id_text = id_path
        self._id_path = _split(id_path)
        self._properties = PropertiesMapper(spec, properties, self._id_path[:-1], {self._id_path[-1]})

    def map(self, obj: dict[str, Any]) -> Mapped:
        if type(obj) is not dict:
            raise InvalidRecord("decode", "not_object", f"expected a JSON object, got {_type_name(obj)}")
        raw = _walk(obj, self._id_path)
        if raw is None:
            raise _missing(self._id, self._id_text)
        record_id = _string(raw, self._id, self._id_text)
        member: dict[str, Any] = {self._id.name: record_id}
        properties = self._properties.build(obj)
        if properties is not None:
            member["properties"] = properties
        return record_id, member


class ActionInteractionMapper:
    """PutActionInteractions: one action interaction, keyed by its eventId (mapped, or derived from content)."""

    def __init__(self, settings: ActionInteractionsMapping) -> None:
        spec = self.spec = ACTION_INTERACTIONS
        self.settings = settings
        m = spec.members
        self._required = [
            (m[name], _split(path), path)
            for name, path in (
                ("actionId", settings.action_id),
                ("sessionId", settings.session_id),
                ("eventType", settings.event_type),
            )
        ]
        self._optional = [
            (m[name], _split(path), path)
            for name, path in (("userId", settings.user_id), ("recommendationId", settings.recommendation_id))
            if path
        ]
        self._timestamp = (m["timestamp"], _split(settings.timestamp), settings.timestamp)
        self._impression = (m["impression"], _split(settings.impression), settings.impression)
        self._event_id = (m["eventId"], _split(settings.event_id), settings.event_id) if settings.event_id else None
        self._event_types = m["eventType"].values
        action_path = _split(settings.action_id)
        parent = action_path[:-1]
        mapped = [settings.action_id, settings.session_id, settings.event_type, settings.timestamp]
        mapped += [settings.user_id, settings.event_id, settings.impression, settings.recommendation_id]
        # "*" takes the fields beside actionId except those other members read.
        taken = {path.rsplit(".", 1)[-1] for path in mapped if path and _split(path)[:-1] == parent}
        self._properties = PropertiesMapper(spec, settings.properties, parent, taken)

    def map(self, obj: dict[str, Any]) -> Mapped:
        if type(obj) is not dict:
            raise InvalidRecord("decode", "not_object", f"expected a JSON object, got {_type_name(obj)}")
        member: dict[str, Any] = {}
        for spec_member, path, text in self._required:
            raw = _walk(obj, path)
            if raw is None:
                raise _missing(spec_member, text)
            member[spec_member.name] = _string(raw, spec_member, text)
        member["eventType"] = self._event_type(member["eventType"])
        timestamp_member, path, text = self._timestamp
        raw = _walk(obj, path)
        if raw is None:
            raise _missing(timestamp_member, text)
        try:
            member["timestamp"] = parse_sent_at(raw, self.settings.timestamp_format, "timestamp")
        except InvalidRecord as error:
            raise InvalidRecord(error.stage, error.reason, f"{error.message} (from {text!r})") from None
        for spec_member, path, text in self._optional:
            raw = _walk(obj, path)
            if raw is not None:
                member[spec_member.name] = _string(raw, spec_member, text)
        if self.settings.impression:
            raw = _walk(obj, self._impression[1])
            if raw is not None:
                member["impression"] = _impression(raw, self._impression[0], self._impression[2])
        properties = self._properties.build(obj)
        if properties is not None:
            member["properties"] = properties
        raw = None if self._event_id is None else _walk(obj, self._event_id[1])
        if raw is None:
            event_id = derive_event_id(member["sessionId"], member.get("userId"), member)
        else:
            assert self._event_id is not None
            event_id = _string(raw, self._event_id[0], self._event_id[2])
        member["eventId"] = event_id
        return event_id, member

    def _event_type(self, value: str) -> str:
        renamed = self.settings.event_types.get(value)
        if renamed is not None:
            return renamed
        if value in self._event_types:
            return value
        if not self._event_types:  # the model no longer lists them: the service decides
            return value
        canonical = canonical_event_type(value, self._event_types)
        if canonical is None:
            raise InvalidRecord(
                "validation",
                "bad_value",
                f"eventType (from {self.settings.event_type!r}): {value[:EXCERPT_CHARS]!r} is not one of "
                f"{', '.join(self._event_types)} (map others with event_types)",
            )
        return canonical


def _impression(value: Any, member: Member, path: str) -> list[str]:
    """A list of ids, or one comma-separated string of them (as PutEvents' mapper reads impressions)."""
    if type(value) is str:
        items: list[Any] = [item.strip() for item in value.split(",")]
    elif type(value) is list:
        items = value
    else:
        raise InvalidRecord(
            "mapping", "wrong_type", f"impression (from {path!r}): expected a list, got {_type_name(value)}"
        )
    assert member.count is not None
    low, high = member.count
    if not low <= len(items) <= high:
        reason = "too_long" if items else "too_short"
        raise InvalidRecord("validation", reason, f"impression (from {path!r}): {len(items)} ids, not {low}-{high}")
    return [_string(item, member, path) for item in items]


def mapper_for(spec: OperationSpec, settings: OperationMapping) -> UpsertMapper | ActionInteractionMapper:
    """The mapper of one route: its operation and that operation's mapping settings."""
    if type(settings) is not MAPPINGS.get(spec.key):
        raise TypeError(f"{spec.name} is not mapped by {type(settings).__name__}")
    if isinstance(settings, ActionInteractionsMapping):
        return ActionInteractionMapper(settings)
    return UpsertMapper(spec, settings.id_path, settings.properties)
