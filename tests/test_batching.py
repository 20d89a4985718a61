"""Batcher: full and lingered batches, calls in flight per session, flush and drop (more in test_hot_session)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.flow.batching import Batch, Batcher

LINGER = 0.5
MANY = 1000


def items(batches: list[Batch[str, str]]) -> list[list[str]]:
    return [batch.items for batch in batches]


def test_full_batch_is_ready_immediately() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=3)
    for n in range(3):
        batcher.add("a", f"a{n}", now=0.0)
    assert batcher.buffered == 3
    taken = batcher.take(now=0.0, linger=LINGER, limit=MANY)
    assert items(taken) == [["a0", "a1", "a2"]]
    assert taken[0].key == "a"
    assert batcher.buffered == 0
    assert batcher.oldest_open() is None


def test_partial_batch_waits_for_its_linger_then_goes() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=10)
    batcher.add("a", "a0", now=10.0)
    batcher.add("a", "a1", now=10.3)
    assert batcher.oldest_open() == 10.0
    assert batcher.take(now=10.3, linger=LINGER, limit=MANY) == [], "young: it stays open to fill"
    assert batcher.take(now=10.5, linger=LINGER, limit=0) == [], "no call allowed"
    assert batcher.buffered == 2
    assert items(batcher.take(now=10.5, linger=LINGER, limit=1)) == [["a0", "a1"]]
    assert batcher.buffered == 0


def test_linger_zero_sends_at_once() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=10)
    batcher.add("a", "a0", now=1.0)
    assert items(batcher.take(now=1.0, linger=0.0, limit=MANY)) == [["a0"]]


def test_partial_batches_leave_in_creation_order_up_to_the_limit() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=10)
    batcher.add("b", "b0", now=0.0)
    batcher.add("a", "a0", now=0.1)
    batcher.add("c", "c0", now=0.2)
    batcher.add("d", "d0", now=0.9)
    assert items(batcher.take(now=1.0, linger=LINGER, limit=2)) == [["b0"], ["a0"]]
    assert items(batcher.take(now=1.0, linger=LINGER, limit=1)) == [["c0"]]
    assert batcher.oldest_open() == 0.9
    assert batcher.take(now=1.0, linger=LINGER, limit=5) == [], "d is younger than the linger"
    assert items(batcher.take(now=1.0, linger=0.0, limit=5)) == [["d0"]]


def test_when_calls_are_scarce_overdue_then_full_then_lingered_partial() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=2)
    batcher.add("overdue", "o0", now=0.0)
    batcher.add("lingered", "l0", now=4.0)
    batcher.add("young", "y0", now=4.9)
    batcher.add("full", "f0", now=5.0)
    batcher.add("full", "f1", now=5.0)
    take = functools.partial(batcher.take, now=5.0, linger=LINGER, limit=1, max_wait=4 * LINGER)
    assert items(take()) == [["o0"]], "waited past max_wait: goes before full batches"
    assert items(take()) == [["f0", "f1"]]
    assert items(take()) == [["l0"]]
    assert take() == [], "the young partial batch keeps filling"
    assert batcher.buffered == 1


def test_one_batch_per_session_in_flight_and_order_kept() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=2)
    for n in range(5):
        batcher.add("a", f"a{n}", now=0.0)
    batcher.add("b", "b0", now=0.0)
    batcher.add("b", "b1", now=0.0)
    first = batcher.take(now=10.0, linger=LINGER, limit=MANY)
    assert items(first) == [["a0", "a1"], ["b0", "b1"]]
    assert batcher.buffered == 3
    assert batcher.take(now=10.0, linger=LINGER, limit=MANY) == []  # a is busy
    batcher.done("b")
    assert batcher.take(now=10.0, linger=LINGER, limit=MANY) == []  # b freed, but has nothing
    batcher.done("a")
    assert items(batcher.take(now=10.0, linger=LINGER, limit=MANY)) == [["a2", "a3"]]
    batcher.done("a")
    assert items(batcher.take(now=10.0, linger=LINGER, limit=MANY)) == [["a4"]]
    assert batcher.buffered == 0
    batcher.done("a")
    batcher.add("a", "a5", now=11.0)
    batcher.add("a", "a6", now=11.0)
    assert items(batcher.take(now=11.0, linger=LINGER, limit=MANY)) == [["a5", "a6"]]


def test_items_added_while_busy_go_out_after_the_call_finishes() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=10)
    batcher.add("a", "a0", now=0.0)
    assert items(batcher.take(now=1.0, linger=LINGER, limit=MANY)) == [["a0"]]
    batcher.add("a", "a1", now=1.0)
    assert batcher.take(now=5.0, linger=LINGER, limit=MANY) == []
    assert batcher.buffered == 1
    batcher.done("a")
    assert items(batcher.take(now=5.0, linger=LINGER, limit=MANY)) == [["a1"]]


def test_flush_makes_every_open_batch_ready() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=10)
    batcher.add("a", "a0", now=0.0)
    batcher.add("b", "b0", now=0.0)
    batcher.add("b", "b1", now=0.0)
    assert batcher.take(now=0.0, linger=LINGER, limit=0) == []
    batcher.flush()
    assert batcher.oldest_open() is None
    assert items(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == [["a0"], ["b0", "b1"]]


def test_flush_respects_a_busy_session() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=10)
    batcher.add("a", "a0", now=0.0)
    batcher.flush()
    assert len(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == 1
    batcher.add("a", "a1", now=0.0)
    batcher.flush()
    assert batcher.take(now=0.0, linger=LINGER, limit=MANY) == []
    batcher.done("a")
    assert items(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == [["a1"]]


def test_drop_removes_and_returns_unowned_items_everywhere() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=2)
    # a: one batch in flight, one waiting (full), one open; b: ready; c: open.
    for name in ("a:p0", "a:p1", "a:p1", "a:p0", "a:p1"):
        batcher.add("a", name, now=0.0)
    assert len(batcher.take(now=0.0, linger=LINGER, limit=1)) == 1
    batcher.add("b", "b:p1", now=0.0)
    batcher.add("b", "b:p0", now=0.0)
    batcher.add("c", "c:p1", now=0.0)
    assert batcher.buffered == 6
    dropped = batcher.drop(lambda item: item.endswith("p0"))
    assert sorted(dropped) == ["a:p1", "a:p1", "b:p1", "c:p1"]
    assert batcher.buffered == 2
    batcher.flush()
    assert items(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == [["b:p0"]]
    batcher.done("a")
    assert items(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == [["a:p0"]]
    assert batcher.buffered == 0


def test_drop_releases_the_slot_of_an_emptied_ready_batch() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=2)
    batcher.add("a", "x0", now=0.0)
    batcher.add("a", "x1", now=0.0)  # ready, holds a's slot
    assert batcher.drop(lambda item: False) == ["x0", "x1"]
    assert batcher.buffered == 0
    assert len(batcher) == 0
    batcher.add("a", "y0", now=1.0)
    batcher.add("a", "y1", now=1.0)
    assert items(batcher.take(now=1.0, linger=LINGER, limit=MANY)) == [["y0", "y1"]]


def test_drop_of_an_emptied_ready_batch_promotes_the_waiting_one() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=1)
    batcher.add("a", "gone", now=0.0)  # ready
    batcher.add("a", "kept", now=0.0)  # waiting behind it
    assert batcher.drop(lambda item: item == "kept") == ["gone"]
    assert items(batcher.take(now=0.0, linger=LINGER, limit=MANY)) == [["kept"]]
    assert batcher.take(now=0.0, linger=LINGER, limit=MANY) == []


def test_drop_keeps_everything_when_all_is_owned() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=3)
    batcher.add("a", "a0", now=0.0)
    assert batcher.drop(lambda item: True) == []
    assert batcher.buffered == 1
    assert batcher.oldest_open() == 0.0


# --- random operations against a simple model ----------------------------------------------------

KEYS = ["a", "b", "c"]


def owned_unless(residue: int) -> Callable[[tuple[str, int]], bool]:
    """Items whose serial number has this residue mod 4 belong to a revoked partition."""
    return lambda item: item[1] % 4 != residue


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from([f"{key}{order}" for key in KEYS for order in range(3)])),
        st.tuples(st.just("take"), st.integers(0, 4)),
        st.tuples(st.just("done"), st.integers(0, 5)),
        st.tuples(st.just("tick"), st.integers(0, 3)),
        st.tuples(st.just("flush"), st.just(0)),
        st.tuples(st.just("drop"), st.integers(0, 3)),
    ),
    max_size=120,
)


@settings(max_examples=400, deadline=None)
@given(ops=operations, max_events=st.integers(1, 4), max_calls=st.integers(1, 3), max_held=st.integers(1, 12))
def test_random_operations_keep_count_order_and_calls_per_session(
    ops: list[tuple[str, int | str]], max_events: int, max_calls: int, max_held: int
) -> None:
    batcher: Batcher[str, tuple[str, int]] = Batcher(max_events, max_calls, max_held)
    now = 0.0
    serial = 0
    added: dict[str, list[int]] = {k: [] for k in KEYS}
    sent: dict[str, list[int]] = {k: [] for k in KEYS}
    dropped: set[tuple[str, int]] = set()
    in_flight: dict[str, list[Batch[str, tuple[str, int]]]] = {k: [] for k in KEYS}
    flushed = False

    def take(limit: int) -> None:
        taken = batcher.take(now, LINGER, limit)
        assert len(taken) <= limit
        for batch in taken:
            assert len(in_flight[batch.key]) < max_calls, "more calls in flight for one session than allowed"
            assert 1 <= len(batch.items) <= max_events
            assert all(key == batch.key for key, _ in batch.items)
            if in_flight[batch.key] and not flushed:
                assert len(batch.items) == max_events, "a busy session's extra calls are full ones (until a flush)"
            in_flight[batch.key].append(batch)
            sent[batch.key].extend(n for _, n in batch.items)

    for op, arg in ops:
        if op == "add":
            assert isinstance(arg, str)
            key, order = arg[0], now + int(arg[1:])  # the order an event's sentAt gives: not monotonic
            serial += 1
            batcher.add(key, (key, serial), now, order)
            added[key].append(serial)
        elif op == "take":
            assert isinstance(arg, int)
            take(arg)
        elif op == "done" and any(in_flight.values()):
            assert isinstance(arg, int)
            busy = [batch for key in KEYS for batch in in_flight[key]]
            finished = busy[arg % len(busy)]  # calls of one session may finish in any order
            in_flight[finished.key].remove(finished)
            batcher.done(finished.key)
        elif op == "tick":
            now += 0.25 * int(arg)
        elif op == "flush":
            batcher.flush()
            flushed = True
        elif op == "drop":
            assert isinstance(arg, int)
            out = batcher.drop(owned_unless(arg))
            assert all(item[1] % 4 == arg for item in out)
            assert not dropped & set(out)
            dropped.update(out)
        held = sum(len(v) for v in added.values()) - sum(len(v) for v in sent.values()) - len(dropped)
        assert batcher.buffered == held
        for key in KEYS:
            waiting = len(list(batcher.held(key)))
            if waiting > max(max_events, max_held):
                assert key in batcher.crowded, "over its bound, the session says so"
            if key in batcher.crowded:
                assert waiting > 0

    # Drain: everything left goes out, at most max_calls per session at a time.
    batcher.flush()
    flushed = True
    for _ in range(sum(len(v) for v in added.values()) + 1):
        take(MANY)
        for key in KEYS:
            while in_flight[key]:
                in_flight[key].pop()
                batcher.done(key)
    assert batcher.buffered == 0
    assert len(batcher) == 0
    assert not batcher.crowded
    for key in KEYS:
        expected = [n for n in added[key] if (key, n) not in dropped]
        assert sent[key] == expected, f"calls start in arrival order, or loss, in session {key}"


def test_busy_session_keeps_filling_instead_of_sending_small_calls() -> None:
    batcher: Batcher[str, str] = Batcher(max_events=10)
    batcher.add("s", "a", now=0.0)
    assert items(batcher.take(now=1.0, linger=0.5, limit=5)) == [["a"]]
    for n, item in enumerate("bcd"):
        batcher.add("s", item, now=1.0 + n)
    batcher.add("t", "x", now=2.0)
    # s's lingered batch waits for its call in flight, and does not hold back t's.
    assert items(batcher.take(now=10.0, linger=0.5, limit=5)) == [["x"]]
    assert batcher.oldest_open() is None
    batcher.add("s", "e", now=10.0)
    assert batcher.take(now=10.0, linger=0.5, limit=5) == []
    batcher.done("s")
    assert items(batcher.take(now=10.0, linger=0.5, limit=5)) == [["b", "c", "d", "e"]], "next as soon as done"


def test_a_busy_sessions_partial_next_batch_lingers_after_the_call() -> None:
    """Not sent the moment the call returns: near the quota that would spend a call on a few events."""
    batcher: Batcher[str, str] = Batcher(max_events=10)
    batcher.add("s", "a", now=0.0)
    assert items(batcher.take(now=0.0, linger=0.0, limit=5)) == [["a"]]
    batcher.add("s", "b", now=0.1)
    batcher.done("s")
    assert batcher.take(now=0.2, linger=LINGER, limit=5) == [], "it fills on while young"
    batcher.add("s", "c", now=0.3)
    assert items(batcher.take(now=0.7, linger=LINGER, limit=5)) == [["b", "c"]], "lingered from its creation"
