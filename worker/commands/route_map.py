"""`personalize-worker map --route NAME`: one route's mapping over JSON lines, as its pipeline would see them.

Each line shows the request member it becomes, the call's destination members, its batch key (events:
tracker, session, user) or its coalescing key (items/users/actions: the id, the newest line wins), or why
it would be dead-lettered; then a summary. No AWS, no Kafka: the route's own mapper and converter.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable
from typing import IO, Any

import orjson

from worker.config import MappingSettings, Settings
from worker.flow.convert import converter, tracked_events
from worker.flow.dedup import NEW, Dedup
from worker.flow.routes import Route, resolve
from worker.mapping.mapper import InvalidRecord, Mapper
from worker.personalize.operations.spec import EVENTS


def describe_routes(settings: Settings) -> str:
    """One line per route, for a `map` that was not told which one."""
    return "\n".join(f"  {r.name}: {r.spec.key} ({r.spec.name}) from {', '.join(r.topics)}" for r in resolve(settings))


def find(settings: Settings, name: str) -> Route | None:
    return next((r for r in resolve(settings) if r.name == name), None)


def _events(route: Route) -> Callable[[bytes], Any]:
    """Line → ((trackingId, sessionId, userId), event) or None (filtered)."""
    assert isinstance(route.mapping, MappingSettings)
    mapper = Mapper(route.mapping)
    if route.tracking_id_field:
        return tracked_events(mapper, route.tracking_id_field, dict(route.destinations))
    tracking_id = route.destinations[0][1]

    def map_event(line: bytes) -> Any:
        mapped = mapper.map(line)
        return None if mapped is None else ((tracking_id, *mapped[0]), mapped[1])

    return map_event


def dry_run_route(route: Route, lines: Iterable[bytes], out: IO[str]) -> dict[str, Any]:
    """Write one JSON entry per line and a summary; returns the summary."""
    events = route.spec is EVENTS
    map_event = _events(route) if events else None
    convert = None if events else converter(route)
    dedup: Dedup[int] = Dedup(float("inf"), sys.maxsize, lambda: 0.0)
    waiting: dict[str, int] = {}  # coalesced id → the line whose update waits
    open_calls: dict[Any, list[int]] = {}  # batch key → [call number, records in it]
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    calls = 0
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        outcomes["lines"] += 1
        entry: dict[str, Any] = {"line": number, "route": route.name}
        try:
            if map_event is not None:
                mapped = map_event(line)
                if mapped is None:
                    outcomes["filtered"] += 1
                    entry["filtered"] = True
                    out.write(orjson.dumps(entry).decode() + "\n")
                    continue
                key, member = mapped
                record_id = member["eventId"]
                request = {"trackingId": key[0], "sessionId": key[1]} | ({"userId": key[2]} if key[2] else {})
            else:
                assert convert is not None
                converted = convert(line)
                if converted is None:
                    outcomes["deleted"] += 1
                    entry["deleted"] = "no streaming delete exists: finishes as deleted, nothing is sent"
                    out.write(orjson.dumps(entry).decode() + "\n")
                    continue
                record_id, _, text = converted
                member = orjson.loads(text)
                key = route.destinations[0][1]
                request = {route.spec.destination: key}
        except InvalidRecord as error:
            outcomes["dead_lettered"] += 1
            reasons[error.reason] += 1
            entry["dead_letter"] = {"stage": error.stage, "reason": error.reason, "message": error.message}
            out.write(orjson.dumps(entry).decode() + "\n")
            continue
        if route.spec.coalesced:
            entry["coalescing_key"] = record_id
            older = waiting.get(record_id)
            waiting[record_id] = number
            if older is not None:
                outcomes["superseded"] += 1
                entry["supersedes_line"] = older  # that line finishes as superseded; this one is sent
                out.write(orjson.dumps({**entry, "request": request, route.spec.list_member: member}).decode() + "\n")
                continue
        else:
            entry["dedup_key"] = record_id
            if dedup.admit(record_id, number) != NEW:
                outcomes["duplicates"] += 1
                entry["duplicate_of"] = record_id
                out.write(orjson.dumps(entry).decode() + "\n")
                continue
            dedup.delivered([record_id])
            entry["batch_key"] = list(key) if isinstance(key, tuple) else key
        current = open_calls.get(key)
        if current is None:
            current = open_calls[key] = [calls, 0]
            calls += 1
        current[1] += 1
        if current[1] == route.max_records:
            del open_calls[key]
        outcomes["records"] += 1
        entry.update(call=current[0], request=request)
        entry[route.spec.list_member] = member
        out.write(orjson.dumps(entry).decode() + "\n")
    summary = {
        "route": route.name,
        "operation": route.spec.name,
        **{k: outcomes[k] for k in ("lines", "records", "duplicates", "superseded", "deleted", "filtered")},
        "dead_lettered": outcomes["dead_lettered"],
        "dead_letter_reasons": dict(reasons),
        "calls": calls,
    }
    out.write(orjson.dumps({"summary": summary}).decode() + "\n")
    return summary
