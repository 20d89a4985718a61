"""Ordered finalizer: commit the contiguous prefix of final records, never backwards, never after revoke."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.flow.offsets import (
    AHEAD_PREFIX,
    MAX_AHEAD_CHARS,
    MetadataError,
    OffsetOrderError,
    OffsetTracker,
    PartitionOffsets,
    decode_ahead,
    encode_ahead,
    encode_sorted_ahead,
)


def test_nothing_tracked_means_nothing_to_commit() -> None:
    state = PartitionOffsets()
    assert state.committable() is None
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.assign("p0")
    assert tracker.to_commit() == {}


def test_committable_is_the_lowest_unfinished_offset() -> None:
    state = PartitionOffsets()
    state.track([10, 11, 12, 15])
    assert state.committable() == 10
    state.finish(11)
    state.finish(15)
    assert state.committable() == 10
    assert state.outstanding == 2
    state.finish(10)
    assert state.committable() == 12
    state.finish(12)
    assert state.committable() == 16
    assert state.outstanding == 0


def test_advance_moves_past_offsets_without_records() -> None:
    state = PartitionOffsets()
    state.track([3, 4])
    state.advance(9)  # a control batch at 5..8
    assert state.committable() == 3
    state.finish(3)
    state.finish(4)
    assert state.committable() == 9
    state.advance(7)  # never backwards
    assert state.committable() == 9


def test_advance_before_any_record_sets_the_start() -> None:
    state = PartitionOffsets()
    state.advance(42)
    assert state.committable() == 42
    state.track([42])
    assert state.committable() == 42


def test_start_position_rejects_older_offsets() -> None:
    state = PartitionOffsets(start=100)
    with pytest.raises(OffsetOrderError):
        state.track([99])


@pytest.mark.parametrize("second", [[5], [4], [7, 6], [6, 6]])
def test_non_increasing_offset_raises(second: list[int]) -> None:
    state = PartitionOffsets()
    state.track([1, 5])
    with pytest.raises(OffsetOrderError):
        state.track(second)


def test_offset_behind_an_advanced_position_raises_even_with_records_pending() -> None:
    state = PartitionOffsets()
    state.track([5])
    state.advance(10)
    with pytest.raises(OffsetOrderError):
        state.track([7])


def test_empty_track_does_not_undo_an_advance() -> None:
    state = PartitionOffsets()
    state.track([5])
    state.advance(10)
    state.track([])
    state.finish(5)
    assert state.committable() == 10


def test_tracker_commits_only_what_moved() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    p0, p1 = tracker.assign("p0"), tracker.assign("p1")
    assert tracker.assign("p0") is p0
    p0.track([0, 1, 2])
    p1.track([7])
    assert tracker.to_commit() == {"p0": 0, "p1": 7}
    tracker.mark_committed({"p0": 0, "p1": 7})
    assert tracker.to_commit() == {}
    p0.finish(0)
    p0.finish(2)
    assert tracker.to_commit() == {"p0": 1}
    assert tracker.outstanding == 2
    tracker.mark_committed({"p0": 1})
    p0.finish(1)
    p1.finish(7)
    assert tracker.to_commit() == {"p0": 3, "p1": 8}
    assert tracker.outstanding == 0


def test_revoked_partition_is_forgotten_and_ignores_late_results() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    state = tracker.assign("p0")
    state.track([0, 1])
    tracker.revoke("p0")
    assert state.retired
    state.finish(0)
    state.finish(1)
    assert state.committable() == 0
    assert tracker.get("p0") is None
    assert tracker.to_commit() == {}
    tracker.mark_committed({"p0": 2})  # a commit racing the revoke changes nothing
    assert state.committed is None
    assert list(tracker) == []
    tracker.revoke("p0")  # twice is harmless
    fresh = tracker.assign("p0")
    assert fresh is not state
    assert not fresh.retired


def test_to_commit_refuses_to_go_backwards() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    state = tracker.assign("p0")
    state.track([0, 1])
    tracker.mark_committed({"p0": 5})  # a bug elsewhere: committed past an unfinished record
    with pytest.raises(OffsetOrderError):
        tracker.to_commit()


# --- properties ----------------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[list[int]], list[int], list[int]]:
    """Fetched chunks of strictly increasing offsets with gaps, and a finish order for some of them."""
    start = draw(st.integers(0, 1000))
    gaps = draw(st.lists(st.integers(1, 4), min_size=1, max_size=60))
    offsets = []
    current = start
    for gap in gaps:
        offsets.append(current)
        current += gap
    cuts = sorted(draw(st.sets(st.integers(1, len(offsets)), max_size=5)) | {len(offsets)})
    chunks, previous = [], 0
    for cut in cuts:
        chunks.append(offsets[previous:cut])
        previous = cut
    finished = draw(st.permutations(offsets)).copy()[: draw(st.integers(0, len(offsets)))]
    commit_points = draw(st.lists(st.integers(0, len(finished)), max_size=8))
    return chunks, finished, commit_points


@settings(max_examples=200, deadline=None)
@given(scenario=scenarios())
def test_committable_is_the_smallest_unfinished_and_commits_never_go_back(
    scenario: tuple[list[list[int]], list[int], list[int]],
) -> None:
    chunks, finished, commit_points = scenario
    tracker: OffsetTracker[int] = OffsetTracker()
    state = tracker.assign(0)
    tracked: list[int] = []
    done: set[int] = set()
    committed: list[int] = []

    def check() -> None:
        value = state.committable()
        unfinished = [o for o in tracked if o not in done]
        assert value is not None
        if unfinished:
            assert value == min(unfinished)
        else:
            assert value == tracked[-1] + 1
        assert state.outstanding == len(unfinished)

    def commit() -> None:
        offsets = tracker.to_commit()
        if 0 in offsets:
            assert not committed or offsets[0] >= committed[-1], "commits never go back (a repeat carries new metadata)"
            committed.append(offsets[0])
            tracker.mark_committed(offsets)

    # Track chunk by chunk; finishes for a chunk happen only after it was tracked.
    available: set[int] = set()
    queue = list(finished)
    for chunk in chunks:
        state.track(chunk)
        tracked.extend(chunk)
        available.update(chunk)
        check()
        commit()
        while queue and queue[0] in available:
            offset = queue.pop(0)
            state.finish(offset)
            done.add(offset)
            check()
            if len(done) in commit_points:
                commit()
    for offset in queue:
        state.finish(offset)
        done.add(offset)
        check()
        commit()
    commit()
    assert committed == sorted(committed)
    if committed:
        assert committed[-1] == state.committable()


@settings(max_examples=100, deadline=None)
@given(scenario=scenarios(), late=st.data())
def test_retired_partition_ignores_every_finish(
    scenario: tuple[list[list[int]], list[int], list[int]], late: st.DataObject
) -> None:
    chunks, _, _ = scenario
    tracker: OffsetTracker[str] = OffsetTracker()
    state = tracker.assign("p")
    for chunk in chunks:
        state.track(chunk)
    before = state.committable()
    outstanding = state.outstanding
    tracker.revoke("p")
    for offset in late.draw(st.permutations([o for chunk in chunks for o in chunk])):
        state.finish(offset)
    assert state.committable() == before
    assert state.outstanding == outstanding
    assert tracker.to_commit() == {}


@settings(max_examples=200, deadline=None)
@given(
    first=st.lists(st.integers(0, 100), min_size=1, max_size=10, unique=True).map(sorted),
    bad=st.integers(0, 100),
)
def test_tracking_a_non_increasing_offset_raises(first: list[int], bad: int) -> None:
    state = PartitionOffsets()
    state.track(first)
    if bad <= first[-1]:
        with pytest.raises(OffsetOrderError):
            state.track([bad])
    else:
        state.track([bad])
        assert state.committable() == first[0]


# --- finished records above the commit point travel in the commit metadata --------------------


def test_ahead_metadata_round_trips_the_finished_records_above_the_commit_point() -> None:
    state = PartitionOffsets()
    state.track(range(100, 120))
    for offset in (103, 104, 105, 110, 119):
        state.finish(offset)
    assert state.committable() == 100
    text = state.ahead_metadata()
    assert decode_ahead(100, text, SPAN) == {103, 104, 105, 110, 119}
    state.finish(100)
    assert decode_ahead(state.committable() or 0, state.ahead_metadata(), SPAN) == {103, 104, 105, 110, 119}


def test_finishing_ahead_of_the_commit_point_is_worth_a_commit() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    state = tracker.assign("p")
    state.track([0, 1, 2])
    state.finish(2)
    assert tracker.to_commit() == {"p": 0}
    tracker.mark_committed({"p": 0})
    assert tracker.to_commit() == {}
    state.finish(1)
    assert tracker.to_commit() == {"p": 0}, "the metadata changed though the offset did not"


def test_ahead_metadata_stays_within_kafkas_metadata_limit_and_lists_only_finished_offsets() -> None:
    finished = set(range(1, 200_000, 3))
    text = encode_ahead(0, finished)
    assert len(text) <= MAX_AHEAD_CHARS
    decoded = decode_ahead(0, text, SPAN)
    assert decoded and decoded <= finished
    assert min(decoded) == 1, "the lowest runs are kept first"


@pytest.mark.parametrize("text", [None, "", "garbage", "other:1+2"])
def test_foreign_metadata_means_nothing_to_skip(text: str | None) -> None:
    assert decode_ahead(10, text, SPAN) == set()


@pytest.mark.parametrize(
    "text",
    [
        "pw1:zz+1",
        "pw1:1+",
        "pw1:+1",
        "pw2:a;zz+1",
        "pw2:a",
        "pw2:b;1+2",  # written for offset 11, read at 10: an admin moved the offset
        "pw1:1+" + "f" * 17,
        "pw1:" + ",".join(["1+1"] * 20_000),  # longer than any encoder writes
        "pw1:1+1f,1+1f",  # overlapping runs expanding past the span
    ],
)
def test_malformed_or_oversized_metadata_is_refused_not_trusted(text: str) -> None:
    with pytest.raises(MetadataError):
        decode_ahead(10, text, 40)


def test_hostile_metadata_expands_to_at_most_the_span_quickly() -> None:
    """`pw1:1+4c4b3f` once expanded to 5M offsets (473 MiB, 3.9 s inside the rebalance callback)."""
    started = time.process_time()
    decoded = decode_ahead(100, "pw1:1+4c4b3f", 1000)
    assert decoded == set(range(101, 1101))
    assert time.process_time() - started < 1.0
    assert decode_ahead(100, "pw1:7d0+5", 1000) == set(), "runs wholly beyond the span are dropped"


@pytest.mark.parametrize(
    "text", ["pw1:1+-5", "pw1:-1+5", "pw1:1+_5", "pw1:+1+5", "pw1: 1+5", "pw2:-0;1+2", "pw1:1+0x5"]
)
def test_signed_or_decorated_numbers_are_malformed(text: str) -> None:
    """Python's int() takes signs, underscores, blanks and 0x; the encoder writes plain lowercase hex only."""
    with pytest.raises(MetadataError):
        decode_ahead(0, text, 40)


