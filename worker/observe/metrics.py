"""Every Prometheus metric, defined once, and the /metrics, /healthz and /readyz endpoints.

Labels stay small and bounded: reasons and outcomes are fixed vocabularies, partitions are removed on
revoke, and no user, item or session identifier is ever a label.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
)
from prometheus_client.exposition import generate_latest

from worker import __version__
from worker.observe.percall import BeforeCollect, LoopHistogram

PREFIX = "personalize_worker"
WAITING_ON = ("batch", "call", "retry", "dead_letter", "parked", "intake", "lost")
"""Where a partition's oldest unfinished record is: buffered in a session batch, in a call, in a call being
retried, waiting for its dead-letter write, parked behind a copy of its eventId in flight, being handed
over from a poll, or nowhere (a bug: see `personalize_worker_delivery_task_failures`)."""
WAITING_AFTER_SECONDS = 5.0
LETTER_FORMS = ("reduced", "minimal")
CALL_OUTCOMES = ("ok", "throttled", "invalid", "server_error", "client_error", "connection", "error")
REGISTRY_OUTCOMES = ("ok", "not_found", "unavailable")
ROUTE_STATES = (
    "consumed",
    "sent",
    "duplicate",
    "filtered",
    "superseded",
    "deleted",
    "invalid",
    "dead_lettered",
)
"""Per-route record counts: fetched, then each record's one final state (invalid ones end dead-lettered)."""
UNLIMITED = 1 << 60
"""cgroup v1 writes "no limit" as a huge number (9223372036854771712), v2 as "max"."""


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int:
    """The tightest memory limit on this process's cgroup and its ancestors, in bytes; 0 when there is none.

    Exported as a metric so that an alert can set process_resident_memory_bytes against it wherever the worker
    runs (Kubernetes, compose, systemd), without joining cAdvisor's series by pod labels.
    """
    try:
        lines = membership.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    places: list[tuple[Path, str, str]] = []  # (hierarchy root, this process's path in it, limit file)
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if not controllers:  # v2: the unified hierarchy, at the root or (hybrid hosts) under unified/
            places += [(root, path, "memory.max"), (root / "unified", path, "memory.max")]
        elif "memory" in controllers.split(","):
            places.append((root / "memory", path, "memory.limit_in_bytes"))
    limits = []
    for base, path, name in places:
        parts = [part for part in path.split("/") if part]
        # Up to the root: a limit may sit on a parent (a pod's cgroup above its container's), and inside a
        # container the path names the host's hierarchy while its own cgroup is mounted at the root.
        for depth in range(len(parts), -1, -1):
            try:
                text = base.joinpath(*parts[:depth], name).read_text(encoding="utf-8").strip()
            except OSError:
                continue
            if text.isdigit() and 0 < int(text) < UNLIMITED:
                limits.append(int(text))
    return min(limits, default=0)


