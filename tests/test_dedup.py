"""Dedup: delivered IDs are remembered for a window, copies wait on the first in flight."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

import worker.flow.dedup
from worker.flow.dedup import NEW, PARKED, SEEN, Dedup


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(window: float = 60.0, max_ids: int = 100) -> tuple[Dedup[str], Clock]:
    clock = Clock()
    return Dedup(window, max_ids, clock), clock


def test_first_copy_is_new_and_not_yet_seen() -> None:
    dedup, _ = make()
    assert dedup.admit("a", "a#1") == NEW
    assert len(dedup) == 0  # in flight is not delivered


def test_copy_while_first_is_in_flight_is_parked_then_duplicate_on_delivery() -> None:
    dedup, _ = make()
    assert dedup.admit("a", "a#1") == NEW
    assert dedup.admit("a", "a#2") == PARKED
    assert dedup.admit("a", "a#3") == PARKED
    assert dedup.admit("b", "b#1") == NEW
    assert dedup.delivered(["a"]) == ["a#2", "a#3"]
    assert dedup.admit("a", "a#4") == SEEN
    assert dedup.admit("b", "b#2") == PARKED  # b is still in flight


def test_failed_first_copy_hands_back_its_parked_copies_and_is_forgotten() -> None:
    dedup, _ = make()
    dedup.admit("a", "a#1")
    dedup.admit("a", "a#2")
    dedup.admit("a", "a#3")
    assert dedup.failed("a") == ["a#2", "a#3"]
    assert dedup.failed("a") == []
    # The first parked copy is re-admitted as the new first; the other waits on it.
    assert dedup.admit("a", "a#2") == NEW
    assert dedup.admit("a", "a#3") == PARKED
    assert dedup.delivered(["a"]) == ["a#3"]
    assert dedup.admit("a", "a#5") == SEEN


def test_failed_without_copies_returns_nothing_and_id_is_new_again() -> None:
    dedup, _ = make()
    dedup.admit("a", "a#1")
    assert dedup.failed("a") == []
    assert dedup.admit("a", "a#2") == NEW


def test_delivered_without_copies_returns_nothing() -> None:
    dedup, _ = make()
    dedup.admit("a", "a#1")
    assert dedup.delivered(["a"]) == []
    assert len(dedup) == 1


def test_window_expiry_makes_an_id_new_again() -> None:
    dedup, clock = make(window=60.0)
    dedup.admit("a", "a#1")
    dedup.delivered(["a"])
    clock.now += 59.0
    assert dedup.admit("a", "a#2") == SEEN
    clock.now += 1.0
    # Exactly one window after delivery, without any other delivery to trigger eviction.
    assert dedup.admit("a", "a#3") == NEW


def test_expired_ids_are_evicted_by_later_deliveries() -> None:
    dedup, clock = make(window=60.0)
    dedup.admit("a", "a#1")
    dedup.delivered(["a"])
    clock.now += 30.0
    dedup.admit("b", "b#1")
    dedup.delivered(["b"])
    clock.now += 31.0
    dedup.admit("c", "c#1")
    dedup.delivered(["c"])
    assert len(dedup) == 2  # a is gone, b and c remain
    assert dedup.admit("b", "b#2") == SEEN
    assert dedup.admit("a", "a#2") == NEW


def test_redelivery_refreshes_the_window() -> None:
    dedup, clock = make(window=60.0)
    dedup.delivered(["a"])
    clock.now += 50.0
    dedup.delivered(["a", "b"])
    clock.now += 50.0
    dedup.delivered(["c"])
    assert dedup.admit("a", "a#2") == SEEN
    assert len(dedup) == 3


def test_max_ids_evicts_the_oldest_first() -> None:
    dedup, clock = make(window=3600.0, max_ids=3)
    for event_id in "abcde":
        dedup.admit(event_id, event_id)
        dedup.delivered([event_id])
        clock.now += 1.0
        assert len(dedup) <= 3
    assert len(dedup) == 3
    assert [dedup.admit(e, e + "#2") for e in "cde"] == [SEEN, SEEN, SEEN]
    assert dedup.admit("a", "a#2") == NEW
    assert dedup.admit("b", "b#2") == NEW


def test_window_zero_disables_remembering_but_still_parks_copies() -> None:
    dedup, _ = make(window=0.0)
    assert not dedup.enabled
    assert dedup.admit("a", "a#1") == NEW
    assert dedup.admit("a", "a#2") == PARKED
    assert dedup.delivered(["a"]) == ["a#2"]
    assert len(dedup) == 0
    assert dedup.admit("a", "a#3") == NEW


def test_max_ids_zero_disables_remembering() -> None:
    dedup, _ = make(max_ids=0)
    assert not dedup.enabled
    dedup.delivered(["a"])
    assert len(dedup) == 0
    assert dedup.admit("a", "a#1") == NEW


def test_forget_in_flight_drops_only_unowned_parked_copies() -> None:
    dedup, _ = make()
    dedup.admit("a", "p0:a#1")
    dedup.admit("a", "p1:a#2")
    dedup.admit("a", "p0:a#3")
    dedup.admit("b", "p1:b#1")
    dedup.admit("b", "p1:b#2")
    dedup.forget_in_flight(lambda item: not item.startswith("p1:"))
    assert dedup.delivered(["a"]) == ["p0:a#3"]
    assert dedup.failed("b") == []
    # The first copies are still tracked: their own outcome arrives later.
    dedup.admit("c", "p0:c#1")
    dedup.forget_in_flight(lambda item: False)
    assert dedup.admit("c", "p0:c#2") == PARKED


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["admit", "deliver", "fail", "tick"]), st.integers(0, 30)), max_size=200),
    max_ids=st.integers(1, 8),
)
def test_remembered_ids_never_exceed_max_ids(ops: list[tuple[str, int]], max_ids: int) -> None:
    dedup, clock = make(window=50.0, max_ids=max_ids)
    for op, n in ops:
        event_id = f"e{n}"
        if op == "admit":
            dedup.admit(event_id, event_id)
        elif op == "deliver":
            dedup.delivered([event_id, f"e{n + 1}"])
        elif op == "fail":
            dedup.failed(event_id)
        else:
            clock.now += n
        assert len(dedup) <= max_ids


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["admit", "deliver", "fail"]), st.integers(0, 5)), max_size=80))
def test_every_copy_is_returned_exactly_once(ops: list[tuple[str, int]]) -> None:
    """Model check: a copy is NEW, SEEN, or PARKED and later handed back by delivered()/failed()."""
    dedup, _ = make()
    counter = 0
    first: dict[str, str] = {}
    handed_back: list[str] = []
    finals: set[str] = set()
    parked: set[str] = set()
    for op, n in ops:
        event_id = f"e{n}"
        if op == "admit":
            counter += 1
            item = f"{event_id}#{counter}"
            verdict = dedup.admit(event_id, item)
            if verdict == NEW:
                assert event_id not in first
                first[event_id] = item
            elif verdict == SEEN:
                finals.add(item)
            else:
                assert event_id in first
                parked.add(item)
        elif event_id in first:
            del first[event_id]
            if op == "deliver":
                back = dedup.delivered([event_id])
                finals.update(back)
            else:
                back = dedup.failed(event_id)
            handed_back.extend(back)
            assert all(item.startswith(event_id + "#") for item in back)
    assert len(handed_back) == len(set(handed_back))
    assert set(handed_back) <= parked
    assert not finals & set(first.values())


class Reference:
    """The window in its plainest form, an OrderedDict: what `Dedup`'s chunked order must behave as."""

    def __init__(self, window: float, max_ids: int) -> None:
        self.window, self.max_ids = window, max_ids
        self.entries: OrderedDict[str, float] = OrderedDict()

    def seen(self, event_id: str, now: float) -> bool:
        at = self.entries.get(event_id)
        return at is not None and at > now - self.window

    def delivered(self, event_ids: list[str], now: float) -> None:
        for event_id in event_ids:
            self.entries.pop(event_id, None)
            self.entries[event_id] = now
        while len(self.entries) > self.max_ids or (
            self.entries and next(iter(self.entries.values())) <= now - self.window
        ):
            self.entries.popitem(last=False)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["admit", "deliver", "tick"]), st.lists(st.integers(0, 40), min_size=1, max_size=12)),
        max_size=300,
    ),
    max_ids=st.integers(1, 30),
    chunk=st.sampled_from([1, 3, 1024]),
)
def test_window_matches_a_plain_ordered_dict(ops: list[tuple[str, list[int]]], max_ids: int, chunk: int) -> None:
    """Redeliveries, expiry and the size cap in any mix: the same IDs are seen, the same count kept."""
    saved, worker.flow.dedup.CHUNK = worker.flow.dedup.CHUNK, chunk
    try:
        dedup, clock = make(window=20.0, max_ids=max_ids)
        reference = Reference(20.0, max_ids)
        for op, numbers in ops:
            ids = [f"e{n}" for n in numbers]
            if op == "tick":
                clock.now += numbers[0] / 4
            elif op == "deliver":
                dedup.delivered(ids)
                reference.delivered(ids, clock.now)
                assert len(dedup) == len(reference.entries)
            else:
                for event_id in ids:
                    assert (dedup.admit(event_id, event_id) == SEEN) == reference.seen(event_id, clock.now)
                    dedup.failed(event_id)
    finally:
        worker.flow.dedup.CHUNK = saved
