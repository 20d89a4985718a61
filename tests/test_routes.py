"""Routes: config validation with key-named errors, the single flow as route `default`, and the pipeline
per operation with fakes and a fake clock (coalescing, deletes, batch keys, per-route counts)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.structs import TopicPartition

from worker.config import load_settings
from worker.errors import ConfigError
from worker.flow.pipeline import Pipeline
from worker.flow.routes import resolve
from worker.observe.metrics import Metrics
from worker.personalize.ratelimit import RateLimiter
from worker.personalize.retry import Rejection

ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/ITEMS"
BASE = '[personalize]\nregion = "us-east-1"\n'


def route(**keys: Any) -> str:
    body = {"name": "r", "topics": ["t"], "dead_letter_topic": "t.dlq", **keys}
    extra: str = keys.get("extra", "")
    return (
        "[[routes]]\n"
        + "\n".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in body.items() if k != "extra")
        + ("\n" + extra)
    )


def load(text: str, tmp_path: Path) -> Any:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, environ={})


def test_single_flow_is_route_default(tmp_path: Path) -> None:
    settings = load('[personalize]\ntracking_id = "trk"\n', tmp_path)
    (only,) = resolve(settings)
    assert (only.name, only.spec.name, only.destinations, only.topics) == (
        "default",
        "PutEvents",
        (("", "trk"),),
        ("clickstream",),
    )


def test_routes_resolve_with_operation_defaults(tmp_path: Path) -> None:
    text = BASE + route(name="items", operation="items", dataset_arn=ARN, extra='mapping = { properties = "*" }')
    (items,) = resolve(load(text, tmp_path))
    assert (
        items.spec.name == "PutItems" and items.max_requests_per_second == 10.0 and items.destinations == (("", ARN),)
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            route(operation="items", extra='mapping = { properties = "*" }'),
            "routes[0].dataset_arn: is required by operation 'items'",
        ),
        (
            route(operation="items", dataset_arn="nope", extra='mapping = { properties = "*" }'),
            "routes[0].dataset_arn: datasetArn must match",
        ),
        (
            route(operation="users", dataset_arn=ARN, tracking_id="t", extra='mapping = { properties = "*" }'),
            "routes[0].tracking_id",
        ),
        (route(operation="items", dataset_arn=ARN), "routes[0].mapping: properties: required key"),
        (route(name="Bad-Name", tracking_id="t"), "routes[0].name"),
        (route(tracking_id="t") + "\n" + route(tracking_id="u"), "routes[1].name: 'r' is the name of an earlier route"),
        (
            route(tracking_id="t") + "\n" + route(name="s", tracking_id="u"),
            "routes[1].topics: 't' is already read by route 'r'",
        ),
        (route(tracking_id="t", tracking_id_field="site"), "routes[0].tracking_id_field"),
        (route(tracking_id_field="site"), "routes[0]: tracking_id_field needs a [routes.trackers] table"),
        (route(tracking_id="t", dead_letter_topic="t"), "routes[0].dead_letter_topic: 't' is a source topic"),
        (
            route(operation="action_interactions"),
            "routes[0].tracking_id: is required by operation 'action_interactions'",
        ),
        (route(tracking_id="t", envelope="debezium"), "envelope applies to"),
    ],
)
def test_route_errors_name_their_key(text: str, error: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load(BASE + text, tmp_path)
    assert error in str(raised.value)


class Record:
    def __init__(self, offset: int, value: bytes | None) -> None:
        self.offset, self.key, self.value, self.headers = offset, None, value, ()


class Calls:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, list[dict[str, Any]]]] = []

    async def deliver(self, key: Any, user_id: str | None, records: list[str], sent_at: float) -> list[Rejection]:
        self.calls.append((key, [orjson.loads(r) for r in records]))
        return []


class Letters:
    async def write(self, letters: Any) -> None:
        pass


def change(op: str, item: str, price: int) -> bytes:
    return orjson.dumps({"op": op, "after": {"item_id": item, "price": price}, "before": None})


async def test_items_route_coalesces_by_id_and_finishes_deletes(tmp_path: Path) -> None:
    text = BASE + route(
        operation="items",
        dataset_arn=ARN,
        envelope="debezium",
        coalesce_window_seconds=10.0,
        extra='mapping = { properties = "*" }',
    )
    settings = load(text, tmp_path)
    (items,) = resolve(settings)
    now = [100.0]
    sink, metrics = Calls(), Metrics()
    pipeline = Pipeline(settings, sink, Letters(), metrics, quota=RateLimiter(1000), clock=lambda: now[0], route=items)
    tp = TopicPartition("t", 0)
    values = [change("c", "a", 1), change("u", "a", 2), change("c", "b", 5), None, change("u", "a", 3)]
    pipeline.ingest(tp, [Record(n, v) for n, v in enumerate(values)])
    assert pipeline.tracker.get(tp).outstanding == 2  # type: ignore[union-attr]  # a@4 and b@2 wait; a@0,1 superseded; 3 deleted
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    for _ in range(50):
        await asyncio.sleep(0.01)
        if not pipeline.outstanding:
            break
    dispatcher.cancel()
    assert [
        (key, sorted((r["itemId"], orjson.loads(r["properties"])["price"]) for r in rs)) for key, rs in sink.calls
    ] == [(ARN, [("a", 3), ("b", 5)])]
    value = metrics.registry.get_sample_value
    states = {
        s: value("personalize_worker_route_records_total", {"route": "r", "state": s})
        for s in ("consumed", "superseded", "deleted", "sent")
    }
    assert states == {"consumed": 5, "superseded": 2, "deleted": 1, "sent": 0}  # `sent` is the sink's (a fake here)
    assert pipeline.tracker.to_commit() == {tp: 5}


async def test_events_route_with_trackers_keys_calls_by_tracker(tmp_path: Path) -> None:
    text = BASE + route(tracking_id_field="site", extra='trackers = { a = "trk-a", b = "trk-b" }')
    settings = load(text, tmp_path)
    (clicks,) = resolve(settings)
    sinks = {"trk-a": Calls(), "trk-b": Calls()}
    pipeline = Pipeline(
        settings, sinks["trk-a"], Letters(), Metrics(), quota=RateLimiter(1000), route=clicks, sinks=sinks
    )

    def event(n: int, site: str) -> bytes:
        return orjson.dumps(
            {"event_id": f"e{n}", "session_id": "s", "event_type": "click", "timestamp": 1.7e9 + n, "site": site}
        )

    tp = TopicPartition("t", 0)
    pipeline.ingest(
        tp, [Record(0, event(0, "a")), Record(1, event(1, "b")), Record(2, event(2, "zz")), Record(3, event(3, "a"))]
    )
    pipeline.batcher.flush()
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    letters = asyncio.create_task(pipeline.run_dead_letters())
    for _ in range(50):
        await asyncio.sleep(0.01)
        if not pipeline.outstanding:
            break
    dispatcher.cancel()
    letters.cancel()
    assert [(k, [e["eventId"] for e in es]) for k, es in sinks["trk-a"].calls] == [("s", ["e0", "e3"])]
    assert [(k, [e["eventId"] for e in es]) for k, es in sinks["trk-b"].calls] == [("s", ["e1"])]
    assert pipeline.tracker.to_commit() == {tp: 4}  # the unknown tracker's record was dead-lettered
