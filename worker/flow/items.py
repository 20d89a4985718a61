"""What travels through the flow: a fetched record as the flow sees it, the item it becomes, the dead letter.

Plain types and protocols only, shared by the intake, the delivery and the Kafka side that feeds and
drains them (`kafka/` imports these; nothing here knows a Kafka client).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final, NamedTuple, Protocol


class Record(Protocol):
    """What the pipeline needs of a Kafka record (aiokafka's ConsumerRecord has it)."""

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class DeadLetter(NamedTuple):
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


class LetterWriter(Protocol):
    async def write(self, letters: Sequence[DeadLetter]) -> None: ...


Item = tuple[int, int, Any, str, float, str, bytes | None, bytes | None, Sequence[tuple[str, bytes]]]
"""One converted record on its way to Personalize: (partition serial, offset, batch key — the session, or
the destination —, the dedup or coalescing id — eventId, or the item/user/action id —, its order in time —
sentAt —, the member as JSON, and the record's key, value and headers for a dead letter).
`OffsetTracker.owners` resolves the serial.

A plain tuple of strings, bytes, numbers and tuples, not an object and without a dict, for the cyclic
garbage collector: such a tuple leaves the collector's lists within a young collection or two. As objects
holding their ConsumerRecord and event dict, the ~50,000 buffered items were ~100,000 of the ~113,000
objects every full collection scanned: stalls of 50-140 ms every ~2 s. The event is serialized here
rather than at call time, so this costs no extra work; kept as a str, because each bytes object
orjson returns pins ~4 KB of the C heap (its output buffer, shrunk in place): 200 MB per 50,000."""
OWNER: Final = 0
OFFSET: Final = 1
SESSION: Final = 2
EVENT_ID: Final = 3
SENT_AT: Final = 4
EVENT: Final = 5
KEY: Final = 6
VALUE: Final = 7
HEADERS: Final = 8


class Flag:
    """asyncio.Event's set/clear with a timed wait that costs one future and one timer handle.

    The dispatcher waits once per finished call: under `asyncio.timeout` (a Timeout object, its
    reschedule and exit) that was ~2% of the worker's CPU. (`wait_for` is not used: on 3.11 it can
    swallow a cancellation.)"""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()

    def clear(self) -> None:
        self._set = False

    async def wait(self, timeout: float) -> None:
        """Until set, or for `timeout` seconds."""
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
