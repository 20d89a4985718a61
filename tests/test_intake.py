"""The intake's per-record loop, pinned: each kind of record in one poll ends in its own state and count.

The loop is written for speed (callees bound once, dedup and batching inline), so this pins what it decides
for every kind of record a poll can hold: new, a copy of one in flight (parked), a copy of one delivered
(a duplicate), one a previous owner finished (skipped), a filtered one and an undecodable one; and holds its
shortcuts to the plain code they stand for (`Batcher.add_all` is `add` of each, the inline admission is
`Dedup.admit`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.config import Settings
from worker.flow.batching import Batcher
from worker.flow.dedup import NEW, SEEN, Dedup
from worker.flow.items import EVENT_ID, OFFSET, DeadLetter
from worker.flow.pipeline import Pipeline
from worker.observe.metrics import Metrics
from worker.personalize.ratelimit import RateLimiter
from worker.personalize.retry import Rejection


@dataclass(frozen=True)
class Rec:
    offset: int
    value: bytes | None
    key: bytes | None = b"k"
    headers: Sequence[tuple[str, bytes]] = ()


class NoSink:
    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        raise AssertionError("the test settles calls itself")


class Letters:
    async def write(self, letters: Sequence[DeadLetter]) -> None:
        pass


def event(offset: int, event_id: str, event_type: str = "click") -> Rec:
    value = {"session_id": "s", "event_type": event_type, "timestamp": 1_790_000_000 + offset, "event_id": event_id}
    return Rec(offset, orjson.dumps(value))


def pipeline(metrics: Metrics) -> Pipeline:
    settings = Settings.model_validate(
        {
            "personalize": {"tracking_id": "t"},
            "mapping": {"event_types": {"click": "click"}, "event_types_only": True},
            "batching": {"linger_ms": 0},
        }
    )
    return Pipeline(settings, NoSink(), Letters(), metrics, quota=RateLimiter(1000), clock=lambda: 100.0)


def test_each_kind_of_record_in_a_poll_ends_in_its_own_state() -> None:
    tp = TopicPartition("t", 0)
    metrics = Metrics()
    pipe = pipeline(metrics)
    pipe.tracker.assign(tp).skip.add(5)
    pipe.ingest(
        tp,
        [
            event(0, "e0"),
            event(1, "e1"),
            event(2, "e0"),  # a copy of e0, in flight or about to be: parked on it
            Rec(3, b"{not json"),  # a dead letter
            event(4, "e4", "view"),  # not a listed type: filtered
            event(5, "e5"),  # a previous owner finished it: skipped
        ],
    )
    state = pipe.tracker.get(tp)
    assert state is not None
    assert pipe.batcher.buffered == 2, "e0 and e1 wait for a call; the copy of e0 is parked"
    assert [letter.offset for _, letter in pipe._dead] == [3]
    assert state.committable() == 0 and state.outstanding == 4, "4 and 5 are final; 0, 1, 2 and 3 are not"
    assert metrics.totals()["duplicates"] == 1.0, "the skipped record counts as a duplicate"

    pipe.batcher.flush()
    (batch,) = pipe.batcher.take(100.0, 0.0, 10)
    assert [(item[OFFSET], item[EVENT_ID]) for item in batch.items] == [(0, "e0"), (1, "e1")]
    pipe.batcher.done(batch.key)
    pipe._settle(batch.items, [])
    assert state.outstanding == 1 and state.committable() == 3, "the parked copy is final with its first"
    assert metrics.totals()["duplicates"] == 2.0

    pipe.ingest(tp, [event(6, "e1"), event(7, "e7")])  # e1 was delivered: a duplicate at once
    assert metrics.totals()["duplicates"] == 3.0
    assert pipe.batcher.buffered == 1 and state.outstanding == 2
    assert metrics.totals()["consumed"] == 8.0
    assert metrics.totals()["filtered"] == 1.0


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
            records.append(Rec(offset, orjson.dumps(value)))
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
        pipe.ingest(TopicPartition("t", 0), [Rec(n, orjson.dumps(v)) for n, v in enumerate(values)])
    assert pipe.batcher.buffered == 2
    assert sorted(pipe.dedup._in_flight) == ["e0", "e1"]
