"""Change-data-capture envelopes: a row change → the row to upsert, or a DELETE marker.

`envelope = "debezium"` reads Debezium's change events, with or without the JSON converter's schema
wrapper (`{"schema": ..., "payload": {...}}`). Creates, updates and snapshot reads upsert the `after`
row. Deletes, tombstones (a null value, which Debezium sends after each delete so compaction can drop
the key) and truncates become `DELETE`: the Personalize Events API has no streaming delete (removing
users or items is a batch data-deletion job), so such records are finished as `deleted` and counted,
never sent and never dead-lettered. Anything else is not a change event and raises `InvalidRecord`.
"""

from __future__ import annotations

import enum
from typing import Any, Final, Literal

from worker.mapping.mapper import InvalidRecord

Envelope = Literal["none", "debezium"]


class Delete(enum.Enum):
    """The type of the one marker value `DELETE`."""

    DELETE = "delete"


DELETE: Final = Delete.DELETE

UPSERT_OPS: Final = frozenset({"c", "u", "r"})
"""create, update, read (a snapshot row)."""
DELETE_OPS: Final = frozenset({"d", "t"})
"""delete, truncate (a whole table emptied: no row to send either)."""


def unwrap(value: Any, envelope: Envelope) -> dict[str, Any] | Literal[Delete.DELETE]:
    """The row a decoded record carries, or DELETE. `value` is None for a tombstone (a null Kafka value)."""
    if envelope == "none":
        if value is None:
            return DELETE
        if type(value) is not dict:
            raise InvalidRecord("decode", "not_object", f"expected a JSON object, got {type(value).__name__}")
        return value
    return debezium(value)


def debezium(value: Any) -> dict[str, Any] | Literal[Delete.DELETE]:
    """Debezium's change event (`op`, `before`, `after`), bare or under the JSON converter's `payload`."""
    if value is None:
        return DELETE
    if type(value) is not dict:
        raise InvalidRecord("decode", "not_object", f"expected a change event object, got {type(value).__name__}")
    change = value.get("payload", value) if "op" not in value else value
    if change is None:  # `{"schema": ..., "payload": null}`: the JSON converter's tombstone
        return DELETE
    if type(change) is not dict:
        raise InvalidRecord("mapping", "bad_envelope", "payload: expected a change event object")
    op = change.get("op")
    if op in UPSERT_OPS:
        after = change.get("after")
        if type(after) is not dict:
            shown = "missing" if after is None else f"not an object ({type(after).__name__})"
            raise InvalidRecord("mapping", "bad_envelope", f"after: a change with op {op!r} has its row {shown}")
        return after
    if op in DELETE_OPS:
        return DELETE
    shown = "missing" if op is None else repr(op)[:20]
    raise InvalidRecord("mapping", "bad_envelope", f"op: {shown} is not a Debezium row change (c, u, r, d, t)")
