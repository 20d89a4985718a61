"""The commit metadata: what a commit says beyond its offset, and what to do when the broker finds it too long.

Each commit carries the offsets finished beyond the commit point (`flow.offsets.PartitionOffsets.ahead`),
so a partition's next owner does not send them again. Read at assignment; shortened, down to nothing,
when the broker's `offset.metadata.max.bytes` is below ours. Without it records are merely re-sent
(same eventIds), never lost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import TopicPartition

from worker.flow.offsets import AHEAD_PREFIX, MetadataError, decode_ahead

log = logging.getLogger("worker.source")  # the source's logger, as before the split: log filters match it


async def committed_ahead(
    consumer: Any, assigned: Sequence[TopicPartition], span: int
) -> dict[TopicPartition, set[int]]:
    """What the previous owners finished beyond their commit points (see worker.flow.offsets)."""
    if not assigned:
        return {}
    try:
        # aiokafka's public committed() drops the metadata; its coordinator call keeps it.
        committed = await consumer._coordinator.fetch_committed_offsets(list(assigned))
    except Exception as error:  # without it records are merely re-sent (same eventIds), never lost
        log.warning("could not read committed metadata", extra={"error": repr(error)})
        return {}
    ahead: dict[TopicPartition, set[int]] = {}
    for tp, meta in committed.items():
        if meta is None or meta.offset < 0:
            continue
        try:
            ahead[tp] = decode_ahead(meta.offset, meta.metadata, span)
        except MetadataError as error:
            log.warning(
                "ignoring unreadable commit metadata; records after the commit point are read again",
                extra={"topic": tp.topic, "partition": tp.partition, "error": str(error)},
            )
    return ahead


def shorter(limit: int) -> int | None:
    """The broker's `offset.metadata.max.bytes` is below `limit`: half of it, down to none (the offset alone
    is always accepted). None if it was already none."""
    if limit <= 0:
        log.error("offset commit refused as too large with no metadata at all")
        return None
    half = limit // 2
    limit = half if half > len(AHEAD_PREFIX) + 8 else 0
    log.warning(
        "broker refused the commit metadata as too large; committing with shorter metadata "
        "(set kafka.commit_metadata_max_bytes below the broker's offset.metadata.max.bytes)",
        extra={"metadata_bytes": limit},
    )
    return limit
