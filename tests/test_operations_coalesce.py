"""The id coalescer, with a fake clock: bursts collapse, windows hold, an id in flight waits, calls carry
distinct ids of one destination, revoked partitions are dropped, and every record ends exactly once."""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from functools import partial

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.personalize.operations.coalesce import Call, Coalescer

Item = tuple[str, int, int]
"""(id, partition, offset): what a test record carries."""

A = "arn:dataset/A"
B = "arn:dataset/B"


def coalescer(window: float = 60.0, max_records: int = 10) -> Coalescer[str, Item]:
    return Coalescer(max_records=max_records, window=window)


def add(
    c: Coalescer[str, Item], record_id: str, offset: int, now: float, partition: int = 0, dest: str = A
) -> Item | None:
    return c.add(dest, record_id, (record_id, partition, offset), partition, offset, now)


def ids(calls: list[Call[str, Item]]) -> list[list[str]]:
    return [call.ids for call in calls]


def test_a_burst_collapses_to_one_update_per_id_the_newest() -> None:
    c = coalescer()
    rng = random.Random(13)
    newest: dict[str, int] = {}
    superseded = 0
    for offset in range(100_000):
        record_id = f"item-{rng.randrange(5000)}"
        newest[record_id] = offset
        if add(c, record_id, offset, now=offset / 100_000) is not None:
            superseded += 1
    assert c.buffered == len(newest) == 5000
    calls = c.take(now=1.0, limit=10_000)
    sent = [item for call in calls for item in call.items]
    assert len(calls) == 500
    assert all(len(set(call.ids)) == len(call.ids) <= 10 for call in calls)
    assert len(sent) == 5000 and superseded == 95_000
    assert {record_id: offset for record_id, _, offset in sent} == newest
    assert c.buffered == 0


def test_a_burst_over_time_sends_each_id_at_most_once_per_window() -> None:
    # 100,000 updates of 5,000 ids over 20 s, at 10 calls a second (the PutItems quota), window 60 s.
    window = 60.0
    c = coalescer(window=window)
    rng = random.Random(7)
    newest: dict[str, int] = {}
    sends: dict[str, list[float]] = defaultdict(list)
    last_sent: dict[str, int] = {}
    superseded = 0
    offset = 0
    now = 0.0
    while now < 1000 and (offset < 100_000 or c.buffered):
        for _ in range(500 if offset < 100_000 else 0):  # 5,000 updates a second for 20 s
            record_id = f"item-{rng.randrange(5000)}"
            newest[record_id] = offset
            superseded += add(c, record_id, offset, now) is not None
            offset += 1
        for call in c.take(now, limit=1):  # 1 call per 0.1 s tick
            for record_id, _, sent_offset in call.items:
                sends[record_id].append(now)
                last_sent[record_id] = sent_offset
            c.done(call)
        now = round(now + 0.1, 1)
    assert c.buffered == 0
    assert last_sent == newest  # the newest state of every id reached Personalize
    total = sum(len(times) for times in sends.values())
    assert total + superseded == 100_000
    assert total <= 2 * 5000  # the first update of each id, then at most one per window
    for times in sends.values():
        assert all(later - earlier >= window - 1e-6 for earlier, later in itertools.pairwise(times))


def test_an_update_within_the_window_waits_for_it() -> None:
    c = coalescer(window=60.0)
    add(c, "x", 1, now=0.0)
    [call] = c.take(now=0.0, limit=10)
    c.done(call)
    add(c, "x", 2, now=5.0)
    add(c, "y", 3, now=5.0)  # another id is not held
    assert ids(c.take(now=5.0, limit=10)) == [["y"]]
    assert c.next_release() == 60.0
    assert c.take(now=59.9, limit=10) == []
    [call] = c.take(now=60.0, limit=10)
    assert call.items == [("x", 0, 2)]
    assert c.next_release() is None


def test_a_newer_update_waits_while_the_older_is_in_flight() -> None:
    c = coalescer(window=0.0)
    add(c, "x", 1, now=0.0)
    [first] = c.take(now=0.0, limit=10)
    assert add(c, "x", 2, now=0.1) is None  # nothing superseded: the one in flight finishes as sent
    assert c.take(now=1.0, limit=10) == []
    assert add(c, "x", 3, now=1.0) == ("x", 0, 2)  # the waiting one is replaced, not the one in flight
    assert first.items == [("x", 0, 1)]
    c.done(first)
    [second] = c.take(now=1.0, limit=10)
    assert second.items == [("x", 0, 3)]


