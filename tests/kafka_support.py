"""A real Apache Kafka broker for tests, plus small aiokafka helpers.

The broker is the official Kafka jars run by ``deploy/local/kafka`` (single-node KRaft, no
Docker). Tests talk to it with aiokafka exactly as the worker does, so protocol-level behaviour
(rebalances, commits, leader changes) is the real thing rather than a mock's idea of it.

Every helper opens and closes its own clients: ``filterwarnings = error`` turns an unclosed
client's ResourceWarning into a failure in whichever test happens to trigger GC.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, RecordMetadata

__all__ = [
    "KAFKA_SCRIPT",
    "KafkaBroker",
    "KafkaBrokerError",
    "Record",
    "TopicFactory",
    "committed_offsets",
    "consume_all",
    "create_topic",
    "end_offsets",
    "free_port",
    "kafka_broker",
    "produce",
    "topic_factory",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = REPO_ROOT / "deploy" / "local" / "kafka"

#: Key or value as accepted by :func:`produce`; ``str`` is UTF-8 encoded.
Payload = bytes | str | None
#: Headers as aiokafka takes them.
Headers = Sequence[tuple[str, bytes]]
#: ``(key, value)`` or ``(key, value, headers)``, or just a value.
Record = tuple[Payload, Payload] | tuple[Payload, Payload, Headers | None] | Payload


T = TypeVar("T")


class KafkaBrokerError(RuntimeError):
    """The launcher script failed; the message carries the tail of broker.log."""


def free_port() -> int:
    """Return a TCP port that is free right now (the OS picks it, so parallel runs don't clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class KafkaBroker:
    """Handle on one broker managed by ``deploy/local/kafka`` (port + state dir identify it).

    ``props`` are extra server.properties entries (e.g. a SASL/TLS listener) passed as
    ``--prop key=value`` on every start.
    """

    port: int
    dir: Path
    props: Mapping[str, str] = field(default_factory=dict)
    start_timeout: float = 90.0
    #: Seconds the last successful start() took (process launch to "answers clients").
    last_start_seconds: float | None = field(default=None, init=False)

    @property
    def bootstrap(self) -> str:
        """Bootstrap string for clients."""
        return f"localhost:{self.port}"

    @property
    def log_file(self) -> Path:
        """Broker stdout/stderr and log4j output."""
        return self.dir / "broker.log"

    def _run(self, command: str, *extra: str, timeout: float) -> subprocess.CompletedProcess[str]:
        args = [str(KAFKA_SCRIPT), command, "--port", str(self.port), "--dir", str(self.dir), *extra]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        """Start (fetching jars on first use) and return once the broker answers clients."""
        extra: list[str] = []
        for key, value in self.props.items():
            extra += ["--prop", f"{key}={value}"]
        t0 = time.monotonic()
        try:
            proc = self._run("start", *extra, timeout=self.start_timeout + 240)  # + a first fetch
        except subprocess.TimeoutExpired as exc:
            self.stop()
            raise KafkaBrokerError(f"kafka start timed out\n{self.log_tail()}") from exc
        if proc.returncode != 0:
            raise KafkaBrokerError(
                f"kafka start failed (exit {proc.returncode}) on port {self.port}, dir {self.dir}\n"
                f"--- script stderr ---\n{proc.stderr[-4000:]}\n--- broker.log tail ---\n{self.log_tail()}"
            )
        self.last_start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 30 s); a no-op if it is not running."""
        proc = self._run("stop", timeout=60)
        if proc.returncode != 0:
            raise KafkaBrokerError(f"kafka stop failed (exit {proc.returncode}): {proc.stderr}")

    def restart(self) -> None:
        """Stop then start; the data survives (the storage is only formatted once)."""
        self.stop()
        self.start()

    def is_running(self) -> bool:
        """What ``deploy/local/kafka status`` says (exit 0 running, 3 stopped)."""
        proc = self._run("status", timeout=30)
        if proc.returncode not in (0, 3):
            raise KafkaBrokerError(f"kafka status failed (exit {proc.returncode}): {proc.stderr}")
        return proc.returncode == 0

    def log_tail(self, lines: int = 80) -> str:
        """Last lines of broker.log, for failure messages."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError as exc:
            return f"(no broker log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    async def astart(self) -> None:
        """:meth:`start` without blocking the event loop."""
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """:meth:`stop` without blocking the event loop."""
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> None:
        """:meth:`restart` without blocking the event loop."""
        await asyncio.to_thread(self.restart)


