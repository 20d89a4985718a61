"""Group membership as deployed: replacing one member (a rolling-update step) on the real broker.

The workers are configured from deploy/k8s itself: the ConfigMap's TOML (timeouts, batching, commit interval)
with only the addresses swapped for the local stack, and the Deployment's environment, where a `fieldRef` to
`metadata.name` becomes a fresh pod name per process, as a Deployment's replacement pods get. With a pod-name
`group_instance_id` (static membership) this test fails: the SIGTERMed member never sends a LeaveGroup and
the group waits out `session_timeout_ms` (45 s) before anyone gets its partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
import tomllib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.kafka_support import TopicFactory, committed_offsets, consume_all
from tests.stack import TRACKING_ID, EmulatorProcess, WorkerFactory, WorkerProcess
from tests.test_chaos import RssWatch, figures, last_assignment, received, until
from tests.test_e2e import wait_committed
from tests.test_manifests import manifests

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]

PARTITIONS = 6
RATE = 200  # records/s: a steady real-time stream, so every partition's commit point keeps moving


def deployed_sections(bootstrap: str, topic: str, dlq: str, group: str, endpoint: str) -> dict[str, dict[str, Any]]:
    """The ConfigMap's settings, pointed at the local broker and emulator instead of MSK and AWS."""
    sections: dict[str, dict[str, Any]] = tomllib.loads(manifests()["ConfigMap"]["data"]["worker.toml"])
    kafka = sections["kafka"]
    for key in ("security_protocol", "sasl_mechanism", "sasl_username", "ssl_cafile"):
        kafka.pop(key, None)
    kafka.update(bootstrap_servers=bootstrap, topics=[topic], group_id=group)
    sections["personalize"].update(tracking_id=TRACKING_ID, endpoint_url=endpoint)
    sections["dead_letter"]["topic"] = dlq
    sections["metrics"]["host"] = "127.0.0.1"
    return sections


def deployed_env(pod_name: str) -> dict[str, str]:
    """The Deployment's container environment for a pod of this name (the Secret is absent: optional)."""
    (container,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        source = entry.get("valueFrom", {})
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[entry["name"]] = pod_name
        elif "secretKeyRef" in source:
            assert source["secretKeyRef"].get("optional") is True, f"{entry['name']} needs a Secret to start"
        else:
            raise AssertionError(f"no local stand-in for {entry}")
    return env


def pod_name() -> str:
    """A Deployment pod's name: new for every replacement."""
    return f"personalize-worker-7d9f8c6b5-{uuid.uuid4().hex[:5]}"


@contextlib.asynccontextmanager
async def steady_stream(bootstrap: str, topic: str) -> AsyncIterator[list[str]]:
    """Produces RATE records/s over 60 sessions (keyed, so spread over every partition) until the block ends;
    yields the eventIds produced so far."""
    produced: list[str] = []
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10, acks="all")
    await producer.start()

    async def run() -> None:
        tick = 0.05
        while True:
            for _ in range(int(RATE * tick)):
                number = len(produced)
                session = f"m-session-{number % 60}"
                event_id = f"m-{number}"
                value = {
                    "event_id": event_id,
                    "user_id": f"m-user-{number % 60}",
                    "session_id": session,
                    "event_type": "click",
                    "item_id": f"item-{number % 500}",
                    "timestamp": time.time(),
                }
                await producer.send(topic, orjson.dumps(value), key=session.encode())
                produced.append(event_id)
            await asyncio.sleep(tick)

    task = asyncio.create_task(run())
    try:
        yield produced
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await producer.flush()
        await producer.stop()


def longest_stretch_without_growth(samples: list[tuple[float, int]]) -> float:
    """Longest time the emulator's event count stood still, from (time, count) samples."""
    longest, since = 0.0, samples[0][0] if samples else 0.0
    for (_, before), (now, count) in itertools.pairwise(samples):
        if count > before:
            since = now
        longest = max(longest, now - since)
    return longest


