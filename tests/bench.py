"""`make bench`: the issue-5 benchmark of the worker on the real local stack.

    python -m tests.bench [--mode MODE] [options]      (see --help; modes below)

Everything runs as real processes: a Kafka broker of its own (``deploy/local/kafka`` on a free port
in a temp dir), the Personalize Events emulator (``python -m worker.emulator``) and the worker CLI
(``python -m worker.cli run``). Everything started here is stopped here, on errors and Ctrl-C too.

Modes (each runs on its own):

``drain`` (default)
    1. Backlog drain: a synthetic clickstream (``worker.commands.sample.generate``: concurrent sessions,
       Zipf items, heavy-tailed session lengths, ~2 % re-delivered duplicates, ~0.5 % malformed)
       is loaded into a topic, then ``run --until-drained`` is timed from process start to exit.
       The worker's CPU time and peak RSS come from ``os.wait4`` on its pid (that process only).
    2. Naive baseline on the same topic with another consumer group, in this process: what a
       user writes first. An aiokafka consumer with auto-commit (every 5 s, aiokafka's default),
       ``json.loads`` per record, one ``put_events`` call with ONE event per record through an
       aioboto3 client with default settings, awaited sequentially (``--naive-concurrency 1``;
       more runs that many such loops over the partitions). Bad records are skipped. Bounded by
       ``--naive-seconds`` or ``--naive-records``, whichever comes first.
    3. Real time: a producer writes ``--realtime-rate`` events/s over ``--realtime-sessions``
       sessions for ``--realtime-seconds`` while a worker runs normally; the age of each event
       is the emulator's ``received_at`` minus the wall time at which this process produced it
       (kept in a map by eventId: the event's sentAt is cut to whole seconds by botocore).

``shared-quota``
    Three worker processes in one group on one backlog against one emulator limited to
    ``--max-tps`` calls/s in total: accepted calls/s as a share of the quota, share throttled.

``memory``
    A 1,000,000-record backlog drained with a dedup window of ``--dedup-ids`` (1,000,000) ids:
    the worker's peak RSS. Plus the dedup window's bytes per id, measured in this process with
    tracemalloc on ``worker.flow.dedup.Dedup`` filled with that many realistic eventIds.

``hot-session``
    Issue 11: the drain of ``drain`` twice, on two topics: the backlog as generated, then the same
    backlog with ``--hot-share`` (5 %) of its events moved to one session (a bot reusing one sessionId;
    all its records keyed alike, so on one partition). The drain rate with the hot session as a share of
    the rate without it (target >= 90 %), and how fast the hot session's own events went.

``decode``
    No stack: CPU per record of decoding schema-registry framed values (tests/bench_decode.py).

``map``
    No stack: CPU per record of mapping: plain paths, and the presets (tests/bench_map.py).

``noise`` and ``quota-find``
    The rate limiter under random throttling and below a quota: see tests/bench_rate.py.

``two-groups``, ``catalog-burst``
    Issue 13, routes (tests/bench_routes.py): one worker feeding two dataset groups at their own quotas;
    a 100,000-update catalogue burst over 5,000 ids through one coalescing items route.

Results are printed as a table and written as JSON to ``.bench/results.json`` (drain), or
``.bench/results-MODE.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import gc
import itertools
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aioboto3
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from tests.kafka_support import KafkaBroker, create_topic, free_port
from worker.commands.sample import HOT_SESSION_ID, generate, optimal_calls
from worker.flow.dedup import Dedup

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / ".bench"
TRACKING_ID = "bench-tracking-id"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
PROPERTIES = ["ctx.page_category", "ctx.device_type"]
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Issue 5 targets, raised by issue 13 (share of the ceiling, CPU per event, both from process start to exit):
# (results key, comparison, threshold or None when it depends on the run).
TARGETS_DRAIN = {
    "events_per_second": ">= 9000",
    "share_of_ceiling": ">= 0.95",
    "speedup_vs_naive": ">= 8",
    "events_per_call_vs_optimal": ">= 0.95",
    "cpu_us_per_event": "<= 50",
    "p99_event_age_ms": "<= linger + 250",
}


def log(text: str) -> None:
    print(f"==> {text}", flush=True)


# --------------------------------------------------------------------------- data


@dataclass
class Chunk:
    """A slice of the clickstream, compact enough to ship back from a generator process."""

    records: list[tuple[bytes, bytes]]
    counts: dict[str, int]
    optimal_calls: int


def _make_chunk(
    records: int, seed: int, sessions: int, start: float, min_session_events: int, hot_share: float
) -> Chunk:
    stream = generate(
        records,
        seed=seed,
        concurrent_sessions=sessions,
        start=start,
        min_session_events=min_session_events,
        hot_session_share=hot_share,
    )
    counts = Counter(m.kind for m in stream.messages)
    return Chunk([(m.key, m.value) for m in stream.messages], dict(counts), optimal_calls(stream))


def generate_chunks(
    total: int, chunk: int, sessions: int, seed: int, jobs: int, min_session_events: int, hot_share: float = 0.0
) -> Iterator[Chunk]:
    """`generate()` in independent chunks (distinct seeds, so distinct session and event ids) on
    `jobs` processes: one 1M-record stream would hold ~1 GB."""
    sizes = [min(chunk, total - start) for start in range(0, total, chunk)]
    span = chunk / 200.0  # generate()'s default 200 events/s of simulated time per chunk
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        window = jobs * 2
        futures = []
        for index, size in enumerate(sizes):
            futures.append(
                pool.submit(
                    _make_chunk,
                    size,
                    seed * 1000 + index,
                    sessions,
                    1_790_000_000.0 + index * span,
                    min_session_events,
                    hot_share,
                )
            )
            while len(futures) > window:
                yield futures.pop(0).result()
        for future in futures:
            yield future.result()


@dataclass
class Loaded:
    topic: str
    records: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    optimal_calls: int = 0
    seconds: float = 0.0

    @property
    def valid(self) -> int:
        return self.counts["valid"]


async def load_topic(
    bootstrap: str, topic: str, args: argparse.Namespace, total: int, hot_share: float = 0.0
) -> Loaded:
    loaded = Loaded(topic)
    started = time.monotonic()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, acks="all", max_batch_size=512 * 1024, compression_type=None
    )
    await producer.start()
    try:
        chunks = generate_chunks(
            total, args.chunk, args.sessions, args.seed, args.jobs, args.min_session_events, hot_share
        )
        for chunk in chunks:
            futures = [await producer.send(topic, value, key=key) for key, value in chunk.records]
            await asyncio.gather(*futures)
            loaded.records += len(chunk.records)
            loaded.counts.update(chunk.counts)
            loaded.optimal_calls += chunk.optimal_calls
            print(f"    produced {loaded.records:,}/{total:,}", end="\r", flush=True)
    finally:
        await producer.stop()
    print()
    loaded.seconds = time.monotonic() - started
    return loaded


# --------------------------------------------------------------------------- processes


def _http(url: str, body: bytes | None = None, timeout: float = 30.0) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: bytes = response.read()
        return data


def _wait_for_line(path: Path, predicate: Callable[[str], bool], timeout: float, alive: Callable[[], bool]) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(errors="replace").splitlines():
                if predicate(line):
                    return line
        if not alive():
            break
        time.sleep(0.05)
    tail = path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"
    raise RuntimeError(f"{path.name}: expected line not seen within {timeout}s\n{tail}")


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process so far (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Emulator:
    """`python -m worker.emulator` on a free port, output to a log file (a pipe nobody reads would block it)."""

    def __init__(self, tmp: Path, max_tps: float, latency_ms: float, jitter_ms: float) -> None:
        self.log_path = tmp / "emulator.log"
        self.args = ["--max-tps", str(max_tps), "--latency-ms", str(latency_ms), "--jitter-ms", str(jitter_ms)]
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker.emulator",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--seed",
                    "5",
                    *self.args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **AWS_ENV},
            )
        process = self.process
        line = _wait_for_line(self.log_path, lambda s: "listening on" in s, 60, lambda: process.poll() is None)
        self.url = line.rsplit(" ", 1)[-1].strip()

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(_http(f"{self.url}/_emulator/stats"))
        return result

    def reset(self) -> None:
        _http(f"{self.url}/_emulator/reset", b"{}")

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in _http(f"{self.url}/_emulator/events", timeout=600).splitlines() if line]


@dataclass
class WorkerResult:
    returncode: int
    wall_seconds: float
    cpu_seconds: float
    startup_cpu_seconds: float
    peak_rss_mb: float
    totals: dict[str, Any]


def compile_worker() -> None:
    """Byte-compile the worker's package before a timed start, as the image's `pip install` does: this editable
    install under PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module from source at each start
    (~0.15 s, which the product does not spend)."""
    compileall.compile_dir(ROOT / "worker", quiet=1)


class Worker:
    """`python -m worker.cli run` as a subprocess. A thread reaps it with ``os.wait4``: the rusage
    returned is exactly that process's CPU time and peak RSS (it starts no children)."""

    def __init__(self, tmp: Path, name: str, sections: dict[str, dict[str, Any]], until_drained: bool) -> None:
        self.name = name
        self.log_path = tmp / f"{name}.log"
        self.metrics_port = free_port()
        sections = {k: dict(v) for k, v in sections.items()}
        sections.setdefault("metrics", {}).update(host="127.0.0.1", port=self.metrics_port)
        self.config = tmp / f"{name}.toml"
        self.config.write_text(_toml(sections), encoding="utf-8")
        self.until_drained = until_drained
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.ended: float | None = None
        self.startup_cpu = 0.0
        self._rusage: tuple[int, resource.struct_rusage] | None = None
        self._reaper: threading.Thread | None = None

    def start(self) -> None:
        compile_worker()
        command = [sys.executable, "-m", "worker.cli", "run", "--config", str(self.config)]
        if self.until_drained:
            command.append("--until-drained")
        self.started = time.monotonic()
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **AWS_ENV}
            )
        self._reaper = threading.Thread(target=self._reap, name=f"reap-{self.name}", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        assert self.process is not None
        _, status, usage = os.wait4(self.process.pid, 0)
        self.ended = time.monotonic()
        self._rusage = (status, usage)
        self.process.returncode = os.waitstatus_to_exitcode(status)

    @property
    def running(self) -> bool:
        return self.process is not None and self._rusage is None

    def wait_running(self, timeout: float = 90.0) -> None:
        """Until the worker logs "running"; records the CPU it spent starting (imports, clients)."""
        _wait_for_line(self.log_path, lambda s: '"msg":"running"' in s, timeout, lambda: self.running)
        assert self.process is not None
        with contextlib.suppress(OSError, ValueError):
            self.startup_cpu = _proc_cpu_seconds(self.process.pid)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until /readyz answers 200 (partitions assigned)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running:
            with contextlib.suppress(OSError, urllib.error.URLError):
                _http(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2)
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready within {timeout}s\n{self.log_tail()}")

    def join(self, timeout: float | None) -> bool:
        if self._reaper is not None:
            self._reaper.join(timeout)
        return not self.running

    def signal(self, sig: signal.Signals) -> None:
        if self.running and self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None:
            return
        if self.running:
            self.signal(signal.SIGTERM)
            if not self.join(timeout):
                self.signal(signal.SIGKILL)
                self.join(10)

    def result(self) -> WorkerResult:
        assert self._rusage is not None and self.ended is not None and self.process is not None
        _, usage = self._rusage
        return WorkerResult(
            returncode=int(self.process.returncode or 0),
            wall_seconds=self.ended - self.started,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            startup_cpu_seconds=self.startup_cpu,
            peak_rss_mb=usage.ru_maxrss / 1024.0,  # KiB on Linux
            totals=self.totals(),
        )

    def totals(self) -> dict[str, Any]:
        for line in reversed(self.log_text().splitlines()):
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if isinstance(entry, dict) and entry.get("msg") == "stopped":
                    totals: dict[str, Any] = entry.get("totals", {})
                    return totals
        return {}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def worker_sections(
    bootstrap: str, topic: str, group: str, endpoint: str, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    return {
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic], "group_id": group},
        "personalize": {"tracking_id": TRACKING_ID, "endpoint_url": endpoint},
        "mapping": {"properties": PROPERTIES},
        "batching": {"linger_ms": args.linger_ms, **batching_overrides(args)},
        "dedup": {"max_ids": args.dedup_ids},
        "dead_letter": {"topic": f"{topic}.dlq"},
        "worker": {"log_format": "json", "commit_interval_seconds": 0.5},
    }


