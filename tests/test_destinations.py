"""An events route with several trackers: each tracker has its own batcher, in-flight share and quota, so a
throttled tracker never starves the others (pure logic with fake limiters; the pipeline with fake sinks)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from aiokafka.structs import TopicPartition

from tests.test_routes import BASE, Letters, Record, load, route
from worker.flow.batching import Batcher
from worker.flow.destinations import MAX_WAIT, DestinationBatcher
from worker.flow.pipeline import Pipeline
from worker.flow.routes import Quotas, resolve
from worker.observe.metrics import Metrics
from worker.personalize.ratelimit import RateLimiter
from worker.personalize.retry import Rejection


class Limiter:
    def __init__(self, calls: int, wait: float = 0.0, rate: float = 100.0) -> None:
        self.calls, self.wait, self.rate = calls, wait, rate

    def available(self) -> tuple[int, float]:
        return self.calls, self.wait


def batcher(limiters: dict[str, Limiter], max_in_flight: int) -> DestinationBatcher[str]:
    return DestinationBatcher(limiters, max_in_flight, lambda: Batcher(2))


def fill(b: DestinationBatcher[str], tracker: str, sessions: int) -> None:
    for s in range(sessions):
        for n in range(2):
            b.add((tracker, f"s{s}", None), f"{tracker}{s}.{n}", now=0.0, order=float(s))


def test_a_tracker_without_quota_gets_no_call_and_the_others_theirs() -> None:
    limiters = {"a": Limiter(0, wait=0.2), "b": Limiter(100)}
    b = batcher(limiters, max_in_flight=3)
    fill(b, "a", 5)
    fill(b, "b", 5)
    calls, wait = b.available()
    assert (calls, wait) == (100, 0.2), "b's calls count; a waits 0.2 s for its quota"
    taken = b.take(now=1.0, linger=0.0, limit=calls)
    assert {batch.key[0] for batch in taken} == {"b"} and len(taken) == 3, "b's own share of slots, a none"
    assert b.in_flight("b") == 3 and b.in_flight("a") == 0
    limiters["a"].calls = 100
    taken = b.take(now=1.0, linger=0.0, limit=100)
    assert [batch.key[0] for batch in taken] == ["a"] * 3, "b's full share is no reason to hold a back"
    for batch in taken:
        b.done(batch.key)
    assert b.in_flight("a") == 0 and b.buffered == 8


def test_idle_trackers_free_calls_do_not_hide_a_throttled_trackers_wait() -> None:
    b = batcher({"a": Limiter(0, wait=0.3), "b": Limiter(50)}, max_in_flight=4)
    fill(b, "a", 1)
    assert b.available() == (0, 0.3), "b has nothing to send: the dispatcher must wake for a's quota"
    assert b.has_full()
    empty = batcher({"a": Limiter(0, wait=9.0)}, max_in_flight=4)
    assert empty.available() == (0, MAX_WAIT)


def test_a_tracker_at_its_in_flight_share_is_not_full_for_the_dispatcher() -> None:
    b = batcher({"a": Limiter(100), "b": Limiter(100)}, max_in_flight=1)
    fill(b, "a", 3)
    assert len(b.take(now=0.0, linger=0.0, limit=10)) == 1
    assert not b.has_full(), "a's next batches wait for a's slot, not for any call"
    assert b.available()[0] == 0


def test_who_goes_first_rotates_so_no_tracker_is_always_served_last() -> None:
    """With two trackers a rotation that steps once per tracker each `take` starts with the same one every
    time: under scarce calls the other would get none, and its calls would always start second."""
    b = batcher({"a": Limiter(100), "b": Limiter(100)}, max_in_flight=10)
    fill(b, "a", 4)
    fill(b, "b", 4)
    firsts = [b.take(now=0.0, linger=0.0, limit=1)[0].key[0] for _ in range(4)]
    assert firsts == ["a", "b", "a", "b"]
    three = batcher({"a": Limiter(100), "b": Limiter(100), "c": Limiter(100)}, max_in_flight=10)
    for tracker in "abc":
        fill(three, tracker, 3)
    firsts = [three.take(now=0.0, linger=0.0, limit=1)[0].key[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


class Throttled:
    """A tracker whose calls never return while the test runs: each waits on its quota, holding its slot."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()

    async def deliver(self, key: Any, user_id: str | None, records: list[str], sent_at: float) -> list[Rejection]:
        self.started += 1
        await self.release.wait()
        return []


class Fast:
    def __init__(self) -> None:
        self.events: list[str] = []

    async def deliver(self, key: Any, user_id: str | None, records: list[str], sent_at: float) -> list[Rejection]:
        self.events.extend(orjson.loads(r)["eventId"] for r in records)
        return []


async def test_a_throttled_tracker_holds_only_its_share_and_the_other_tracker_delivers(tmp_path: Path) -> None:
    text = BASE + route(tracking_id_field="site", max_in_flight=2, extra='trackers = { a = "trk-a", b = "trk-b" }')
    settings = load(text, tmp_path)
    (clicks,) = resolve(settings)
    throttled, fast = Throttled(), Fast()
    sinks: dict[str, Any] = {"trk-a": throttled, "trk-b": fast}
    quotas = Quotas({"trk-a": RateLimiter(1000), "trk-b": RateLimiter(1000)})
    pipeline = Pipeline(settings, throttled, Letters(), Metrics(), quota=quotas, route=clicks, sinks=sinks)

    def event(n: int, site: str) -> bytes:
        # a's events are older: in one shared pool they would go first and take every slot.
        at = 1.7e9 + (n if site == "a" else 1000 + n)
        return orjson.dumps(
            {
                "event_id": f"{site}{n}",
                "session_id": f"{site}{n % 20}",
                "event_type": "click",
                "timestamp": at,
                "site": site,
            }
        )

    tp = TopicPartition("t", 0)
    pipeline.ingest(tp, [Record(n, event(n, "a")) for n in range(40)])
    pipeline.ingest(tp, [Record(40 + n, event(n, "b")) for n in range(30)])
    pipeline.batcher.flush()
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    try:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(fast.events) == 30:
                break
        assert sorted(fast.events) == sorted(f"b{n}" for n in range(30)), (fast.events, pipeline.outstanding)
        assert throttled.started == 2, "a holds its own two slots, no more"
        throttled.release.set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not pipeline.outstanding:
                break
        assert pipeline.tracker.to_commit() == {tp: 70}
    finally:
        throttled.release.set()
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
