"""A poison event, an outage for everyone, and request-level refusals, end to end: the CLI against the
real broker and the emulator, with a steady trickle of other sessions' traffic beside the backlog (the
traffic that tells "fails for this event" from "fails for everyone").

Each test prints one `CHAOS-FIGURES {json}` line for the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.kafka_support import TopicFactory, consume_all
from tests.stack import EmulatorProcess, WorkerFactory, WorkerProcess
from tests.test_chaos import RssWatch, figures, log_lines, metric, readyz, received, until
from tests.test_e2e import header, load, wait_committed
from worker.commands.sample import Clickstream, Message, generate

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]

POISON_ITEM = "poison-item"
REFUSED_LOG = "PutEvents refuses the request itself; retrying, nothing is dead-lettered"


def with_poison(stream: Clickstream, index: int) -> Message:
    """Give the valid message at `index` the item the emulator fails on; returns it."""
    message = stream.messages[index]
    assert message.kind == "valid" and message.source is not None
    source = {**message.source, "item_id": POISON_ITEM}
    poisoned = Message(message.key, orjson.dumps(source), "valid", source)
    stream.messages[index] = poisoned
    return poisoned


def poison_id(message: Message) -> str:
    assert message.source is not None
    return str(message.source["event_id"])


def event_ids(stream: Clickstream) -> set[str]:
    return {m.source["event_id"] for m in stream.valid if m.source}


@contextlib.asynccontextmanager
async def trickle(bootstrap: str, topic: str, stream: Clickstream, per_second: float = 40) -> AsyncIterator[list[int]]:
    """Produce `stream` a few records at a time while the block runs: other sessions' live traffic.
    Yields [records produced so far], exact once the block has ended (the rest is never produced)."""
    produced = [0]
    stop = asyncio.Event()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()

    async def run() -> None:
        step = 10
        for start in range(0, len(stream.messages), step):
            if stop.is_set():
                return
            for message in stream.messages[start : start + step]:
                await producer.send_and_wait(topic, message.value, key=message.key)
                produced[0] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), step / per_second)
        raise AssertionError("the trickle ran out: the test took longer than its live traffic lasts")

    task = asyncio.create_task(run())
    try:
        yield produced
    finally:
        stop.set()
        await task  # not cancelled: a record cut off mid-send could land without being counted
        await producer.stop()


def produced_ids(stream: Clickstream, count: int) -> set[str]:
    return {m.source["event_id"] for m in stream.messages[:count] if m.kind == "valid" and m.source}


def exhausted(worker: WorkerProcess) -> float:
    return metric(worker, 'records_invalid_total{reason="retries_exhausted"}')


async def check_poison_letter(bootstrap: str, dlq: str, poison: Message, attempts: int) -> None:
    dead = await consume_all(bootstrap, dlq, timeout=30)
    assert len(dead) == 1, [dict(r.headers) for r in dead]
    letter = dead[0]
    assert letter.value == poison.value, "the original record, byte for byte"
    assert header(letter, "dlq.error.stage") == "personalize"
    assert header(letter, "dlq.error.reason") == "retries_exhausted"
    message = header(letter, "dlq.error.message")
    assert f"failed alone {attempts} times" in message and "InternalFailure" in message, message


async def test_a_poison_event_is_dead_lettered_and_everything_else_delivered_once(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=3)
    dlq = await topic_factory(partitions=1)
    backlog = generate(3_000, seed=909, concurrent_sessions=200, duplicate_rate=0.0, malformed_rate=0.0)
    poison = with_poison(backlog, 300)
    live = generate(10_000, seed=910, concurrent_sessions=50, duplicate_rate=0.0, malformed_rate=0.0)
    await asyncio.to_thread(emulator.configure, fail_item_ids=[POISON_ITEM], latency_ms=5)
    await load(bootstrap, topic, backlog)
    group = f"{topic}-group"
    sections = worker_factory.config(topic, dlq, group, personalize={"max_requests_per_second": 200})
    async with RssWatch(worker_factory) as rss, trickle(bootstrap, topic, live) as produced:
        worker = worker_factory(sections)
        started = time.monotonic()
        await until(lambda: exhausted(worker) == 1, 180, "the poison event to be dead-lettered")
        took = time.monotonic() - started
    await wait_committed(bootstrap, group, topic, timeout=120)
    rss.sample()

    counts = received(await asyncio.to_thread(emulator.events))
    expected = (event_ids(backlog) | produced_ids(live, produced[0])) - {poison_id(poison)}
    assert set(counts) == expected, "everything else reaches Personalize"
    assert max(counts.values()) == 1, "exactly once"
    await check_poison_letter(bootstrap, dlq, poison, attempts=10)
    attempts = (await asyncio.to_thread(emulator.stats))["rejected"].get("InternalFailure", 0)
    assert 10 <= attempts <= 40, "halving (2 per level) plus 10 alone, and the few before other calls got through"
    figures(
        "poison event (500 every time) among 3,000 + live traffic",
        len(backlog.messages) + produced[0],
        counts,
        1,
        rss.peak_kib,
        calls_carrying_the_poison=attempts,
        dead_lettered_after_s=round(took, 1),
    )


async def test_an_outage_dead_letters_nothing_and_its_failures_never_count(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    """Every call 503 for 25 s, a poison event among the backlog: nothing is split or dead-lettered while
    everyone fails; after, delivery resumes and only the poison event is isolated, by failures after the outage."""
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=3)
    dlq = await topic_factory(partitions=1)
    backlog = generate(3_000, seed=919, concurrent_sessions=200, duplicate_rate=0.0, malformed_rate=0.0)
    poison = with_poison(backlog, 100)
    live = generate(10_000, seed=920, concurrent_sessions=50, duplicate_rate=0.0, malformed_rate=0.0)
    await asyncio.to_thread(emulator.configure, outage=True, fail_item_ids=[POISON_ITEM], latency_ms=5)
    await load(bootstrap, topic, backlog)
    group = f"{topic}-group"
    # Three attempts: a policy that counted the outage's failures would dead-letter thousands within seconds.
    sections = worker_factory.config(
        topic,
        dlq,
        group,
        personalize={"max_requests_per_second": 200, "max_event_attempts": 3},
        batching={"max_buffered_events": 1_000},
        worker={"stall_timeout_seconds": 5},
    )
    samples: list[dict[str, float]] = []
    async with RssWatch(worker_factory) as rss, trickle(bootstrap, topic, live) as produced:
        worker = worker_factory(sections)
        await until(lambda: metric(worker, "stalled") == 1, 60, "the stall alarm in the outage")
        status, reason = await asyncio.to_thread(readyz, worker)
        assert status == 503 and reason.strip().endswith("PutEvents failing: ServiceUnavailable"), reason
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                samples.append(await asyncio.to_thread(worker.metrics))
            await asyncio.sleep(0.5)
        assert int((await asyncio.to_thread(emulator.stats))["events"]) == 0
        await asyncio.to_thread(emulator.configure, outage=False)
        await until(lambda: exhausted(worker) == 1, 180, "the poison event to be dead-lettered after the outage")
    await wait_committed(bootstrap, group, topic, timeout=120)

    p = "personalize_worker_"
    assert samples and all(s.get(p + "records_dead_lettered_total") == 0 for s in samples), "nothing in the outage"
    assert all(s.get(p + "put_events_refused") == 0 for s in samples), "an outage is not a refusal of the request"
    assert any(s.get(p + "consumption_paused") == 1 for s in samples), "backpressure pauses consumption"
    failed_calls = max(s.get(p + 'put_events_calls_total{outcome="server_error"}', 0) for s in samples)
    assert failed_calls > 50, "the outage was exercised"
    counts = received(await asyncio.to_thread(emulator.events))
    expected = (event_ids(backlog) | produced_ids(live, produced[0])) - {poison_id(poison)}
    assert set(counts) == expected and max(counts.values()) == 1
    await check_poison_letter(bootstrap, dlq, poison, attempts=3)
    figures(
        "outage: every call 503 for 25 s, a poison event in the backlog",
        len(backlog.messages) + produced[0],
        counts,
        1,
        rss.peak_kib,
        failed_calls_in_outage=failed_calls,
        dead_lettered_in_outage=0,
    )


async def test_refused_requests_raise_the_alarm_and_dead_letter_nothing(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    """Access denied, then an unknown tracker, each for a while: /readyz 503 with the code and a fixed phrase
    (never the service's message, which names the account and role), no dead letters; then recovery."""
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=3)
    dlq = await topic_factory(partitions=1)
    backlog = generate(1_000, seed=929, concurrent_sessions=100, duplicate_rate=0.0, malformed_rate=0.0)
    live = generate(10_000, seed=930, concurrent_sessions=50, duplicate_rate=0.0, malformed_rate=0.0)
    await asyncio.to_thread(emulator.configure, latency_ms=5)
    await load(bootstrap, topic, backlog)
    group = f"{topic}-group"
    sections = worker_factory.config(topic, dlq, group, personalize={"max_event_attempts": 1})
    periods: list[dict[str, Any]] = []
    async with RssWatch(worker_factory) as rss, trickle(bootstrap, topic, live) as produced:
        worker = worker_factory(sections)
        await until(lambda: int(emulator.stats()["events"]) >= len(backlog.valid), 60, "the backlog delivered")
        refusals: list[tuple[dict[str, Any], dict[str, Any], str]] = [
            ({"access_denied": True}, {"access_denied": False}, "AccessDeniedException (credentials or permissions)"),
            (
                {"tracking_ids": ["someone-else"]},
                {"tracking_ids": None},
                "ResourceNotFoundException (unknown event tracker: check personalize.tracking_id and region)",
            ),
        ]
        for fault, clear, reason in refusals:
            await asyncio.to_thread(emulator.configure, **fault)
            began = time.monotonic()
            await until(lambda: metric(worker, "put_events_refused") == 1, 30, f"the alarm for {fault}")
            status, text = await asyncio.to_thread(readyz, worker)
            assert (status, text.strip()) == (503, f"PutEvents refused: {reason}")
            await asyncio.sleep(8)  # a while: many refused calls, with max_event_attempts = 1
            assert metric(worker, "records_dead_lettered_total") == 0
            await asyncio.to_thread(emulator.configure, **clear)
            await until(lambda: metric(worker, "put_events_refused") == 0, 60, "recovery")
            assert (await asyncio.to_thread(readyz, worker))[0] == 200
            periods.append({"fault": fault, "seconds": round(time.monotonic() - began, 1)})
        await asyncio.sleep(2)
    await wait_committed(bootstrap, group, topic, timeout=120)

    lines = log_lines(worker, REFUSED_LOG)
    assert [line["reason"] for line in lines] == [
        "PutEvents refused: AccessDeniedException (credentials or permissions)",
        "PutEvents refused: ResourceNotFoundException "
        "(unknown event tracker: check personalize.tracking_id and region)",
    ], "one line per refusal, not one per call"
    assert "123456789012" in lines[0]["error"], "the log may carry the (cut) message; /readyz never does"
    assert await consume_all(bootstrap, dlq, timeout=30) == []
    counts = received(await asyncio.to_thread(emulator.events))
    assert set(counts) == event_ids(backlog) | produced_ids(live, produced[0])
    assert max(counts.values()) == 1
    stats = await asyncio.to_thread(emulator.stats)
    assert stats["rejected"]["AccessDeniedException"] > 10 and stats["rejected"]["ResourceNotFoundException"] > 10
    figures(
        "request-level refusals: access denied, then unknown tracker",
        len(backlog.messages) + produced[0],
        counts,
        0,
        rss.peak_kib,
        refused_calls={k: stats["rejected"][k] for k in ("AccessDeniedException", "ResourceNotFoundException")},
        periods=periods,
    )
