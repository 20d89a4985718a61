"""What the emulator keeps of the traffic: accepted calls per operation (for ``/_emulator/<kind>`` and
``--record``) and counters overall, per operation and per destination (for ``/_emulator/stats``)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from worker.emulator.faults import MAX_DESTINATIONS, OTHER
from worker.emulator.model import Operation


class CallLog:
    """Accepted calls of one operation, kept as raw request bytes (far smaller than parsed dicts)
    and expanded into one line per record only when read."""

    def __init__(self, operation: Operation) -> None:
        self.operation = operation
        self.calls: list[tuple[bytes, str, float]] = []
        self.starts: list[int] = []
        self.records = 0

    def add(self, raw: bytes, count: int, request_id: str, received_at: float) -> None:
        self.starts.append(self.records)
        self.calls.append((raw, request_id, received_at))
        self.records += count

    def expand(self, doc: dict[str, Any], request_id: str, received_at: float) -> Iterator[dict[str, Any]]:
        context = {member: doc.get(member) for member in self.operation.context_members}
        context["request_id"] = request_id
        context["received_at"] = received_at
        for record in doc[self.operation.records_member]:
            yield {**record, **context}

    def lines(self, since: int = 0) -> Iterator[bytes]:
        """ndjson lines from record ``since`` on; works on a snapshot, so appends and resets are safe."""
        calls, starts, count = self.calls, self.starts, len(self.calls)
        first = max(bisect.bisect_right(starts, since, 0, count) - 1, 0)
        for index in range(first, count):
            raw, request_id, received_at = calls[index]
            records = self.expand(orjson.loads(raw), request_id, received_at)
            for position, record in enumerate(records, start=starts[index]):
                if position >= since:
                    yield orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


@dataclass
class Stats:
    requests: int = 0
    events: int = 0
    duplicate_events: int = 0
    events_without_id: int = 0
    throttled: int = 0
    calls: int = 0
    max_events_per_call: int = 0


@dataclass(slots=True)
class Tally:
    """Calls accepted, records in them, and requests throttled, for one operation or destination."""

    calls: int = 0
    records: int = 0
    throttled: int = 0


class Tallies:
    """Counters per operation and per (operation, destination), so tests can assert that two trackers or
    datasets filled their own quotas. Destinations past ``limit`` are counted together under ``OTHER``."""

    def __init__(self, limit: int = MAX_DESTINATIONS) -> None:
        self._limit = limit
        self.operations: dict[str, Tally] = {}
        self.destinations: dict[tuple[str, str], Tally] = {}

    def _pair(self, operation: str, destination: str | None) -> tuple[Tally, Tally | None]:
        total = self.operations.get(operation)
        if total is None:
            total = self.operations[operation] = Tally()
        if destination is None:
            return total, None
        tally = self.destinations.get((operation, destination))
        if tally is None:
            if len(self.destinations) >= self._limit:
                destination = OTHER
                tally = self.destinations.get((operation, destination))
            if tally is None:
                tally = self.destinations[(operation, destination)] = Tally()
        return total, tally

    def accepted(self, operation: str, destination: str | None, records: int) -> None:
        for tally in self._pair(operation, destination):
            if tally is not None:
                tally.calls += 1
                tally.records += records

    def throttled(self, operation: str, destination: str | None) -> None:
        for tally in self._pair(operation, destination):
            if tally is not None:
                tally.throttled += 1

    def snapshot(self) -> dict[str, Any]:
        """``{"operations": {op: tally}, "destinations": {op: {destination: tally}}}`` as plain dicts."""
        by_destination: dict[str, dict[str, Any]] = {}
        for (operation, destination), tally in self.destinations.items():
            by_destination.setdefault(operation, {})[destination] = asdict(tally)
        return {
            "operations": {operation: asdict(tally) for operation, tally in self.operations.items()},
            "destinations": by_destination,
        }
