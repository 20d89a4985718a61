"""Compressed topics: every codec a Kafka producer may use is consumed, and a worker that cannot is loud.

Each topic is created with `compression.type=<codec>`, so every batch in its log carries that codec
whoever produced it: aiokafka and librdkafka (confluent-kafka) batches compressed with it are kept as
they are, uncompressed batches are compressed by the broker's own Java codecs (as an MSK topic with
that setting does). `log_codecs` reads the log raw to prove it.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaClient, TopicPartition
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.memory_records import MemoryRecords
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import Message as RdKafkaMessage
from confluent_kafka import Producer as RdKafkaProducer

from tests.kafka_support import TopicFactory, committed_offsets, consume_all, end_offsets, free_port, produce
from tests.stack import AWS_ENV, EmulatorProcess, WorkerFactory, write_config
from worker import app
from worker.app import Worker
from worker.commands.sample import generate
from worker.config import load_settings

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

CODECS = {
    "gzip": DefaultRecordBatch.CODEC_GZIP,
    "snappy": DefaultRecordBatch.CODEC_SNAPPY,
    "lz4": DefaultRecordBatch.CODEC_LZ4,
    "zstd": DefaultRecordBatch.CODEC_ZSTD,
}
FETCH_BYTES = 16 * 1024 * 1024


def produce_with_librdkafka(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], codec: str) -> None:
    """A foreign client's batches: librdkafka's own codec implementations (and Java's key partitioner)."""
    failures: list[str] = []

    def delivered(error: RdKafkaError | None, _message: RdKafkaMessage) -> None:
        if error is not None:
            failures.append(str(error))

    producer = RdKafkaProducer(
        {
            "bootstrap.servers": bootstrap,
            "compression.type": codec,
            "linger.ms": 20,
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
        }
    )
    for key, value in records:
        producer.produce(topic, value=value, key=key, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(60) == 0, "librdkafka did not deliver everything within 60 s"
    assert not failures, failures[:3]


async def log_codecs(bootstrap: str, topic: str) -> Counter[int]:
    """How many record batches in the topic's log carry each codec, read raw as a fetch returns them."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client.add_topic(topic)
        ends = await end_offsets(bootstrap, topic)
        codecs: Counter[int] = Counter()
        for partition, end in ends.items():
            node = client.cluster.leader_for_partition(TopicPartition(topic, partition))
            offset = 0
            while offset < end:
                request = FetchRequest(500, 1, FETCH_BYTES, 0, [(topic, [(partition, offset, FETCH_BYTES)])])
                response = await client.send(node, request)
                (_, partitions), *_ = response.topics
                (_, error_code, _, *rest), *_ = partitions
                assert error_code == 0, f"fetch error {error_code}"
                records = MemoryRecords(rest[-1])
                while (batch := records.next_batch()) is not None:
                    codecs[batch.compression_type] += 1
                    offset = batch.next_offset
        return codecs
    finally:
        await client.close()


def hidden_cramjam(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import cramjam` fails, exactly as where it is not installed."""
    stub = tmp_path / "no-cramjam"
    stub.mkdir(exist_ok=True)
    (stub / "cramjam.py").write_text('raise ImportError("cramjam hidden by tests/test_codecs.py")\n')
    return {"PYTHONPATH": str(stub)}


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line the worker wrote must be one JSON object (log_format = json)."""
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("codec", list(CODECS))
async def test_compressed_topic_delivered_exactly_once(
    codec: str, topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=3, config={"compression.type": codec})
    dlq = await topic_factory(partitions=1)
    stream = generate(3_000, seed=21, concurrent_sessions=60)
    records = [(m.key, m.value) for m in stream.messages]
    third = len(records) // 3
    await produce(bootstrap, topic, records[:third], linger_ms=20, compression_type=codec)
    await asyncio.to_thread(produce_with_librdkafka, bootstrap, topic, records[third : 2 * third], codec)
    await produce(bootstrap, topic, records[2 * third :], linger_ms=20)  # the broker compresses these
    codecs = await log_codecs(bootstrap, topic)
    assert set(codecs) == {CODECS[codec]}, f"the log must hold only {codec} batches: {codecs}"
    group = f"{topic}-group"

    worker = worker_factory(worker_factory.config(topic, dlq, group), until_drained=True)
    assert await worker.await_exit(180) == 0, worker.log_tail()

    assert await committed_offsets(bootstrap, group, topic) == await end_offsets(bootstrap, topic)
    valid = {m.source["event_id"] for m in stream.valid if m.source}
    received = Counter(e["eventId"] for e in await asyncio.to_thread(emulator.events))
    assert set(received) == valid, "the emulator must hold exactly the unique valid events"
    assert max(received.values()) == 1, "no event may be paid for twice"
    dead = await consume_all(bootstrap, dlq, timeout=30)
    malformed = sorted(m.value for m in stream.messages if m.kind == "malformed")
    assert malformed, "the data must exercise the dead-letter path"
    assert sorted(r.value or b"" for r in dead) == malformed, "dead letters carry the decompressed originals"
    stopped = json_lines(worker.log_text())[-1]
    assert stopped["msg"] == "stopped" and stopped["clean"] is True


async def test_a_failing_fetch_loop_exits_non_zero_naming_the_cause(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess, tmp_path: Path
) -> None:
    """aiokafka raises UnsupportedCodecError from getmany when cramjam is missing: the worker must not
    call that stop clean, commit nothing, and exit non-zero with one error line that names the cause."""
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=2, config={"compression.type": "lz4"})
    dlq = await topic_factory(partitions=1)
    stream = generate(200, seed=3, concurrent_sessions=10)
    await produce(bootstrap, topic, [(m.key, m.value) for m in stream.messages])
    group = f"{topic}-group"

    worker = worker_factory(worker_factory.config(topic, dlq, group), until_drained=True, env=hidden_cramjam(tmp_path))
    assert await worker.await_exit(120) == 1, worker.log_tail()

    lines = json_lines(worker.log_text())
    assert lines[-1]["msg"] == "stopped" and lines[-1]["clean"] is False, "a failed stop is never clean"
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["where"] == "fetch"
    assert errors[0]["error"].startswith("UnsupportedCodecError") and "lz4" in errors[0]["error"]
    assert "cramjam" in errors[0]["hint"]
    assert lines[-1]["error"] == errors[0]["error"]
    warned = [line for line in lines if line["msg"] == "compression codecs unavailable"]
    assert warned and warned[0]["codecs"] == ["snappy", "lz4", "zstd"], "start-up says so before any fetch"
    assert await committed_offsets(bootstrap, group, topic) == {}
    assert await asyncio.to_thread(emulator.events) == []


async def test_a_loop_failing_during_the_drain_is_not_a_clean_stop(
    topic_factory: TopicFactory,
    worker_factory: WorkerFactory,
    emulator: EmulatorProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A loop that dies while the shutdown drains (here the dead-letter writer) used to be swallowed by
    the shutdown's gather: exit 0 and clean=true. In process, to inject that failure at that moment."""
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=1)
    dlq = await topic_factory(partitions=1)
    stream = generate(100, seed=4, concurrent_sessions=5)
    await produce(bootstrap, topic, [(m.key, m.value) for m in stream.messages])
    group = f"{topic}-group"
    sections = worker_factory.config(topic, dlq, group, metrics={"port": free_port()})
    settings = load_settings(write_config(tmp_path / "w.toml", sections), environ={})
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(app, "tune_garbage_collector", lambda collect=False: None)  # gc.freeze() would outlive it
    worker = Worker(settings)

    draining = asyncio.Event()
    settle = worker.pipeline.settle_partitions

    async def slow_settle(partitions: list[TopicPartition], timeout: float) -> bool:
        draining.set()
        await asyncio.sleep(0.5)  # a drain takes a while: the failure lands inside it
        return await settle(partitions, timeout)

    async def dead_letters_breaking_in_the_drain() -> None:
        await draining.wait()
        raise RuntimeError("dead-letter writer broke during the drain")

    monkeypatch.setattr(worker.pipeline, "settle_partitions", slow_settle)
    monkeypatch.setattr(worker.pipeline, "run_dead_letters", dead_letters_breaking_in_the_drain)
    running = asyncio.create_task(worker.run())
    ends = await end_offsets(bootstrap, topic)
    deadline = asyncio.get_running_loop().time() + 60
    while await committed_offsets(bootstrap, group, topic) != ends:
        assert not running.done() and asyncio.get_running_loop().time() < deadline, "the worker never caught up"
        await asyncio.sleep(0.2)
    with caplog.at_level(logging.INFO, logger="worker.app"):
        worker.stop_requested.set()  # what SIGTERM does
        assert await asyncio.wait_for(running, 60) == 1
    stopped = [vars(r) for r in caplog.records if r.getMessage() == "stopped"]
    assert stopped and stopped[-1]["clean"] is False
    failed = [vars(r) for r in caplog.records if r.levelno == logging.ERROR]
    assert [r["where"] for r in failed] == ["dead-letters"]
    assert "dead-letter writer broke" in stopped[-1]["error"]


def run_check(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**AWS_ENV, "PATH": "/usr/bin:/bin", **(env or {})},
        check=False,
    )


async def test_check_fails_when_a_codec_is_missing(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    topic = await topic_factory(partitions=1)
    config = write_config(tmp_path / "w.toml", worker_factory.config(topic, f"{topic}.dlq", "g"))

    result = await asyncio.to_thread(run_check, config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ok  ] compression codecs: gzip, snappy, lz4, zstd" in result.stdout

    result = await asyncio.to_thread(run_check, config, hidden_cramjam(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if "compression codecs" in line)
    assert line.startswith("[FAIL]") and "snappy, lz4, zstd" in line and "cramjam" in line, line
    assert "gzip" not in line.split(":", 1)[1].split("(")[0], "gzip needs no library and is not missing"
