"""`python -m tests.bench_intake`: CPU per record of the intake path, in this process, no stack.

What the drain's worker does with each fetched record before a call takes it: `Pipeline.ingest` (track,
convert — decode, map, serialize —, dedup admit, batcher add) on real aiokafka `ConsumerRecord`s of the
drain benchmark's backlog (`tests.bench`'s generator, seeds and mapping), fed per partition in the source's
slices. Calls are "delivered" between slices, as the dispatcher would (`take`, `done`, `_settle`), so the
batcher, dedup window and offsets look as they do in a drain; only the `ingest` calls are timed.

    python -m tests.bench_intake [--records 100000] [--repeats 5]
    python -m tests.bench_intake --save /tmp/recs.pkl          # generate once, for callgrind runs
    python -m tests.bench_intake --load /tmp/recs.pkl --repeats 1 [--no-ingest]

`--no-ingest` does everything but the ingest (set-up, loading, the same deliveries are skipped too): under
`valgrind --tool=callgrind` the difference of the two runs' instruction counts is the intake's own.
"""

from __future__ import annotations

import argparse
import pickle
import time
import zlib
from collections.abc import Sequence
from typing import Any

from aiokafka.structs import ConsumerRecord, TopicPartition

from tests.bench import PROPERTIES, TRACKING_ID
from worker.app import tune_garbage_collector
from worker.commands.sample import generate
from worker.config import Settings
from worker.flow.items import DeadLetter
from worker.flow.pipeline import Pipeline
from worker.kafka.source import INGEST_SLICE
from worker.observe.metrics import Metrics
from worker.personalize.ratelimit import RateLimiter
from worker.personalize.retry import Rejection

TOPIC = "bench"
CALLS_PER_SLICE = 20
"""Calls 'delivered' after each slice: about the drain's ratio of calls to records (~21,000 to 200,000)."""


class NoSink:
    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        raise AssertionError("calls are settled by the bench itself")


class Letters:
    async def write(self, letters: Sequence[DeadLetter]) -> None:
        pass


Backlog = dict[int, list[tuple[bytes, bytes]]]


def backlog(records: int, partitions: int = 6, chunk: int = 50_000, seed: int = 7) -> Backlog:
    """The drain bench's backlog (same seeds, sessions, start times), spread over partitions by key."""
    out: Backlog = {p: [] for p in range(partitions)}
    for index, start in enumerate(range(0, records, chunk)):
        stream = generate(
            min(chunk, records - start),
            seed=seed * 1000 + index,
            concurrent_sessions=500,
            start=1_790_000_000.0 + index * chunk / 200.0,
            min_session_events=40,
        )
        for m in stream.messages:
            out[zlib.crc32(m.key) % partitions].append((m.key, m.value))
    return out


def consumer_records(data: Backlog) -> dict[TopicPartition, list[Any]]:
    return {
        TopicPartition(TOPIC, p): [
            ConsumerRecord(TOPIC, p, offset, 0, 0, key, value, None, len(key), len(value), ())
            for offset, (key, value) in enumerate(rows)
        ]
        for p, rows in data.items()
    }


def pipeline() -> Pipeline:
    settings = Settings.model_validate(
        {
            "personalize": {"tracking_id": TRACKING_ID},
            "mapping": {"properties": PROPERTIES},
            "batching": {"linger_ms": 500},
            "dedup": {"max_ids": 1_000_000},
        }
    )
    return Pipeline(settings, NoSink(), Letters(), Metrics(), quota=RateLimiter(1000), clock=time.monotonic)


def run_once(polls: dict[TopicPartition, list[Any]], ingest: bool = True) -> float:
    """CPU seconds spent in `ingest` for the whole backlog (0.0 with `ingest` False)."""
    pipe = pipeline()
    spent = 0.0
    clock = time.process_time
    longest = max(len(records) for records in polls.values())
    for start in range(0, longest, INGEST_SLICE):
        for tp, records in polls.items():
            chunk = records[start : start + INGEST_SLICE]
            if not chunk or not ingest:
                continue
            began = clock()
            pipe.ingest(tp, chunk)
            spent += clock() - began
            for batch in pipe.batcher.take(time.monotonic(), 0.5, CALLS_PER_SLICE):
                pipe.batcher.done(batch.key)
                pipe._settle(batch.items, [])
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_intake", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5, help="the best counts")
    parser.add_argument("--save", default=None, help="write the generated backlog here and exit")
    parser.add_argument("--load", default=None, help="read the backlog from --save's file")
    parser.add_argument("--no-ingest", action="store_true", help="everything but the ingest (callgrind baseline)")
    args = parser.parse_args()
    if args.load:
        with open(args.load, "rb") as f:
            data = pickle.load(f)
    else:
        data = backlog(args.records)
    if args.save:
        with open(args.save, "wb") as f:
            pickle.dump(data, f)
        return
    polls = consumer_records(data)
    del data
    tune_garbage_collector(collect=True)  # as the worker runs: the records frozen, young collections rarer
    total = sum(len(records) for records in polls.values())
    best = min(run_once(polls, not args.no_ingest) for _ in range(args.repeats))
    print(f"records {total:,}  ingest_us_per_record {best / total * 1e6:.3f} (best of {args.repeats})")


if __name__ == "__main__":
    main()
