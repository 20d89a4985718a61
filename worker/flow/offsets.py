"""Per-partition ordered finalizer: which offset may be committed, given records finishing out of order.

The committable offset of a partition is its lowest record not yet in a final state (or one past the
last tracked record when all are final). It only ever moves forward. Revoking a partition retires its
state object, so results that arrive later for it change nothing.

Records finish out of offset order (sessions, not offsets, decide what is sent when), so at any
moment some records above the committable offset are already final. The commit carries them in its
metadata, and the next owner of the partition — after a rebalance or a crash — finishes those
records at once instead of sending them a second time.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Container, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)

AHEAD_PREFIX = "pw2:"
"""Version 2 names its base offset (`pw2:<base>;<runs>`): metadata left beside an offset that was moved
(a reset by an admin tool) must not mark the wrong records finished. Version 1 had no base."""
LEGACY_PREFIX = "pw1:"
MAX_AHEAD_CHARS = 3800
"""Default length of commit metadata: Kafka refuses more than `offset.metadata.max.bytes` (4096 by
default); `kafka.commit_metadata_max_bytes` sets it, and the committer shortens it when refused."""
_HEX = re.compile(r"[0-9a-f]{1,16}")
"""What the encoder writes for a number. Not int(x, 16) alone: it takes signs, blanks, `_` and `0x`, and a
negative length once subtracted from the expansion total (see `decode_ahead`)."""
MAX_REMEMBERED = 10_000
"""Revoked partitions whose stall clock is remembered (see `OffsetTracker._progress`)."""
MAX_DECODE_CHARS = 65_536
"""Commit metadata longer than this is not even parsed: it is untrusted input, read inside a rebalance."""


class OffsetOrderError(AssertionError):
    """An offset went backwards: a bug that could commit past an unfinished record."""


class PartitionOffsets:
    """Outstanding offsets of one partition, in fetch order."""

    __slots__ = (
        "_done",
        "_fetched",
        "_next",
        "_pending",
        "advanced_at",
        "advanced_to",
        "committed",
        "committed_ahead",
        "retired",
        "serial",
        "skip",
    )

    def __init__(self, start: int | None = None, serial: int = -1, now: float = 0.0) -> None:
        self.serial = serial
        """Names this ownership of the partition (never reused, see `OffsetTracker.owners`)."""
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._next: int | None = start
        self.committed: int | None = None
        """The last offset handed to Kafka for this partition, set by the committer."""
        self.committed_ahead = 0
        """How many final records above `committed` that commit's metadata listed."""
        self.retired = False
        self.skip: set[int] = set()
        """Offsets a previous owner already finished (from the committed metadata): final on arrival."""
        self._fetched: deque[tuple[int, float]] = deque()
        """(first offset, when) of each tracked slice: the age of the oldest unfinished record, at one
        entry per fetched slice rather than a timestamp per record."""
        self.advanced_at = now
        """When the committed offset last moved forward (or the partition was assigned): the stall clock.
        A commit whose offset stays put — only its metadata changed — is not progress."""
        self.advanced_to: int | None = None
        """The committed offset as of `advanced_at`, when known from an earlier ownership in this process."""

    def track(self, offsets: Iterable[int], now: float = 0.0) -> None:
        pending = self._pending
        first = len(pending)
        # `_next` is past the last tracked offset and any advanced position: with records pending,
        # judging by the last pending offset alone would let an empty track move `_next` backwards.
        last = self._next - 1 if self._next is not None else -1
        for offset in offsets:
            if offset <= last:
                raise OffsetOrderError(f"offset {offset} tracked after {last}")
            pending.append(offset)
            last = offset
        self._next = last + 1
        if len(pending) > first:
            self._fetched.append((pending[first], now))

    def advance(self, position: int) -> None:
        """Kafka's position can pass offsets that hold no record (control batches, compaction gaps)."""
        if self._next is None or position > self._next:
            self._next = position

    def finish(self, offset: int) -> None:
        """Mark one record final; a no-op for a retired partition (its results no longer count)."""
        if self.retired:
            return
        pending = self._pending
        if pending and offset == pending[0]:
            pending.popleft()
            done = self._done
            while pending and pending[0] in done:
                done.remove(pending.popleft())
        else:
            self._done.add(offset)

    @property
    def outstanding(self) -> int:
        return len(self._pending) - len(self._done)

    @property
    def finished_ahead(self) -> int:
        return len(self._done)

    @property
    def commit_lag(self) -> int:
        """Offsets between the commit point and the highest fetched one: what pending/done state this
        partition holds. Bounded by pausing the partition (`worker.max_commit_lag_records`)."""
        if not self._pending or self._next is None:
            return 0
        return self._next - self._pending[0]

    def oldest_unfinished(self) -> tuple[int, float] | None:
        """(offset, when fetched) of the lowest record not yet final, or None when all are."""
        if not self._pending:
            self._fetched.clear()
            return None
        oldest = self._pending[0]
        fetched = self._fetched
        while len(fetched) > 1 and fetched[1][0] <= oldest:
            fetched.popleft()
        return oldest, fetched[0][1] if fetched else 0.0

    def ahead_metadata(self, limit: int = MAX_AHEAD_CHARS) -> str:
        """The final records above the committable offset, for the commit's metadata (at most `limit`
        characters; 0 = none)."""
        base = self.committable()
        if base is None or not (self._done or self.skip) or limit <= len(AHEAD_PREFIX):
            return ""
        if self.skip:  # offsets inherited from the previous owner and not read yet are passed on too
            return encode_ahead(base, self._done | {offset for offset in self.skip if offset > base}, limit)
        done = self._done
        if len(done) * 4 < len(self._pending):  # few finished: sorting them beats walking all pending
            return encode_ahead(base, done, limit)
        # `_pending` is in offset order and holds every finished offset above `base`: walking it yields
        # the lowest runs without sorting all of them (up to ~20,000 per partition at full buffer, of
        # which the metadata has room for a fraction). Sorting them all was ~4% of the worker's CPU.
        return encode_sorted_ahead(base, self._pending, limit, done)

    def committable(self) -> int | None:
        """The offset to commit (Kafka's "next record to read"), or None if nothing was ever tracked."""
        if self._pending:
            return self._pending[0]
        return self._next


