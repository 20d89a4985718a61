"""Debezium change events: creates, updates and snapshot reads upsert `after`; deletes, truncates and
tombstones are DELETE; anything else is refused, not guessed."""

from __future__ import annotations

from typing import Any

import pytest

from worker.mapping.mapper import InvalidRecord
from worker.personalize.operations.envelope import DELETE, debezium, unwrap

ROW = {"item_id": "i-1", "title": "T"}


def change(op: str, after: Any = ROW, before: Any = None) -> dict[str, Any]:
    return {"before": before, "after": after, "source": {"table": "items"}, "op": op, "ts_ms": 1}


@pytest.mark.parametrize("op", ["c", "u", "r"])
def test_create_update_and_snapshot_read_upsert_the_after_row(op: str) -> None:
    assert debezium(change(op)) == ROW
    # The JSON converter with schemas enabled wraps the change in `payload`.
    assert debezium({"schema": {"type": "struct"}, "payload": change(op)}) == ROW


@pytest.mark.parametrize("op", ["d", "t"])
def test_delete_and_truncate_are_delete(op: str) -> None:
    assert debezium(change(op, after=None, before=ROW)) is DELETE
    assert debezium({"schema": {}, "payload": change(op, after=None)}) is DELETE


def test_tombstones_are_delete() -> None:
    assert debezium(None) is DELETE
    assert debezium({"schema": None, "payload": None}) is DELETE
    assert unwrap(None, "debezium") is DELETE
    assert unwrap(None, "none") is DELETE


@pytest.mark.parametrize(
    ("value", "reason", "words"),
    [
        (change("c", after=None), "bad_envelope", "missing"),
        (change("u", after=["not", "a", "row"]), "bad_envelope", "not an object"),
        ({k: v for k, v in change("c").items() if k != "after"}, "bad_envelope", "missing"),
        (change("m"), "bad_envelope", "'m'"),
        (ROW, "bad_envelope", "op: missing"),  # a plain row: the route is misconfigured, not a change event
        ({"payload": "c"}, "bad_envelope", "payload"),
        ([change("c")], "not_object", "list"),
        ("c", "not_object", "str"),
    ],
)
def test_not_a_change_event_is_refused(value: Any, reason: str, words: str) -> None:
    with pytest.raises(InvalidRecord) as caught:
        debezium(value)
    assert caught.value.reason == reason
    assert words in caught.value.message


def test_no_envelope_passes_objects_through() -> None:
    assert unwrap(ROW, "none") is ROW
    assert unwrap(change("d"), "none") == change("d")  # without an envelope, `op` is just a field
    with pytest.raises(InvalidRecord):
        unwrap([ROW], "none")
    assert unwrap(change("u"), "debezium") == ROW