def test_a_permanently_failed_update_does_not_hold_the_newer_one_longer() -> None:
    # The caller dead-letters a rejected record and reports the call done: the newer update of the id
    # goes when the window of the failed send passes, like after any send.
    c = coalescer(window=10.0)
    add(c, "x", 1, now=0.0)
    [call] = c.take(now=0.0, limit=10)
    add(c, "x", 2, now=1.0)
    c.done(call)
    assert c.take(now=9.0, limit=10) == []
    assert ids(c.take(now=10.0, limit=10)) == [["x"]]


def test_calls_carry_distinct_ids_of_one_destination() -> None:
    c = coalescer(window=0.0, max_records=3)
    for offset, (dest, record_id) in enumerate([(A, "x"), (A, "x"), (B, "x"), (A, "y"), (B, "z"), (A, "w"), (A, "v")]):
        add(c, record_id, offset, now=0.0, dest=dest)
    calls = c.take(now=0.0, limit=10)
    assert [(call.destination, call.ids) for call in calls] == [(A, ["x", "y", "w"]), (A, ["v"]), (B, ["x", "z"])]


def test_full_calls_go_first_partial_ones_after_their_linger() -> None:
    c = coalescer(window=0.0, max_records=2)
    add(c, "b1", 1, now=0.0, dest=B)
    add(c, "a1", 2, now=0.5, dest=A)
    add(c, "a2", 3, now=0.5, dest=A)
    assert [call.destination for call in c.take(now=0.5, limit=10, linger=1.0)] == [A]
    assert c.take(now=0.9, limit=10, linger=1.0) == []
    assert [call.ids for call in c.take(now=1.0, limit=10, linger=1.0)] == [["b1"]]


def test_limit_bounds_the_calls() -> None:
    c = coalescer(window=0.0, max_records=1)
    for offset in range(5):
        add(c, f"id{offset}", offset, now=0.0)
    assert len(c.take(now=0.0, limit=2)) == 2
    assert c.buffered == 3 and c.ready() == 3


def test_a_replayed_older_offset_is_superseded_on_arrival() -> None:
    c = coalescer()
    add(c, "x", 10, now=0.0)
    assert add(c, "x", 5, now=0.1) == ("x", 0, 5)  # same partition, older: it changes nothing
    assert add(c, "x", 3, now=0.2, partition=1) == ("x", 0, 10)  # another partition: arrival order
    [call] = c.take(now=1.0, limit=10)
    assert call.items == [("x", 1, 3)]


def test_a_busy_id_keeps_its_place_in_line() -> None:
    c = coalescer(window=0.0, max_records=1)
    add(c, "x", 1, now=0.0)
    add(c, "y", 2, now=0.1)
    add(c, "x", 3, now=0.2)
    assert [call.items for call in c.take(now=1.0, limit=2)] == [[("x", 0, 3)], [("y", 0, 2)]]


def test_drop_removes_a_revoked_partitions_waiting_records() -> None:
    c = coalescer(window=60.0)
    add(c, "held", 1, now=0.0, partition=1)
    [call] = c.take(now=0.0, limit=10)
    c.done(call)
    add(c, "held", 2, now=1.0, partition=1)  # held by its window
    add(c, "ready", 3, now=1.0, partition=1)
    add(c, "kept", 4, now=1.0, partition=2)
    add(c, "in-flight", 5, now=1.0, partition=1)
    [in_flight] = [call for call in c.take(now=1.0, limit=10) if "in-flight" in call.ids]
    add(c, "in-flight", 6, now=1.0, partition=1)  # held by the call in flight
    dropped = c.drop(lambda item: item[1] != 1)
    assert sorted(dropped) == [("held", 1, 2), ("in-flight", 1, 6)]
    assert list(c.items()) == []
    assert c.buffered == 0
    assert c.next_release() is None  # the dropped hold's timer is stale
    c.done(in_flight)
    add(c, "ready", 7, now=2.0, partition=2)
    assert c.take(now=100.0, limit=10)[0].items == [("ready", 2, 7)]


def test_draining_sends_held_ids_at_once_but_never_one_in_flight_twice() -> None:
    c = coalescer(window=60.0)
    add(c, "x", 1, now=0.0)
    add(c, "y", 2, now=0.0)
    calls = c.take(now=0.0, limit=10)
    [call] = calls
    c.done(call)
    add(c, "x", 3, now=1.0)  # held by the window
    assert c.take(now=1.0, limit=10) == []
    c.draining = True
    [drained] = c.take(now=1.0, limit=10)
    assert drained.items == [("x", 0, 3)]
    add(c, "x", 4, now=1.1)  # x is in flight: it still waits for its call
    assert c.take(now=1.1, limit=10) == []
    c.done(drained)
    assert c.take(now=1.2, limit=10)[0].items == [("x", 0, 4)]