class OffsetTracker(Generic[P]):
    """All owned partitions; the committer asks it what may be committed and what changed."""

    def __init__(self) -> None:
        self._partitions: dict[P, PartitionOffsets] = {}
        self.owners: dict[int, tuple[P, PartitionOffsets]] = {}
        """Serial → the partition and its state, for owned partitions only: records refer to their
        partition by serial (an int, so they stay plain tuples), and a serial from before a revocation
        finds nothing, even when the partition is assigned here again."""
        self._serials = itertools.count()
        self._progress: dict[P, tuple[int, float]] = {}
        """Revoked partitions' (committed offset, when it last advanced): a partition that comes back
        keeps its stall clock, or a group rebalancing more often than the stall timeout would hide a
        stuck partition for ever. Bounded: the oldest are forgotten past MAX_REMEMBERED."""

    def assign(self, partition: P, now: float = 0.0) -> PartitionOffsets:
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = PartitionOffsets(serial=next(self._serials), now=now)
            self.owners[state.serial] = (partition, state)
            remembered = self._progress.pop(partition, None)
            if remembered is not None:
                state.advanced_to, state.advanced_at = remembered
        return state

    def get(self, partition: P) -> PartitionOffsets | None:
        return self._partitions.get(partition)

    def revoke(self, partition: P) -> None:
        state = self._partitions.pop(partition, None)
        if state is not None:
            state.retired = True
            del self.owners[state.serial]
            committed = state.committed if state.committed is not None else state.advanced_to
            if committed is not None:
                self._progress[partition] = (committed, state.advanced_at)
                if len(self._progress) > MAX_REMEMBERED:
                    del self._progress[next(iter(self._progress))]

    def __iter__(self) -> Iterator[tuple[P, PartitionOffsets]]:
        return iter(list(self._partitions.items()))

    def to_commit(self) -> dict[P, int]:
        """Partitions whose committable offset moved past the last commit."""
        result: dict[P, int] = {}
        for partition, state in self._partitions.items():
            offset = state.committable()
            if offset is None or (offset == state.committed and state.finished_ahead == state.committed_ahead):
                continue
            if state.committed is not None and offset < state.committed:
                raise OffsetOrderError(f"{partition}: committable {offset} is behind committed {state.committed}")
            result[partition] = offset
        return result

    def ahead_metadata(self, partition: P, limit: int = MAX_AHEAD_CHARS) -> str:
        state = self._partitions.get(partition)
        return state.ahead_metadata(limit) if state is not None else ""

    def mark_committed(self, offsets: dict[P, int], now: float = 0.0) -> bool:
        """Record a successful commit; True if some partition's offset moved forward (progress)."""
        advanced = False
        for partition, offset in offsets.items():
            state = self._partitions.get(partition)
            if state is not None:
                before = state.committed if state.committed is not None else state.advanced_to
                if before is None or offset > before:
                    state.advanced_at = now
                    advanced = True
                state.committed = offset
                state.committed_ahead = state.finished_ahead
        return advanced

    @property
    def outstanding(self) -> int:
        return sum(state.outstanding for state in self._partitions.values())


