"""Backpressure at a full buffer without pausing the partitions, while calls keep freeing room.

Pausing a partition makes aiokafka drop the records it prefetched for it (up to `max_partition_fetch_bytes`
each), and every resume fetched them again. At a full buffer that cycled several times a second while
draining a backlog: most of what was read from the broker was thrown away, read and decoded again (a 30,000-
record drain at a 6,000 buffer read its partitions 3-4 times over). Unpolled, the prefetched records wait in
place. Pausing stays for a buffer that stays full (an outage): its getmany keeps the group membership alive
(max.poll.interval.ms).
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Buffer(Protocol):
    @property
    def outstanding(self) -> int: ...


class Polls(Protocol):
    @property
    def max_poll_records(self) -> int: ...


ROOM_WAIT_SECONDS = 1.0
"""How long a full buffer is waited on before the partitions are paused (`Source._apply_backpressure`)."""
ROOM_POLL_SECONDS = 0.01
"""How often the wait looks at the buffer: ~100 looks a second, each a sum over the owned partitions."""


def resume_at(cap: int, max_poll_records: int) -> int:
    """The buffered count at which fetching goes on: a tenth of the buffer (at most a poll) free. Any room at
    all would make a poll per finished call, each with its fixed cost, for ~9 records."""
    return cap - min(max_poll_records, max(1, cap // 10))


async def wait_for_room(buffer: Buffer, cap: int, kafka: Polls) -> bool:
    """Wait while `buffer.outstanding` is over `resume_at`, up to ROOM_WAIT_SECONDS; False if it stayed full.
    Bounded by a count of looks rather than a clock: the caller's clock may be a test's."""
    level = resume_at(cap, kafka.max_poll_records)
    for _ in range(round(ROOM_WAIT_SECONDS / ROOM_POLL_SECONDS)):
        if buffer.outstanding <= level:
            return True
        await asyncio.sleep(ROOM_POLL_SECONDS)
    return buffer.outstanding <= level