def batching_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The [batching] keys given on the command line; the worker's defaults otherwise."""
    keys = ("max_buffered_events", "max_calls_per_session", "max_session_events")
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}


@dataclass
class Stack:
    """The broker and the emulator; stopped by `close()` whatever state they are in."""

    tmp: Path
    broker: KafkaBroker
    emulator: Emulator
    workers: list[Worker] = field(default_factory=list)
    broker_started: bool = False

    def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.stop(30)
        with contextlib.suppress(Exception):
            self.emulator.stop()
        if self.broker_started:
            log("stopping the broker and the emulator")
            try:
                self.broker.stop()
            except Exception as error:
                print(f"bench: stopping the broker failed: {error}", file=sys.stderr)


@contextlib.contextmanager
def stack(args: argparse.Namespace) -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="pw-bench-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        bench = Stack(
            tmp, KafkaBroker(port=port, dir=tmp / "kafka"), Emulator(tmp, args.max_tps, args.latency_ms, args.jitter_ms)
        )
        try:
            log(f"starting the Kafka broker on localhost:{port} (state in {tmp / 'kafka'})")
            bench.broker_started = True
            bench.broker.start()
            asyncio.run(_warm_up(bench.broker.bootstrap))
            log(
                f"starting the emulator (--max-tps {args.max_tps:g} --latency-ms {args.latency_ms:g} "
                f"--jitter-ms {args.jitter_ms:g})"
            )
            bench.emulator.start()
            yield bench
        finally:
            bench.close()


