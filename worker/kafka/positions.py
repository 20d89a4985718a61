"""Passing offsets that hold no record for the worker: transaction markers, aborted transactions' records,
compaction gaps. The consumer's position moves past them; the offset tracker, which sees records only,
would not, so a partition whose last offsets are such (every transaction ends with a marker) was never
committed to its end: it read as behind forever, and the watchdog called an idle partition stalled.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any

from aiokafka import TopicPartition

from worker.flow.offsets import OffsetTracker, PartitionOffsets
from worker.observe.metrics import Metrics

Positions = dict[TopicPartition, tuple[PartitionOffsets, int]]


def known_positions(consumer: Any, tracker: OffsetTracker[TopicPartition]) -> Positions:
    """Each owned partition's state and the consumer's position in it, where the position is known now.

    Read right after a poll, before the loop is let go: positions past exactly what that poll returned.
    `consumer.position()` is async and waits for a position being looked up or reset; aiokafka's subscription
    state answers at once. Should a later aiokafka (or a test's fake consumer) not have it, nothing is
    passed here (`Source.drained` still passes gaps at the end of a drain)."""
    subscription = getattr(getattr(consumer, "_subscription", None), "subscription", None)
    assignment = getattr(subscription, "assignment", None)
    if assignment is None:
        return {}
    positions: Positions = {}
    for tp in assignment.tps:
        state = tracker.get(tp)
        tp_state = assignment.state_value(tp)
        if state is not None and tp_state is not None and tp_state.has_valid_position:
            positions[tp] = (state, tp_state.position)
    return positions


def pass_gaps(positions: Positions, tracker: OffsetTracker[TopicPartition], revoking: Set[TopicPartition]) -> None:
    """Move each partition's commit point up to its position: only once the poll read with `positions` was
    handed over in full (a position past records the pipeline has not taken would commit past them), and
    only for the same ownership (one revoked meanwhile, or being revoked, is left alone)."""
    for tp, (state, position) in positions.items():
        if tracker.get(tp) is state and tp not in revoking:
            state.advance(position)


def lag(consumer: Any, tracker: OffsetTracker[TopicPartition], metrics: Metrics) -> dict[TopicPartition, int]:
    """Records behind the high watermark per owned partition, from what the consumer knows; updates the lag
    gauges."""
    behind: dict[TopicPartition, int] = {}
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        state = tracker.get(tp)
        if highwater is None or state is None:
            continue
        position = state.committed if state.committed is not None else state.committable()
        if position is None:
            continue
        behind[tp] = max(0, highwater - position)
        metrics.lag.labels(tp.topic, str(tp.partition)).set(behind[tp])
    return behind
