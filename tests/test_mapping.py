"""Mapping: every PutEvents rule from the botocore model, one past each limit, and hostile input."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.session
import orjson
import pytest
from botocore.validate import ParamValidator
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.config import MappingSettings
from worker.mapping import limits
from worker.mapping.interactions import camel_case
from worker.mapping.mapper import (
    EVENT_ID_PREFIX,
    MAX_EPOCH_SECONDS,
    InvalidRecord,
    Mapper,
    _round_ms,
    derive_event_id,
    parse_sent_at,
)

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000  # 2023-11-14T22:13:20Z

BASE: dict[str, Any] = {"event_type": "click", "session_id": "s-1", "timestamp": T0}
"""The smallest message that maps: eventType, sessionId and sentAt."""


def full_settings(**overrides: Any) -> MappingSettings:
    """Defaults plus properties and an attribution path, so every Event member is reachable."""
    values: dict[str, Any] = {
        "properties": ("ctx.page_category", "ctx.device_type"),
        "metric_attribution_source": "source",
    }
    values.update(overrides)
    return MappingSettings(**values)


FULL = Mapper(full_settings())


def message(**fields: Any) -> bytes:
    return orjson.dumps({**BASE, **fields})


def mapped(mapper: Mapper, value: bytes) -> tuple[tuple[str, str | None], dict[str, Any]]:
    result = mapper.map(value)
    assert result is not None
    return result


def rejected(mapper: Mapper, value: bytes | None) -> InvalidRecord:
    with pytest.raises(InvalidRecord) as info:
        mapper.map(value)
    return info.value


def test_minimal_message_maps_to_the_required_members_only() -> None:
    (session_id, user_id), event = mapped(Mapper(MappingSettings()), message())
    assert (session_id, user_id) == ("s-1", None)
    assert set(event) == {"eventType", "sentAt", "eventId"}
    assert event["eventType"] == "click"
    assert event["sentAt"] == float(T0)
    assert event["eventId"].startswith(EVENT_ID_PREFIX)


def test_example_message_with_example_config_maps_every_member() -> None:
    raw = (ROOT / "config" / "example-message.json").read_bytes()
    mapper = Mapper(MappingSettings(properties=("ctx.page_category", "ctx.device_type")))
    key, event = mapped(mapper, raw)
    assert key == ("sess-7f3a", "user-42")
    assert event == {
        "eventType": "click",
        "sentAt": datetime(2026, 11, 22, 15, 4, 5, 123000, tzinfo=UTC).timestamp(),
        "itemId": "sku-1234",
        "eventValue": 1.0,
        "recommendationId": "rec-9",
        "impression": ["sku-1234", "sku-88", "sku-3"],
        "properties": '{"pageCategory":"shoes","deviceType":"mobile"}',
        "eventId": "evt-000001",
    }


# --- limits: each member at its limit is accepted, one past it is rejected -----------------------

AT_LIMIT: list[tuple[str, dict[str, Any]]] = [
    ("eventType", {"event_type": "t" * 256}),
    ("sessionId", {"session_id": "s" * 256}),
    ("userId", {"user_id": "u" * 256}),
    ("itemId", {"item_id": "i" * 256}),
    ("eventId", {"event_id": "e" * 256}),
    ("recommendationId", {"recommendation_id": "r" * 40}),
    ("properties", {"ctx": {"page_category": "p" * (1024 - len('{"pageCategory":""}'))}}),
    ("impression", {"impression": [f"i{n}" for n in range(25)]}),
    ("impression", {"impression": ["i" * 256]}),
    ("impression", {"impression": ",".join(f"i{n}" for n in range(25))}),
    ("metricAttribution.eventAttributionSource", {"source": "~" * 1024}),
    ("metricAttribution.eventAttributionSource", {"source": " x "}),
]


@pytest.mark.parametrize(("member", "fields"), AT_LIMIT, ids=[f"{m}-{i}" for i, (m, _) in enumerate(AT_LIMIT)])
def test_member_at_its_limit_is_accepted(member: str, fields: dict[str, Any]) -> None:
    (session_id, user_id), event = mapped(FULL, message(**fields))
    if member == "sessionId":
        assert session_id == fields["session_id"]
    elif member == "userId":
        assert user_id == fields["user_id"]
    else:
        assert member.split(".", maxsplit=1)[0] in event
    if member == "properties":
        assert len(event["properties"]) == 1024


REJECTED: list[tuple[str, dict[str, Any], str, str, str]] = [
    # (case id, fields, stage, reason, member named in the message)
    ("eventType-257", {"event_type": "t" * 257}, "validation", "too_long", "eventType"),
    ("eventType-empty", {"event_type": ""}, "validation", "too_short", "eventType"),
    ("sessionId-257", {"session_id": "s" * 257}, "validation", "too_long", "sessionId"),
    ("sessionId-empty", {"session_id": ""}, "validation", "too_short", "sessionId"),
    ("userId-257", {"user_id": "u" * 257}, "validation", "too_long", "userId"),
    ("itemId-257", {"item_id": "i" * 257}, "validation", "too_long", "itemId"),
    ("eventId-257", {"event_id": "e" * 257}, "validation", "too_long", "eventId"),
    ("recommendationId-41", {"recommendation_id": "r" * 41}, "validation", "too_long", "recommendationId"),
    (
        "properties-1025",
        {"ctx": {"page_category": "p" * (1025 - len('{"pageCategory":""}'))}},
        "validation",
        "too_long",
        "properties",
    ),
    (
        "properties-1025-non-ascii",
        {"ctx": {"page_category": "é" * (1025 - len('{"pageCategory":""}'))}},
        "validation",
        "too_long",
        "properties",
    ),
    ("properties-object", {"ctx": {"page_category": {"a": 1}}}, "mapping", "wrong_type", "pageCategory"),
    ("properties-list", {"ctx": {"device_type": ["a"]}}, "mapping", "wrong_type", "deviceType"),
    ("impression-26", {"impression": [f"i{n}" for n in range(26)]}, "validation", "too_long", "impression"),
    (
        "impression-26-text",
        {"impression": ",".join(f"i{n}" for n in range(26))},
        "validation",
        "too_long",
        "impression",
    ),
    ("impression-item-257", {"impression": ["ok", "i" * 257]}, "validation", "too_long", "impression"),
    ("impression-empty-item-text", {"impression": "a,,b"}, "validation", "too_short", "impression"),
    ("impression-object", {"impression": {"a": 1}}, "mapping", "wrong_type", "impression"),
    ("impression-number", {"impression": 5}, "mapping", "wrong_type", "impression"),
    ("impression-item-bool", {"impression": ["a", True]}, "mapping", "wrong_type", "impression"),
    ("impression-item-null", {"impression": ["a", None]}, "mapping", "wrong_type", "impression"),
    ("impression-item-float", {"impression": [1.5]}, "mapping", "wrong_type", "impression"),
    (
        "attribution-non-ascii",
        {"source": "café"},
        "validation",
        "bad_value",
        "metricAttribution.eventAttributionSource",
    ),
    (
        "attribution-control-char",
        {"source": "a\tb"},
        "validation",
        "bad_value",
        "metricAttribution.eventAttributionSource",
    ),
    (
        "attribution-blank",
        {"source": "   "},
        "validation",
        "bad_value",
        "metricAttribution.eventAttributionSource",
    ),
    (
        "attribution-1025",
        {"source": "~" * 1025},
        "validation",
        "too_long",
        "metricAttribution.eventAttributionSource",
    ),
    (
        "attribution-number",
        {"source": 7},
        "mapping",
        "wrong_type",
        "metricAttribution.eventAttributionSource",
    ),
    ("eventValue-bool", {"event_value": True}, "mapping", "wrong_type", "eventValue"),
    ("eventValue-text", {"event_value": "abc"}, "mapping", "wrong_type", "eventValue"),
    ("eventValue-object", {"event_value": {}}, "mapping", "wrong_type", "eventValue"),
    ("eventValue-list", {"event_value": [1]}, "mapping", "wrong_type", "eventValue"),
    ("eventValue-nan-text", {"event_value": "nan"}, "validation", "out_of_range", "eventValue"),
    ("eventValue-inf-text", {"event_value": "1e400"}, "validation", "out_of_range", "eventValue"),
    ("eventValue-beyond-float32", {"event_value": 3.5e38}, "validation", "out_of_range", "eventValue"),
    ("eventType-missing", {"event_type": None}, "mapping", "missing_field", "eventType"),
    ("sessionId-missing", {"session_id": None}, "mapping", "missing_field", "sessionId"),
    ("sentAt-missing", {"timestamp": None}, "mapping", "missing_field", "sentAt"),
    ("sentAt-negative", {"timestamp": -5}, "validation", "bad_timestamp", "sentAt"),
    ("sentAt-zero", {"timestamp": 0}, "validation", "bad_timestamp", "sentAt"),
    ("sentAt-1e30", {"timestamp": 1e30}, "validation", "bad_timestamp", "sentAt"),
    ("sentAt-year-99999", {"timestamp": "99999-01-01T00:00:00Z"}, "mapping", "bad_timestamp", "sentAt"),
    ("sentAt-yesterday", {"timestamp": "yesterday"}, "mapping", "bad_timestamp", "sentAt"),
    ("sentAt-bool", {"timestamp": True}, "mapping", "bad_timestamp", "sentAt"),
    ("sentAt-object", {"timestamp": {"s": 1}}, "mapping", "bad_timestamp", "sentAt"),
    ("sentAt-nul", {"timestamp": "20\x0026-01-01T00:00:00"}, "mapping", "bad_timestamp", "sentAt"),
]
WRONG_TYPES: list[tuple[str, Any]] = [("object", {"a": 1}), ("list", ["a"]), ("bool", True), ("float", 1.5)]
ID_FIELDS = [
    ("event_type", "eventType"),
    ("session_id", "sessionId"),
    ("user_id", "userId"),
    ("item_id", "itemId"),
    ("event_id", "eventId"),
    ("recommendation_id", "recommendationId"),
]
REJECTED += [
    (f"{member}-{kind}", {field: value}, "mapping", "wrong_type", member)
    for field, member in ID_FIELDS
    for kind, value in WRONG_TYPES
]


@pytest.mark.parametrize(
    ("fields", "stage", "reason", "member"),
    [case[1:] for case in REJECTED],
    ids=[case[0] for case in REJECTED],
)
def test_rule_violation_is_rejected_with_reason_naming_the_member(
    fields: dict[str, Any], stage: str, reason: str, member: str
) -> None:
    error = rejected(FULL, message(**fields))
    assert (error.stage, error.reason) == (stage, reason)
    assert member in error.message
    assert str(error) == error.message


@pytest.mark.parametrize(
    ("field", "member"),
    [
        ("user_id", "userId"),
        ("item_id", "itemId"),
        ("event_id", "eventId"),
        ("recommendation_id", "recommendationId"),
        ("event_value", "eventValue"),
        ("impression", "impression"),
        ("source", "metricAttribution"),
    ],
)
@pytest.mark.parametrize("empty", ["", []])
def test_empty_optional_member_is_absent_not_an_error(field: str, member: str, empty: Any) -> None:
    if empty == [] and field != "impression":
        return  # a list is the wrong type for the others: still an error
    key, event = mapped(FULL, message(**{field: empty}))
    assert key == ("s-1", None)
    assert member == "eventId" or member not in event
    assert event["eventId"].startswith(EVENT_ID_PREFIX)  # an empty eventId is derived, as an absent one


@pytest.mark.parametrize("field", ["event_type", "session_id", "timestamp"])
def test_absent_required_field_is_missing(field: str) -> None:
    fields = {k: v for k, v in BASE.items() if k != field}
    error = rejected(FULL, orjson.dumps(fields))
    assert (error.stage, error.reason) == ("mapping", "missing_field")
    assert repr(field) in error.message


@pytest.mark.parametrize(
    "field", ["user_id", "item_id", "event_value", "recommendation_id", "impression", "source", "event_id"]
)
def test_null_optional_field_is_treated_as_absent(field: str) -> None:
    _, with_null = mapped(FULL, message(**{field: None}))
    _, without = mapped(FULL, message())
    assert with_null == without


def test_null_property_is_left_out_and_all_null_means_no_properties() -> None:
    _, event = mapped(FULL, message(ctx={"page_category": None, "device_type": "tv"}))
    assert event["properties"] == '{"deviceType":"tv"}'
    _, event = mapped(FULL, message(ctx={"page_category": None}))
    assert "properties" not in event
    _, event = mapped(FULL, message(ctx="not an object"))
    assert "properties" not in event


# --- decoding ------------------------------------------------------------------------------------

DECODE: list[tuple[str, bytes | None, str]] = [
    ("none", None, "empty"),
    ("empty", b"", "empty"),
    ("whitespace", b"  \n", "not_json"),
    ("garbage", b"not json", "not_json"),
    ("truncated", b'{"event_type": "click"', "not_json"),
    ("invalid-utf8", b"\xff\xfe\xfd", "not_json"),
    ("invalid-utf8-in-string", b'{"event_type": "cl\xffick"}', "not_json"),
    ("lone-surrogate", b'{"event_type": "\\ud800"}', "not_json"),
    ("nan-literal", b'{"event_value": NaN}', "not_json"),
    ("deep-nesting", b"[" * 10_000 + b"]" * 10_000, "not_json"),
    ("deep-nesting-in-object", b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}", "not_json"),
    ("list", b"[1, 2]", "not_object"),
    ("string", b'"click"', "not_object"),
    ("number", b"42", "not_object"),
    ("null", b"null", "not_object"),
    ("bool", b"true", "not_object"),
]


@pytest.mark.parametrize(("value", "reason"), [c[1:] for c in DECODE], ids=[c[0] for c in DECODE])
def test_undecodable_value_is_rejected_at_decode(value: bytes | None, reason: str) -> None:
    error = rejected(FULL, value)
    assert (error.stage, error.reason) == ("decode", reason)


def test_not_object_message_names_what_it_got() -> None:
    assert "a list" in rejected(FULL, b"[]").message
    assert "null" in rejected(FULL, b"null").message


def test_nul_inside_a_string_is_valid_json_and_kept_verbatim() -> None:
    # The model sets no pattern on IDs, so NUL is not ours to reject; it must survive serialization
    # and still give a distinct, deterministic eventId.
    key, event = mapped(FULL, message(session_id="a\x00b", item_id="x\x00", ctx={"page_category": "\x00"}))
    assert key == ("a\x00b", None)
    assert event["itemId"] == "x\x00"
    assert orjson.loads(event["properties"]) == {"pageCategory": "\x00"}
    _, plain = mapped(FULL, message(session_id="ab", item_id="x", ctx={"page_category": ""}))
    assert event["eventId"] != plain["eventId"]
    assert mapped(FULL, message(session_id="a\x00b", item_id="x\x00", ctx={"page_category": "\x00"}))[1] == event


def test_deep_nesting_elsewhere_in_the_object_is_rejected_quickly() -> None:
    nested = b"[" * 1000 + b"]" * 1000  # within orjson's depth limit: decodes, and the field is ignored
    _, event = mapped(FULL, message()[:-1] + b',"junk":' + nested + b"}")
    assert event["eventType"] == "click"


def test_duplicate_keys_take_the_last_value() -> None:
    _, event = mapped(FULL, b'{"event_type":"a","event_type":"b","session_id":"s","timestamp":1700000000}')
    assert event["eventType"] == "b"


# --- identifiers and values ----------------------------------------------------------------------


def test_integer_ids_become_their_decimal_text() -> None:
    key, event = mapped(
        FULL,
        message(session_id=7, user_id=42, item_id=0, event_id=2**63, recommendation_id=-3, impression=[1, 2]),
    )
    assert key == ("7", "42")
    assert event["itemId"] == "0"
    assert event["eventId"] == "9223372036854775808"
    assert event["recommendationId"] == "-3"
    assert event["impression"] == ["1", "2"]


def test_integer_beyond_64_bits_is_a_float_and_so_not_an_id() -> None:
    error = rejected(FULL, message()[:-1] + b',"user_id":123456789012345678901234567890}')
    assert (error.reason, "userId" in error.message) == ("wrong_type", True)


def test_trailing_nul_in_a_timestamp_is_rejected_or_read_as_the_same_instant() -> None:
    # CPython's fromisoformat stops at a NUL; whatever it does, it must not invent a different time.
    try:
        seconds = parse_sent_at("2026-01-01T00:00:00\x00", "auto")
    except InvalidRecord as error:
        assert error.reason == "bad_timestamp"
    else:
        assert seconds == datetime(2026, 1, 1, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("raw", "expected"), [(1, 1.0), (2.5, 2.5), ("2.5", 2.5), (" 3 ", 3.0), (-1.0, -1.0)])
def test_event_value_numbers_and_numeric_text(raw: Any, expected: float) -> None:
    _, event = mapped(FULL, message(event_value=raw))
    assert event["eventValue"] == expected
    assert type(event["eventValue"]) is float


def test_impression_text_is_split_and_trimmed() -> None:
    _, event = mapped(FULL, message(impression=" a, b ,c"))
    assert event["impression"] == ["a", "b", "c"]


def test_attribution_constant_applies_to_every_event() -> None:
    mapper = Mapper(MappingSettings(metric_attribution_source_value="newsletter"))
    _, event = mapped(mapper, message())
    assert event["metricAttribution"] == {"eventAttributionSource": "newsletter"}


def test_unmapped_members_are_never_read() -> None:
    mapper = Mapper(MappingSettings(user_id="", item_id="", event_id="", impression="", event_value=""))
    key, event = mapped(mapper, message(user_id="u", item_id="i", event_id="e", impression=["x"], event_value=1))
    assert key == ("s-1", None)
    assert set(event) == {"eventType", "sentAt", "eventId"}
    assert event["eventId"] != "e"


def test_dotted_paths_reach_into_nested_objects_and_stop_at_non_objects() -> None:
    mapper = Mapper(MappingSettings(session_id="ctx.session.id", user_id="ctx.user.id"))
    key, _ = mapped(mapper, message(ctx={"session": {"id": "deep"}, "user": ["not", "an", "object"]}))
    assert key == ("deep", None)
    error = rejected(mapper, message(ctx={"session": "flat"}))
    assert error.reason == "missing_field"
    assert "'ctx.session.id'" in error.message


# --- properties ----------------------------------------------------------------------------------


def test_properties_are_camel_case_compact_json_in_configured_order() -> None:
    mapper = Mapper(MappingSettings(properties=("ctx.device_type", "num_items", "flag", "page-category")))
    _, event = mapped(mapper, message(ctx={"device_type": "tv"}, num_items=3, flag=False, **{"page-category": "é"}))
    assert event["properties"] == '{"deviceType":"tv","numItems":3,"flag":false,"pageCategory":"é"}'


def test_two_paths_with_the_same_camel_case_key_are_refused() -> None:
    with pytest.raises(ValueError, match="pageCategory"):  # by config validation, before any Mapper
        MappingSettings(properties=("a.page_category", "b.pageCategory"))


@pytest.mark.parametrize(
    ("segment", "expected"),
    [
        ("page_category", "pageCategory"),
        ("device-type", "deviceType"),
        ("PageCategory", "pageCategory"),
        ("number_of_ratings", "numberOfRatings"),
        ("_leading", "leading"),
        ("a__b", "aB"),
        ("already", "already"),
        ("__", "__"),
    ],
)
def test_camel_case(segment: str, expected: str) -> None:
    assert camel_case(segment) == expected


# --- event types ---------------------------------------------------------------------------------


def test_event_types_rename_and_pass_through_unlisted() -> None:
    mapper = Mapper(MappingSettings(event_types={"add_to_cart": "AddToCart"}))
    assert mapped(mapper, message(event_type="add_to_cart"))[1]["eventType"] == "AddToCart"
    assert mapped(mapper, message(event_type="click"))[1]["eventType"] == "click"


def test_event_types_only_filters_unlisted_types_to_none() -> None:
    mapper = Mapper(MappingSettings(event_types={"add_to_cart": "AddToCart"}, event_types_only=True))
    assert mapper.map(message(event_type="click")) is None
    # Filtering happens before the other members are checked: a filtered record is not invalid.
    assert mapper.map(message(event_type="click", session_id=None, timestamp="yesterday")) is None
    assert mapped(mapper, message(event_type="add_to_cart"))[1]["eventType"] == "AddToCart"


def test_event_types_only_still_requires_an_event_type() -> None:
    mapper = Mapper(MappingSettings(event_types={"a": "A"}, event_types_only=True))
    assert rejected(mapper, message(event_type=None)).reason == "missing_field"


# --- eventId -------------------------------------------------------------------------------------


def test_mapped_event_id_is_preferred() -> None:
    assert mapped(FULL, message(event_id="evt-1"))[1]["eventId"] == "evt-1"


def test_derived_event_id_is_deterministic_across_encodings() -> None:
    a = b'{"event_type":"click","session_id":"s","timestamp":1700000000,"item_id":"i"}'
    b = b'{ "item_id" : "i", "timestamp": "2023-11-14T22:13:20Z", "session_id": "s", "event_type": "click" }'
    first = mapped(FULL, a)[1]["eventId"]
    assert first == mapped(FULL, a)[1]["eventId"]
    assert first == mapped(FULL, b)[1]["eventId"]
    assert first.startswith(EVENT_ID_PREFIX)
    assert limits.EVENT_ID.min <= len(first) <= limits.EVENT_ID.max


@pytest.mark.parametrize(
    "change",
    [
        {"item_id": "other"},
        {"session_id": "s-2"},
        {"user_id": "u"},
        {"timestamp": T0 + 1},
        {"event_type": "view"},
        {"event_value": 2.0},
        {"impression": ["b", "a"]},
        {"ctx": {"page_category": "hats"}},
        {"source": "email"},
        {"recommendation_id": "r2"},
    ],
)
def test_derived_event_id_changes_with_any_mapped_content(change: dict[str, Any]) -> None:
    base = {"item_id": "i", "event_value": 1.0, "impression": ["a", "b"], "recommendation_id": "r"}
    base_id = mapped(FULL, message(**base))[1]["eventId"]
    assert mapped(FULL, message(**{**base, **change}))[1]["eventId"] != base_id


def test_derived_event_id_ignores_unmapped_fields() -> None:
    assert mapped(FULL, message(noise=1))[1]["eventId"] == mapped(FULL, message(noise=2))[1]["eventId"]


def test_derive_event_id_separates_user_from_session() -> None:
    event = {"eventType": "click", "sentAt": 1.0}
    assert derive_event_id("s", None, event) != derive_event_id("s", "", event)
    assert derive_event_id("a", "b", event) != derive_event_id("b", "a", event)
    assert derive_event_id("s", "u", event) == derive_event_id("s", "u", dict(reversed(event.items())))


# --- size ----------------------------------------------------------------------------------------


def _largest(char: str) -> dict[str, Any]:
    return {
        "event_type": char * 256,
        "item_id": char * 256,
        "event_id": char * 256,
        "recommendation_id": char * 40,
        "impression": [char * 256] * 25,
        "source": "~" * 1024,
    }


def test_largest_ascii_event_fits_in_10_kb() -> None:
    _, event = mapped(FULL, message(**_largest("x")))
    assert len(orjson.dumps(event)) <= limits.MAX_EVENT_BYTES


def test_event_over_10_kb_is_rejected() -> None:
    # Every member within its character limit, but three-byte characters push the event past 10 KB.
    error = rejected(FULL, message(**{**_largest("€"), "source": "x"}))
    assert (error.stage, error.reason) == ("validation", "too_large")
    assert str(limits.MAX_EVENT_BYTES) in error.message


# --- sentAt --------------------------------------------------------------------------------------

AT = datetime(2026, 11, 22, 15, 4, 5, 123000, tzinfo=UTC).timestamp()
TIMESTAMPS: list[tuple[Any, str, float]] = [
    (1_700_000_000, "epoch_s", 1_700_000_000.0),
    (1_700_000_000.5, "epoch_s", 1_700_000_000.5),
    ("1700000000.5", "epoch_s", 1_700_000_000.5),
    ("1.7e9", "epoch_s", 1_700_000_000.0),
    (1_700_000_000_123, "epoch_ms", 1_700_000_000.123),
    ("1700000000123", "epoch_ms", 1_700_000_000.123),
    ("2026-11-22T15:04:05.123Z", "iso8601", AT),
    ("2026-11-22T15:04:05.123+00:00", "iso8601", AT),
    ("2026-11-22T17:04:05.123+02:00", "iso8601", AT),
    ("2026-11-22T15:04:05.123", "iso8601", AT),  # naive is UTC
    ("2026-11-22T15:04:05.123Z", "auto", AT),
    ("2026-11-22 15:04:05.123", "auto", AT),
    (1_700_000_000, "auto", 1_700_000_000.0),
    (1_700_000_000_123, "auto", 1_700_000_000.123),
    ("1700000000", "auto", 1_700_000_000.0),
    ("1700000000123", "auto", 1_700_000_000.123),
    (99_999_999_999, "auto", 99_999_999_999.0),  # at the threshold: still seconds
    (MAX_EPOCH_SECONDS, "epoch_s", MAX_EPOCH_SECONDS),
    ("9999-12-31T23:59:59Z", "auto", MAX_EPOCH_SECONDS),
    (0.001, "epoch_s", 0.001),
]


@pytest.mark.parametrize(("value", "fmt", "expected"), TIMESTAMPS)
def test_parse_sent_at(value: Any, fmt: str, expected: float) -> None:
    assert parse_sent_at(value, fmt) == pytest.approx(expected, abs=1e-6)


BAD_TIMESTAMPS: list[tuple[Any, str]] = [
    (-5, "epoch_s"),
    (-5, "auto"),
    ("-5", "auto"),
    (0, "auto"),
    (1e30, "auto"),
    (1e30, "epoch_ms"),
    ("1e30", "auto"),
    (MAX_EPOCH_SECONDS + 1, "epoch_s"),
    ("99999-01-01T00:00:00", "auto"),
    ("99999-01-01T00:00:00", "iso8601"),
    ("1969-12-31T23:59:59Z", "iso8601"),
    ("0001-01-01T00:00:00+05:00", "iso8601"),
    ("9999-12-31T23:59:59-05:00", "iso8601"),  # year 10000 in UTC
    ("yesterday", "auto"),
    ("yesterday", "epoch_s"),
    ("", "auto"),
    ("nan", "epoch_s"),
    ("inf", "epoch_ms"),
    ("-", "auto"),
    (".", "auto"),
    ("²", "auto"),
    (1_700_000_000, "iso8601"),
    ("2026-11-22T15:04:05Z", "epoch_ms"),
    (True, "epoch_s"),
    (None, "auto"),
    ([1_700_000_000], "auto"),
]


@pytest.mark.parametrize(("value", "fmt"), BAD_TIMESTAMPS)
def test_absurd_timestamps_are_rejected(value: Any, fmt: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        parse_sent_at(value, fmt)
    assert info.value.reason == "bad_timestamp"
    assert info.value.message.startswith("sentAt:")


@pytest.mark.parametrize("fmt", ["auto", "epoch_s", "epoch_ms", "iso8601"])
def test_bad_timestamp_message_stays_short_for_huge_values(fmt: str) -> None:
    # The message becomes a dead-letter header; echoing a megabyte of input would break that write.
    with pytest.raises(InvalidRecord) as info:
        parse_sent_at("9" * 200_000, fmt)
    assert len(info.value.message) < 200


@pytest.mark.parametrize("fmt", ["epoch_s", "epoch_ms", "iso8601"])
def test_sent_at_format_setting_reaches_the_mapper(fmt: str) -> None:
    raw = {"epoch_s": 1_700_000_000, "epoch_ms": 1_700_000_000_000, "iso8601": "2023-11-14T22:13:20"}[fmt]
    mapper = Mapper(MappingSettings(sent_at_format=fmt))  # type: ignore[arg-type]
    assert mapped(mapper, message(timestamp=raw))[1]["sentAt"] == float(T0)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(json_scalars, st.lists(json_scalars, max_size=3)),
    fmt=st.sampled_from(["auto", "epoch_s", "epoch_ms", "iso8601"]),
)
def test_parse_sent_at_returns_a_valid_instant_or_invalid_record(value: Any, fmt: str) -> None:
    try:
        seconds = parse_sent_at(value, fmt)
    except InvalidRecord as error:
        assert error.reason == "bad_timestamp"
        return
    assert math.isfinite(seconds)
    assert 0 < seconds <= MAX_EPOCH_SECONDS


# --- any object: an event that botocore would accept, or InvalidRecord ------------------------------

_PUT_EVENTS = (
    botocore.session.get_session().get_service_model("personalize-events").operation_model("PutEvents").input_shape
)
ids = st.one_of(st.text(max_size=300), st.integers(min_value=-(2**63), max_value=2**63), json_scalars)
good_ids = st.one_of(st.text(min_size=1, max_size=20), st.integers(min_value=0, max_value=2**63))


def mostly(good: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Plausible values with a hostile one now and then, so both outcomes are exercised."""
    return st.integers(0, 9).flatmap(lambda n: hostile if n == 3 else good)