class Metrics:
    """One instance per worker, on its own registry, so several workers can live in one test process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = PREFIX
        self._routes: list[RouteMetrics] = []
        BeforeCollect(self._flush, r)  # first: the per-call counts reach their counters before they are read
        self.records_consumed = Counter(f"{p}_records_consumed", "Kafka records fetched.", registry=r)
        self.events_sent = Counter(f"{p}_events_sent", "Events accepted by PutEvents.", registry=r)
        self.duplicates = Counter(f"{p}_records_duplicate", "Records whose eventId was already delivered.", registry=r)
        self.filtered = Counter(f"{p}_records_filtered", "Records dropped by the event_types filter.", registry=r)
        self.invalid = Counter(
            f"{p}_records_invalid", "Records that cannot become a valid event.", ["reason"], registry=r
        )
        self.dead_lettered = Counter(
            f"{p}_records_dead_lettered", "Records written to the dead-letter topic.", registry=r
        )
        self.dead_letter_errors = Counter(f"{p}_dead_letter_errors", "Failed dead-letter writes.", registry=r)
        self.dead_letters_reduced = Counter(
            f"{p}_dead_letters_reduced",
            "Dead letters written without the parts the topic refused (form: reduced | minimal).",
            ["form"],
            registry=r,
        )
        self.calls = Counter(f"{p}_put_events_calls", "PutEvents calls by outcome.", ["outcome"], registry=r)
        self.retries = Counter(
            f"{p}_put_events_retries", "PutEvents calls retried after a transient error.", registry=r
        )
        self.call_latency = LoopHistogram(
            f"{p}_put_events_latency_seconds",
            "PutEvents call latency.",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.events_per_call = LoopHistogram(
            f"{p}_events_per_call",
            "Events carried by each successful PutEvents call.",
            registry=r,
            buckets=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
        )
        self.event_age = LoopHistogram(
            f"{p}_event_age_seconds",
            "Delivery time minus sentAt, for the first (oldest) event of each call.",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0),
        )
        self.in_flight = Gauge(f"{p}_calls_in_flight", "PutEvents calls in flight.", registry=r)
        self.buffered = Gauge(f"{p}_events_buffered", "Events waiting in session batches.", registry=r)
        self.rate_limit = Gauge(
            f"{p}_rate_limit_requests_per_second", "Current client-side PutEvents rate (AIMD).", registry=r
        )
        self.paused = Gauge(
            f"{p}_consumption_paused", "1 while fetching of some partition is paused for backpressure.", registry=r
        )
        self.paused_partitions = Gauge(
            f"{p}_paused_partitions",
            "Partitions paused: buffer full, or commit point lagging by worker.max_commit_lag_records.",
            registry=r,
        )
        self.commit_metadata_limit = Gauge(
            f"{p}_commit_metadata_limit_bytes",
            "Commit metadata length in force (shortened when the broker refuses it).",
            registry=r,
        )
        self.oldest_unfinished = Gauge(
            f"{p}_oldest_unfinished_age_seconds",
            "Age of the partition's oldest record not yet final (0: none).",
            ["topic", "partition"],
            registry=r,
        )
        self.waiting_on = Gauge(
            f"{p}_oldest_unfinished_waiting",
            "1 for what the partition's oldest unfinished record waits on, once it is "
            f"{WAITING_AFTER_SECONDS:.0f} s old.",
            ["topic", "partition", "on"],
            registry=r,
        )
        self.delivery_failures = Counter(
            f"{p}_delivery_task_failures",
            "Delivery tasks that failed with a bug: their records stay unfinished until a restart.",
            registry=r,
        )
        self.partitions_held = Gauge(
            f"{p}_partitions_held",
            "Partitions not fetched because a session on them holds more than batching.max_session_events.",
            registry=r,
        )
        self.sessions_crowded = Gauge(
            f"{p}_sessions_crowded", "Sessions holding more than batching.max_session_events events.", registry=r
        )
        self.throttled_share = Gauge(
            f"{p}_rate_limit_throttled_share",
            "Share of PutEvents calls throttled in the rate limiter's last window (~0.5 s).",
            registry=r,
        )
        self.throttle_noise = Gauge(
            f"{p}_rate_limit_noise_share",
            "Throttled share that does not follow this worker's rate (a shared quota, load shedding): not cut for.",
            registry=r,
        )
        self.dead_letter_blocked = Gauge(
            f"{p}_dead_letter_blocked", "1 while the dead-letter topic cannot be written.", registry=r
        )
        self.stalled = Gauge(
            f"{p}_stalled", "1 while a partition is behind and its committed offset does not advance.", registry=r
        )
        self.refused = Gauge(
            f"{p}_put_events_refused",
            "1 while PutEvents refuses the request itself (tracker, credentials, permissions): retried, never "
            "dead-lettered; /readyz says why.",
            registry=r,
        )
        self.registry_unavailable = Gauge(
            f"{p}_schema_registry_unavailable",
            "1 while the schema registry cannot be reached and a poll waits for its schemas (consumption held).",
            registry=r,
        )
        self.registry_requests = Counter(
            f"{p}_schema_registry_requests",
            "Schema registry lookups by outcome: ok, not_found (records dead-lettered), unavailable (retried).",
            ["outcome"],
            registry=r,
        )
        self.schemas_cached = Gauge(f"{p}_schemas_cached", "Writer schemas decoded and cached, by id.", registry=r)
        self.route_records = Counter(
            f"{p}_route_records",
            "Records per route: consumed, and by final state (sent, duplicate, filtered, superseded, deleted, "
            "dead_lettered; invalid counts the mapping refusals among the dead letters).",
            ["route", "state"],
            registry=r,
        )
        self.route_calls = Counter(
            f"{p}_route_calls",
            "Personalize calls per route (any operation) by outcome.",
            ["route", "outcome"],
            registry=r,
        )
        self.route_rate_limit = Gauge(
            f"{p}_route_rate_limit_requests_per_second",
            "Current client-side request rate (AIMD) per route and destination (tracker name, or the route's one).",
            ["route", "destination"],
            registry=r,
        )
        self.assigned = Gauge(f"{p}_assigned_partitions", "Partitions assigned to this worker.", registry=r)
        self.source_topics_missing = Gauge(
            f"{p}_source_topics_missing",
            "Configured source topics the cluster does not have (the worker never creates them).",
            registry=r,
        )
        self.lag = Gauge(
            f"{p}_consumer_lag", "High watermark minus committed offset.", ["topic", "partition"], registry=r
        )
        self.committed = Gauge(f"{p}_committed_offset", "Last committed offset.", ["topic", "partition"], registry=r)
        self.last_commit = Gauge(f"{p}_last_commit_timestamp_seconds", "When offsets last moved forward.", registry=r)
        self.last_fetch = Gauge(f"{p}_last_fetch_timestamp_seconds", "When records were last fetched.", registry=r)
        Info(f"{p}_build", "Worker version.", registry=r).info({"version": __version__})
        # process_* (RSS, CPU, open fds), python_gc_* and python_info, as any Python exporter has them.
        for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            r.register(collector)
        self.memory_limit = Gauge(
            f"{p}_memory_limit_bytes",
            "The cgroup (container) memory limit, for alerts on process_resident_memory_bytes; 0: no limit.",
            registry=r,
        )
        self.memory_limit.set(cgroup_memory_limit())
        # Bound once: the hot path never looks a label up. calls_ok and events_sent (and each route's) lag
        # until collected (`RouteMetrics.accepted`): read them through the registry, never their values.
        self.calls_ok = self.calls.labels("ok")
        for outcome in CALL_OUTCOMES:
            self.calls.labels(outcome)
        for form in LETTER_FORMS:
            self.dead_letters_reduced.labels(form)
        for outcome in REGISTRY_OUTCOMES:
            self.registry_requests.labels(outcome)

    def route(self, name: str) -> RouteMetrics:
        """The route's children, bound once: the hot path never looks a label up."""
        self._routes.append(route := RouteMetrics(self, name))
        return route

    def _flush(self) -> None:
        for route in self._routes:
            route.flush()

    def forget_partition(self, topic: str, partition: int) -> None:
        """A revoked partition's series go away with it."""
        for gauge in (self.lag, self.committed, self.oldest_unfinished):
            with contextlib.suppress(KeyError):
                gauge.remove(topic, str(partition))
        for on in WAITING_ON:
            with contextlib.suppress(KeyError):
                self.waiting_on.remove(topic, str(partition), on)

    def totals(self) -> dict[str, float]:
        """The run's main counters, for the final log line and the demo's summary."""
        value = self.registry.get_sample_value
        return {
            "consumed": value(f"{PREFIX}_records_consumed_total") or 0.0,
            "sent": value(f"{PREFIX}_events_sent_total") or 0.0,
            "duplicates": value(f"{PREFIX}_records_duplicate_total") or 0.0,
            "filtered": value(f"{PREFIX}_records_filtered_total") or 0.0,
            "dead_lettered": value(f"{PREFIX}_records_dead_lettered_total") or 0.0,
            "dead_letters_reduced": sum(
                value(f"{PREFIX}_dead_letters_reduced_total", {"form": form}) or 0.0 for form in LETTER_FORMS
            ),
            "calls": value(f"{PREFIX}_put_events_calls_total", {"outcome": "ok"}) or 0.0,
            "retries": value(f"{PREFIX}_put_events_retries_total") or 0.0,
        }

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RouteMetrics:
    """One route's counter children (the unlabelled series stay the process's totals, as before routes)."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        records = metrics.route_records
        self.consumed, self.sent, self.duplicate, self.filtered, self.superseded, self.deleted = (
            records.labels(name, state)
            for state in ("consumed", "sent", "duplicate", "filtered", "superseded", "deleted")
        )
        self.invalid = records.labels(name, "invalid")
        self.dead_lettered = records.labels(name, "dead_lettered")
        self.calls = {outcome: metrics.route_calls.labels(name, outcome) for outcome in CALL_OUTCOMES}
        self._rate = metrics.route_rate_limit
        self._calls, self._sent = (metrics.calls_ok, self.calls["ok"]), (metrics.events_sent, self.sent)
        self._accepted = self._events = 0

    def accepted(self, events: int) -> None:
        """A call of `events` events accepted: counted here, added to the counters when they are collected."""
        self._accepted += 1
        self._events += events

    def flush(self) -> None:
        if self._accepted:
            for counter in self._calls:
                counter.inc(self._accepted)
            for counter in self._sent:
                counter.inc(self._events)
            self._accepted = self._events = 0

    def rate_limit(self, destination: str) -> Gauge:
        return self._rate.labels(self.name, destination)


class MetricsServer:
    """/metrics, /healthz (the loop is alive) and /readyz (the worker says it can make progress).

    Plain asyncio, one GET per connection: three fixed pages need no web framework, and importing aiohttp's
    (its connector builds SSL contexts at import) cost ~0.3 s of every start, before the first call."""

    def __init__(self, metrics: Metrics, ready: Callable[[], tuple[bool, str]]) -> None:
        self._metrics = metrics
        self._ready = ready
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=HEAD_LIMIT)
        addresses = [s.getsockname() for s in self._server.sockets]
        self.port = int(addresses[0][1]) if addresses else port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):  # a scraper holding its connection open must not hold the exit
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def page(self, method: str, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for one request (the head only, for HEAD)."""
        if method not in ("GET", "HEAD"):
            return 405, TEXT, b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self._metrics.render()
        if path == "/healthz":
            return 200, TEXT, b"ok\n"
        if path == "/readyz":
            ok, reason = self._ready()
            return (200 if ok else 503), TEXT, f"{reason}\n".encode()
        return 404, TEXT, b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_SECONDS)
            method, target, *_ = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""]
            status, content_type, body = self.page(method, target.split("?", 1)[0])
            reason = HTTPStatus(status).phrase
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, UnicodeError):
            pass  # a client that went away or sent no request: nothing to answer
        finally:
            self._clients.discard(task)
            writer.close()


TEXT = "text/plain; charset=utf-8"
HEAD_LIMIT = 16 * 1024
"""A request head longer than this is not a scrape: the connection is closed unanswered."""
HEAD_TIMEOUT_SECONDS = 10.0