async def test_replacing_a_member_as_deployed_moves_its_partitions_in_seconds(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=PARTITIONS)
    dlq = await topic_factory(partitions=1)
    group = f"{topic}-group"
    sections = deployed_sections(bootstrap, topic, dlq, group, emulator.url)
    session_timeout = sections["kafka"]["session_timeout_ms"] / 1000
    assert "group_instance_id" not in sections["kafka"]

    def start() -> WorkerProcess:
        return worker_factory(sections, env=deployed_env(pod_name()))

    def delivered() -> int:
        return int(emulator.stats()["events"])

    async with RssWatch(worker_factory) as rss, steady_stream(bootstrap, topic) as produced:
        members = [start() for _ in range(3)]
        await until(lambda: all(last_assignment(w) for w in members), 90, "three members, each with partitions")
        await until(lambda: delivered() > 2 * RATE, 60, "deliveries")
        leaving, staying = members[0], members[1:]
        given_up = last_assignment(leaving)

        # One rolling-update step: the old pod gets SIGTERM, its replacement starts with a new name.
        sigterm_at = time.monotonic()
        leaving.signal(signal.SIGTERM)
        replacement = start()
        assert await leaving.await_exit(60) == 0
        left_at = time.monotonic()
        at_exit = await committed_offsets(bootstrap, group, topic)  # includes the leaver's final commit

        samples: list[tuple[float, int]] = []

        async def committing_past(before: dict[int, int], members: list[WorkerProcess]) -> bool:
            """Every partition owned by exactly one of `members` and committed past `before`."""
            samples.append((time.monotonic(), await asyncio.to_thread(delivered)))
            owners = [await asyncio.to_thread(last_assignment, w) for w in members]
            if set().union(*owners) != set(range(PARTITIONS)) or sum(map(len, owners)) != PARTITIONS:
                return False
            committed = await committed_offsets(bootstrap, group, topic)
            return all(committed.get(p, -1) > before.get(p, -1) for p in range(PARTITIONS))

        # 1. The leaver's partitions move: every partition owned and committing again past where it stood when
        #    the leaver exited (its final commit included), whether or not the replacement has joined yet.
        deadline = sigterm_at + 120
        while not await committing_past(at_exit, [*staying, replacement]):
            assert time.monotonic() < deadline, "partitions never all moved and committed again"
            await asyncio.sleep(0.1)
        took = time.monotonic() - sigterm_at
        # The discriminating bound: far below the session timeout a static member that never returns costs.
        assert took < session_timeout / 2, f"{took:.1f} s from SIGTERM to every partition committing again"
        stalled = longest_stretch_without_growth(samples)

        # 2. The replacement (a new process: its start-up is slower on a loaded machine) takes its share, and
        #    after that rebalance every partition commits again.
        await until(lambda: last_assignment(replacement), 90, "the replacement to get partitions")
        joined = await committed_offsets(bootstrap, group, topic)
        while not await committing_past(joined, [*staying, replacement]):
            assert time.monotonic() < deadline, "partitions never all committed again after the replacement joined"
            await asyncio.sleep(0.1)
        replaced = time.monotonic() - sigterm_at
        await asyncio.sleep(3)

    # Nothing lost: every produced event reached the emulator once the stream stops and the group catches up.
    await wait_committed(bootstrap, group, topic, timeout=120)
    counts = received(await asyncio.to_thread(emulator.events))
    assert set(produced) <= set(counts)
    dead = await consume_all(bootstrap, dlq, timeout=10)
    assert not dead
    figures(
        "replace one member as deployed (dynamic membership)",
        len(produced),
        counts,
        len(dead),
        rss.peak_kib,
        partitions_moved=sorted(given_up),
        sigterm_to_exit_s=round(left_at - sigterm_at, 2),
        sigterm_to_all_partitions_committing_s=round(took, 2),
        sigterm_to_replacement_in_and_all_committing_s=round(replaced, 2),
        longest_stretch_without_deliveries_s=round(stalled, 2),
    )
