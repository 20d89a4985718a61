"""`personalize-worker map`: lines (or records read back by `replay`) through the mapping, dedup and batching
as `run` would, printing the call each would join or why it would be dead-lettered. Sends nothing.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any

import orjson

from worker.config import Settings
from worker.flow.dedup import NEW, Dedup
from worker.mapping.mapper import InvalidRecord, Mapper, SessionKey

if TYPE_CHECKING:
    from worker.mapping.schemas import Schemas


def dry_run(
    settings: Settings,
    lines: Iterable[bytes],
    out: IO[str],
    *,
    schemas: Schemas | None = None,
    offsets: Sequence[int] | None = None,
) -> dict[str, Any]:
    """For each line: the call it would join, or why it would be dead-lettered; then a summary.

    With `schemas` the lines are framed record values (see worker.commands.replay): each entry also shows its schema
    id and the decoded object. With `offsets` (records read from Kafka) each entry names its offset."""
    mapper = Mapper(settings.mapping)
    map_record = mapper.map if schemas is None else schemas.mapping(mapper)
    if mapper.reads_record:  # `_kafka.*` or a layout: each line stands for a record (see LineRecord)
        from worker.mapping.layouts import LineRecord

        layout = settings.mapping.layout
        map_record = lambda line: mapper.map_record(LineRecord(line or b"", 0, layout))  # noqa: E731
    dedup: Dedup[int] = Dedup(float("inf"), sys.maxsize, lambda: 0.0)
    open_calls: dict[SessionKey, list[int]] = {}  # session → [call number, events in it]
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    next_call = 0
    tsv = settings.mapping.layout == "snowplow_tsv"
    for number, raw in enumerate(lines, start=1):
        # A Snowplow TSV line ends in tabs when its last fields are empty: only the line break goes.
        line = raw if schemas is not None else raw.rstrip(b"\r\n") if tsv else raw.strip()
        if not line and offsets is None:
            continue
        outcomes["lines"] += 1
        entry: dict[str, Any] = {"line": number}
        if offsets is not None:
            entry["offset"] = offsets[number - 1]
        if schemas is not None:
            entry.update(schema_id=schemas.schema_id_of(line), decoded=schemas.decoded(line))
        try:
            mapped = map_record(line)
        except InvalidRecord as error:
            outcomes["dead_lettered"] += 1
            reasons[error.reason] += 1
            entry["dead_letter"] = {"stage": error.stage, "reason": error.reason, "message": error.message}
            mapped = None
        else:
            if mapped is None:
                outcomes["filtered"] += 1
                entry["filtered"] = True
        if mapped is not None:
            key, event = mapped
            if dedup.admit(event["eventId"], number) != NEW:
                outcomes["duplicates"] += 1
                entry["duplicate_of_event_id"] = event["eventId"]
            else:
                dedup.delivered([event["eventId"]])
                current = open_calls.get(key)
                if current is None:
                    current = open_calls[key] = [next_call, 0]
                    next_call += 1
                call = current[0]
                current[1] += 1
                if current[1] == settings.batching.max_events:
                    del open_calls[key]
                outcomes["events"] += 1
                request = {"trackingId": settings.personalize.tracking_id, "sessionId": key[0]}
                if key[1] is not None:
                    request["userId"] = key[1]
                entry.update(call=call, request=request, event=event)
        out.write(orjson.dumps(entry).decode() + "\n")
    summary = {
        **{k: outcomes[k] for k in ("lines", "events", "duplicates", "filtered", "dead_lettered")},
        "dead_letter_reasons": dict(reasons),
        "calls": next_call,
        "events_per_call": round(outcomes["events"] / next_call, 2) if next_call else 0.0,
    }
    out.write(orjson.dumps({"summary": summary}).decode() + "\n")
    return summary