def test_negative_runs_cannot_buy_room_for_more_expansion() -> None:
    """A negative length once subtracted from the expansion total, so runs of the whole span could repeat:
    ~64 KB of `1+-186a0,1+1869f` pairs expanded 4,000 x 100,000 offsets inside the rebalance callback."""
    pair = "1+-186a0,1+1869f"
    text = "pw1:" + ",".join([pair] * ((65_000 - 4) // (len(pair) + 1)))
    started = time.process_time()
    with pytest.raises(MetadataError):
        decode_ahead(0, text, 100_000)
    assert time.process_time() - started < 1.0


def test_metadata_names_its_base_and_round_trips() -> None:
    text = encode_ahead(0x1234, {0x1236, 0x1237})
    assert text.startswith("pw2:1234;")
    assert decode_ahead(0x1234, text, SPAN) == {0x1236, 0x1237}
    with pytest.raises(MetadataError):
        decode_ahead(0x1235, text, SPAN)


def test_metadata_limit_shortens_or_drops_it() -> None:
    state = PartitionOffsets()
    state.track(range(0, 1000))
    for offset in range(2, 1000, 2):
        state.finish(offset)
    full, short = state.ahead_metadata(), state.ahead_metadata(40)
    assert len(full) > 40 >= len(short) > 0
    assert decode_ahead(0, short, SPAN) <= decode_ahead(0, full, SPAN)
    assert state.ahead_metadata(0) == ""


def test_commit_lag_and_oldest_unfinished() -> None:
    state = PartitionOffsets(now=5.0)
    assert state.commit_lag == 0 and state.oldest_unfinished() is None
    state.track(range(0, 200), now=10.0)
    state.track(range(200, 400), now=20.0)
    assert state.commit_lag == 400
    assert state.oldest_unfinished() == (0, 10.0)
    for offset in range(1, 400):
        state.finish(offset)
    assert state.commit_lag == 400, "one unfinished record holds the whole span"
    state.finish(0)
    assert state.commit_lag == 0 and state.oldest_unfinished() is None
    state.track([400, 401], now=30.0)
    state.finish(400)
    assert state.oldest_unfinished() == (401, 30.0)


def test_only_a_moving_offset_counts_as_progress() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    state = tracker.assign("p", now=1.0)
    assert state.advanced_at == 1.0
    state.track([0, 1, 2], now=1.0)
    state.finish(0)
    assert tracker.mark_committed({"p": 1}, now=2.0)
    state.finish(2)
    assert not tracker.mark_committed({"p": 1}, now=3.0), "same offset, new metadata: not progress"
    assert state.advanced_at == 2.0


@settings(max_examples=200, deadline=None)
@given(
    offsets=st.lists(st.integers(0, 3000), min_size=1, max_size=400, unique=True).map(sorted),
    finished=st.data(),
    limit=st.sampled_from([12, 40, MAX_AHEAD_CHARS]),
)
def test_metadata_walked_from_pending_equals_the_sorted_encoding(
    offsets: list[int], finished: st.DataObject, limit: int
) -> None:
    """`ahead_metadata` walks the pending offsets instead of sorting the finished ones: same text."""
    state = PartitionOffsets()
    state.track(offsets)
    for offset in finished.draw(st.lists(st.sampled_from(offsets), unique=True)):
        state.finish(offset)
    base = state.committable()
    assert base is not None
    pending_done = {offset for offset in state._done if offset > base}
    walked = encode_sorted_ahead(base, state._pending, limit, state._done)
    assert walked == encode_ahead(base, pending_done, limit)
    assert walked == encode_sorted_ahead(base, (o for o in state._pending if o in state._done), limit)
    if limit == MAX_AHEAD_CHARS:
        assert state.ahead_metadata() == encode_ahead(base, pending_done)


SPAN = 100_000


def test_the_stall_clock_survives_a_partition_going_and_coming_back() -> None:
    """A group that rebalances more often than the stall timeout must not hide a stuck partition."""
    tracker: OffsetTracker[str] = OffsetTracker()
    state = tracker.assign("p", now=1.0)
    state.track([5, 6], now=1.0)
    assert tracker.mark_committed({"p": 5}, now=2.0)
    tracker.revoke("p")
    again = tracker.assign("p", now=50.0)
    again.track([5, 6], now=50.0)
    assert not tracker.mark_committed({"p": 5}, now=51.0), "the same offset again is not progress"
    assert again.advanced_at == 2.0
    again.finish(5)
    assert tracker.mark_committed({"p": 6}, now=52.0)
    assert again.advanced_at == 52.0


def reference_encoding(base: int, offsets: set[int], limit: int) -> str:
    """The metadata format written out plainly: every run, then as many whole runs as fit in `limit`."""
    runs: list[list[int]] = []
    for offset in sorted(offsets):
        if runs and offset == runs[-1][1] + 1:
            runs[-1][1] = offset
        else:
            runs.append([offset, offset])
    text = ""
    for start, end in runs:
        longer = f"{text},{start - base:x}+{end - start:x}" if text else f"{start - base:x}+{end - start:x}"
        if len(f"{AHEAD_PREFIX}{base:x};{longer}") > limit:
            break
        text = longer
    return f"{AHEAD_PREFIX}{base:x};{text}" if text else ""


@settings(max_examples=300, deadline=None)
@given(
    base=st.integers(0, 1 << 40),
    gaps=st.lists(st.integers(1, 40), max_size=600),
    limit=st.integers(0, MAX_AHEAD_CHARS),
)
def test_encoding_equals_the_plain_reference(base: int, gaps: list[int], limit: int) -> None:
    """The encoder's one-loop form (it runs per partition at every commit) against the format written plainly:
    runs of 1 and of many, every cut point of the limit, an empty set."""
    offsets, offset = set(), base
    for gap in gaps:
        offset += gap
        offsets.add(offset)
    assert encode_ahead(base, offsets, limit) == reference_encoding(base, offsets, limit)