async def _warm_up(bootstrap: str, timeout: float = 60.0) -> None:
    """Have the group coordinator ready before anything is timed."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await admin.find_coordinator("bench-warm-up")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def make_topics(bootstrap: str, topic: str, partitions: int) -> None:
    await create_topic(bootstrap, topic, partitions)
    await create_topic(bootstrap, f"{topic}.dlq", 1)


def run_worker(bench: Stack, worker: Worker, timeout: float) -> WorkerResult:
    bench.workers.append(worker)
    worker.start()
    worker.wait_running()
    if not worker.join(timeout):
        print(f"bench: {worker.name} still running after {timeout}s; stopping it", file=sys.stderr)
        worker.stop()
    result = worker.result()
    if result.returncode != 0:
        print(f"bench: {worker.name} exited with {result.returncode}\n{worker.log_tail()}", file=sys.stderr)
    return result


# --------------------------------------------------------------------------- naive baseline


def _naive_event(obj: Any) -> tuple[str, str | None, dict[str, Any]]:
    """The mapping a first version writes inline: field by field, no validation."""
    event: dict[str, Any] = {
        "eventId": obj["event_id"],
        "eventType": obj["event_type"],
        "itemId": obj["item_id"],
        "sentAt": obj["timestamp"],
        "properties": json.dumps(
            {"pageCategory": obj["ctx"]["page_category"], "deviceType": obj["ctx"]["device_type"]}
        ),
    }
    if "event_value" in obj:
        event["eventValue"] = obj["event_value"]
    return obj["session_id"], obj.get("user_id"), event


async def run_naive(bootstrap: str, topic: str, endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    """A consumer loop, one `put_events` per record with one event, sequential awaits per loop."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"naive-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=True,  # aiokafka default: commits every 5 s
    )
    session = aioboto3.Session()
    sent = errors = skipped = consumed = 0
    started = time.monotonic()
    deadline = started + args.naive_seconds
    done = asyncio.Event()
    first_send: float | None = None
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(1, args.naive_concurrency) * 2)

    async with session.client(
        "personalize-events",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    ) as client:

        async def sender() -> None:
            nonlocal sent, errors, skipped, first_send
            while True:
                value = await queue.get()
                try:
                    session_id, user_id, event = _naive_event(json.loads(value))
                except Exception:  # a first version logs and skips bad records
                    skipped += 1
                    continue
                request: dict[str, Any] = {"trackingId": TRACKING_ID, "sessionId": session_id, "eventList": [event]}
                if user_id is not None:
                    request["userId"] = user_id
                try:
                    if first_send is None:
                        first_send = time.monotonic()
                    await client.put_events(**request)
                    sent += 1
                except Exception:  # counted, not retried
                    errors += 1
                if sent >= args.naive_records or time.monotonic() >= deadline:
                    done.set()

        await consumer.start()
        senders = [asyncio.create_task(sender()) for _ in range(max(1, args.naive_concurrency))]
        try:
            while not done.is_set() and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=200, max_records=100)
                for records in batches.values():
                    for record in records:
                        consumed += 1
                        await queue.put(record.value)
                        if done.is_set():
                            break
        finally:
            elapsed = time.monotonic() - (first_send or started)
            for task in senders:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
            await consumer.stop()
    return {
        "naive_events_sent": sent,
        "naive_errors": errors,
        "naive_skipped": skipped,
        "naive_seconds": round(elapsed, 2),
        "naive_events_per_second": round(sent / elapsed, 1) if elapsed > 0 else 0.0,
        "naive_concurrency": max(1, args.naive_concurrency),
    }


