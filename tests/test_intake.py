"""The intake's per-record loop, pinned: each kind of record in one poll ends in its own state and count.

The loop is written for speed (callees bound once, dedup and batching inline), so this pins what it decides
for every kind of record a poll can hold: new, a copy of one in flight (parked), a copy of one delivered
(a duplicate), one a previous owner finished (skipped), a filtered one and an undecodable one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from aiokafka.structs import TopicPartition

from worker.config import Settings
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
