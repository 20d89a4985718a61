"""End to end: the CLI in a subprocess, the real broker, the emulator; every record accounted for."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.kafka_support import TopicFactory, committed_offsets, consume_all, end_offsets, produce
from tests.stack import AWS_ENV, TRACKING_ID, EmulatorProcess, WorkerFactory, write_config
from worker.commands.sample import Clickstream, Message, generate

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]


async def load(bootstrap: str, topic: str, stream: Clickstream) -> list[tuple[Message, int, int]]:
    """Produce the stream keyed by session; returns (message, partition, offset) in produce order."""
    metadata = await produce(bootstrap, topic, [(m.key, m.value) for m in stream.messages], linger_ms=20)
    return [(m, md.partition, md.offset) for m, md in zip(stream.messages, metadata, strict=True)]


async def wait_committed(bootstrap: str, group: str, topic: str, timeout: float) -> dict[int, int]:
    ends = await end_offsets(bootstrap, topic)
    deadline = asyncio.get_running_loop().time() + timeout
    committed: dict[int, int] = {}
    while asyncio.get_running_loop().time() < deadline:
        committed = await committed_offsets(bootstrap, group, topic)
        if committed == ends:
            return committed
        await asyncio.sleep(0.5)
    raise AssertionError(f"committed {committed} never reached end offsets {ends}")


def check_calls(events: list[dict[str, Any]]) -> int:
    """Every call carries 1-10 events of one session; returns the number of calls."""
    calls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        calls[event["request_id"]].append(event)
    for call in calls.values():
        assert 1 <= len(call) <= 10
        assert len({(e["sessionId"], e.get("userId"), e["trackingId"]) for e in call}) == 1
    return len(calls)


def check_fields(event: dict[str, Any], source: dict[str, Any]) -> None:
    assert event["trackingId"] == TRACKING_ID
    assert event["sessionId"] == source["session_id"]
    assert event.get("userId") == source.get("user_id")
    assert event["eventType"] == source["event_type"]
    assert event["itemId"] == source["item_id"]
    assert event["sentAt"] == round(source["timestamp"], 3)  # milliseconds kept on the wire
    assert event.get("eventValue") == source.get("event_value")
    assert orjson.loads(event["properties"]) == {
        "pageCategory": source["ctx"]["page_category"],
        "deviceType": source["ctx"]["device_type"],
    }


def header(record: Any, name: str) -> str:
    value: bytes = dict(record.headers)[name]
    return value.decode()


async def test_clickstream_delivered_exactly_once_with_dead_letters_and_commits(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=6)
    dlq = await topic_factory(partitions=1)
    stream = generate(12_000, seed=11, concurrent_sessions=300)
    placed = await load(bootstrap, topic, stream)
    group = f"{topic}-group"

    worker = worker_factory(worker_factory.config(topic, dlq, group))
    await wait_committed(bootstrap, group, topic, timeout=180)
    metrics = await asyncio.to_thread(worker.metrics)
    worker.signal(signal.SIGTERM)
    assert await worker.await_exit(60) == 0

    valid = {m.source["event_id"]: m.source for m in stream.valid if m.source}
    events = await asyncio.to_thread(emulator.events)
    received = Counter(e["eventId"] for e in events)
    assert set(received) == set(valid), "the emulator must hold exactly the unique valid events"
    assert max(received.values()) == 1, "no event may be paid for twice"
    for event in events:
        check_fields(event, valid[event["eventId"]])
    calls = check_calls(events)

    dead = await consume_all(bootstrap, dlq, timeout=30)
    malformed = [(m, p, o) for m, p, o in placed if m.kind == "malformed"]
    assert sorted((r.value or b"") for r in dead) == sorted(m.value for m, _, _ in malformed)
    assert {(int(header(r, "dlq.source.partition")), int(header(r, "dlq.source.offset"))) for r in dead} == {
        (p, o) for _, p, o in malformed
    }
    for record in dead:
        assert header(record, "dlq.source.topic") == topic
        assert header(record, "dlq.error.stage") in {"decode", "mapping", "validation"}
        assert header(record, "dlq.error.message")
        assert record.key is not None

    prefix = "personalize_worker_"
    assert metrics[f"{prefix}records_consumed_total"] == len(stream.messages)
    assert metrics[f"{prefix}events_sent_total"] == len(valid)
    assert metrics[f"{prefix}records_duplicate_total"] == stream.count("duplicate")
    assert metrics[f"{prefix}records_dead_lettered_total"] == len(malformed)
    invalid = sum(v for k, v in metrics.items() if k.startswith(f"{prefix}records_invalid_total"))
    assert invalid == len(malformed)
    assert metrics[f'{prefix}put_events_calls_total{{outcome="ok"}}'] == calls
    assert metrics[f"{prefix}events_per_call_count"] == calls
    for partition, end in (await end_offsets(bootstrap, topic)).items():
        assert metrics[f'{prefix}committed_offset{{partition="{partition}",topic="{topic}"}}'] == end


async def test_derived_event_ids_and_service_rejections_are_split_out(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    """No eventId in the messages: the derived one is stable, so re-delivered copies are not resent.
    Events the service refuses are isolated by splitting their call and dead-lettered with its message."""
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=3)
    dlq = await topic_factory(partitions=1)
    stream = generate(4_000, seed=5, concurrent_sessions=100, with_event_ids=False)
    rejected_item = "item-2"
    await asyncio.to_thread(emulator.configure, reject_item_ids=[rejected_item])
    placed = await load(bootstrap, topic, stream)
    group = f"{topic}-group"

    worker = worker_factory(worker_factory.config(topic, dlq, group), until_drained=True)
    assert await worker.await_exit(180) == 0
    assert await committed_offsets(bootstrap, group, topic) == await end_offsets(bootstrap, topic)

    refused = [(m, p, o) for m, p, o in placed if m.source and m.source["item_id"] == rejected_item]
    assert refused, "the data must exercise the rejection path"
    accepted = {m.value for m in stream.valid if m.source and m.source["item_id"] != rejected_item}
    events = await asyncio.to_thread(emulator.events)
    assert len(events) == len(accepted), "each unique accepted event exactly once"
    assert all(e["eventId"].startswith("pw1-") for e in events)
    check_calls(events)

    dead = await consume_all(bootstrap, dlq, timeout=30)
    by_stage = Counter(header(r, "dlq.error.stage") for r in dead)
    assert by_stage["personalize"] == len(refused)
    assert by_stage["personalize"] + sum(v for k, v in by_stage.items() if k != "personalize") == len(dead)
    assert len(dead) == len(refused) + stream.count("malformed")
    for record in dead:
        if header(record, "dlq.error.stage") == "personalize":
            assert "itemId" in header(record, "dlq.error.message")


def run_cli(*args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env={**AWS_ENV, "PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_map_dry_run_shows_calls_and_reasons(tmp_path: Path) -> None:
    config = write_config(tmp_path / "w.toml", {"personalize": {"tracking_id": "t"}})
    lines = b"\n".join(
        [
            b'{"session_id": "s1", "event_type": "click", "timestamp": 1790000000, "item_id": "a"}',
            b'{"session_id": "s1", "event_type": "click", "timestamp": 1790000001, "item_id": "b"}',
            b'{"session_id": "s2", "event_type": "view", "timestamp": "2026-11-22T10:00:00Z", "event_id": "x"}',
            b'{"session_id": "s2", "event_type": "view", "timestamp": "2026-11-22T10:00:00Z", "event_id": "x"}',
            b"not json",
            b'{"event_type": "click", "timestamp": 1}',
        ]
    )
    result = run_cli("map", "--config", str(config), stdin=lines)
    assert result.returncode == 1, result.stderr  # two lines would be dead-lettered
    out = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert out[0]["call"] == out[1]["call"] == 0 and out[0]["request"]["sessionId"] == "s1"
    assert out[2]["call"] == 1 and out[2]["event"]["eventId"] == "x"
    assert out[3]["duplicate_of_event_id"] == "x"
    assert out[4]["dead_letter"]["reason"] == "not_json"
    assert out[5]["dead_letter"]["reason"] == "missing_field" and "sessionId" in out[5]["dead_letter"]["message"]
    assert out[-1]["summary"] == {
        "lines": 6,
        "events": 3,
        "duplicates": 1,
        "filtered": 0,
        "dead_lettered": 2,
        "dead_letter_reasons": {"not_json": 1, "missing_field": 1},
        "calls": 2,
        "events_per_call": 1.5,
    }


def test_bad_config_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "w.toml",
        {"personalize": {"tracking_id": "t"}, "batching": {"max_events": 11, "lingr_ms": 5}},
    )
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    message = result.stderr.decode()
    assert "batching.max_events" in message and "batching.lingr_ms: unknown key" in message


async def test_check_reports_what_is_reachable(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    topic = await topic_factory(partitions=2)
    good = write_config(tmp_path / "good.toml", worker_factory.config(topic, f"{topic}.dlq", "g"))
    result = await asyncio.to_thread(run_cli, "check", "--config", str(good))
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"source topic" in result.stdout and b"2 partitions" in result.stdout

    bad = write_config(
        tmp_path / "bad.toml",
        worker_factory.config("no-such-topic", "x.dlq", "g", personalize={"endpoint_url": "http://127.0.0.1:9"}),
    )
    result = await asyncio.to_thread(run_cli, "check", "--config", str(bad))
    assert result.returncode == 1
    assert b"[FAIL] source topic 'no-such-topic': does not exist" in result.stdout
    assert b"[FAIL] Personalize Events at http://127.0.0.1:9" in result.stdout
