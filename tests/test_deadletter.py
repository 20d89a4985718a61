"""The dead-letter writer: a letter the topic refuses for its content is written smaller, never retried as it
is forever; everything else is retried with the alarm. Pure rules first, then the writer's loop with a fake
producer, then the writer against the real broker (topic limits, the producer's own limit, compaction)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    UnknownError,
)

from tests.kafka_support import KafkaBroker, TopicFactory, consume_all
from worker.backoff import Backoff
from worker.flow.items import DeadLetter
from worker.kafka.deadletter import KEEP_BYTES, DeadLetterWriter, Form, is_content_error, next_form, render
from worker.observe.metrics import PREFIX, Metrics

MIB = 1024 * 1024
DLQ_KEYS = ("dlq.error.stage", "dlq.error.reason", "dlq.error.message", "dlq.source.topic", "dlq.source.partition")


def letter(offset: int, value: bytes | None = b"{bad", key: bytes | None = b"k", **changes: Any) -> DeadLetter:
    fields: dict[str, Any] = {
        "topic": "clicks",
        "partition": 2,
        "offset": offset,
        "key": key,
        "value": value,
        "headers": [("trace", b"t-1")],
        "stage": "decode",
        "reason": "not_json",
        "message": "unexpected end of input",
        **changes,
    }
    return DeadLetter(**fields)


def headers_of(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    return {name: (value or b"").decode() for name, value in headers}


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"{PREFIX}_{name}", labels) or 0.0


async def eventually(predicate: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate() or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- pure rules


def test_content_errors_are_the_record_refusals_only() -> None:
    for error in (MessageSizeTooLargeError(), RecordListTooLargeError(), UnknownError()):
        assert is_content_error(error)
    # Not about the record: the same letter is retried (aiokafka calls the first three not retriable).
    for error in (
        KafkaTimeoutError(),
        TopicAuthorizationFailedError(),
        OutOfOrderSequenceNumber(),
        NotLeaderForPartitionError(),
        KafkaConnectionError(),
    ):
        assert not is_content_error(error)


def test_full_letter_keeps_everything() -> None:
    rendered = render(letter(7), Form.FULL)
    assert (rendered.key, rendered.value) == (b"k", b"{bad")
    found = headers_of(rendered.headers)
    assert found["trace"] == "t-1" and found["dlq.source.offset"] == "7" and found["dlq.error.reason"] == "not_json"
    assert "dlq.letter.form" not in found
    # aiokafka refuses a record with neither key nor value: a keyless tombstone's letter is empty.
    assert render(letter(8, value=None, key=None), Form.ALONE).value == b""


def test_reduced_letter_drops_only_what_is_too_large_and_says_so() -> None:
    big = letter(9, value=b"x" * (KEEP_BYTES + 1))
    found = headers_of(render(big, Form.REDUCED, "MessageSizeTooLargeError").headers)
    reduced = render(big, Form.REDUCED, "MessageSizeTooLargeError")
    assert (reduced.key, reduced.value) == (b"k", b"")
    assert found["dlq.value.truncated"] == "true" and found["dlq.value.original_size"] == str(KEEP_BYTES + 1)
    assert found["dlq.letter.form"] == "reduced" and found["dlq.letter.refused_by"] == "MessageSizeTooLargeError"
    assert found["trace"] == "t-1" and found["dlq.source.offset"] == "9"
    assert "dlq.key.truncated" not in found and "dlq.headers.truncated" not in found

    bulky = letter(10, key=b"k" * (KEEP_BYTES + 1), headers=[("blob", b"b" * KEEP_BYTES)])
    reduced = render(bulky, Form.REDUCED, "MessageSizeTooLargeError")
    found = headers_of(reduced.headers)
    assert (reduced.key, reduced.value) == (None, b"{bad"), "a small value survives a bulky key"
    assert found["dlq.value.truncated"] == "false"
    assert found["dlq.key.truncated"] == "true" and found["dlq.key.original_size"] == str(KEEP_BYTES + 1)
    assert found["dlq.headers.truncated"] == "true" and found["dlq.headers.original_size"] == str(4 + KEEP_BYTES)
    assert "blob" not in found


def test_minimal_letter_is_the_dlq_headers_alone() -> None:
    minimal = render(letter(11), Form.MINIMAL, "UnknownError")
    assert (minimal.key, minimal.value) == (None, b"")
    found = headers_of(minimal.headers)
    assert all(name.startswith("dlq.") for name in found)
    assert set(DLQ_KEYS) <= set(found) and found["dlq.source.offset"] == "11"
    assert found["dlq.letter.form"] == "minimal" and found["dlq.value.original_size"] == "4"


def test_each_refusal_moves_one_form_down() -> None:
    small, big = letter(1), letter(2, value=b"x" * MIB)
    size, unknown = MessageSizeTooLargeError(), UnknownError()
    assert next_form(small, Form.FULL, size, refused_before_sending=False) is Form.ALONE, "its batch may be the problem"
    assert next_form(big, Form.FULL, unknown, refused_before_sending=False) is Form.ALONE, "may be transient"
    assert next_form(big, Form.FULL, size, refused_before_sending=False) is Form.REDUCED, "it was alone in its batch"
    assert next_form(big, Form.FULL, size, refused_before_sending=True) is Form.REDUCED, "the producer's check"
    assert next_form(big, Form.ALONE, unknown, refused_before_sending=False) is Form.REDUCED
    assert next_form(small, Form.ALONE, size, refused_before_sending=False) is Form.MINIMAL, "nothing to drop"
    assert next_form(big, Form.REDUCED, size, refused_before_sending=False) is Form.MINIMAL


# --------------------------------------------------------------------------- the loop, with a fake producer


class FakeProducer:
    """Accepts or refuses each send by `verdict(value, key, headers)`: an exception refuses it, at `send`
    when `at_send`, else on its delivery future; futures resolve at once unless `hold` is set."""

    def __init__(self, verdict: Callable[..., Exception | None], at_send: bool = False) -> None:
        self.verdict = verdict
        self.at_send = at_send
        self.hold: asyncio.Event | None = None
        self.sent: list[tuple[bytes | None, bytes | None, dict[str, str]]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, value: bytes | None, key: bytes | None, headers: Any) -> asyncio.Future[None]:
        error = self.verdict(value, key, headers)
        if error is not None and self.at_send:
            raise error
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def settle() -> None:
            if self.hold is not None:
                await self.hold.wait()
            if error is None:
                self.sent.append((key, value, headers_of(headers)))
                future.set_result(None)
            else:
                future.set_exception(error)

        asyncio.get_running_loop().create_task(settle())
        return future


def fake_writer(producer: FakeProducer, metrics: Metrics, **kwargs: Any) -> tuple[DeadLetterWriter, list[int]]:
    created: list[int] = []

    def make() -> AIOKafkaProducer:
        created.append(1)
        return producer  # a duck-typed stand-in (aiokafka is untyped: AIOKafkaProducer is Any to mypy)

    return DeadLetterWriter(make, "dlq", metrics, Backoff(base=0.01, cap=0.02), **kwargs), created


async def test_too_large_letter_is_reduced_and_the_producer_replaced() -> None:
    producer = FakeProducer(lambda value, key, headers: MessageSizeTooLargeError() if len(value) > 1000 else None)
    metrics = Metrics()
    writer, created = fake_writer(producer, metrics)
    await writer.start()
    await asyncio.wait_for(writer.write([letter(0), letter(1, value=b"x" * 20_000), letter(2)]), 10)
    assert sorted(h["dlq.source.offset"] for _, _, h in producer.sent) == ["0", "1", "2"]
    reduced = next(h for _, v, h in producer.sent if "dlq.letter.form" in h)
    assert reduced["dlq.source.offset"] == "1" and reduced["dlq.value.original_size"] == "20000"
    assert len(created) == 2, "replaced after the failed delivery; larger than a batch, so never resent whole"
    assert sample(metrics, "dead_letters_reduced_total", form="reduced") == 1
    assert sample(metrics, "records_dead_lettered_total") == 3
    assert writer.blocked_reason is None and sample(metrics, "dead_letter_blocked") == 0


async def test_refusal_by_the_producers_own_limit_fails_that_letter_only() -> None:
    producer = FakeProducer(lambda value, key, headers: MessageSizeTooLargeError() if len(value) > 1000 else None, True)
    metrics = Metrics()
    writer, created = fake_writer(producer, metrics)
    await asyncio.wait_for(writer.write([letter(0, value=b"x" * 5000), letter(1)]), 10)
    assert [h["dlq.source.offset"] for _, _, h in producer.sent] == ["1", "0"]
    assert len(created) == 1, "nothing reached the broker: no sequence gap, no new producer"


async def test_topic_trouble_retries_the_same_letter_with_the_alarm() -> None:
    refusals = [TopicAuthorizationFailedError(), KafkaTimeoutError()]
    producer = FakeProducer(lambda value, key, headers: refusals.pop(0) if refusals else None)
    metrics = Metrics()
    writer, _ = fake_writer(producer, metrics)
    seen: list[str | None] = []

    async def watch() -> None:
        while True:
            seen.append(writer.blocked_reason)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(writer.write([letter(0, value=b"x" * 5000)]), 10)
    watcher.cancel()
    assert producer.sent[0][1] == b"x" * 5000, "never reduced for a refusal that is not about the record"
    assert any(reason and "is not writable: TopicAuthorizationFailedError" in reason for reason in seen)
    assert sample(metrics, "dead_letter_errors_total") == 2
    assert writer.blocked_reason is None


async def test_a_refused_minimal_letter_keeps_retrying_loudly_until_accepted(caplog: pytest.LogCaptureFixture) -> None:
    accept = asyncio.Event()
    producer = FakeProducer(lambda value, key, headers: None if accept.is_set() else UnknownError())
    metrics = Metrics()
    writer, _ = fake_writer(producer, metrics)
    task = asyncio.create_task(writer.write([letter(0)]))
    await eventually(lambda: writer.blocked_reason, 10)
    assert writer.blocked_reason and "refuses even a minimal letter" in writer.blocked_reason
    assert sample(metrics, "dead_letter_blocked") == 1
    await asyncio.sleep(0.3)
    assert not task.done(), "never dropped"
    assert sample(metrics, "dead_letter_errors_total") > 5, "still retrying"
    alarms = [r for r in caplog.records if r.getMessage().startswith("cannot write to the dead-letter topic")]
    assert len(alarms) == 1, "one log line for the fault, not one per retry"
    accept.set()
    await asyncio.wait_for(task, 10)
    assert producer.sent[0][2]["dlq.letter.form"] == "minimal"
    assert sample(metrics, "dead_letters_reduced_total", form="minimal") == 1
    assert writer.blocked_reason is None and sample(metrics, "dead_letter_blocked") == 0


async def test_once_send_says_the_topic_is_unwritable_the_round_stops_trying() -> None:
    """Three letters refused (UnknownError) go again alone; the first `send` then times out on metadata:
    the other two are not sent into the same wait, the round backs off."""
    calls: list[str] = []

    def verdict(value: bytes | None, key: bytes | None, headers: Any) -> Exception | None:
        calls.append(headers_of(headers)["dlq.source.offset"])
        return UnknownError() if len(calls) <= 3 else None

    producer = FakeProducer(verdict)
    real_send = producer.send
    timeouts = [KafkaTimeoutError()]

    async def send(topic: str, value: bytes | None, key: bytes | None, headers: Any) -> asyncio.Future[None]:
        if len(calls) == 3 and timeouts:
            calls.append("timeout")
            raise timeouts.pop()
        return await real_send(topic, value, key, headers)

    producer.send = send  # type: ignore[method-assign]
    metrics = Metrics()
    writer, _ = fake_writer(producer, metrics)
    await asyncio.wait_for(writer.write([letter(0), letter(1), letter(2)]), 10)
    assert calls == ["0", "1", "2", "timeout", "0", "1", "2"]
    assert sorted(h["dlq.source.offset"] for _, _, h in producer.sent) == ["0", "1", "2"]
    assert all("dlq.letter.form" not in h for _, _, h in producer.sent), "sent alone, whole"


async def test_acknowledgements_that_never_come_raise_the_alarm() -> None:
    producer = FakeProducer(lambda value, key, headers: None)
    producer.hold = asyncio.Event()
    metrics = Metrics()
    writer, _ = fake_writer(producer, metrics, ack_alarm_after=0.05)
    task = asyncio.create_task(writer.write([letter(0)]))
    await asyncio.sleep(0.5)
    assert writer.blocked_reason and "has not acknowledged" in writer.blocked_reason
    assert sample(metrics, "dead_letter_blocked") == 1
    producer.hold.set()
    await asyncio.wait_for(task, 10)
    assert writer.blocked_reason is None and sample(metrics, "dead_letter_blocked") == 0


# --------------------------------------------------------------------------- the writer against the real broker


def broker_writer(
    bootstrap: str, topic: str, metrics: Metrics, max_request_size: int = 8 * MIB
) -> tuple[DeadLetterWriter, list[int]]:
    """As the worker builds it (acks=all, idempotent), counting the producers it creates."""
    created: list[int] = []

    def make() -> AIOKafkaProducer:
        created.append(1)
        return AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_request_size=max_request_size,
        )

    return DeadLetterWriter(make, topic, metrics, Backoff(base=0.05, cap=0.5)), created


def by_offset(records: Sequence[Any]) -> dict[int, Any]:
    found: dict[int, Any] = {}
    for record in records:
        offset = int(dict(record.headers)["dlq.source.offset"])
        assert offset not in found, f"offset {offset} lettered twice"
        found[offset] = record
    return found


@pytest.mark.kafka
async def test_letters_over_the_topic_limit_are_reduced_and_later_letters_flow(
    topic_factory: TopicFactory, kafka_broker: KafkaBroker
) -> None:
    """The topic keeps the broker's default limit (1 MiB); the producer allows 8 MiB, so the broker refuses."""
    dlq = await topic_factory(partitions=1)
    bootstrap = kafka_broker.bootstrap
    metrics = Metrics()
    writer, created = broker_writer(bootstrap, dlq, metrics)
    await writer.start()
    try:
        letters = [
            letter(0),
            letter(1, value=b"x" * (3 * MIB // 2)),
            letter(2),
            letter(3, value=None, key=None),
            letter(4, value=b"{small", headers=[("trace", b"t-1"), ("blob", b"b" * (6 * MIB // 5))]),
            letter(5),
        ]
        await asyncio.wait_for(writer.write(letters), 60)
        await asyncio.wait_for(writer.write([letter(6)]), 60)
    finally:
        await writer.stop()
    found = by_offset(await consume_all(bootstrap, dlq, timeout=30))
    assert sorted(found) == [0, 1, 2, 3, 4, 5, 6], "a letter for every record, once"
    for offset in (0, 2, 5, 6):
        assert (found[offset].key, found[offset].value) == (b"k", b"{bad"), "small letters intact"
        assert headers_of(found[offset].headers)["trace"] == "t-1"
    assert found[3].value == b"" and found[3].key is None
    big = headers_of(found[1].headers)
    assert (found[1].key, found[1].value) == (b"k", b"")
    assert big["dlq.value.truncated"] == "true" and big["dlq.value.original_size"] == str(3 * MIB // 2)
    assert big["dlq.letter.refused_by"] == "MessageSizeTooLargeError" and big["dlq.letter.form"] == "reduced"
    assert big["dlq.error.reason"] == "not_json" and big["dlq.source.topic"] == "clicks" and big["trace"] == "t-1"
    bulky = headers_of(found[4].headers)
    assert found[4].value == b"{small" and bulky["dlq.headers.truncated"] == "true" and "blob" not in bulky
    assert sample(metrics, "dead_letters_reduced_total", form="reduced") == 2
    assert sample(metrics, "records_dead_lettered_total") == 7
    assert len(created) > 1, "the producer is replaced after the broker refused a batch"
    assert writer.blocked_reason is None


@pytest.mark.kafka
async def test_letters_over_the_producers_own_limit_are_reduced_before_sending(
    topic_factory: TopicFactory, kafka_broker: KafkaBroker
) -> None:
    """The topic allows 4 MiB but the producer's max_request_size is 1 MiB: `send` itself refuses."""
    dlq = await topic_factory(partitions=1, config={"max.message.bytes": str(4 * MIB)})
    metrics = Metrics()
    writer, created = broker_writer(kafka_broker.bootstrap, dlq, metrics, max_request_size=MIB)
    await writer.start()
    try:
        letters = [letter(0, value=b"x" * (3 * MIB // 2)), letter(1, value=b"y" * (900 * 1024)), letter(2)]
        await asyncio.wait_for(writer.write(letters), 60)
    finally:
        await writer.stop()
    found = by_offset(await consume_all(kafka_broker.bootstrap, dlq, timeout=30))
    assert sorted(found) == [0, 1, 2]
    reduced = headers_of(found[0].headers)
    assert found[0].value == b"" and reduced["dlq.letter.refused_by"] == "MessageSizeTooLargeError"
    assert reduced["dlq.value.original_size"] == str(3 * MIB // 2)
    assert found[1].value == b"y" * (900 * 1024), "under both limits: intact"
    assert len(created) == 1, "nothing reached the broker, so the producer is still good"


@pytest.mark.kafka
async def test_a_topic_limit_under_the_batch_size_isolates_letters_instead_of_reducing(
    topic_factory: TopicFactory, kafka_broker: KafkaBroker
) -> None:
    """Each letter fits the topic's 4 KiB, a batch of them does not: each goes again alone, intact."""
    dlq = await topic_factory(partitions=1, config={"max.message.bytes": "4096"})
    metrics = Metrics()
    writer, _ = broker_writer(kafka_broker.bootstrap, dlq, metrics)
    await writer.start()
    try:
        await asyncio.wait_for(writer.write([letter(n, value=b"z" * 300) for n in range(40)]), 120)
    finally:
        await writer.stop()
    found = by_offset(await consume_all(kafka_broker.bootstrap, dlq, timeout=30))
    assert sorted(found) == list(range(40))
    assert all(record.value == b"z" * 300 for record in found.values())
    assert sample(metrics, "dead_letters_reduced_total", form="reduced") == 0
    assert sample(metrics, "dead_letters_reduced_total", form="minimal") == 0


@pytest.mark.kafka
async def test_a_topic_refusing_even_minimal_letters_blocks_loudly_and_drops_nothing(
    topic_factory: TopicFactory, kafka_broker: KafkaBroker
) -> None:
    """A compacted dead-letter topic refuses keyless records (INVALID_RECORD): a configuration fault."""
    dlq = await topic_factory(partitions=1, config={"cleanup.policy": "compact"})
    metrics = Metrics()
    writer, _ = broker_writer(kafka_broker.bootstrap, dlq, metrics)
    await writer.start()
    task = asyncio.create_task(writer.write([letter(0, key=None), letter(1)]))
    try:
        await eventually(lambda: writer.blocked_reason, 60)
        assert writer.blocked_reason and "refuses even a minimal letter" in writer.blocked_reason
        assert sample(metrics, "dead_letter_blocked") == 1
        await asyncio.sleep(1)
        assert not task.done(), "the keyless record's letter is neither dropped nor given up"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await writer.stop()
    found = by_offset(await consume_all(kafka_broker.bootstrap, dlq, timeout=30))
    assert sorted(found) == [1], "the keyed letter was written meanwhile"