def test_remembered_send_times_are_bounded() -> None:
    c: Coalescer[str, Item] = Coalescer(max_records=10, window=3600.0, max_remembered=100)
    for offset in range(1000):
        add(c, f"id{offset}", offset, now=0.0)
    for call in c.take(now=0.0, limit=1000):
        c.done(call)
    c.take(now=1.0, limit=1)
    assert len(c._sent) <= 100
    # Forgotten ids may go again before their window: quota, never correctness.
    add(c, "id0", 2000, now=2.0)
    assert ids(c.take(now=2.0, limit=1)) == [["id0"]]


# --- property test -------------------------------------------------------------------------------

_add = st.tuples(st.just("add"), st.sampled_from([A, B]), st.sampled_from("abc"), st.integers(0, 2))
_take = st.tuples(st.just("take"), st.integers(0, 3))
_done = st.tuples(st.just("done"), st.integers(0, 5))
_ops = st.lists(
    st.one_of(
        # Adds, takes and dones weigh the most: the rules are about their interleavings.
        _add,
        _add,
        _take,
        _take,
        _done,
        _done,
        st.tuples(st.just("tick"), st.sampled_from([0.5, 1.0, 5.0])),  # exact in binary: no rounding at the window
        st.tuples(st.just("drop"), st.integers(0, 2)),
        st.tuples(st.just("drain"), st.booleans()),
    ),
    min_size=20,
    max_size=120,
)


def _not_of(partition: int, item: Item) -> bool:
    return item[1] != partition


@settings(max_examples=300, deadline=None)
@given(ops=_ops, window=st.sampled_from([0.0, 2.0, 10.0]), max_records=st.integers(1, 4))
def test_random_operations_finish_every_record_once_and_keep_the_rules(
    ops: list[tuple[object, ...]], window: float, max_records: int
) -> None:
    c: Coalescer[str, Item] = Coalescer(max_records=max_records, window=window)
    now = 0.0
    offsets = Counter[int]()
    ended: Counter[Item] = Counter()
    added: list[Item] = []
    in_flight: list[Call[str, Item]] = []
    flying: set[tuple[str, str]] = set()
    last_sent: dict[tuple[str, str], float] = {}
    drained_at: float | None = None
    """The last time draining was on: a send after it may be within its id's window."""
    for op in ops:
        if op[0] == "add":
            _, dest, record_id, partition = op
            assert isinstance(dest, str) and isinstance(record_id, str) and isinstance(partition, int)
            offsets[partition] += 1
            item = (f"{dest}/{record_id}", partition, offsets[partition])
            added.append(item)
            old = c.add(dest, record_id, item, partition, offsets[partition], now)
            if old is not None:
                ended[old] += 1
        elif op[0] == "take":
            for call in c.take(now, limit=int(op[1])):  # type: ignore[call-overload]
                assert 1 <= len(call.ids) <= max_records
                assert len(set(call.ids)) == len(call.ids)
                for record_id, item in zip(call.ids, call.items, strict=True):
                    key = (call.destination, record_id)
                    assert item[0] == f"{call.destination}/{record_id}"
                    assert key not in flying  # never two calls of one id at once
                    previous = last_sent.get(key)
                    if previous is not None and (drained_at is None or drained_at < previous):
                        assert now - previous >= window
                    last_sent[key] = now
                    flying.add(key)
                    ended[item] += 1
                in_flight.append(call)
        elif op[0] == "done" and in_flight:
            call = in_flight.pop(int(op[1]) % len(in_flight))  # type: ignore[call-overload]
            c.done(call)
            flying -= {(call.destination, record_id) for record_id in call.ids}
        elif op[0] == "tick":
            now += float(op[1])  # type: ignore[arg-type]
        elif op[0] == "drop":
            revoked = int(op[1])  # type: ignore[call-overload]
            for item in c.drop(partial(_not_of, revoked)):
                ended[item] += 1
        elif op[0] == "drain":
            c.draining = bool(op[1])
        if c.draining:
            drained_at = now
        waiting = list(c.items())
        assert c.buffered == len(waiting) == len(set(waiting))
        assert not set(waiting) & set(ended)
    # Everything left waiting would still end once; nothing ended twice or came from nowhere.
    assert all(count == 1 for count in ended.values())
    assert set(ended) | set(c.items()) == set(added)
