"""Every route's pipeline behind the one face `Source`, the watchdog and the worker use.

One `Pipeline` per route over one shared offset tracker, so the one consumer fetches, pauses and commits
every route's partitions alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from aiokafka.structs import TopicPartition

from worker.flow.batching import Batch
from worker.flow.items import Item, Record
from worker.flow.offsets import OffsetTracker
from worker.flow.pipeline import Pipeline


class Routes:
    """Every route's pipeline behind the one face `Source`, the watchdog and the worker use."""

    def __init__(self, pipelines: dict[str, Pipeline], topics: dict[str, str], tracker: OffsetTracker[TopicPartition]):
        self.pipelines = pipelines
        self._by_topic = {topic: pipelines[name] for topic, name in topics.items()}
        self.tracker = tracker

    def _split(self, partitions: Iterable[TopicPartition]) -> list[tuple[Pipeline, list[TopicPartition]]]:
        groups: dict[int, tuple[Pipeline, list[TopicPartition]]] = {}
        for tp in partitions:
            pipeline = self._by_topic.get(tp.topic)
            if pipeline is not None:
                groups.setdefault(id(pipeline), (pipeline, []))[1].append(tp)
        return list(groups.values())

    @property
    def outstanding(self) -> int:
        return self.tracker.outstanding

    @property
    def failure(self) -> str | None:
        return next((p.failure for p in self.pipelines.values() if p.failure), None)

    @property
    def sessions_crowded(self) -> int:
        return sum(p.sessions_crowded for p in self.pipelines.values())

    def ingest(self, partition: TopicPartition, records: Sequence[Record]) -> None:
        self._by_topic[partition.topic].ingest(partition, records)

    def crowded_partitions(self) -> set[TopicPartition]:
        crowded: set[TopicPartition] = set()
        for pipeline in self.pipelines.values():
            crowded |= pipeline.crowded_partitions()
        return crowded

    def where(
        self, wanted: dict[int, int], retrying: Callable[[Batch[Any, Item]], bool], deep: bool = True
    ) -> dict[int, str]:
        found: dict[int, str] = {}
        for pipeline in self.pipelines.values():
            rest = {serial: offset for serial, offset in wanted.items() if serial not in found}
            if not rest:
                break
            found.update(pipeline.where(rest, retrying, deep))
        return found

    async def settle_partitions(self, partitions: Sequence[TopicPartition], timeout: float) -> bool:
        groups = self._split(partitions)
        results = await asyncio.gather(*(p.settle_partitions(parts, timeout) for p, parts in groups))
        return all(results)

    def lagging(self, partitions: Collection[TopicPartition]) -> None:
        """Every route hears which of its partitions lag (none: its windows apply again)."""
        mine: dict[int, list[TopicPartition]] = {id(p): [] for p in self.pipelines.values()}
        for pipeline, parts in self._split(partitions):
            mine[id(pipeline)] = parts
        for pipeline in self.pipelines.values():
            pipeline.lagging(mine[id(pipeline)])

    def drop_unsent(self, partitions: Sequence[TopicPartition]) -> None:
        for pipeline, parts in self._split(partitions):
            pipeline.drop_unsent(parts)

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        for pipeline, parts in self._split(partitions):
            pipeline.forget(parts)

    async def finish_in_flight(self, timeout: float) -> bool:
        results = await asyncio.gather(*(p.finish_in_flight(timeout) for p in self.pipelines.values()))
        return all(results)

    async def cancel_in_flight(self) -> None:
        await asyncio.gather(*(p.cancel_in_flight() for p in self.pipelines.values()))

    async def run_dispatcher(self) -> None:
        await asyncio.gather(*(p.run_dispatcher() for p in self.pipelines.values()))

    async def run_dead_letters(self) -> None:
        await asyncio.gather(*(p.run_dead_letters() for p in self.pipelines.values()))
