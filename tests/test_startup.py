"""Start-up: source topics are never created and a missing one is waited for (or fails a drain); a stop during
start-up ends it at once; a failed start is its JSON lines and nothing else; a first start on a fresh cluster
logs no error. Against the real broker (auto-creation on and off), the CLI in subprocesses and real sockets."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiokafka.admin import AIOKafkaAdminClient

from tests.kafka_support import KafkaBroker, _warm_up, create_topic, free_port, produce
from tests.stack import EmulatorProcess, WorkerFactory, WorkerProcess, write_config
from tests.test_chaos import log_lines, metric, readyz, received, until, valid_ids
from tests.test_e2e import load, run_cli, wait_committed
from worker.commands.check import DLQ_HEADROOM_BYTES
from worker.commands.sample import generate
from worker.kafka.topics import RECHECK_SECONDS

MISSING = "source topic missing; waiting for it to be created (the worker never creates source topics)"
DEFAULT_LIMIT = 1048588
"""Kafka's default max.message.bytes (message.max.bytes), which the test brokers keep."""
LIMIT = f"max.message.bytes {DEFAULT_LIMIT}"


# --------------------------------------------------------------------------- brokers and workers


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def strict_broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KafkaBroker]:
    """A broker that never auto-creates topics, as many production clusters are set up."""
    props = {"auto.create.topics.enable": "false"}
    broker = KafkaBroker(port=free_port(), dir=tmp_path_factory.mktemp("strict-kafka") / "state", props=props)
    try:
        await broker.astart()
        await _warm_up(broker.bootstrap)
    except BaseException:
        print(f"--- strict broker failed to start ---\n{broker.log_tail()}")
        await broker.astop()
        raise
    try:
        yield broker
    finally:
        await broker.astop()


@pytest.fixture(params=[True, False], ids=["auto-create-on", "auto-create-off"])
def broker(request: pytest.FixtureRequest, kafka_broker: KafkaBroker, strict_broker: KafkaBroker) -> KafkaBroker:
    return kafka_broker if request.param else strict_broker