# --- client helpers ------------------------------------------------------------------------


def _encode(payload: Payload) -> bytes | None:
    return payload.encode() if isinstance(payload, str) else payload


async def _retry_until(
    deadline: float, attempt: Callable[[], Awaitable[T | None]], what: str, interval: float = 0.1
) -> T:
    """Call ``attempt`` until it returns non-None; Kafka errors count as "not yet"."""
    last: BaseException | None = None
    while True:
        try:
            result = await attempt()
            if result is not None:
                return result
        except KafkaError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} (last error: {last!r})")
        await asyncio.sleep(interval)


async def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    *,
    config: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> str:
    """Create a topic and return only once every partition has a leader that serves requests.

    Metadata alone is not enough: right after creation the broker can still answer
    NOT_LEADER_OR_FOLLOWER to produce/list-offsets for a moment, which makes tests flaky.
    """
    deadline = time.monotonic() + timeout
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        topic = NewTopic(name, partitions, 1, topic_configs=dict(config or {}))
        response = await admin.create_topics([topic])
        for err in getattr(response, "topic_errors", []):
            if err[1] != 0:  # (topic, error_code, error_message)
                raise KafkaBrokerError(f"create_topics({name}) failed: {err}")

        await _retry_until(
            deadline,
            lambda: _led_partitions(admin, name, partitions),
            f"topic {name} has no leaders yet",
        )
    finally:
        await admin.close()
    # ListOffsets goes to each partition leader, so success means the leaders are live.
    await end_offsets(bootstrap, name, timeout=max(1.0, deadline - time.monotonic()))
    return name


async def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[Record],
    *,
    partition: int | None = None,
    linger_ms: int = 5,
    **producer_kwargs: Any,
) -> list[RecordMetadata]:
    """Send records concurrently (send + gather, batched by linger) and wait for all acks.

    Each record is a value, ``(key, value)`` or ``(key, value, headers)``; str is UTF-8
    encoded. Returns the RecordMetadata (partition, offset) of each record, in input order.
    """
    kwargs: dict[str, Any] = {"linger_ms": linger_ms, "max_batch_size": 256 * 1024, "acks": "all"}
    kwargs.update(producer_kwargs)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kwargs)
    await producer.start()
    try:
        futures: list[Awaitable[RecordMetadata]] = []
        for record in records:
            if isinstance(record, tuple):
                key, value, headers = (record[0], record[1], record[2] if len(record) > 2 else None)
            else:
                key, value, headers = None, record, None
            fut = await producer.send(
                topic,
                value=_encode(value),
                key=_encode(key),
                partition=partition,
                headers=list(headers) if headers else None,
            )
            futures.append(fut)
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


async def _led_partitions(admin: Any, topic: str, expected: int | None = None) -> list[TopicPartition] | None:
    """The topic's partitions if it exists (with ``expected`` partitions) and all have leaders."""
    info = (await admin.describe_topics([topic]))[0]
    parts = info["partitions"]
    if info["error_code"] != 0 or not parts or (expected is not None and len(parts) != expected):
        return None
    if any(p["leader"] < 0 for p in parts):
        return None
    return [TopicPartition(topic, p["partition"]) for p in sorted(parts, key=lambda p: p["partition"])]


async def _topic_partitions(bootstrap: str, topic: str, deadline: float) -> list[TopicPartition]:
    # Via the admin client: a group-less consumer only tracks metadata of assigned topics.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await _retry_until(deadline, lambda: _led_partitions(admin, topic), f"topic {topic} not found")
    finally:
        await admin.close()


