"""The intake's per-record shortcuts (issue 13) against the plain code they stand for.

`Mapper._map` rounds a numeric sentAt inline (what `round_ms` and the range check did), `Mapper.member` is
`map` plus the converter around it: each must give the same value, or the same error, for any input.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.config import MappingSettings
from worker.mapping.mapper import MAX_EPOCH_SECONDS, InvalidRecord, Mapper
from worker.mapping.values import AUTO_MS_THRESHOLD, round_ms


class Rec(NamedTuple):
    value: bytes | None


def reference_sent_at(raw: float) -> float | None:
    """The numeric sentAt as `_map` computed it before the inline rounding: None for a rejected one."""
    seconds = float(raw)
    if seconds > AUTO_MS_THRESHOLD:
        seconds /= 1000.0
    sent_at = round_ms(seconds)
    return sent_at if 0.0 < sent_at <= MAX_EPOCH_SECONDS else None


def mapped_sent_at(mapper: Mapper, raw: float) -> float | None:
    value = orjson.dumps({"event_type": "click", "session_id": "s", "event_id": "e", "timestamp": raw})
    try:
        result = mapper.map(value)
    except InvalidRecord:
        return None
    assert result is not None
    return float(result[1]["sentAt"])


near_half_ms = st.builds(
    lambda ms, ulps: (ms + 0.5) / 1000 + ulps * math.ulp((ms + 0.5) / 1000),
    st.integers(min_value=0, max_value=int(MAX_EPOCH_SECONDS * 1000)),
    st.integers(min_value=-64, max_value=64),
)


@settings(max_examples=3000, deadline=None)
@given(
    raw=st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.floats(min_value=0, max_value=2.0),  # below one second: the inline path leaves these to round_ms
        st.floats(min_value=0, max_value=MAX_EPOCH_SECONDS * 2),
        st.floats(min_value=AUTO_MS_THRESHOLD, max_value=MAX_EPOCH_SECONDS * 2000),  # milliseconds
        st.integers(min_value=-(10**15), max_value=10**15),
        st.integers(min_value=1, max_value=int(MAX_EPOCH_SECONDS * 1000)).map(lambda ms: ms / 1000),
        near_half_ms,
        st.sampled_from([0.0, 0.0004, 0.0005, 0.0006, 1.0, MAX_EPOCH_SECONDS, MAX_EPOCH_SECONDS + 0.0004]),
    )
)
def test_the_inline_rounding_of_a_numeric_sent_at_is_round_ms_and_its_range_check(raw: float) -> None:
    expected = reference_sent_at(raw)
    got = mapped_sent_at(Mapper(MappingSettings()), raw)
    assert got == expected
    if got is not None and expected is not None:
        assert math.copysign(1, got) == math.copysign(1, expected)


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"{not json",
        b"[1, 2]",
        b'"text"',
        b'{"event_type": "click", "session_id": "s", "timestamp": 1790000000.5, "ctx": {"page_category": "a"}}',
        b'{"event_type": "click", "session_id": "s", "timestamp": 1790000000, "event_id": "e", "user_id": ""}',
        b'{"event_type": "x", "session_id": "s", "timestamp": "nope"}',
        b'{"event_type": "click", "timestamp": 1790000000}',
        b'{"event_type": "click", "session_id": "s", "timestamp": 1790000000, "ctx": {"page_category": [1]}}',
        b'{"event_type": "skip", "session_id": "s", "timestamp": 1790000000}',
    ],
)
def test_member_is_map_and_its_converter(value: bytes | None) -> None:
    mapper = Mapper(
        MappingSettings(
            properties=("ctx.page_category", "ctx.device_type"), event_types={"click": "click"}, event_types_only=True
        )
    )
    expected: Any
    try:
        result = mapper.map(value)
        if result is None:
            expected = None
        else:
            key, event = result
            expected = (key, event["eventId"], event["sentAt"], orjson.dumps(event).decode())
    except InvalidRecord as error:
        expected = ("error", error.stage, error.reason, error.message)
    try:
        got: Any = mapper.member(Rec(value))
    except InvalidRecord as error:
        got = ("error", error.stage, error.reason, error.message)
    assert got == expected


property_values = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.text(min_size=500, max_size=600),  # two of them pass the 1,024 characters of properties
    st.integers(min_value=-(2**63), max_value=2**63 - 1),  # what a JSON message can hold
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.booleans(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.booleans(), max_size=2),
)


@settings(max_examples=1500, deadline=None)
@given(
    paths=st.sampled_from([("ctx.a", "ctx.b"), ("a", "b"), ("ctx.a",), ("x.y.a", "x.y.b", "x.y.c")]),
    values=st.lists(property_values, min_size=3, max_size=3),
    parent_kind=st.sampled_from(["object", "missing", "string", "list"]),
)
def test_the_inline_properties_are_properties_of(paths: tuple[str, ...], values: list[Any], parent_kind: str) -> None:
    mapper = Mapper(MappingSettings(properties=paths))
    assert mapper._leaves is not None, "side by side and untyped: the inline path"
    obj: dict[str, Any] = {"event_type": "click", "session_id": "s", "event_id": "e", "timestamp": 1_790_000_000}
    parent_path = paths[0].split(".")[:-1]
    fields = {path.split(".")[-1]: value for path, value in zip(paths, values, strict=False)}
    parent: Any = {"object": fields, "missing": None, "string": "text", "list": [fields]}[parent_kind]
    if parent_path:
        holder = obj
        for part in parent_path[:-1]:
            holder = holder.setdefault(part, {})
        if parent is not None:
            holder[parent_path[-1]] = parent
    elif parent_kind == "object":
        obj.update(fields)
    expected: Any
    try:
        expected = mapper._properties_of(obj, obj.get if mapper._flat else lambda getter: getter(obj))
    except InvalidRecord as error:
        expected = ("error", error.reason, error.message)
    try:
        result = mapper.map(orjson.dumps(obj))
        assert result is not None
        got: Any = result[1].get("properties")
    except InvalidRecord as error:
        got = ("error", error.reason, error.message)
    assert got == expected