objects = st.fixed_dictionaries(
    {
        "event_type": mostly(st.sampled_from(["click", "view"]), ids),
        "session_id": mostly(good_ids, ids),
        "timestamp": mostly(st.integers(min_value=1, max_value=2 * 10**12), json_scalars),
    },
    optional={
        "user_id": mostly(good_ids, ids),
        "item_id": mostly(good_ids, ids),
        "event_id": mostly(good_ids, ids),
        "event_value": mostly(st.floats(-1e6, 1e6), st.one_of(json_scalars, st.just({}))),
        "recommendation_id": mostly(st.text(min_size=1, max_size=40), ids),
        "impression": mostly(st.lists(good_ids, min_size=1, max_size=25), st.one_of(st.text(), json_scalars)),
        "source": mostly(st.from_regex(r"[!-~]{1,30}", fullmatch=True), st.one_of(st.text(), json_scalars)),
        "ctx": mostly(st.dictionaries(st.sampled_from(["page_category", "device_type"]), json_scalars), ids),
    },
)


def _check_event(key: tuple[str, str | None], event: dict[str, Any]) -> None:
    request: dict[str, Any] = {"trackingId": "t", "sessionId": key[0], "eventList": [event]}
    if key[1] is not None:
        request["userId"] = key[1]
    assert _PUT_EVENTS is not None
    report = ParamValidator().validate(request, _PUT_EVENTS)
    assert not report.has_errors(), report.generate_report()
    # botocore checks only minimum lengths; the maxima are ours to enforce.
    assert len(key[0]) <= limits.SESSION_ID.max
    assert key[1] is None or len(key[1]) <= limits.USER_ID.max
    for member, limit in [
        ("eventType", limits.EVENT_TYPE),
        ("eventId", limits.EVENT_ID),
        ("itemId", limits.ITEM_ID),
        ("recommendationId", limits.RECOMMENDATION_ID),
        ("properties", limits.PROPERTIES),
    ]:
        if member in event:
            assert limit.min <= len(event[member]) <= limit.max, member
    if "impression" in event:
        assert limits.IMPRESSION_ITEMS[0] <= len(event["impression"]) <= limits.IMPRESSION_ITEMS[1]
        assert all(1 <= len(i) <= limits.IMPRESSION_ITEM.max for i in event["impression"])
    if "properties" in event:
        assert type(orjson.loads(event["properties"])) is dict
    if "eventValue" in event:
        assert math.isfinite(event["eventValue"])
    assert 0 < event["sentAt"] <= MAX_EPOCH_SECONDS
    assert len(orjson.dumps(event)) <= limits.MAX_EVENT_BYTES


