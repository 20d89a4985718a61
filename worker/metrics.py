"""Every Prometheus metric, defined once, and the /metrics, /healthz and /readyz endpoints.

Labels stay small and bounded: reasons and outcomes are fixed vocabularies, partitions are removed on
revoke, and no user, item or session identifier is ever a label.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest

from worker import __version__

PREFIX = "personalize_worker"
CALL_OUTCOMES = ("ok", "throttled", "invalid", "server_error", "client_error", "connection", "error")


class Metrics:
    """One instance per worker, on its own registry, so several workers can live in one test process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = PREFIX
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
        self.calls = Counter(f"{p}_put_events_calls", "PutEvents calls by outcome.", ["outcome"], registry=r)
        self.retries = Counter(
            f"{p}_put_events_retries", "PutEvents calls retried after a transient error.", registry=r
        )
        self.call_latency = Histogram(
            f"{p}_put_events_latency_seconds",
            "PutEvents call latency.",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.events_per_call = Histogram(
            f"{p}_events_per_call",
            "Events carried by each successful PutEvents call.",
            registry=r,
            buckets=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
        )
        self.event_age = Histogram(
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
        self.paused = Gauge(f"{p}_consumption_paused", "1 while fetching is paused for backpressure.", registry=r)
        self.dead_letter_blocked = Gauge(
            f"{p}_dead_letter_blocked", "1 while the dead-letter topic cannot be written.", registry=r
        )
        self.stalled = Gauge(f"{p}_stalled", "1 while lag is above zero and nothing progresses.", registry=r)
        self.assigned = Gauge(f"{p}_assigned_partitions", "Partitions assigned to this worker.", registry=r)
        self.lag = Gauge(
            f"{p}_consumer_lag", "High watermark minus committed offset.", ["topic", "partition"], registry=r
        )
        self.committed = Gauge(f"{p}_committed_offset", "Last committed offset.", ["topic", "partition"], registry=r)
        self.last_commit = Gauge(f"{p}_last_commit_timestamp_seconds", "When offsets last moved forward.", registry=r)
        self.last_fetch = Gauge(f"{p}_last_fetch_timestamp_seconds", "When records were last fetched.", registry=r)
        Info(f"{p}_build", "Worker version.", registry=r).info({"version": __version__})
        # Children bound once: the hot path never looks a label up.
        self.calls_ok = self.calls.labels("ok")
        for outcome in CALL_OUTCOMES:
            self.calls.labels(outcome)

    def forget_partition(self, topic: str, partition: int) -> None:
        """A revoked partition's series go away with it."""
        for gauge in (self.lag, self.committed):
            with contextlib.suppress(KeyError):
                gauge.remove(topic, str(partition))

    def totals(self) -> dict[str, float]:
        """The run's main counters, for the final log line and the demo's summary."""
        value = self.registry.get_sample_value
        return {
            "consumed": value(f"{PREFIX}_records_consumed_total") or 0.0,
            "sent": value(f"{PREFIX}_events_sent_total") or 0.0,
            "duplicates": value(f"{PREFIX}_records_duplicate_total") or 0.0,
            "filtered": value(f"{PREFIX}_records_filtered_total") or 0.0,
            "dead_lettered": value(f"{PREFIX}_records_dead_lettered_total") or 0.0,
            "calls": value(f"{PREFIX}_put_events_calls_total", {"outcome": "ok"}) or 0.0,
            "retries": value(f"{PREFIX}_put_events_retries_total") or 0.0,
        }

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """/metrics, /healthz (the loop is alive) and /readyz (the worker says it can make progress)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], tuple[bool, str]]) -> None:
        self._metrics = metrics
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, reason = self._ready()
        return web.Response(text=f"{reason}\n", status=200 if ok else 503)
