"""Writing failed records to the dead-letter topic: original key, value and headers, plus the reason.

This module does not decide what failed; it only makes the write durable (acks=all) and retries it
until the broker acknowledges, because the caller commits the record's offset only after that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from worker.metrics import Metrics
from worker.retry import Backoff

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 2000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that can never be delivered, and why."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    stage: str
    reason: str
    message: str


def dlq_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    return [
        *letter.headers,
        ("dlq.error.stage", letter.stage.encode()),
        ("dlq.error.reason", letter.reason.encode()),
        ("dlq.error.message", letter.message[:MAX_REASON_CHARS].encode("utf-8", "replace")),
        ("dlq.source.topic", letter.topic.encode()),
        ("dlq.source.partition", str(letter.partition).encode()),
        ("dlq.source.offset", str(letter.offset).encode()),
    ]


class DeadLetterWriter:
    def __init__(self, producer: AIOKafkaProducer, topic: str, metrics: Metrics, backoff: Backoff | None = None):
        self._producer = producer
        self._topic = topic
        self._metrics = metrics
        self._backoff = backoff or Backoff(base=0.2, cap=10.0)
        self.blocked_reason: str | None = None
        """Set while writes fail: the worker is not ready and does not commit past these records."""

    async def _send_all(self, letters: Sequence[DeadLetter]) -> list[Exception | None]:
        """Queue the letters one at a time (the producer batches them), then wait for every ack.

        Not one `send` per letter at once: thousands of sends waiting on a full batch all wake on each
        drained one (quadratic), and the last ones time out. A refused `send` fails the rest of the round:
        the topic is not writable now, and each further send would wait out the metadata timeout again.
        """
        deliveries: list[asyncio.Future[Any]] = []
        refused: Exception | None = None
        for letter in letters:
            try:
                deliveries.append(
                    await self._producer.send(
                        self._topic, value=letter.value, key=letter.key, headers=dlq_headers(letter)
                    )
                )
            except Exception as error:  # every broker failure means "not yet written": retried
                refused = error
                break
        acks = await asyncio.gather(*deliveries, return_exceptions=True)
        results: list[Exception | None] = [ack if isinstance(ack, Exception) else None for ack in acks]
        return results + [refused] * (len(letters) - len(results))

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        """Returns once the broker has acknowledged every letter; retries forever meanwhile."""
        attempt = 0
        remaining = list(letters)
        while remaining:
            results = await self._send_all(remaining)
            failed = [letter for letter, error in zip(remaining, results, strict=True) if error is not None]
            self._metrics.dead_lettered.inc(len(remaining) - len(failed))
            if not failed:
                break
            error = next(e for e in results if e is not None)
            attempt += 1
            self._metrics.dead_letter_errors.inc(len(failed))
            self._metrics.dead_letter_blocked.set(1)
            self.blocked_reason = f"dead-letter topic {self._topic!r} is not writable: {type(error).__name__}: {error}"
            log.error(
                "cannot write to the dead-letter topic; offsets will not advance past these records",
                extra={"error": self.blocked_reason, "records": len(failed)},
            )
            remaining = failed
            await asyncio.sleep(self._backoff.delay(attempt))
        if self.blocked_reason is not None:  # the loop only ends once every letter is written
            self.blocked_reason = None
            self._metrics.dead_letter_blocked.set(0)
            log.info("dead-letter topic writable again")
