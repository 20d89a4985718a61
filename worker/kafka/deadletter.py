"""Writing failed records to the dead-letter topic: original key, value and headers, plus the reason.

This module does not decide what failed; it makes the write durable (acks=all) and retries it until
the broker acknowledges, because the caller commits the record's offset only after that. A letter the
topic refuses for what it contains (too large, invalid) is never retried as it is: it is rewritten
smaller, down to the dlq.* headers alone, so one record can never block every later letter and commit.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownError,
)

from worker.backoff import Backoff
from worker.flow.items import DeadLetter
from worker.observe.metrics import Metrics

log = logging.getLogger("worker.deadletter")  # the pre-move name: log filters match it

MAX_REASON_CHARS = 2000
KEEP_BYTES = 16 * 1024
"""A reduced letter keeps the key, the value and the original headers each only up to this size: small
enough to fit any sensibly configured topic, large enough for every valid clickstream event (10 KB)."""
BATCH_BYTES = 16 * 1024
"""aiokafka's default max_batch_size, which the dead-letter producer keeps."""
ACK_ALARM_SECONDS = 30.0
"""The idempotent producer retries a broker outage inside aiokafka without end: past this, say so."""

CONTENT_ERRORS: tuple[type[Exception], ...] = (
    MessageSizeTooLargeError,  # broker: over the topic's max.message.bytes; producer: over max_request_size
    RecordListTooLargeError,  # the batch is over the broker's limit
    RecordTooLargeError,
    CorruptRecordException,  # CORRUPT_MESSAGE: the broker cannot read the record
    UnknownError,  # aiokafka 0.14 has no class for INVALID_RECORD (87): it arrives as UnknownError
)
"""Refusals about the record itself: the same bytes will be refused again, so they are rewritten smaller.
Everything else (broker down, not leader, timeouts, authorization, out-of-order sequence) is about the
topic or the connection: the same letter is retried with backoff and the alarm. Not aiokafka's
`retriable` flag alone: KafkaTimeoutError and TopicAuthorizationFailedError are not retriable either,
and neither is a reason to drop a letter's content."""


def dlq_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    """The reason and the source position: what no form of a letter may ever lose."""
    return [
        ("dlq.error.stage", letter.stage.encode()),
        ("dlq.error.reason", letter.reason.encode()),
        ("dlq.error.message", letter.message[:MAX_REASON_CHARS].encode("utf-8", "replace")),
        ("dlq.source.topic", letter.topic.encode()),
        ("dlq.source.partition", str(letter.partition).encode()),
        ("dlq.source.offset", str(letter.offset).encode()),
    ]


class Form(enum.IntEnum):
    """How much of the original record a letter carries; each refusal for content moves one step down."""

    FULL = 0
    """Key, value and headers, batched with the other letters."""
    ALONE = 1
    """The full letter again, in a batch of its own: the batch as a whole may have been what was too large
    (a topic limit under the producer's batch size), and UnknownError may be a transient server error."""
    REDUCED = 2
    """Each of key, value and headers kept only if it is at most KEEP_BYTES."""
    MINIMAL = 3
    """Only the dlq.* headers: the position and the reason."""


class Rendered(NamedTuple):
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def is_content_error(error: BaseException) -> bool:
    return isinstance(error, CONTENT_ERRORS)


def _headers_size(headers: Sequence[tuple[str, bytes | None]]) -> int:
    return sum(len(name.encode()) + len(value or b"") for name, value in headers)


def render(letter: DeadLetter, form: Form, refused_by: str = "") -> Rendered:
    """The letter as sent in `form`. A reduced letter says what it dropped and why, in dlq.* headers."""
    if form <= Form.ALONE:
        # aiokafka refuses a record with neither key nor value; a keyless tombstone's letter is empty.
        value = b"" if letter.key is None and letter.value is None else letter.value
        return Rendered(letter.key, value, [*letter.headers, *dlq_headers(letter)])
    budget = KEEP_BYTES if form is Form.REDUCED else 0
    value_size = len(letter.value or b"")
    key_size = len(letter.key or b"")
    headers_size = _headers_size(letter.headers)
    key = letter.key if key_size <= budget else None
    value = letter.value if value_size <= budget else b""
    if key is None and value is None:
        value = b""
    kept_headers = list(letter.headers) if headers_size <= budget else []
    notes = [
        ("dlq.letter.form", form.name.lower().encode()),
        ("dlq.letter.refused_by", refused_by.encode()),
        ("dlq.value.truncated", b"true" if value_size > budget else b"false"),
        ("dlq.value.original_size", str(value_size).encode()),
    ]
    if key_size > budget:
        notes += [("dlq.key.truncated", b"true"), ("dlq.key.original_size", str(key_size).encode())]
    if headers_size > budget:
        notes += [("dlq.headers.truncated", b"true"), ("dlq.headers.original_size", str(headers_size).encode())]
    return Rendered(key, value, [*kept_headers, *dlq_headers(letter), *notes])


