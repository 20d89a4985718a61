"""`personalize-worker produce`: put test messages on a topic, for trying a config against a real broker.

A development aid, not part of the service: it reads JSON lines (or makes a synthetic clickstream) and
produces them keyed by their session, as a well-behaved upstream producer would, so that one session's
events stay in one partition and in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from worker.commands.sample import generate
from worker.config import KafkaSettings
from worker.kafka.connection import explain_connection_errors, kafka_security


def session_key(value: bytes, path: str) -> bytes | None:
    """The message's session id (the mapping's `session_id` path) as the Kafka key; None if absent."""
    try:
        node: Any = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None  # still produced: the worker dead-letters it, which is worth seeing too
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, str):
        return node.encode()
    if isinstance(node, int) and not isinstance(node, bool):
        return str(node).encode()
    return None


def lines_of(source: Iterable[bytes], session_path: str) -> Iterator[tuple[bytes | None, bytes]]:
    for raw in source:
        line = raw.strip()
        if line:
            yield session_key(line, session_path), line


def sample_of(records: int, seed: int) -> Iterator[tuple[bytes | None, bytes]]:
    """The demo's clickstream: sessions, Zipf items, a few re-delivered duplicates and malformed records."""
    for message in generate(records, seed=seed).messages:
        yield message.key, message.value


async def produce(kafka: KafkaSettings, topic: str, messages: Iterable[tuple[bytes | None, bytes]]) -> int:
    """Send every message and wait for each acknowledgement; the number sent."""
    # aiokafka logs at ERROR while a broker auto-creates the topic ("not found in cluster metadata"); with
    # no handler those lines reach the terminal. A real failure still raises and is explained below.
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())
    producer = AIOKafkaProducer(acks="all", linger_ms=20, **kafka_security(kafka))
    with explain_connection_errors(kafka):
        await producer.start()
    try:
        pending = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return len(pending)
