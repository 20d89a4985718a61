"""Routes: each one source topics → decode → mapping → one Personalize operation → a destination.

`resolve` turns the settings into `Route`s (the single-flow file is one route named `default`), with
the defaults each operation and the top-level sections give. What a record becomes is `convert`'s;
running every route's pipeline behind one face is `fanout`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from worker.config import MappingSettings, Settings
from worker.personalize.operations.settings import OperationMapping
from worker.personalize.operations.spec import EVENTS, SPECS, OperationSpec

if TYPE_CHECKING:
    from worker.mapping.schemas import Schemas, TopicSchemas
    from worker.observe.metrics import Metrics


class Route(NamedTuple):
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


class Quotas:
    """The limiters of an events route's trackers, by tracking id: the pipeline gives each tracker its own
    batcher, in-flight share and quota (`destinations.DestinationBatcher`), so a throttled tracker's calls
    never hold the slots of the others."""

    def __init__(self, limiters: Mapping[str, Any]) -> None:
        self.limiters = dict(limiters)


def route_schemas(
    settings: Settings, routes: list[Route], metrics: Metrics
) -> tuple[Schemas | TopicSchemas | None, dict[str, Schemas]]:
    """What the source resolves schema ids with (None: every route reads JSON), and per route reading a
    schema-registry format its `Schemas` — one per format, shared by the routes using it; "" for the single
    flow's. Avro and Protobuf runtimes load only for those who use them."""
    if not settings.routes:
        if settings.mapping.format == "json":
            return None, {}
        from worker.mapping.schemas import Schemas

        single = Schemas(settings, metrics)
        return single, {"": single}
    by_format: dict[str, Schemas] = {}
    found: dict[str, Schemas] = {}
    for route in routes:
        fmt = route.mapping.format if isinstance(route.mapping, MappingSettings) else "json"
        if fmt != "json":
            from worker.mapping.schemas import Schemas

            if fmt not in by_format:
                by_format[fmt] = Schemas(settings, metrics, format=fmt)
            found[route.name] = by_format[fmt]
    if not found:
        return None, found
    from worker.mapping.schemas import TopicSchemas

    by_topic = {topic: found[r.name] for r in routes if r.name in found for topic in r.topics}
    return TopicSchemas(by_topic), found