def next_form(letter: DeadLetter, form: Form, error: Exception, *, refused_before_sending: bool) -> Form:
    """The form to try after a refusal for content. A full letter goes again alone unless the refusal is
    certain: the producer's own size check, or a size refusal of a letter larger than a batch (aiokafka
    never adds records to a batch past BATCH_BYTES, so it was alone already). A reduced form that would
    drop nothing is skipped: it would only be larger."""
    sizes = (len(letter.key or b""), len(letter.value or b""), _headers_size(letter.headers))
    alone_already = isinstance(error, MessageSizeTooLargeError) and sum(sizes) > BATCH_BYTES
    if form is Form.FULL and not refused_before_sending and not alone_already:
        return Form.ALONE
    if form <= Form.ALONE:
        return Form.REDUCED if max(sizes) > KEEP_BYTES else Form.MINIMAL
    return Form.MINIMAL


class _Pending:
    """Mutable (its form changes per round), so not a NamedTuple; a plain class, as the two below: a dataclass
    compiles its generated methods at import (~2M instructions of `run`'s start-up each; issue 13)."""

    __slots__ = ("form", "letter", "refused_by")

    def __init__(self, letter: DeadLetter, form: Form = Form.FULL, refused_by: str = "") -> None:
        self.letter = letter
        self.form = form
        self.refused_by = refused_by


class _Failure:
    __slots__ = ("before_sending", "error")

    def __init__(self, error: Exception, before_sending: bool = False) -> None:
        self.error = error
        self.before_sending = before_sending
        """Refused by `send` itself (the producer's size check, metadata): nothing reached the broker."""


def _delivery_failure(delivery: asyncio.Future[Any]) -> _Failure | None:
    if delivery.cancelled():
        return _Failure(RuntimeError("dead-letter delivery cancelled"))
    error = delivery.exception()
    if error is None:
        return None
    return _Failure(error if isinstance(error, Exception) else RuntimeError(repr(error)))


class _Round:
    __slots__ = ("escalated", "failed", "reduced", "written")

    def __init__(self) -> None:
        self.written = 0
        self.reduced: dict[Form, int] = {}
        self.escalated = 0
        self.failed: list[tuple[_Pending, _Failure]] = []