@settings(max_examples=200, deadline=None)
@given(obj=objects)
def test_any_object_maps_to_a_valid_event_or_raises_invalid_record(obj: dict[str, Any]) -> None:
    try:
        result = FULL.map(orjson.dumps(obj))
    except InvalidRecord as error:
        assert error.stage in {"mapping", "validation"}
        assert error.reason
        return
    assert result is not None
    _check_event(*result)


# --- the fast paths: the same answers as the full checks -------------------------------------------


def _outcome(call: Any, *args: Any) -> Any:
    """What a mapping call returns, or the (stage, reason, message) it raises."""
    try:
        return call(*args)
    except InvalidRecord as error:
        return (error.stage, error.reason, error.message)


json_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson can encode
# Characters whose JSON encoding is longest relative to their text, and a comma for impression text.
hostile_chars = st.sampled_from(['"', "\\", "\x00", "\n", "\x1f", "é", "€", "\U0001f600", "a", ","])
hostile_text = st.one_of(
    st.text(alphabet=hostile_chars),
    st.builds(lambda char, count: char * count, hostile_chars, st.integers(0, 300)),
)
hostile_scalars = st.one_of(
    hostile_text,
    json_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
hostile_objects = st.fixed_dictionaries(
    {"event_type": st.sampled_from(["click", "view"]), "session_id": good_ids, "timestamp": st.integers(1, 2 * 10**12)},
    optional={
        "user_id": st.one_of(hostile_text, json_ints),
        "item_id": st.one_of(hostile_text, json_ints),
        "event_id": st.one_of(hostile_text, json_ints),
        "event_value": st.one_of(st.floats(-3e38, 3e38), json_ints),
        "recommendation_id": st.one_of(hostile_text, json_ints),
        "impression": st.one_of(hostile_text, st.lists(st.one_of(hostile_text, json_ints), max_size=25)),
        "source": st.from_regex(r'[ -~"\\]{1,40}', fullmatch=True),
        "ctx": st.dictionaries(st.sampled_from(["page_category", "device_type"]), hostile_scalars),
        "f": st.one_of(hostile_text, json_ints),
        "pad": st.integers(0, 3000).map(lambda n: "x" * n),  # long messages take the exact check
    },
)
SIZE_MAPPERS = [
    FULL,
    # One source field feeding every member that reaches the event, a property included.
    Mapper(
        MappingSettings(
            event_type="f",
            item_id="f",
            event_id="f",
            recommendation_id="f",
            impression="f",
            properties=("f", "ctx.page_category"),
        )
    ),
    Mapper(MappingSettings(event_type="f", item_id="f", metric_attribution_source="f", properties=("f",))),
    Mapper(MappingSettings(event_types={"click": "x" * 256}, metric_attribution_source_value='~"\\' * 300)),
    Mapper(
        MappingSettings(properties=("ctx.page_category", "ctx.device_type", "f", "event_value", "item_id", "event_id"))
    ),
    # Expressions that still yield one value of the message, or a literal: bounded as paths are.
    Mapper(
        MappingSettings(
            event_type="f || '" + '"' * 200 + "'",
            item_id="ctx.page_category || f",
            event_id="f[0] || f",
            impression="f[].a || f[*] || f",
            recommendation_id="f == 'x' && f",
            properties={"a": "f || event_type", "b": "!f", "c": '`"\\\\\\\\"`', "d": "ctx.device_type[]"},
        )
    ),
]


@settings(max_examples=300, deadline=None)
@given(obj=hostile_objects, mapper=st.sampled_from(SIZE_MAPPERS))
def test_event_size_is_bounded_by_the_message_size(obj: dict[str, Any], mapper: Mapper) -> None:
    # The bound that lets `map` skip serializing an event to check the 10 KB quota.
    raw = orjson.dumps(obj)
    factor, base = mapper._size_bound()
    result = _outcome(mapper.map, raw)
    if type(result) is tuple and type(result[1]) is dict:
        assert len(orjson.dumps(result[1])) <= factor * len(raw) + base
    assert result == _outcome(mapper.map_object, orjson.loads(raw))


@pytest.mark.parametrize(
    "raw",
    [
        # Numbers whose re-serialized form is longer than their text in the message.
        b'{"event_type":"c","session_id":"s","timestamp":1e9,"event_value":1e5,"f":1,"ctx":{"page_category":1e300}}',
        b'{"event_type":"c","session_id":"s","timestamp":"1.7e9","event_value":"1E1","ctx":{"device_type":-0.0}}',
        b'{"event_type":"c","session_id":"s","timestamp":1700000000,"f":18446744073709551616}',
        b'{"event_type":"c","session_id":"s","timestamp":1700000000,"event_id":1,"item_id":2,"recommendation_id":3}',
        b'{"event_type":"c","session_id":"s","timestamp":1700000000,"impression":"a,b,c,d,e,f,g,h,i,j,k,l,m"}',
        b'{"event_type":"c","session_id":"s","timestamp":1700000000,"impression":[1,2,3,4,5,6,7,8,9,0,1,2,3]}',
    ],
)
@pytest.mark.parametrize("mapper", SIZE_MAPPERS)
def test_event_size_bound_covers_numbers_that_grow(raw: bytes, mapper: Mapper) -> None:
    factor, base = mapper._size_bound()
    result = _outcome(mapper.map, raw)
    if type(result) is tuple and type(result[1]) is dict:
        assert len(orjson.dumps(result[1])) <= factor * len(raw) + base


@settings(max_examples=200, deadline=None)
@given(obj=objects)
def test_nested_paths_map_like_top_level_ones(obj: dict[str, Any]) -> None:
    # A mapping with a nested member reads every path by walking it instead of `dict.get`.
    flat = full_settings()
    members = ["user_id", "session_id", "event_id", "event_type", "event_value", "item_id", "sent_at"]
    members += ["impression", "recommendation_id", "metric_attribution_source"]
    nested = full_settings(
        **{name: f"m.{getattr(flat, name)}" for name in members},
        properties=tuple(f"m.{path}" for path in flat.properties),
    )
    expected = _outcome(Mapper(flat).map, orjson.dumps(obj))
    got = _outcome(Mapper(nested).map, orjson.dumps({"m": obj}))
    if type(expected) is tuple and expected[1] == "missing_field":
        assert got[:2] == expected[:2]  # the message names the configured path
    elif type(got) is tuple and type(got[-1]) is str:
        assert got[:-1] == expected[:-1]
        assert got[-1].replace(" at m.", " at ") == expected[-1]  # errors name the configured source
    else:
        assert got == expected


@pytest.mark.parametrize(
    ("paths", "fields", "expected"),
    [
        (("a", "b_c"), {"a": 1, "b_c": "x"}, '{"a":1,"bC":"x"}'),
        (("x.y.a", "x.y.b"), {"x": {"y": {"a": "1", "b": None}}}, '{"a":"1"}'),
        (("x.y.a", "x.y.b"), {"x": {"y": ["a"]}}, None),
        (("x.a", "b", "y.c"), {"x": {"a": True}, "b": 2.5, "y": "flat"}, '{"a":true,"b":2.5}'),
    ],
)
def test_properties_at_the_top_nested_deeper_and_in_several_objects(
    paths: tuple[str, ...], fields: dict[str, Any], expected: str | None
) -> None:
    _, event = mapped(Mapper(MappingSettings(properties=paths)), message(**fields))
    assert event.get("properties") == expected


# Within a few units in the last place of a half millisecond: where seconds·1000 rounds either way.
near_half_ms = st.builds(
    lambda ms, ulps: (ms + 0.5) / 1000 + ulps * math.ulp((ms + 0.5) / 1000),
    st.integers(min_value=0, max_value=int(MAX_EPOCH_SECONDS * 1000)),
    st.integers(min_value=-64, max_value=64),
)


@settings(max_examples=2000, deadline=None)
@given(
    seconds=st.one_of(
        st.floats(),
        st.floats(min_value=0, max_value=MAX_EPOCH_SECONDS * 2),
        st.integers(min_value=1, max_value=int(MAX_EPOCH_SECONDS * 1000)).map(lambda ms: ms / 1000),
        near_half_ms,
    )
)
def test_millisecond_rounding_is_exactly_round(seconds: float) -> None:
    expected = round(seconds, 3) if math.isfinite(seconds) else seconds
    got = _round_ms(seconds)
    assert got == expected or (math.isnan(got) and math.isnan(expected))
    assert math.copysign(1, got) == math.copysign(1, expected)