# --------------------------------------------------------------------------- real-time phase


def realtime_messages(args: argparse.Namespace) -> list[tuple[str, bytes, dict[str, Any]]]:
    """(eventId, key, object) for the real-time phase: generate()'s sessions, fresh ids, no bad records."""
    count = int(args.realtime_rate * args.realtime_seconds)
    stream = generate(
        count,
        seed=args.seed + 9000,
        concurrent_sessions=args.realtime_sessions,
        duplicate_rate=0.0,
        malformed_rate=0.0,
    )
    out: list[tuple[str, bytes, dict[str, Any]]] = []
    for index, message in enumerate(stream.valid):
        assert message.source is not None
        obj = dict(message.source)
        obj["event_id"] = f"rt-{args.seed}-{index}"
        out.append((obj["event_id"], message.key, obj))
    return out


async def produce_realtime(
    bootstrap: str, topic: str, messages: list[tuple[str, bytes, dict[str, Any]]], rate: float
) -> dict[str, float]:
    """Produce at `rate` messages/s; returns eventId → wall time just before the send."""
    sent_at: dict[str, float] = {}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    try:
        futures = []
        began = time.monotonic()
        index = 0
        while index < len(messages):
            now = time.monotonic()
            due = int((now - began) * rate) + 1
            while index < min(due, len(messages)):
                event_id, key, obj = messages[index]
                wall = time.time()
                obj["timestamp"] = int(wall)  # whole seconds: what botocore would send anyway
                sent_at[event_id] = wall
                futures.append(await producer.send(topic, orjson.dumps(obj), key=key))
                index += 1
            await asyncio.sleep(max(0.0, began + index / rate - time.monotonic()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent_at


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[rank]


def run_realtime(bench: Stack, args: argparse.Namespace) -> dict[str, Any]:
    bootstrap, emulator = bench.broker.bootstrap, bench.emulator
    topic = f"bench-rt-{uuid.uuid4().hex[:6]}"
    asyncio.run(make_topics(bootstrap, topic, args.partitions))
    messages = realtime_messages(args)
    log(
        f"real time: {len(messages):,} events at {args.realtime_rate:g}/s over {args.realtime_sessions:,} "
        f"concurrent sessions, worker in normal mode (linger {args.linger_ms} ms)"
    )
    emulator.reset()
    worker = Worker(
        bench.tmp, "worker-realtime", worker_sections(bootstrap, topic, "bench-rt", emulator.url, args), False
    )
    bench.workers.append(worker)
    worker.start()
    worker.wait_running()
    worker.wait_ready()
    time.sleep(1.0)  # let the first fetch be in flight
    sent_at = asyncio.run(produce_realtime(bootstrap, topic, messages, args.realtime_rate))
    deadline = time.monotonic() + args.linger_ms / 1000.0 + 15
    while time.monotonic() < deadline and emulator.stats()["events"] < len(sent_at):
        time.sleep(0.2)
    worker.stop()
    stats = emulator.stats()
    ages = [
        (event["received_at"] - sent_at[event["eventId"]]) * 1000.0
        for event in emulator.events()
        if event.get("eventId") in sent_at
    ]
    return {
        "realtime_produced": len(sent_at),
        "realtime_delivered": len(ages),
        "realtime_calls": stats["calls"],
        "realtime_events_per_call": round(stats["events"] / stats["calls"], 2) if stats["calls"] else 0.0,
        "realtime_throttled_calls": stats["throttled"],
        "p50_event_age_ms": round(percentile(ages, 50), 1),
        "p90_event_age_ms": round(percentile(ages, 90), 1),
        "p99_event_age_ms": round(percentile(ages, 99), 1),
        "max_event_age_ms": round(max(ages), 1) if ages else float("nan"),
        "realtime_worker_exit": worker.result().returncode,
    }


# --------------------------------------------------------------------------- modes


def drain_metrics(
    loaded: Loaded, result: WorkerResult, stats: dict[str, Any], events: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    calls, sent = int(stats["calls"]), int(stats["events"])
    received = [e["received_at"] for e in events]
    active = (max(received) - min(received)) if received else 0.0
    optimal = loaded.valid / loaded.optimal_calls if loaded.optimal_calls else 0.0
    epc = sent / calls if calls else 0.0
    steady_cpu = result.cpu_seconds - result.startup_cpu_seconds
    return {
        "records": loaded.records,
        "valid_unique_events": loaded.valid,
        "duplicates_in_data": loaded.counts["duplicate"],
        "malformed_in_data": loaded.counts["malformed"],
        "worker_exit": result.returncode,
        "wall_seconds": round(result.wall_seconds, 2),
        "events": sent,
        "unique_event_ids_at_emulator": stats["unique_event_ids"],
        "duplicate_events_at_emulator": stats["duplicate_events"],
        "events_per_second": round(sent / result.wall_seconds, 1) if result.wall_seconds else 0.0,
        "events_per_second_active": round(sent / active, 1) if active else 0.0,
        "calls": calls,
        "calls_per_second_active": round(calls / active, 1) if active else 0.0,
        "throttled_calls": stats["throttled"],
        "events_per_call": round(epc, 3),
        "optimal_calls": loaded.optimal_calls,
        "optimal_events_per_call": round(optimal, 3),
        "events_per_call_vs_optimal": round(epc / optimal, 3) if optimal else 0.0,
        "ceiling_events_per_second": round(args.max_tps * optimal, 1),
        # The 9,000 events/s is 90 % of the ceiling when every call can be full (10 events):
        # on data whose sessions leave partial calls, the same share of this data's ceiling.
        "share_of_ceiling": round(sent / result.wall_seconds / (args.max_tps * optimal), 3)
        if result.wall_seconds and optimal
        else 0.0,
        "share_of_ceiling_active": round(sent / active / (args.max_tps * optimal), 3) if active and optimal else 0.0,
        "events_per_call_histogram": stats.get("events_per_call", {}),
        "worker_cpu_seconds": round(result.cpu_seconds, 2),
        "worker_startup_cpu_seconds": round(result.startup_cpu_seconds, 2),
        "cpu_us_per_event": round(result.cpu_seconds / sent * 1e6, 1) if sent else 0.0,
        "cpu_us_per_event_excl_startup": round(steady_cpu / sent * 1e6, 1) if sent else 0.0,
        "cpu_us_per_call": round(steady_cpu / calls * 1e6, 1) if calls else 0.0,
        "worker_cpu_utilization": round(result.cpu_seconds / result.wall_seconds, 2) if result.wall_seconds else 0.0,
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "worker_totals": result.totals,
    }


def drain_once(
    bench: Stack, args: argparse.Namespace, name: str, hot_share: float = 0.0
) -> tuple[Loaded, WorkerResult, dict[str, Any], list[dict[str, Any]]]:
    bootstrap = bench.broker.bootstrap
    topic = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    asyncio.run(make_topics(bootstrap, topic, args.partitions))
    log(
        f"generating and producing {args.records:,} records to {topic!r} "
        f"({args.partitions} partitions, {args.sessions} concurrent sessions)"
    )
    loaded = asyncio.run(load_topic(bootstrap, topic, args, args.records, hot_share))
    log(
        f"loaded in {loaded.seconds:.0f}s: {loaded.valid:,} valid, {loaded.counts['duplicate']:,} duplicates, "
        f"{loaded.counts['malformed']:,} malformed; optimal calls {loaded.optimal_calls:,}"
    )
    bench.emulator.reset()
    log("running the worker: run --until-drained")
    worker = Worker(
        bench.tmp, f"worker-{name}", worker_sections(bootstrap, topic, "bench-worker", bench.emulator.url, args), True
    )
    result = run_worker(bench, worker, args.timeout)
    stats = bench.emulator.stats()
    events = bench.emulator.events()
    return loaded, result, stats, events


def mode_drain(bench: Stack, args: argparse.Namespace) -> dict[str, Any]:
    loaded, result, stats, events = drain_once(bench, args, "drain")
    results = drain_metrics(loaded, result, stats, events, args)
    del events
    gc.collect()
    if not args.skip_naive:
        log(
            f"naive baseline on the same topic, another group: one event per put_events, "
            f"{max(1, args.naive_concurrency)} sequential loop(s), "
            f"up to {args.naive_seconds:g}s or {args.naive_records:,} events"
        )
        bench.emulator.reset()
        results.update(asyncio.run(run_naive(bench.broker.bootstrap, loaded.topic, bench.emulator.url, args)))
        naive = results["naive_events_per_second"]
        results["speedup_vs_naive"] = round(results["events_per_second"] / naive, 1) if naive else None
    if not args.skip_realtime:
        results.update(run_realtime(bench, args))
    return results


def mode_shared_quota(bench: Stack, args: argparse.Namespace) -> dict[str, Any]:
    bootstrap, emulator = bench.broker.bootstrap, bench.emulator
    topic = f"bench-shared-{uuid.uuid4().hex[:6]}"
    asyncio.run(make_topics(bootstrap, topic, args.partitions))
    log(f"generating and producing {args.records:,} records to {topic!r} ({args.partitions} partitions)")
    loaded = asyncio.run(load_topic(bootstrap, topic, args, args.records))
    emulator.reset()
    log(f"running {args.replicas} workers in one group against one quota of {args.max_tps:g} calls/s")
    sections = worker_sections(bootstrap, topic, "bench-shared", emulator.url, args)
    workers = [Worker(bench.tmp, f"worker-shared-{n}", sections, True) for n in range(args.replicas)]
    samples: list[tuple[float, int, int]] = []  # (time, accepted calls, throttled)
    for worker in workers:
        bench.workers.append(worker)
        worker.start()
    for worker in workers:
        worker.wait_running()
    while any(w.running for w in workers) and time.monotonic() - workers[0].started < args.timeout:
        stats = emulator.stats()
        samples.append((time.monotonic(), int(stats["calls"]), int(stats["throttled"])))
        time.sleep(0.5)
    for worker in workers:
        worker.stop()
    stats = emulator.stats()
    samples.append((time.monotonic(), int(stats["calls"]), int(stats["throttled"])))
    results = [w.result() for w in workers]
    # The shared window: from the first accepted call to the first worker's exit (all three busy).
    first_exit = min(w.ended or time.monotonic() for w in workers)
    busy = [s for s in samples if s[1] > 0 and s[0] <= first_exit]
    window: dict[str, Any] = {}
    if len(busy) >= 2:
        (t0, c0, h0), (t1, c1, h1) = busy[0], busy[-1]
        calls, throttled = c1 - c0, h1 - h0
        window = {
            "window_seconds": round(t1 - t0, 1),
            "aggregate_calls_per_second": round(calls / (t1 - t0), 1),
            "quota_utilization": round(calls / (t1 - t0) / args.max_tps, 3),
            "throttled_share": round(throttled / (calls + throttled), 4) if calls + throttled else 0.0,
        }
        per_second = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(busy) if b[0] > a[0]]
        window["calls_per_second_median"] = round(statistics.median(per_second), 1) if per_second else 0.0
    total_calls, total_throttled = int(stats["calls"]), int(stats["throttled"])
    return {
        "records": loaded.records,
        "replicas": args.replicas,
        "worker_exits": [r.returncode for r in results],
        "worker_wall_seconds": [round(r.wall_seconds, 1) for r in results],
        "worker_cpu_seconds": [round(r.cpu_seconds, 1) for r in results],
        "events": stats["events"],
        "calls": total_calls,
        "throttled_calls": total_throttled,
        "throttled_share_overall": round(total_throttled / (total_calls + total_throttled), 4)
        if total_calls + total_throttled
        else 0.0,
        "events_per_call": round(stats["events"] / total_calls, 3) if total_calls else 0.0,
        **window,
    }


def hot_session_metrics(events: list[dict[str, Any]]) -> dict[str, Any]:
    """How the hot session's own events went, next to the whole drain's sending time."""
    received = [e["received_at"] for e in events]
    hot = [e for e in events if e.get("sessionId") == HOT_SESSION_ID]
    if not hot or not received:
        return {"hot_session_events": 0}
    hot_received = [e["received_at"] for e in hot]
    span = max(hot_received) - min(hot_received)
    calls = len({e["request_id"] for e in hot})
    first, last = min(received), max(received)
    rest = sorted(e["received_at"] for e in events if e.get("sessionId") != HOT_SESSION_ID)
    return {
        # When 99 % of the other sessions' events were in, as a share of the drain's sending time: the
        # rest is the tail the hot session (and its partition) added.
        "others_p99_vs_drain": round((percentile(rest, 99) - first) / (last - first), 3) if last > first else 0.0,
        "hot_session_events": len(hot),
        "hot_session_calls": calls,
        "hot_session_events_per_call": round(len(hot) / calls, 2),
        "hot_session_events_per_second": round(len(hot) / span, 1) if span else 0.0,
        # 1.0: its last event went with the drain's last; more: it held the drain's end back.
        "hot_session_end_vs_drain": round((max(hot_received) - first) / (last - first), 3) if last > first else 0.0,
    }


def mode_hot_session(bench: Stack, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, share in (("plain", 0.0), ("hot", args.hot_share)):
        loaded, result, stats, events = drain_once(bench, args, name, share)
        drained = drain_metrics(loaded, result, stats, events, args)
        keys = (
            "records",
            "worker_exit",
            "wall_seconds",
            "events",
            "duplicate_events_at_emulator",
            "events_per_second",
            "events_per_second_active",
            "events_per_call",
            "share_of_ceiling",
            "cpu_us_per_event",
        )
        # Not peak_rss_mb: the second worker's ru_maxrss includes this process's own peak (Linux records
        # the pre-exec image's high-water mark in the child's), here after the first run's event list.
        results.update({f"{name}_{key}": drained[key] for key in keys})
        if share:
            results.update(hot_session_metrics(events))
        del events
        gc.collect()
    plain, hot = results["plain_events_per_second"], results["hot_events_per_second"]
    results["hot_vs_plain"] = round(hot / plain, 3) if plain else 0.0
    plain, hot = results["plain_events_per_second_active"], results["hot_events_per_second_active"]
    results["hot_vs_plain_active"] = round(hot / plain, 3) if plain else 0.0
    return results


def dedup_bytes_per_id(count: int) -> dict[str, Any]:
    """tracemalloc over a Dedup filled like the worker fills it (admit, then delivered in calls of 10)."""
    out: dict[str, Any] = {}

    def sample_id(n: int) -> str:
        return f"evt-7-{n}"  # worker.commands.sample's ids

    def uuid_id(n: int) -> str:
        return str(uuid.uuid4())  # what many producers send

    makers: list[tuple[str, Callable[[int], str]]] = [("sample", sample_id), ("uuid4", uuid_id)]
    for style, make in makers:
        gc.collect()
        tracemalloc.start()
        dedup: Dedup[int] = Dedup(3600.0, count, time.monotonic)
        batch: list[str] = []
        for n in range(count):
            event_id = make(n)
            dedup.admit(event_id, n)
            batch.append(event_id)
            if len(batch) == 10:
                dedup.delivered(batch)
                batch = []
        dedup.delivered(batch)
        del batch
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[f"dedup_bytes_per_id_{style}"] = round(current / count, 1)
        out[f"dedup_peak_bytes_per_id_{style}"] = round(peak / count, 1)
        out[f"dedup_ids_{style}"] = len(dedup)
        del dedup
    return out


def mode_memory(bench: Stack, args: argparse.Namespace) -> dict[str, Any]:
    loaded, result, stats, events = drain_once(bench, args, "memory")
    results = drain_metrics(loaded, result, stats, events, args)
    del events
    gc.collect()
    log(f"dedup window: tracemalloc over worker.flow.dedup.Dedup with {args.dedup_ids:,} ids")
    results.update(dedup_bytes_per_id(args.dedup_ids))
    return results


# --------------------------------------------------------------------------- report


def _verdict(value: Any, rule: str, linger_ms: int) -> str:
    if value is None or not isinstance(value, (int, float)):
        return "-"
    op, _, raw = rule.partition(" ")
    threshold = linger_ms + 250.0 if raw == "linger + 250" else float(raw)
    ok = value >= threshold if op == ">=" else value <= threshold
    return "ok" if ok else "MISS"


def report(mode: str, results: dict[str, Any], args: argparse.Namespace) -> None:
    targets: dict[str, str] = dict(TARGETS_DRAIN) if mode == "drain" else {}
    if mode == "shared-quota":
        targets = {"quota_utilization": ">= 0.9", "throttled_share": "<= 0.05"}
    if mode == "memory":
        targets = {"peak_rss_mb": "<= 400"}
    if mode == "hot-session":
        targets = {"hot_vs_plain": ">= 0.90"}
    if mode == "decode":
        from tests.bench_decode import TARGETS

        targets = dict(TARGETS)
    if mode == "map":
        from tests.bench_map import TARGETS as MAP_TARGETS

        targets = dict(MAP_TARGETS)
    if mode in ("two-groups", "catalog-burst"):
        from tests.bench_routes import TARGETS as ROUTE_TARGETS

        targets = dict(ROUTE_TARGETS[mode])
    if mode in RATE_MODES:
        targets = _rate_bench().TARGETS[mode]
    print(f"\nresults ({mode})")
    print(f"  {'metric':<34} {'value':>14}  {'target':<18} verdict")
    for key, value in results.items():
        if isinstance(value, (dict, list)) and key not in ("worker_exits", "worker_wall_seconds", "worker_cpu_seconds"):
            continue
        rule = targets.get(key, "")
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        verdict = _verdict(value, rule, args.linger_ms) if rule else ""
        print(f"  {key:<34} {shown:>14}  {rule:<18} {verdict}")
    print()


RATE_MODES = ("noise", "quota-find")


def _rate_bench() -> Any:
    """tests/bench_rate.py, imported when used: it builds on this module's helpers."""
    from tests import bench_rate

    return bench_rate


def parameters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **{k: v for k, v in vars(args).items() if k not in ("out",)},
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=(__doc__ or "").split("\n")[0])
    modes = (
        "drain",
        "shared-quota",
        "memory",
        "hot-session",
        "decode",
        "map",
        "two-groups",
        "catalog-burst",
        *RATE_MODES,
    )
    parser.add_argument("--mode", choices=modes, default="drain")
    parser.add_argument(
        "--records",
        type=int,
        default=None,
        help="backlog size (drain/shared-quota 200,000; memory 1,000,000; two-groups 100,000 per group; "
        "catalog-burst 100,000 updates; quota-find 60,000)",
    )
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--sessions", type=int, default=500, help="concurrent sessions in the generated backlog")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--min-session-events",
        type=int,
        default=40,
        help="shortest session in the backlog (Pareto tail above it); 40 lets calls be full, 1 is browsing traffic",
    )
    parser.add_argument("--chunk", type=int, default=50_000, help="records per generate() call")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="processes generating data")
    parser.add_argument("--linger-ms", type=int, default=500, help="worker batching.linger_ms (worker default 500)")
    parser.add_argument("--dedup-ids", type=int, default=1_000_000, help="worker dedup.max_ids")
    parser.add_argument("--max-tps", type=float, default=1000.0, help="emulator PutEvents quota, calls/s")
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--jitter-ms", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a draining worker may take")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--naive-seconds", type=float, default=30.0)
    parser.add_argument("--naive-records", type=int, default=20_000)
    parser.add_argument("--naive-concurrency", type=int, default=1, help="sequential send loops (1 = await each call)")
    parser.add_argument("--skip-realtime", action="store_true")
    parser.add_argument("--realtime-rate", type=float, default=500.0, help="events/s produced in the real-time phase")
    parser.add_argument("--realtime-seconds", type=float, default=30.0)
    parser.add_argument("--realtime-sessions", type=int, default=3000)
    parser.add_argument("--replicas", type=int, default=3, help="workers in shared-quota mode")
    parser.add_argument("--hot-share", type=float, default=0.05, help="hot-session mode: the hot session's share")
    parser.add_argument("--max-buffered-events", type=int, default=None, help="worker batching.max_buffered_events")
    parser.add_argument("--max-calls-per-session", type=int, default=None, help="worker batching.max_calls_per_session")
    parser.add_argument("--max-session-events", type=int, default=None, help="worker batching.max_session_events")
    parser.add_argument("--decode-calls", type=int, default=20_000, help="decode, map modes: calls per timed repeat")
    parser.add_argument("--decode-repeats", type=int, default=7, help="decode, map modes: repeats (the best counts)")
    parser.add_argument("--throttle-rate", type=float, default=0.3, help="noise mode: share throttled at random")
    parser.add_argument("--quota", type=float, default=100.0, help="quota-find mode: the emulator's calls/s")
    from tests.bench_routes import add_arguments

    add_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default .bench/results[-MODE].json)")
    return parser


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.records is None:
        defaults = {"memory": 1_000_000, "two-groups": 100_000, "catalog-burst": 100_000, "quota-find": 60_000}
        args.records = defaults.get(args.mode, 200_000)
    out = args.out or OUT_DIR / ("results.json" if args.mode == "drain" else f"results-{args.mode}.json")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM cleans up like Ctrl-C
    started = time.monotonic()
    try:
        if args.mode == "decode":
            from tests.bench_decode import mode_decode

            results = mode_decode(args)
        elif args.mode == "map":
            from tests.bench_map import mode_map

            results = mode_map(args)
        else:
            results = run_stack(args)
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    results["bench_seconds"] = round(time.monotonic() - started, 1)
    report(args.mode, results, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(
        orjson.dumps(
            {"mode": args.mode, **results, "parameters": parameters(args)}, option=orjson.OPT_INDENT_2, default=str
        )
    )
    log(f"wrote {out}")
    return 0


def run_stack(args: argparse.Namespace) -> dict[str, Any]:
    with stack(args) as bench:
        if args.mode == "drain":
            return mode_drain(bench, args)
        if args.mode == "shared-quota":
            return mode_shared_quota(bench, args)
        if args.mode == "hot-session":
            return mode_hot_session(bench, args)
        if args.mode in RATE_MODES:
            result: dict[str, Any] = _rate_bench().run(args.mode, bench, args)
            return result
        if args.mode in ("two-groups", "catalog-burst"):
            from tests.bench_catalog import mode_catalog_burst
            from tests.bench_routes import mode_two_groups

            return (mode_two_groups if args.mode == "two-groups" else mode_catalog_burst)(bench, args)
        return mode_memory(bench, args)


if __name__ == "__main__":
    sys.exit(main())