def encode_ahead(base: int, offsets: Iterable[int], limit: int = MAX_AHEAD_CHARS) -> str:
    """Offsets above `base` as hex runs `start+length` relative to it; the lowest runs first, cut at
    `limit` (a subset only costs re-sends, never a loss)."""
    return encode_sorted_ahead(base, sorted(offsets), limit)


def encode_sorted_ahead(
    base: int, ordered: Iterable[int], limit: int = MAX_AHEAD_CHARS, members: Container[int] | None = None
) -> str:
    """`encode_ahead` for offsets in ascending order, read only as far as `limit` leaves room; with
    `members`, only the offsets in it (a partition's finished ones, read off its pending offsets).

    One loop, no generator of runs between, and the membership test inside it rather than a filtering
    generator before it (~25% less): it runs for each partition at every commit over thousands of offsets
    (a drain's commits spent ~1 ms a partition here, 2 % of the worker's CPU)."""
    head = f"{AHEAD_PREFIX}{base:x};"
    room = limit - len(head) + 1  # each part takes its length and a comma; the first needs no comma
    parts: list[str] = []
    start = end = -2  # no run yet: offsets are never negative, so none extends it
    for offset in ordered:
        if members is not None and offset not in members:
            continue
        if offset == end + 1:
            end = offset
            continue
        if start >= 0:
            part = "%x+%x" % (start - base, end - start)  # noqa: UP031 (cheaper than an f-string here)
            room -= len(part) + 1
            if room < 0:
                return head + ",".join(parts) if parts else ""
            parts.append(part)
        start = end = offset
    if start >= 0:
        part = "%x+%x" % (start - base, end - start)  # noqa: UP031
        if room >= len(part) + 1:
            parts.append(part)
    return head + ",".join(parts) if parts else ""


class MetadataError(ValueError):
    """Commit metadata that is malformed or larger than a previous owner could have written."""


def decode_ahead(base: int, text: str | None, max_span: int) -> set[int]:
    """The offsets `encode_ahead` listed, within `max_span` above `base`.

    The metadata is untrusted (any client of the group can commit any string, and it is read inside the
    rebalance callback): its length, each number, and the total it expands to are bounded before any
    set is built, so a hostile `pw1:1+4c4b3f` costs nothing. Runs beyond `max_span` are dropped (a
    subset only costs re-sends); anything unreadable raises MetadataError, and the caller ignores it all.
    """
    if not text or not text.startswith((AHEAD_PREFIX, LEGACY_PREFIX)):
        return set()
    if len(text) > MAX_DECODE_CHARS:
        raise MetadataError(f"{len(text)} characters, more than {MAX_DECODE_CHARS}")
    body = text[len(AHEAD_PREFIX) :]
    if text.startswith(AHEAD_PREFIX):
        written_for, sep, body = body.partition(";")
        if not sep or written_for != f"{base:x}":
            raise MetadataError(f"written for another offset than the committed {base}")
    runs: list[tuple[int, int]] = []
    total = 0
    for part in body.split(","):
        start_hex, sep, length_hex = part.partition("+")
        if not sep or not _HEX.fullmatch(start_hex) or not _HEX.fullmatch(length_hex):
            raise MetadataError(f"malformed run {part[:40]!r}")
        start, length = int(start_hex, 16), int(length_hex, 16)
        if start < 1 or start > max_span:
            continue
        count = min(length + 1, max_span - start + 1)
        total += count
        if total > max_span:
            raise MetadataError(f"lists more than {max_span} offsets")
        runs.append((base + start, count))
    offsets: set[int] = set()
    for first, count in runs:
        offsets.update(range(first, first + count))
    return offsets