class DeadLetterWriter:
    """Owns the dead-letter producer, because a failed delivery can leave it unusable: the idempotent
    producer numbered the refused batch, the broker never stored it, and every later batch to that
    partition is refused as out of order. After any failed delivery the producer is replaced."""

    def __init__(
        self,
        producers: Callable[[], AIOKafkaProducer],
        topic: str,
        metrics: Metrics,
        backoff: Backoff | None = None,
        *,
        ack_alarm_after: float = ACK_ALARM_SECONDS,
    ) -> None:
        self._producers = producers
        self._producer: AIOKafkaProducer | None = None
        self._stale = True
        self._topic = topic
        self._metrics = metrics
        self._backoff = backoff or Backoff(base=0.2, cap=10.0)
        self._ack_alarm_after = ack_alarm_after
        self.blocked_reason: str | None = None
        """Set while writes fail: the worker is not ready and does not commit past these records."""

    async def start(self) -> None:
        await self._ready_producer()

    async def kafka_client(self) -> Any:
        """The producer's aiokafka client, for cluster metadata at start-up (one connection, not another)."""
        return (await self._ready_producer()).client

    async def stop(self) -> None:
        producer, self._producer, self._stale = self._producer, None, True
        if producer is not None:
            await producer.stop()

    async def _ready_producer(self) -> AIOKafkaProducer:
        if self._producer is not None and not self._stale:
            return self._producer
        if self._producer is not None:
            log.debug("replacing the dead-letter producer after a refused delivery")
        await self.stop()
        producer = self._producers()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer, self._stale = producer, False
        return producer

    async def _deliver(self, pending: Sequence[_Pending]) -> list[_Failure | None]:
        """Queue the letters one at a time (the producer batches them), then wait for every ack.

        Not one `send` per letter at once: thousands of sends waiting on a full batch all wake on each
        drained one (quadratic), and the last ones time out. A `send` refused for another reason than the
        record's size fails the rest of the round: the topic is not writable now, and each further send
        would wait out the metadata timeout again.
        """
        if not pending:
            return []
        try:
            producer = await self._ready_producer()
        except Exception as error:  # the broker is unreachable: every letter waits for the next round
            return [_Failure(error, before_sending=True)] * len(pending)
        outcomes: list[asyncio.Future[Any] | _Failure] = []
        for index, item in enumerate(pending):
            rendered = render(item.letter, item.form, item.refused_by)
            try:
                outcomes.append(
                    await producer.send(self._topic, value=rendered.value, key=rendered.key, headers=rendered.headers)
                )
            except MessageSizeTooLargeError as error:  # over max_request_size: this letter only
                outcomes.append(_Failure(error, before_sending=True))
            except Exception as error:  # every broker failure means "not yet written": retried
                outcomes += [_Failure(error, before_sending=True)] * (len(pending) - index)
                break
        await self._await_acks([o for o in outcomes if not isinstance(o, _Failure)])
        results = [o if isinstance(o, _Failure) else _delivery_failure(o) for o in outcomes]
        if any(r is not None and not r.before_sending for r in results):
            self._stale = True  # see the class docstring: its sequence numbers now have a gap
        return results

    async def _await_acks(self, deliveries: list[asyncio.Future[Any]]) -> None:
        if not deliveries:
            return
        _, unacked = await asyncio.wait(deliveries, timeout=self._ack_alarm_after)
        if unacked:
            seconds = self._ack_alarm_after
            self._alarm(
                f"dead-letter topic {self._topic!r} has not acknowledged writes for {seconds:.0f}s",
                "dead-letter writes unacknowledged; offsets will not advance past these records",
                records=len(unacked),
            )
            await asyncio.wait(unacked)

    async def _round(self, pending: Sequence[_Pending]) -> _Round:
        """Full letters go out batched; the others one at a time, each in a batch of its own. Once `send`
        says the topic is not writable now, the rest of the round is not tried (each would wait again)."""
        batched = [p for p in pending if p.form is Form.FULL]
        alone = [p for p in pending if p.form is not Form.FULL]
        results: list[_Failure | None] = []
        unwritable: _Failure | None = None
        for group in (batched, *([item] for item in alone)):
            if unwritable is not None:
                results += [unwritable] * len(group)
                continue
            delivered = await self._deliver(group)
            results += delivered
            unwritable = next((f for f in delivered if f and f.before_sending and not is_content_error(f.error)), None)
        outcome = _Round()
        for item, failure in zip([*batched, *alone], results, strict=True):
            if failure is None:
                outcome.written += 1
                if item.form >= Form.REDUCED:
                    outcome.reduced[item.form] = outcome.reduced.get(item.form, 0) + 1
                continue
            if is_content_error(failure.error) and item.form is not Form.MINIMAL:
                item.form = next_form(
                    item.letter, item.form, failure.error, refused_before_sending=failure.before_sending
                )
                item.refused_by = type(failure.error).__name__
                outcome.escalated += 1
            outcome.failed.append((item, failure))
        return outcome

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        """Returns once the broker has acknowledged a letter for every record; retries forever meanwhile.

        A letter refused for its content is sent again at once in a smaller form; only when nothing got
        smaller in a round (the topic or the connection is the problem, or even the minimal form is
        refused) does the writer back off, raise the alarm and try the same letters again.
        """
        attempt = 0
        pending = [_Pending(letter) for letter in letters]
        while pending:
            outcome = await self._round(pending)
            self._count(outcome)
            pending = [item for item, _ in outcome.failed]
            if not pending or outcome.escalated:
                continue
            attempt += 1
            content = [(item, f) for item, f in outcome.failed if is_content_error(f.error)]
            item, failure = (content or outcome.failed)[0]
            error = failure.error
            if content:
                reason = f"dead-letter topic {self._topic!r} refuses even a minimal letter (dlq.* headers only)"
            else:
                reason = f"dead-letter topic {self._topic!r} is not writable"
            self._alarm(
                f"{reason}: {type(error).__name__}: {error}",
                "cannot write to the dead-letter topic; offsets will not advance past these records",
                records=len(pending),
                form=item.form.name.lower(),
            )
            await asyncio.sleep(self._backoff.delay(attempt))
        if self.blocked_reason is not None:  # the loop only ends once every letter is written
            self.blocked_reason = None
            self._metrics.dead_letter_blocked.set(0)
            log.info("dead-letter topic writable again")

    def _alarm(self, reason: str, message: str, **extra: object) -> None:
        """Not ready, the gauge, and one log line per distinct reason (not one per retry)."""
        if reason != self.blocked_reason:
            log.error(message, extra={"error": reason, **extra})
        self.blocked_reason = reason
        self._metrics.dead_letter_blocked.set(1)

    def _count(self, outcome: _Round) -> None:
        self._metrics.dead_lettered.inc(outcome.written)
        if outcome.failed:
            self._metrics.dead_letter_errors.inc(len(outcome.failed))
        for form, count in outcome.reduced.items():
            self._metrics.dead_letters_reduced.labels(form.name.lower()).inc(count)
        if outcome.reduced:
            log.warning(
                "dead letters refused by the topic for their size or content were written reduced",
                extra={form.name.lower(): count for form, count in outcome.reduced.items()},
            )
