"""`map` beyond JSON lines: records from Kafka, and records in the schema registry's wire formats.

A file of framed records holds one record value per line, as standard base64 (`--encoding base64`, the
default) or hex (`--encoding hex`); blank lines and lines starting with `#` are skipped. A record from
Kafka is read as the worker reads it (`--topic T --partition P --offset O --count N`, read_committed).
Framed records are decoded with their writer's schema from `[schema_registry]`, and each output line shows
the schema id and the decoded object beside the event (or the dead letter) they become.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import sys
from collections.abc import Iterable
from typing import IO, Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from worker.config import Settings
from worker.kafka.connection import kafka_security

FETCH_SECONDS = 30.0


def read_lines(source: Iterable[bytes], encoding: str) -> list[bytes]:
    """Record values from a base64 (or hex) per-line file; a line that does not decode names itself."""
    values = []
    for number, raw in enumerate(source, start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            values.append(bytes.fromhex(line.decode()) if encoding == "hex" else base64.b64decode(line, validate=True))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise SystemExit(f"personalize-worker: line {number} is not {encoding}") from None
    return values


async def read_kafka(
    settings: Settings, topic: str, partition: int, offset: int, count: int
) -> list[tuple[int, bytes]]:
    """Up to `count` records from `offset` on (fewer at the partition's end): (offset, value)."""
    admin = AIOKafkaAdminClient(**kafka_security(settings.kafka))
    await admin.start()
    try:
        described = (await admin.describe_topics([topic]))[0]
    finally:
        await admin.close()
    if partition not in {p["partition"] for p in described.get("partitions") or ()}:
        raise SystemExit(f"personalize-worker: {topic}-{partition} does not exist")
    consumer = AIOKafkaConsumer(
        enable_auto_commit=False, isolation_level="read_committed", **kafka_security(settings.kafka)
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        end = (await consumer.end_offsets([tp]))[tp]
        records: list[tuple[int, bytes]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FETCH_SECONDS
        while len(records) < count and await consumer.position(tp) < end and loop.time() < deadline:
            for record in (await consumer.getmany(tp, timeout_ms=500, max_records=count - len(records))).get(tp, []):
                records.append((record.offset, record.value or b""))
        return records[:count]
    finally:
        await consumer.stop()


async def _resolve(settings: Settings, values: list[bytes]) -> Any:
    from worker.mapping.schemas import Schemas
    from worker.observe.metrics import Metrics

    schemas = Schemas(settings, Metrics())
    budget = 3 * settings.schema_registry.request_timeout_seconds
    records = [_Value(v) for v in values]
    if not await schemas.resolve({None: records}, wait=budget):
        reason = schemas.blocked_reason or "no answer"
        await schemas.close()
        raise SystemExit(f"personalize-worker: {reason}")
    await schemas.client.close()
    return schemas


class _Value:
    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value


def run(settings: Settings, args: argparse.Namespace, out: IO[str]) -> int:
    from worker.commands.dry_run import dry_run

    offsets: list[int] | None = None
    if args.topic is not None:
        records = asyncio.run(read_kafka(settings, args.topic, args.partition, args.offset, args.count))
        offsets = [offset for offset, _ in records]
        values = [value for _, value in records]
    elif args.input in (None, "-"):
        values = read_lines(sys.stdin.buffer, args.encoding)
    else:
        with open(args.input, "rb") as source:
            values = read_lines(source, args.encoding)
    if settings.mapping.format == "json":
        dry_run(settings, values, out, offsets=offsets)
        return 0
    schemas = asyncio.run(_resolve(settings, values))
    dry_run(settings, values, out, schemas=schemas, offsets=offsets)
    return 0