async def end_offsets(
    bootstrap: str,
    topic: str,
    *,
    timeout: float = 10.0,
) -> dict[int, int]:
    """Log end offset (next offset to be written) of every partition of ``topic``."""
    deadline = time.monotonic() + timeout
    tps = await _topic_partitions(bootstrap, topic, deadline)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:

        async def attempt() -> dict[TopicPartition, int]:
            return cast(dict[TopicPartition, int], await consumer.end_offsets(tps))

        ends = await _retry_until(deadline, attempt, f"end offsets of {topic}")
        return {tp.partition: int(off) for tp, off in ends.items()}
    finally:
        await consumer.stop()


async def consume_all(
    bootstrap: str,
    topic: str,
    timeout: float = 10.0,
    *,
    min_records: int | None = None,
    isolation_level: str = "read_uncommitted",
) -> list[ConsumerRecord]:
    """Read ``topic`` from the beginning without a consumer group, sorted by (partition, offset).

    By default reads up to the end offsets as of the call and returns (TimeoutError if that
    takes longer than ``timeout``). With ``min_records`` it instead keeps polling until at least
    that many records arrived or ``timeout`` passed, and returns what it has (so an assertion on
    the result shows the difference instead of a bare timeout). A missing topic is treated as
    empty after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    try:
        tps = await _topic_partitions(bootstrap, topic, deadline)
    except TimeoutError:
        return []
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    out: list[ConsumerRecord] = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        targets: dict[TopicPartition, int] = {}
        if min_records is None:
            targets = cast(dict[TopicPartition, int], await consumer.end_offsets(tps))
        while True:
            if min_records is not None:
                if len(out) >= min_records:
                    break
            elif all([await consumer.position(tp) >= end for tp, end in targets.items()]):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if min_records is not None:
                    break
                raise TimeoutError(f"consume_all({topic}) did not reach end offsets {targets} in {timeout}s")
            batches = await consumer.getmany(timeout_ms=int(min(remaining, 0.5) * 1000))
            for recs in batches.values():
                out.extend(recs)
    finally:
        await consumer.stop()
    out.sort(key=lambda r: (r.partition, r.offset))
    return out


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Offsets ``group`` has committed for ``topic`` (partitions without a commit are absent)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: int(meta.offset) for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}


# --- fixtures ------------------------------------------------------------------------------


class TopicFactory(Protocol):
    """Type of the ``topic_factory`` fixture."""

    async def __call__(
        self, partitions: int = 6, *, name: str | None = None, config: Mapping[str, str] | None = None
    ) -> str: ...


async def _warm_up(bootstrap: str, timeout: float = 60.0) -> None:
    """Make the group coordinator ready (creates __consumer_offsets) so the first test that uses
    a consumer group doesn't pay for it or log GroupCoordinatorNotAvailable retries."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:

        async def attempt() -> int:
            return int(await admin.find_coordinator("kafka-support-warm-up"))

        await _retry_until(time.monotonic() + timeout, attempt, "group coordinator not available", 0.2)
    finally:
        await admin.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KafkaBroker]:
    """One broker for the whole session on a free port, in a temp dir; stopped at the end."""
    broker = KafkaBroker(port=free_port(), dir=tmp_path_factory.mktemp("kafka") / "state")
    try:
        await broker.astart()
        await _warm_up(broker.bootstrap)
    except BaseException:
        print(f"\n--- kafka broker failed to start; tail of {broker.log_file} ---\n{broker.log_tail()}")
        await broker.astop()
        raise
    try:
        yield broker
    finally:
        await broker.astop()


_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9._-]+")


@pytest_asyncio.fixture(loop_scope="session")
async def topic_factory(kafka_broker: KafkaBroker, request: pytest.FixtureRequest) -> TopicFactory:
    """``await topic_factory(partitions=6)`` -> name of a fresh topic, ready for produce/consume.

    Names embed the test name (readable broker logs) plus a random suffix (unique per call).
    """
    prefix = _NAME_UNSAFE.sub("-", request.node.name)[:120]

    async def make(partitions: int = 6, *, name: str | None = None, config: Mapping[str, str] | None = None) -> str:
        topic = name or f"t-{prefix}-{uuid.uuid4().hex[:8]}"
        return await create_topic(kafka_broker.bootstrap, topic, partitions, config=config)

    return make
