"""What a record becomes on a route: the operation's request member with its batch key, id and order.

One `Convert` per route, chosen here once, so the intake runs one loop for every operation: events
(mapped, deduplicated, batched by session) and items, users, actions, action interactions (one
destination, coalesced or deduplicated by id). Raises `InvalidRecord` for a dead letter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka.structs import TopicPartition

from worker.config import MappingSettings
from worker.errors import ConfigError
from worker.flow.items import Record
from worker.flow.routes import Route
from worker.mapping.mapper import InvalidRecord, Mapper
from worker.personalize.operations.envelope import DELETE, unwrap
from worker.personalize.operations.records import mapper_for
from worker.personalize.operations.spec import ACTION_INTERACTIONS, EVENTS

if TYPE_CHECKING:
    from worker.mapping.schemas import Schemas

EXCERPT = 40

Converted = tuple[str, float, str]
"""(the record's id — eventId or the item/user/action id —, its order in time, the member as JSON)."""

Member = tuple[Any, str, float, str]
"""(batch key, dedup or coalescing id, order in time, the member as JSON): what `Item` carries of it."""

Convert = Callable[[Record, TopicPartition], Member | None]
"""A fetched record → its member, or None when it is rightly not sent (filtered out, or a delete)."""


def record_converter(route: Route, schemas: Schemas | None = None) -> Convert:
    """The route's `Convert`. `schemas`: registry formats decode with the writer's schema first (the
    source resolved it before intake)."""
    if route.spec is not EVENTS:
        return _members(converter(route), route.destinations[0][1])
    assert isinstance(route.mapping, MappingSettings)
    mapper = Mapper(route.mapping)
    map_value: Callable[[bytes | None], Any] = mapper.map if schemas is None else schemas.mapping(mapper)
    if route.tracking_id_field:
        decode = None if schemas is None else schemas.objects()
        map_value = tracked_events(mapper, route.tracking_id_field, dict(route.destinations), decode)
    # A mapping reading `_kafka.*` or a layout built from headers is handed the whole record.
    if mapper.reads_record:
        if route.tracking_id_field:
            raise ConfigError(f"route {route.name}: tracking_id_field with _kafka.* or a layout is not supported")
        return _events_of_records(mapper.map_record)
    return _events(map_value)


def _events(map_value: Callable[[bytes | None], Any]) -> Convert:
    dumps = orjson.dumps

    def convert(record: Record, partition: TopicPartition) -> Member | None:
        mapped = map_value(record.value)
        if mapped is None:
            return None
        key, event = mapped
        return key, event["eventId"], event["sentAt"], dumps(event).decode()

    return convert


def _events_of_records(map_record: Callable[[Record, str, int], Any]) -> Convert:
    dumps = orjson.dumps

    def convert(record: Record, partition: TopicPartition) -> Member | None:
        mapped = map_record(record, partition.topic, partition.partition)
        if mapped is None:
            return None
        key, event = mapped
        return key, event["eventId"], event["sentAt"], dumps(event).decode()

    return convert


def _members(convert_value: Callable[[bytes | None], Converted | None], destination: str) -> Convert:
    def convert(record: Record, partition: TopicPartition) -> Member | None:
        converted = convert_value(record.value)
        if converted is None:
            return None
        record_id, order, member = converted
        return destination, record_id, order, member

    return convert


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
