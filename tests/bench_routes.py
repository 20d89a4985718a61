"""`python -m tests.bench --mode two-groups|catalog-burst`: the issue-13 benchmark of routes.

``two-groups``
    One worker process feeding two dataset groups: one events route whose ``tracking_id_field`` (``site``)
    picks one of two trackers (``--group-routes 2``: two topics, two routes, one tracker each). In the
    emulator each tracker is its own dataset group with its own PutEvents quota (``--max-tps``, 1,000).
    Two backlogs of ``--records`` each (``worker.commands.sample``, distinct seeds, so distinct sessions and ids),
    interleaved. Per group: calls/s and events/s *together* (between the later group's first accepted call
    and the earlier group's last: both busy), as a share of the group's quota and of its ceiling
    (quota x this data's optimal events per call, as ``drain`` computes ``share_of_ceiling``). The
    worker's and the emulator's CPU over the run say which process was the limit.

``catalog-burst`` (tests/bench_catalog.py)
    ``--records`` (100,000) item updates over ``--item-ids`` (5,000) ids through one coalescing items route,
    the emulator's PutItems quota ``--items-tps`` (10) calls/s: calls, items per call, ids sent twice within
    the window, the superseded share, and the burst's length against distinct ids / (10 x quota).

Both note the load average: the machine is shared, and the figures are only as good as the CPU they got.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from tests.bench import (
    PROPERTIES,
    Chunk,
    Loaded,
    Stack,
    Worker,
    WorkerResult,
    _toml_value,
    batching_overrides,
    log,
    make_topics,
)
from worker.commands.sample import generate, optimal_calls

SITES = ("a", "b")
TRACKERS = {site: f"bench-tracker-{site}" for site in SITES}

TARGETS = {
    "two-groups": {"a_share_of_ceiling_together": ">= 0.90", "b_share_of_ceiling_together": ">= 0.90"},
    "catalog-burst": {
        "partial_calls": "<= 1",
        "calls_with_repeated_ids": "<= 0",
        "ids_sent_twice_within_window": "<= 0",
        "stale_or_missing_ids": "<= 0",
        "burst_vs_floor": "<= 1.2",
    },
}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def routes_toml(routes: list[dict[str, Any]]) -> str:
    """`[[routes]]` tables; dict values (trackers, mapping) as inline tables."""

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        return _toml_value(v)

    lines: list[str] = []
    for route in routes:
        lines.append("[[routes]]")
        lines.extend(f"{key} = {value(v)}" for key, v in route.items())
        lines.append("")
    return "\n".join(lines)


def route_worker(bench: Stack, name: str, group: str, routes: list[dict[str, Any]], args: argparse.Namespace) -> Worker:
    """A draining worker whose whole flow is `[[routes]]` (no top-level topics, tracker or mapping)."""
    sections: dict[str, dict[str, Any]] = {
        "kafka": {"bootstrap_servers": bench.broker.bootstrap, "group_id": group},
        "personalize": {"endpoint_url": bench.emulator.url},
        "batching": {"linger_ms": args.linger_ms, **batching_overrides(args)},
        "dedup": {"max_ids": args.dedup_ids},
        "worker": {"log_format": "json", "commit_interval_seconds": 0.5},
    }
    worker = Worker(bench.tmp, name, sections, True)
    worker.config.write_text(worker.config.read_text(encoding="utf-8") + "\n" + routes_toml(routes), encoding="utf-8")
    return worker


def emulator_pid(bench: Stack) -> int:
    process = bench.emulator.process
    assert process is not None
    return process.pid


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a process so far: the second says how
    much the machine, not the process, held it back (/proc/PID/schedstat, nanoseconds)."""
    try:
        running, waiting, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(running) / 1e9, int(waiting) / 1e9


def run_sampled(bench: Stack, worker: Worker, timeout: float) -> tuple[WorkerResult, tuple[float, float]]:
    """`run_worker`, plus the worker's schedstat sampled until it exits (a reaped pid has none)."""
    bench.workers.append(worker)
    worker.start()
    worker.wait_running()
    assert worker.process is not None
    last = (0.0, 0.0)
    deadline = time.monotonic() + timeout
    while worker.running and time.monotonic() < deadline:
        sample = schedstat(worker.process.pid)
        last = sample if sample[0] else last
        time.sleep(0.2)
    if worker.running:
        print(f"bench: {worker.name} still running after {timeout}s; stopping it", file=sys.stderr)
    worker.stop()
    result = worker.result()
    if result.returncode != 0:
        print(f"bench: {worker.name} exited with {result.returncode}\n{worker.log_tail()}", file=sys.stderr)
    return result, last


# --------------------------------------------------------------------------- two-groups


