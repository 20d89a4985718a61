"""Routes: each one source topics → decode → mapping → one Personalize operation → a destination.

`resolve` turns the settings into `Route`s (the single-flow file is one route named `default`);
the per-record converters live here; `Routes` runs one `Pipeline` per route over one shared offset
tracker, so the one consumer (`Source`) fetches, pauses and commits every route's partitions alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka.structs import TopicPartition

from worker.config import MappingSettings, Settings
from worker.flow.offsets import OffsetTracker
from worker.mapping.mapper import InvalidRecord, Mapper
from worker.personalize.operations.envelope import DELETE, unwrap
from worker.personalize.operations.records import mapper_for
from worker.personalize.operations.settings import OperationMapping
from worker.personalize.operations.spec import ACTION_INTERACTIONS, EVENTS, SPECS, OperationSpec

if TYPE_CHECKING:
    from worker.flow.batching import Batch
    from worker.flow.pipeline import Item, Pipeline, Record

EXCERPT = 40


@dataclass(frozen=True)
class Route:
    """One route's settings, resolved: defaults filled from the operation and the top-level sections."""

    name: str
    topics: tuple[str, ...]
    spec: OperationSpec
    destinations: tuple[tuple[str, str], ...]
    """(name, tracking id or dataset ARN): one unnamed destination, or an events route's trackers."""
    tracking_id_field: str
    mapping: MappingSettings | OperationMapping
    envelope: str
    dead_letter_topic: str
    max_requests_per_second: float
    max_in_flight: int
    max_records: int
    linger_ms: int
    max_calls_per_session: int
    max_session_events: int
    dedup_window_seconds: float
    dedup_max_ids: int
    coalesce_window_seconds: float


def resolve(settings: Settings) -> list[Route]:
    """The routes to run; without `[[routes]]`, today's single flow as the route `default`."""
    b, p = settings.batching, settings.personalize
    if not settings.routes:
        assert p.tracking_id is not None, "config validation requires it without routes"
        return [
            Route(
                name="default",
                topics=settings.kafka.topics,
                spec=EVENTS,
                destinations=(("", p.tracking_id),),
                tracking_id_field="",
                mapping=settings.mapping,
                envelope="none",
                dead_letter_topic=settings.dead_letter.topic,
                max_requests_per_second=p.max_requests_per_second,
                max_in_flight=p.max_in_flight,
                max_records=b.max_events,
                linger_ms=b.linger_ms,
                max_calls_per_session=b.max_calls_per_session,
                max_session_events=b.max_session_events,
                dedup_window_seconds=settings.dedup.window_seconds,
                dedup_max_ids=settings.dedup.max_ids,
                coalesce_window_seconds=0.0,
            )
        ]
    routes = []
    for r in settings.routes:
        spec = SPECS[r.operation]
        # One unnamed destination, or the trackers of an events route that picks one per record.
        destinations = tuple(sorted(r.trackers.items())) or (("", r.tracking_id or r.dataset_arn),)
        sessions = bool(spec.session_members)
        routes.append(
            Route(
                name=r.name,
                topics=r.topics,
                spec=spec,
                destinations=destinations,
                tracking_id_field=r.tracking_id_field,
                mapping=r.mapping,
                envelope=r.envelope,
                dead_letter_topic=r.dead_letter_topic,
                max_requests_per_second=r.max_requests_per_second or spec.default_requests_per_second,
                max_in_flight=r.max_in_flight or p.max_in_flight,
                max_records=min(r.max_records_per_call or spec.records_per_call[1], spec.records_per_call[1]),
                linger_ms=b.linger_ms if r.linger_ms is None else r.linger_ms,
                # Without sessions (one batch key per destination) only the in-flight cap bounds the calls,
                # and only the buffer cap the records held.
                max_calls_per_session=b.max_calls_per_session if sessions else 1024,
                max_session_events=b.max_session_events if sessions else 1 << 62,
                dedup_window_seconds=settings.dedup.window_seconds
                if r.dedup_window_seconds is None
                else r.dedup_window_seconds,
                dedup_max_ids=settings.dedup.max_ids,
                coalesce_window_seconds=r.coalesce_window_seconds,
            )
        )
    return routes


def _decode(value: bytes | None) -> Any:
    """As `Mapper.map` decodes: the same reasons for the same faults."""
    if not value:
        raise InvalidRecord("decode", "empty", "the message value is empty")
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRecord("decode", "not_json", f"not valid JSON: {exc}") from None


def _decode_object(value: bytes | None) -> Any:
    obj = _decode(value)
    if type(obj) is not dict:
        raise InvalidRecord("decode", "not_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def tracked_events(
    mapper: Mapper, field: str, trackers: dict[str, str], decode: Callable[[bytes | None], Any] | None = None
) -> Callable[[bytes | None], Any]:
    """An events route with `tracking_id_field`: the batch key gains the record's tracking id in front,
    (trackingId, sessionId, userId), so each call goes to one tracker. An unmapped value is dead-lettered.
    `decode`: value → dict (`Schemas.objects` for a registry format; default JSON)."""
    path = tuple(field.split("."))
    decode_object = decode or _decode_object

    def map_tracked(value: bytes | None) -> Any:
        obj = decode_object(value)
        name: Any = obj
        for part in path:
            name = name.get(part) if type(name) is dict else None
        tracking_id = trackers.get(name) if type(name) is str else None
        if tracking_id is None:
            shown = "missing" if name is None else repr(name)[:EXCERPT]
            raise InvalidRecord("mapping", "unknown_tracker", f"{field}: {shown} is not a key of the route's trackers")
        mapped = mapper.map_object(obj)
        if mapped is None:
            return None
        key, event = mapped
        return (tracking_id, key[0], key[1]), event

    return map_tracked


Converted = tuple[str, float, str]
"""(the record's id — eventId or the item/user/action id —, its order in time, the member as JSON)."""


def converter(route: Route) -> Callable[[bytes | None], Converted | None]:
    """Value → the request member of an items/users/actions/action_interactions route; None: a delete
    (nothing to send: no streaming delete exists, see `operations.envelope`)."""
    assert route.spec is not EVENTS and not isinstance(route.mapping, MappingSettings)
    mapper = mapper_for(route.spec, route.mapping)
    envelope = route.envelope
    timed = route.spec is ACTION_INTERACTIONS
    dumps = orjson.dumps

    def convert(value: bytes | None) -> Converted | None:
        # With an envelope, a null or empty value is a tombstone.
        obj = _decode(value) if value or envelope == "none" else None
        row = unwrap(obj, "debezium" if envelope == "debezium" else "none")
        if row is DELETE:
            return None
        record_id, member = mapper.map(row)
        return record_id, member["timestamp"] if timed else time.time(), dumps(member).decode()

    return convert


class Quotas:
    """The limiters of an events route's trackers, by tracking id: the pipeline gives each tracker its own
    batcher, in-flight share and quota (`destinations.DestinationBatcher`), so a throttled tracker's calls
    never hold the slots of the others."""

    def __init__(self, limiters: Mapping[str, Any]) -> None:
        self.limiters = dict(limiters)


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

    def where(self, wanted: dict[int, int], retrying: Callable[[Batch[Any, Item]], bool]) -> dict[int, str]:
        found: dict[int, str] = {}
        for pipeline in self.pipelines.values():
            found.update(pipeline.where(wanted, retrying))
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