@pytest.fixture
def workers(broker: KafkaBroker, emulator: EmulatorProcess, tmp_path: Path) -> Iterator[WorkerFactory]:
    factory = WorkerFactory(broker, emulator, tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()
        for worker in factory.workers:
            print(f"--- {worker.log_path.name}\n{worker.log_tail()}")


async def topics_of(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def json_lines(worker: WorkerProcess) -> list[dict[str, Any]]:
    """Every line the worker wrote; one that is not JSON (a warning, a traceback) fails the test here."""
    return [orjson.loads(line) for line in worker.log_text().splitlines()]


def figures(scenario: str, broker: KafkaBroker | None, **numbers: Any) -> None:
    """One `STARTUP-FIGURES {json}` line for the README."""
    where = "auto-create off" if broker is not None and broker.props else "auto-create on"
    line = {"scenario": scenario, "broker": where if broker is not None else "none", **numbers}
    print("STARTUP-FIGURES " + orjson.dumps(line).decode(), flush=True)


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- missing source topics


@pytest.mark.kafka
async def test_missing_topic_is_waited_for_never_created_and_consumed_once_it_exists(
    broker: KafkaBroker, workers: WorkerFactory, emulator: EmulatorProcess
) -> None:
    bootstrap = broker.bootstrap
    topic = name("late")
    dlq = await create_topic(bootstrap, f"{topic}.dlq", 1)
    group = f"{topic}-group"
    worker = workers(workers.config(topic, dlq, group))

    def waiting() -> bool:
        try:
            status, reason = readyz(worker)
        except OSError:  # the metrics server is not up yet
            return False
        return status == 503 and f"source topic {topic!r} does not exist" in reason

    await until(waiting, 60, "/readyz naming the missing topic")
    assert metric(worker, "source_topics_missing") == 1
    await asyncio.sleep(3 * RECHECK_SECONDS)  # several re-checks and metadata refreshes
    assert len(log_lines(worker, MISSING)) == 1, worker.log_tail()
    assert log_lines(worker, MISSING)[0]["topics"] == [topic]
    assert "not found in cluster metadata" not in worker.log_text()
    assert topic not in await topics_of(bootstrap), "the worker created its source topic"

    await create_topic(bootstrap, topic, 2)
    created = time.monotonic()

    def assigned() -> bool:
        return any(f"{topic}-0" in line["partitions"] for line in log_lines(worker, "partitions assigned"))

    await until(assigned, 60, "the new topic's partitions assigned")
    figures("source topic created late", broker, assigned_after_creation_s=round(time.monotonic() - created, 1))
    stream = generate(300, seed=12, duplicate_rate=0.0, malformed_rate=0.0)
    await load(bootstrap, topic, stream)
    await wait_committed(bootstrap, group, topic, timeout=120)
    await until(lambda: readyz(worker)[0] == 200, 30, "/readyz ready")
    assert metric(worker, "source_topics_missing") == 0
    assert set(received(await asyncio.to_thread(emulator.events))) == valid_ids(stream)
    assert log_lines(worker, "source topics present")


@pytest.mark.kafka
async def test_until_drained_fails_in_seconds_naming_only_the_missing_topic(
    broker: KafkaBroker, workers: WorkerFactory
) -> None:
    bootstrap = broker.bootstrap
    present = await create_topic(bootstrap, name("present"), 1)
    await produce(bootstrap, present, [b'{"session_id": "s", "event_type": "click", "timestamp": 1790000000}'])
    typo = name("typo")
    dlq = await create_topic(bootstrap, f"{present}.dlq", 1)
    sections = workers.config(present, dlq, f"{present}-group", kafka={"topics": [present, typo]})
    worker = workers(sections, until_drained=True)
    started = time.monotonic()
    code = await worker.await_exit(90)
    elapsed = time.monotonic() - started
    lines = json_lines(worker)
    assert code == 1, worker.log_tail()
    assert elapsed < 30, f"took {elapsed:.1f}s"  # the old path waited out aiokafka's 40 s metadata timeout
    figures("--until-drained, a source topic missing", broker, exit_code=code, exited_after_s=round(elapsed, 1))
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1 and errors[0]["msg"] == "worker failed", errors
    assert f"source topic {typo!r} does not exist" in errors[0]["error"] and repr(present) not in errors[0]["error"]
    assert typo not in await topics_of(bootstrap), "the worker created its source topic"


# --------------------------------------------------------------------------- stopping and failing at start-up


@pytest.mark.kafka
async def test_sigterm_during_start_up_exits_0_at_once(worker_factory: WorkerFactory) -> None:
    """A "broker" that accepts connections (the kernel's backlog) and never answers: aiokafka waits 40 s for
    it. SIGTERM must not wait with it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        sections = worker_factory.config(
            "t", "t.dlq", "g", kafka={"bootstrap_servers": f"127.0.0.1:{silent.getsockname()[1]}"}
        )
        worker = worker_factory(sections)
        await until(lambda: '"msg":"starting"' in worker.log_text(), 60, "the starting line")
        await asyncio.sleep(1.0)
        assert worker.running
        worker.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        code = await worker.await_exit(60)
        elapsed = time.monotonic() - stopped_at
    assert code == 0
    assert elapsed < 10, f"took {elapsed:.1f}s after SIGTERM"
    figures("SIGTERM during start-up (broker never answers)", None, exit_code=code, exited_after_s=round(elapsed, 1))
    messages = [(line["level"], line["msg"]) for line in json_lines(worker)]
    assert ("info", "stop requested during start-up; stopping") in messages
    assert messages[-1] == ("info", "stopped") and json_lines(worker)[-1]["clean"] is True
    assert not [m for m in messages if m[0] == "error"]


@pytest.mark.kafka
async def test_a_failed_start_writes_its_json_lines_and_nothing_else(worker_factory: WorkerFactory) -> None:
    port = free_port()  # nothing listens there
    sections = worker_factory.config("t", "t.dlq", "g", kafka={"bootstrap_servers": f"localhost:{port}"})
    worker = worker_factory(sections)
    assert await worker.await_exit(60) == 1
    lines = json_lines(worker)  # an "Unclosed AIOKafka..." warning or a traceback would not parse
    # botocore's credential line may come or not: the credential chain runs beside the Kafka start, which
    # failing cancels it.
    lines = [line for line in lines if line["msg"] != "Found credentials in environment variables."]
    assert [(line["level"], line["msg"]) for line in lines] == [
        ("info", "starting"),
        ("error", "worker failed"),
        ("info", "stopped"),
    ]
    failed = lines[1]
    assert failed["where"] == "start-up" and f"cannot connect to Kafka at localhost:{port}" in failed["error"]
    assert "Connection refused" in failed["error"]


@pytest.mark.kafka
async def test_first_start_on_a_fresh_cluster_logs_no_error(emulator: EmulatorProcess, tmp_path: Path) -> None:
    """No warm-up: the broker creates __consumer_offsets when the worker first looks for its coordinator, and
    aiokafka logs "Group Coordinator Request failed" at ERROR meanwhile, for a normal first start."""
    broker = KafkaBroker(port=free_port(), dir=tmp_path / "fresh-kafka")
    factory = WorkerFactory(broker, emulator, tmp_path)
    await broker.astart()
    try:
        topic = await create_topic(broker.bootstrap, "fresh", 2)
        dlq = await create_topic(broker.bootstrap, "fresh.dlq", 1)
        stream = generate(200, seed=5, duplicate_rate=0.0, malformed_rate=0.0)
        await load(broker.bootstrap, topic, stream)
        worker = factory(factory.config(topic, dlq, "fresh-group"), until_drained=True)
        assert await worker.await_exit(120) == 0, worker.log_tail()
        lines = json_lines(worker)
        assert not [line for line in lines if line["level"] not in ("info", "debug")], worker.log_tail()
        assert set(received(await asyncio.to_thread(emulator.events))) == valid_ids(stream)
    finally:
        await asyncio.to_thread(factory.stop_all)
        await broker.astop()


# --------------------------------------------------------------------------- check: the dead-letter topic


def check(config: Path) -> tuple[int, list[str]]:
    result = run_cli("check", "--config", str(config))
    return result.returncode, result.stdout.decode().splitlines()


def line_about(lines: list[str], what: str) -> str:
    found = [line for line in lines if what in line]
    assert len(found) == 1, (what, lines)
    return found[0]


@pytest.mark.kafka
async def test_check_says_whether_the_broker_will_create_the_dead_letter_topic(
    broker: KafkaBroker, workers: WorkerFactory, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap
    topic = await create_topic(bootstrap, name("src"), 1)
    dlq = f"{topic}.dlq"  # not created
    code, lines = await asyncio.to_thread(check, write_config(tmp_path / "w.toml", workers.config(topic, dlq, "g")))
    assert line_about(lines, f"source topic {topic!r}") == f"[ok  ] source topic {topic!r}: 1 partitions, {LIMIT}"
    said = line_about(lines, f"dead-letter topic {dlq!r}:")
    if broker.props:  # auto.create.topics.enable=false
        assert code == 1, lines
        assert said.startswith("[FAIL]") and "the broker will not create it (auto.create.topics.enable=false)" in said
        create = f"kafka-topics.sh --bootstrap-server {bootstrap} --create --topic {dlq} --config max.message.bytes="
        assert f"{create}{DEFAULT_LIMIT + DLQ_HEADROOM_BYTES}" in said
    else:
        assert code == 0, lines
        assert said.startswith("[ok  ]") and "the broker creates it on the first dead letter" in said, said
        # ... with the broker's default limit: no room above a record of the source's own (default) limit.
        size = line_about(lines, f"dead-letter topic {dlq!r} max.message.bytes:")
        needs = f"{DEFAULT_LIMIT} bytes; the largest source topic allows {DEFAULT_LIMIT}, a dead letter needs up to"
        assert size.startswith("[WARN]") and needs in size, size
    assert dlq not in await topics_of(bootstrap), "check created the dead-letter topic"


@pytest.mark.kafka
async def test_check_compares_dead_letter_sizes_with_the_largest_source_topic(
    worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    big, small = 2 * 1024 * 1024, 1024 * 1024
    needed = big + DLQ_HEADROOM_BYTES
    source = await create_topic(bootstrap, name("big"), 1, config={"max.message.bytes": str(big)})
    other = await create_topic(bootstrap, name("small"), 1, config={"max.message.bytes": str(small)})
    numbers = f"the largest source topic allows {big}, a dead letter needs up to {needed}"
    cases = [(small, "[FAIL]", 1), (big, "[WARN]", 0), (needed, "[ok  ]", 0)]
    for limit, mark, exit_code in cases:
        dlq = await create_topic(bootstrap, name("dlq"), 1, config={"max.message.bytes": str(limit)})
        sections = worker_factory.config(source, dlq, "g", kafka={"topics": [other, source]})
        code, lines = await asyncio.to_thread(check, write_config(tmp_path / "w.toml", sections))
        said = line_about(lines, f"dead-letter topic {dlq!r} max.message.bytes:")
        assert code == exit_code and said.startswith(f"{mark} ") and f"{limit} bytes; {numbers}" in said, lines
        fix = f"--alter --entity-type topics --entity-name {dlq} --add-config max.message.bytes={needed}"
        assert (fix in said) == (mark != "[ok  ]"), said
        assert line_about(lines, "dead_letter.max_message_bytes:").startswith("[ok  ]")  # 8 MiB by default

    sections = worker_factory.config(source, dlq, "g", dead_letter={"max_message_bytes": small})
    code, lines = await asyncio.to_thread(check, write_config(tmp_path / "w.toml", sections))
    said = line_about(lines, "dead_letter.max_message_bytes:")
    assert code == 1 and said.startswith("[FAIL]") and f"{small} bytes; {numbers}" in said, lines
    assert f"set dead_letter.max_message_bytes = {needed}" in said


@pytest.mark.kafka
async def test_a_source_topic_deleted_while_running_is_not_recreated_and_the_others_go_on(
    worker_factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    """On a broker that auto-creates topics: a request naming the deleted topic would bring it back, empty."""
    bootstrap = worker_factory.broker.bootstrap
    gone, stays = await create_topic(bootstrap, name("gone"), 1), await create_topic(bootstrap, name("stays"), 1)
    dlq = await create_topic(bootstrap, f"{stays}.dlq", 1)
    group = f"{stays}-group"
    first = generate(200, seed=21, duplicate_rate=0.0, malformed_rate=0.0)
    await load(bootstrap, gone, first)
    await load(bootstrap, stays, first)
    worker = worker_factory(worker_factory.config(stays, dlq, group, kafka={"topics": [gone, stays]}))
    await wait_committed(bootstrap, group, stays, timeout=120)
    await wait_committed(bootstrap, group, gone, timeout=60)

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([gone])
    finally:
        await admin.close()

    def missing() -> bool:
        status, reason = readyz(worker)
        return status == 503 and f"source topic {gone!r} does not exist" in reason

    await until(missing, 90, "/readyz naming the deleted topic")
    assert metric(worker, "source_topics_missing") == 1
    second = generate(200, seed=22, duplicate_rate=0.0, malformed_rate=0.0)
    await load(bootstrap, stays, second)
    await wait_committed(bootstrap, group, stays, timeout=120)
    await asyncio.sleep(2 * RECHECK_SECONDS)
    assert gone not in await topics_of(bootstrap), "the worker re-created a deleted source topic"
    assert len(log_lines(worker, MISSING)) == 1, worker.log_tail()
    assert valid_ids(second) <= set(received(await asyncio.to_thread(emulator.events)))