def _site_chunk(records: int, seed: int, sessions: int, start: float, min_session_events: int, site: str) -> Chunk:
    """`generate()` with a `site` field naming the group; re-delivered copies stay byte-identical."""
    stream = generate(
        records, seed=seed, concurrent_sessions=sessions, start=start, min_session_events=min_session_events
    )
    encoded: dict[int, bytes] = {}
    out: list[tuple[bytes, bytes]] = []
    for m in stream.messages:
        if m.source is None:  # malformed: dead-lettered whatever its site
            out.append((m.key, m.value))
            continue
        value = encoded.get(id(m.source))
        if value is None:
            value = encoded[id(m.source)] = orjson.dumps({**m.source, "site": site})
        out.append((m.key, value))
    counts = Counter(m.kind for m in stream.messages)
    return Chunk(out, dict(counts), optimal_calls(stream))


def _group_chunks(args: argparse.Namespace) -> Iterator[dict[str, Chunk]]:
    """Each chunk index of both groups (distinct seeds per group), generated on `--jobs` processes."""
    sizes = [min(args.chunk, args.records - start) for start in range(0, args.records, args.chunk)]
    span = args.chunk / 200.0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures: list[dict[str, Future[Chunk]]] = []
        for index, size in enumerate(sizes):
            start = 1_790_000_000.0 + index * span
            futures.append(
                {
                    site: pool.submit(
                        _site_chunk,
                        size,
                        (args.seed + 100 * (number + 1)) * 1000 + index,
                        args.sessions,
                        start,
                        args.min_session_events,
                        site,
                    )
                    for number, site in enumerate(SITES)
                }
            )
            while len(futures) > args.jobs:
                yield {site: future.result() for site, future in futures.pop(0).items()}
        for pair in futures:
            yield {site: future.result() for site, future in pair.items()}


async def _load_groups(bootstrap: str, topics: dict[str, str], args: argparse.Namespace) -> dict[str, Loaded]:
    """Both groups' records interleaved one by one, as two sites' traffic mixed in one stream: fetched
    together, so both groups have calls to make at the same time from the first fetch to the last."""
    loaded = {site: Loaded(topics[site]) for site in SITES}
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, acks="all", max_batch_size=512 * 1024, compression_type=None
    )
    await producer.start()
    started = time.monotonic()
    try:
        for chunks in _group_chunks(args):
            pairs = itertools.zip_longest(*(chunks[site].records for site in SITES))
            futures = [
                await producer.send(topics[site], record[1], key=record[0])
                for pair in pairs
                for site, record in zip(SITES, pair, strict=True)
                if record is not None
            ]
            await asyncio.gather(*futures)
            for site, chunk in chunks.items():
                group = loaded[site]
                group.records += len(chunk.records)
                group.counts.update(chunk.counts)
                group.optimal_calls += chunk.optimal_calls
            print(f"    produced {sum(g.records for g in loaded.values()):,}/{2 * args.records:,}", end="\r")
    finally:
        await producer.stop()
    print()
    for group in loaded.values():
        group.seconds = time.monotonic() - started
    return loaded


def group_metrics(
    events: list[dict[str, Any]], loaded: dict[str, Loaded], throttled: dict[str, int], max_tps: float
) -> dict[str, Any]:
    """Per group: own sending span, and the window both groups were being sent ("together")."""
    times: dict[str, list[float]] = {site: [] for site in SITES}
    calls: dict[str, list[tuple[float, str]]] = {site: [] for site in SITES}
    site_of = {tracker: site for site, tracker in TRACKERS.items()}
    seen: set[str] = set()
    for event in events:
        site = site_of[event["trackingId"]]
        times[site].append(event["received_at"])
        if event["request_id"] not in seen:
            seen.add(event["request_id"])
            calls[site].append((event["received_at"], event["request_id"]))
    if not all(times.values()):
        return {"error": "a group received no events"}
    t0 = max(min(t) for t in times.values())
    t1 = min(max(t) for t in times.values())
    together = t1 - t0
    out: dict[str, Any] = {"together_seconds": round(together, 2)}
    for site in SITES:
        group, sent, made = loaded[site], times[site], calls[site]
        optimal = group.valid / group.optimal_calls if group.optimal_calls else 0.0
        ceiling = max_tps * optimal
        span = max(sent) - min(sent)
        both_events = sum(1 for t in sent if t0 <= t <= t1)
        both_calls = sum(1 for t, _ in made if t0 <= t <= t1)
        eps = both_events / together if together > 0 else 0.0
        out.update(
            {
                f"{site}_valid_unique_events": group.valid,
                f"{site}_events": len(sent),
                f"{site}_calls": len(made),
                f"{site}_throttled_calls": throttled.get(TRACKERS[site], 0),
                f"{site}_events_per_call": round(len(sent) / len(made), 3),
                f"{site}_optimal_events_per_call": round(optimal, 3),
                f"{site}_ceiling_events_per_second": round(ceiling, 1),
                f"{site}_sending_seconds": round(span, 2),
                f"{site}_calls_per_second_own_span": round(len(made) / span, 1) if span else 0.0,
                f"{site}_events_per_second_own_span": round(len(sent) / span, 1) if span else 0.0,
                f"{site}_calls_per_second_together": round(both_calls / together, 1) if together > 0 else 0.0,
                f"{site}_events_per_second_together": round(eps, 1),
                f"{site}_calls_share_of_quota_together": round(both_calls / together / max_tps, 3)
                if together > 0
                else 0.0,
                f"{site}_share_of_ceiling_together": round(eps / ceiling, 3) if ceiling else 0.0,
            }
        )
    return out


