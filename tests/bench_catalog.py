"""`python -m tests.bench --mode catalog-burst` (issue 13): a catalogue burst through one coalescing items route.

``--records`` (100,000) item updates over ``--item-ids`` (5,000) ids, as Debezium change events (or plain
rows: ``--catalog-envelope none``), keyed by id, loaded as a backlog and drained through one items route;
the emulator's PutItems quota is ``--items-tps`` (10) calls/s. Calls, items per call, ids sent twice within
the coalescing window, ids whose last accepted state is not their newest update, the superseded share, and
the burst's length against its floor: distinct ids / (10 x quota) seconds. Options and targets: bench_routes.

The ids sent before the backlog was read are sent again with their newest state at least a window later, so
`burst_vs_floor` means something only when the floor is well above the window (50 s vs 5 s at the defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import uuid
from collections import Counter, defaultdict
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from tests.bench import Stack, _http, log, make_topics, run_worker
from tests.bench_routes import load_average, route_worker

ITEMS_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/bench/ITEMS"
CATEGORIES = ("shoes", "shirts", "bags", "watches", "hats", "socks")


def catalog_updates(args: argparse.Namespace) -> tuple[list[tuple[bytes, bytes]], dict[str, int]]:
    """(key, value) of each update in production order, and each id's newest version (a global sequence,
    so the newest is the highest). Ids drawn uniformly: ~20 updates each at the defaults."""
    rng = random.Random(args.seed)
    newest: dict[str, int] = {}
    out: list[tuple[bytes, bytes]] = []
    for version in range(args.records):
        item_id = f"item-{rng.randrange(args.item_ids):05d}"
        row = {
            "item_id": item_id,
            "price": round(rng.uniform(1, 500), 2),
            "category": rng.choice(CATEGORIES),
            "stock": rng.randrange(1000),
            "version": version,
        }
        if args.catalog_envelope == "debezium":
            before = {**row, "version": newest[item_id]} if item_id in newest else None
            change = {
                "before": before,
                "after": row,
                "source": {"connector": "postgresql", "db": "shop", "table": "items", "lsn": 1000 + version},
                "op": "u" if before else "c",
                "ts_ms": 1_790_000_000_000 + version,
            }
            value = orjson.dumps(change)
        else:
            value = orjson.dumps(row)
        newest[item_id] = version
        out.append((item_id.encode(), value))
    return out, newest


async def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all", max_batch_size=512 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def item_records(bench: Stack) -> list[dict[str, Any]]:
    raw = _http(f"{bench.emulator.url}/_emulator/items", timeout=600)
    return [orjson.loads(line) for line in raw.splitlines() if line]


def catalog_metrics(
    sent: list[dict[str, Any]], newest: dict[str, int], updates: int, window: float, args: argparse.Namespace
) -> dict[str, Any]:
    """From the accepted PutItems records, in arrival order."""
    per_call: dict[str, list[str]] = defaultdict(list)
    sends: dict[str, list[float]] = defaultdict(list)
    last: dict[str, int] = {}
    for record in sent:
        per_call[record["request_id"]].append(record["itemId"])
        sends[record["itemId"]].append(record["received_at"])
        last[record["itemId"]] = orjson.loads(record["properties"])["version"]
    sizes = Counter(len(ids) for ids in per_call.values())
    # Received times carry the emulator's latency jitter (up to 2 x jitter between two calls); the worker's
    # rule holds at the time it takes a call, so a gap that much under the window is not a breach.
    allowance = 2 * args.jitter_ms / 1000.0
    gaps = [b - a for times in sends.values() for a, b in itertools.pairwise(times)]
    received = [r["received_at"] for r in sent]
    span = max(received) - min(received) if received else 0.0
    floor = len(newest) / (10 * args.items_tps)
    calls = len(per_call)
    return {
        "items_sent": len(sent),
        "calls": calls,
        "items_per_call": round(len(sent) / calls, 3) if calls else 0.0,
        "items_per_call_histogram": {str(k): v for k, v in sorted(sizes.items())},
        "partial_calls": sum(n for size, n in sizes.items() if size < 10),
        "calls_with_repeated_ids": sum(1 for ids in per_call.values() if len(set(ids)) < len(ids)),
        "ids_sent_more_than_once": sum(1 for times in sends.values() if len(times) > 1),
        "extra_sends": len(sent) - len(sends),
        "ids_sent_twice_within_window": sum(
            1 for times in sends.values() if any(b - a < window - allowance for a, b in itertools.pairwise(times))
        ),
        "min_resend_gap_seconds": round(min(gaps), 3) if gaps else None,
        "stale_or_missing_ids": sum(1 for item, version in newest.items() if last.get(item) != version),
        # Every update ends sent or superseded here (no deletes, no invalid rows; the worker drained and exited 0).
        "superseded": updates - len(sent),
        "superseded_share": round((updates - len(sent)) / updates, 4) if updates else 0.0,
        "sending_seconds": round(span, 2),
        "floor_seconds": round(floor, 2),
        # N calls at r/s hold the quota N/r seconds: the span between the first and last plus one interval.
        "burst_vs_floor": round((span + 1 / args.items_tps) / floor, 3) if floor else 0.0,
    }


def mode_catalog_burst(bench: Stack, args: argparse.Namespace) -> dict[str, Any]:
    bootstrap = bench.broker.bootstrap
    topic = f"bench-catalog-{uuid.uuid4().hex[:6]}"
    asyncio.run(make_topics(bootstrap, topic, args.partitions))
    messages, newest = catalog_updates(args)
    log(
        f"producing {len(messages):,} {args.catalog_envelope} item updates over {len(newest):,} ids "
        f"to {topic!r} ({args.partitions} partitions)"
    )
    asyncio.run(_produce(bootstrap, topic, messages))
    del messages
    bench.emulator.reset()
    _http(f"{bench.emulator.url}/_emulator/config", orjson.dumps({"quotas": {"items": args.items_tps}}))
    window = args.coalesce_window_seconds
    route: dict[str, Any] = {
        "name": "catalog",
        "topics": [topic],
        "operation": "items",
        "dataset_arn": ITEMS_ARN,
        "envelope": args.catalog_envelope,
        "mapping": {"properties": "*"},
        "coalesce_window_seconds": window,
        "max_requests_per_second": args.items_tps,
        "dead_letter_topic": f"{topic}.dlq",
    }
    load_before = load_average()
    log(f"running the worker: one items route, PutItems quota {args.items_tps:g}/s; load average {load_before}")
    worker = route_worker(bench, "worker-catalog", "bench-catalog", [route], args)
    result = run_worker(bench, worker, args.timeout)
    stats = bench.emulator.stats()
    sent = item_records(bench)
    return {
        "updates": args.records,
        "distinct_ids": len(newest),
        "envelope": args.catalog_envelope,
        "items_quota_per_second": args.items_tps,
        "coalesce_window_seconds": window,
        "worker_exit": result.returncode,
        "wall_seconds": round(result.wall_seconds, 2),
        "worker_cpu_seconds": round(result.cpu_seconds, 2),
        "throttled_calls": stats["throttled"],
        **catalog_metrics(sent, newest, args.records, window, args),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
