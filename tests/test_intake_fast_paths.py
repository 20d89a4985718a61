"""The intake's per-record shortcuts (issue 13) against the plain code they stand for.

`Mapper.member` is `map` plus the converter around it; `worker.mapping.flat`'s one-pass member is
`Mapper.member` (it rounds a numeric sentAt inline, as `round_ms` and the range check did, and reads the
properties inline, as `_properties_of` did): each must give the same value, or the same error, for any input.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import pytest
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.config import MappingSettings, Settings
from worker.flow.batching import Batcher
from worker.flow.dedup import NEW, SEEN, Dedup
from worker.flow.pipeline import Pipeline
from worker.mapping.flat import flat_member
from worker.mapping.mapper import MAX_EPOCH_SECONDS, InvalidRecord, Mapper
from worker.mapping.values import AUTO_MS_THRESHOLD, round_ms
from worker.observe.metrics import Metrics
from worker.personalize.ratelimit import RateLimiter


class Rec(NamedTuple):
    value: bytes | None


@dataclass(frozen=True)
class FetchedRecord:
    offset: int
    value: bytes | None
    key: bytes | None = b"k"
    headers: Sequence[tuple[str, bytes]] = ()


class NoSink:
    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Any]:
        raise AssertionError("the test settles calls itself")


class Letters:
    async def write(self, letters: Sequence[Any]) -> None:
        pass


def reference_sent_at(raw: float) -> float | None:
    """The numeric sentAt as `_map` computed it before the inline rounding: None for a rejected one."""
    seconds = float(raw)
    if seconds > AUTO_MS_THRESHOLD:
        seconds /= 1000.0
    sent_at = round_ms(seconds)
    return sent_at if 0.0 < sent_at <= MAX_EPOCH_SECONDS else None


def mapped_sent_at(mapper: Mapper, raw: float) -> float | None:
    value = {"event_type": "click", "session_id": "s", "item_id": "i", "event_id": "e", "timestamp": raw}
    fast = flat_member(mapper)
    assert fast is not None
    try:
        result = fast(Rec(orjson.dumps(value)), None)
    except InvalidRecord:
        return None
    assert result is not None
    return float(result[2])


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
    paths=st.sampled_from([("ctx.a", "ctx.b"), ("a", "b"), ("ctx.a",)]),
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
    obj["item_id"] = "i"  # the one-pass member's common record
    fast = flat_member(mapper)
    assert fast is not None
    try:
        result = fast(Rec(orjson.dumps(obj)), None)
        assert result is not None
        got: Any = orjson.loads(result[3]).get("properties")
    except InvalidRecord as error:
        got = ("error", error.reason, error.message)
    assert got == expected


def outcome(convert: Any, value: bytes | None) -> Any:
    try:
        return convert(Rec(value), None)
    except InvalidRecord as error:
        return ("error", error.stage, error.reason, error.message)


member_values = st.one_of(
    st.none(),
    st.just(""),
    st.text(min_size=1, max_size=6),
    st.sampled_from(["x" * 40, "x" * 256, "x" * 257, "é" * 256]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=2), st.booleans(), max_size=1),
)
timestamps = st.one_of(
    st.floats(min_value=1_000_000_000, max_value=2_000_000_000),
    st.floats(min_value=1e12, max_value=2e12),  # milliseconds
    st.floats(allow_nan=False, allow_infinity=False),
    near_half_ms,
    st.integers(min_value=0, max_value=2**40),
    st.sampled_from(["2026-11-26T12:00:00Z", "nope", None, 0.0004, -1.0, MAX_EPOCH_SECONDS + 1]),
)


names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)
common_records = st.fixed_dictionaries(
    {
        "event_type": names,
        "session_id": names,
        "timestamp": st.floats(min_value=1_000_000_000, max_value=2_000_000_000),
        "item_id": names,
        "event_id": names,
        "ctx": st.fixed_dictionaries({}, optional={"page_category": names, "device_type": names}),
    },
    optional={"user_id": names, "event_value": st.floats(min_value=-1e6, max_value=1e6)},
)
"""Records the one-pass member takes whole; the test changes a field or two of them to anything."""
fields_of = {
    "event_type": member_values,
    "session_id": member_values,
    "user_id": member_values,
    "timestamp": timestamps,
    "item_id": member_values,
    "event_id": member_values,
    "event_value": st.one_of(member_values, st.sampled_from([3.4e38, 3.5e38, -3.5e38, 1e-300, 12.5])),
    "recommendation_id": member_values,
    "impression": member_values,
    "ctx": st.one_of(st.dictionaries(st.sampled_from(["page_category", "device_type"]), member_values), member_values),
}


@settings(max_examples=4000, deadline=None)
@given(
    record=common_records,
    changes=st.lists(st.sampled_from(sorted(fields_of)), max_size=2).flatmap(
        lambda names: st.fixed_dictionaries({name: fields_of[name] for name in names})
    ),
    removed=st.lists(st.sampled_from(sorted(fields_of)), max_size=1),
    properties=st.sampled_from([("ctx.page_category", "ctx.device_type"), (), ("page", "device")]),
    sent_at_format=st.sampled_from(["auto", "epoch_s", "epoch_ms"]),
)
def test_the_one_pass_member_is_member(
    record: dict[str, Any],
    changes: dict[str, Any],
    removed: list[str],
    properties: tuple[str, ...],
    sent_at_format: str,
) -> None:
    mapper = Mapper(MappingSettings.model_validate({"properties": properties, "sent_at_format": sent_at_format}))
    fast = flat_member(mapper)
    assert fast is not None
    record = {key: field for key, field in {**record, **changes}.items() if key not in removed}
    if properties == ("page", "device") and type(record.get("ctx")) is dict:
        record.update({"page": record["ctx"].get("page_category"), "device": record["ctx"].get("device_type")})
    value = orjson.dumps(record)
    assert outcome(fast, value) == outcome(mapper.member, value)


@pytest.mark.parametrize(
    "value", [None, b"", b"{not json", b"[1]", b"null", b'{"event_type": "click", "session_id": "s"}', b"\xff"]
)
def test_the_one_pass_member_fails_as_member(value: bytes | None) -> None:
    mapper = Mapper(MappingSettings(properties=("ctx.page_category",)))
    fast = flat_member(mapper)
    assert fast is not None
    assert outcome(fast, value) == outcome(mapper.member, value)


@pytest.mark.parametrize(
    "settings",
    [
        {"where": "event_type == 'click'"},
        {"event_types": {"click": "Click"}},
        {"metric_attribution_source_value": "email"},
        {"sent_at_format": "iso8601"},
        {"session_id": "ctx.session"},
        {"event_type": "[type, kind] | [0]"},
        {"properties": ("a.b", "c.d")},
    ],
)
def test_an_uncommon_mapping_has_no_one_pass_member(settings: dict[str, Any]) -> None:
    assert flat_member(Mapper(MappingSettings(**settings))) is None


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"event_value": 3.4e38},
        {"event_value": 3.5e38},
        {"event_value": -3.5e38},
        {"event_value": 12},
        {"event_value": "12.5"},
        {"event_value": ""},
        {"user_id": ""},
        {"user_id": "x" * 256},
        {"user_id": "x" * 257},
        {"user_id": 42},
        {"event_type": "x" * 257},
        {"session_id": ""},
        {"item_id": ""},
        {"item_id": None},
        {"event_id": ""},
        {"event_id": "x" * 257},
        {"timestamp": 1_790_000_000},
        {"timestamp": 1_790_000_000_123.0},
        {"timestamp": 0.0004},
        {"timestamp": "2026-11-26T12:00:00Z"},
        {"ctx": "flat"},
        {"ctx": {"page_category": 7}},
        {"ctx": {"page_category": "p" * 600, "device_type": "d" * 600}},
        {"recommendation_id": "r"},
        {"impression": ["a", "b"]},
    ],
)
def test_the_one_pass_member_is_member_at_each_edge(change: dict[str, Any]) -> None:
    mapper = Mapper(MappingSettings(properties=("ctx.page_category", "ctx.device_type")))
    fast = flat_member(mapper)
    assert fast is not None
    record = {
        "event_type": "click",
        "session_id": "s",
        "user_id": "u",
        "timestamp": 1_790_000_000.123,
        "item_id": "i",
        "event_id": "e",
        "ctx": {"page_category": "shoes", "device_type": "web"},
        **change,
    }
    value = orjson.dumps(record)
    assert outcome(fast, value) == outcome(mapper.member, value)


def batcher_state(batcher: Batcher[str, int]) -> Any:
    return (
        {key: (b.created_at, b.order, b.items) for key, b in batcher._open.items()},
        {key: (b.created_at, b.order, b.items) for key, b in batcher._filling.items()},
        {key: [b.items for b in waiting] for key, waiting in batcher._waiting.items()},
        sorted((order, b.key, b.items) for order, _, b in batcher._ready),
        dict(batcher._calls),
        batcher.buffered,
        set(batcher.crowded),
    )


@settings(max_examples=300, deadline=None)
@given(
    polls=st.lists(
        st.lists(st.tuples(st.sampled_from("abcd"), st.floats(0, 100)), max_size=30), min_size=1, max_size=6
    ),
    done=st.lists(st.sampled_from("abcd"), max_size=6),
)
def test_add_all_is_add_of_each(polls: list[list[tuple[str, float]]], done: list[str]) -> None:
    one, each = Batcher[str, int](3, 1, 6), Batcher[str, int](3, 1, 6)
    serial = 0
    for now, poll in enumerate(polls):
        entries = []
        for key, order in poll:
            entries.append((key, serial, order))
            serial += 1
        one.add_all(entries, float(now))
        for key, item, order in entries:
            each.add(key, item, float(now), order)
        assert batcher_state(one) == batcher_state(each)
        taken_one, taken_each = one.take(float(now), 0.0, 2), each.take(float(now), 0.0, 2)
        assert [(b.key, b.items) for b in taken_one] == [(b.key, b.items) for b in taken_each]
        for key in done:
            if key in one._calls:
                one.done(key)
                each.done(key)
        assert batcher_state(one) == batcher_state(each)


@settings(max_examples=150, deadline=None)
@given(
    polls=st.lists(st.lists(st.sampled_from("abcdefg"), max_size=12), min_size=1, max_size=6),
    delivered=st.lists(st.integers(0, 3), min_size=6, max_size=6),
    steps=st.lists(st.sampled_from([0.0, 1.0, 30.0, 400.0]), min_size=6, max_size=6),
)
def test_the_intakes_inline_admission_is_dedup_admit(
    polls: list[list[str]], delivered: list[int], steps: list[float]
) -> None:
    """Each poll's records admitted inline end as `Dedup.admit` (on a copy of the state before the poll) says:
    new ones buffered, seen ones finished as duplicates, copies of one in flight parked."""
    clock = [1000.0]
    settings = Settings.model_validate(
        {"personalize": {"tracking_id": "t"}, "batching": {"linger_ms": 0}, "dedup": {"window_seconds": 300}}
    )
    metrics = Metrics()
    pipe = Pipeline(settings, NoSink(), Letters(), metrics, quota=RateLimiter(1000), clock=lambda: clock[0])
    tp = TopicPartition("t", 0)
    offset = 0
    for poll, deliver, step in zip(polls, delivered, steps, strict=False):
        reference: Dedup[Any] = copy.deepcopy(pipe.dedup)
        verdicts = [reference.admit(event_id, None) for event_id in poll]
        buffered, duplicates = pipe.batcher.buffered, metrics.totals()["duplicates"]
        records = []
        for event_id in poll:
            value = {"session_id": "s", "event_type": "click", "timestamp": 1_790_000_000, "event_id": event_id}
            records.append(FetchedRecord(offset, orjson.dumps(value)))
            offset += 1
        pipe.ingest(tp, records)
        assert pipe.batcher.buffered - buffered == verdicts.count(NEW)
        assert metrics.totals()["duplicates"] - duplicates == verdicts.count(SEEN)
        assert sorted(pipe.dedup._in_flight) == sorted(reference._in_flight)
        parked = {key: len(copies or ()) for key, copies in pipe.dedup._in_flight.items()}
        assert parked == {key: len(copies or ()) for key, copies in reference._in_flight.items()}
        for batch in pipe.batcher.take(clock[0], 0.0, deliver):
            pipe.batcher.done(batch.key)
            pipe._settle(batch.items, [])
        clock[0] += step


def test_records_admitted_before_a_bug_are_buffered_not_left_in_flight() -> None:
    """The new items go to the batcher after the loop: a record raising a bug mid-poll must not strand those
    admitted before it (in flight for dedup, in no batch: never sent, their copies parked for ever)."""
    settings = Settings.model_validate({"personalize": {"tracking_id": "t"}, "batching": {"linger_ms": 0}})
    pipe = Pipeline(settings, NoSink(), Letters(), Metrics(), quota=RateLimiter(1000), clock=lambda: 100.0)
    convert = pipe._convert

    def buggy(record: Any, partition: TopicPartition) -> Any:
        if record.offset == 2:
            raise RuntimeError("a bug")
        return convert(record, partition)

    pipe._convert = buggy
    values = [
        {"session_id": "s", "event_type": "click", "timestamp": 1_790_000_000, "event_id": f"e{n}"} for n in range(3)
    ]
    with pytest.raises(RuntimeError):
        pipe.ingest(TopicPartition("t", 0), [FetchedRecord(n, orjson.dumps(v)) for n, v in enumerate(values)])
    assert pipe.batcher.buffered == 2
    assert sorted(pipe.dedup._in_flight) == ["e0", "e1"]