def mode_two_groups(bench: Stack, args: argparse.Namespace) -> dict[str, Any]:
    bootstrap = bench.broker.bootstrap
    tag = uuid.uuid4().hex[:6]
    if args.group_routes == 2:
        topics = {site: f"bench-groups-{site}-{tag}" for site in SITES}
        routes: list[dict[str, Any]] = [
            {
                "name": f"clicks_{site}",
                "topics": [topics[site]],
                "operation": "events",
                "tracking_id": TRACKERS[site],
                "mapping": {"properties": PROPERTIES},
                "dead_letter_topic": f"{topics[site]}.dlq",
            }
            for site in SITES
        ]
    else:
        topic = f"bench-groups-{tag}"
        topics = dict.fromkeys(SITES, topic)
        routes = [
            {
                "name": "clicks",
                "topics": [topic],
                "operation": "events",
                "tracking_id_field": "site",
                "trackers": TRACKERS,
                "mapping": {"properties": PROPERTIES},
                "dead_letter_topic": f"{topic}.dlq",
            }
        ]
    for name in sorted(set(topics.values())):
        asyncio.run(make_topics(bootstrap, name, args.partitions))
    log(
        f"generating and producing 2 x {args.records:,} records ({args.sessions} concurrent sessions each) to "
        f"{sorted(set(topics.values()))} ({args.partitions} partitions); {args.group_routes} route(s)"
    )
    loaded = asyncio.run(_load_groups(bootstrap, topics, args))
    for site, group in loaded.items():
        log(f"group {site}: {group.valid:,} valid, optimal calls {group.optimal_calls:,}")
    bench.emulator.reset()
    load_before = load_average()
    emulator_before = schedstat(emulator_pid(bench))
    log(f"running one worker for both groups (run --until-drained); load average {load_before}")
    worker = route_worker(bench, "worker-two-groups", "bench-groups", routes, args)
    result, (_, worker_waited) = run_sampled(bench, worker, args.timeout)
    emulator_after = schedstat(emulator_pid(bench))
    emulator_seconds, emulator_waited = (b - a for a, b in zip(emulator_before, emulator_after, strict=True))
    load_after = load_average()
    stats = bench.emulator.stats()
    events = bench.emulator.events()
    throttled = {d: int(t["throttled"]) for d, t in stats.get("destinations", {}).get("events", {}).items()}
    results: dict[str, Any] = {
        "records": sum(g.records for g in loaded.values()),
        "group_routes": args.group_routes,
        "worker_exit": result.returncode,
        "wall_seconds": round(result.wall_seconds, 2),
        "events": stats["events"],
        "duplicate_events_at_emulator": stats["duplicate_events"],
        "events_per_second": round(stats["events"] / result.wall_seconds, 1) if result.wall_seconds else 0.0,
        **group_metrics(events, loaded, throttled, args.max_tps),
        "worker_cpu_seconds": round(result.cpu_seconds, 2),
        "worker_cpu_utilization": round(result.cpu_seconds / result.wall_seconds, 2) if result.wall_seconds else 0.0,
        "cpu_us_per_call": round((result.cpu_seconds - result.startup_cpu_seconds) / stats["calls"] * 1e6, 1)
        if stats["calls"]
        else 0.0,
        # Runnable but not running, as a share of the wall time: what the shared machine took away.
        "worker_runqueue_wait_share": round(worker_waited / result.wall_seconds, 2) if result.wall_seconds else 0.0,
        "emulator_cpu_utilization": round(emulator_seconds / result.wall_seconds, 2) if result.wall_seconds else 0.0,
        "emulator_runqueue_wait_share": round(emulator_waited / result.wall_seconds, 2) if result.wall_seconds else 0.0,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "worker_totals": result.totals,
    }
    del events
    gc.collect()
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--group-routes", type=int, choices=(1, 2), default=1, help="two-groups: 1 route by tracking_id_field, or 2"
    )
    parser.add_argument("--item-ids", type=int, default=5000, help="catalog-burst: distinct item ids")
    parser.add_argument("--items-tps", type=float, default=10.0, help="catalog-burst: emulator PutItems quota")
    parser.add_argument("--catalog-envelope", choices=("debezium", "none"), default="debezium")
    parser.add_argument("--coalesce-window-seconds", type=float, default=5.0, help="catalog-burst: the route's")
