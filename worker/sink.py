"""The Personalize side: one long-lived aioboto3 client, an AIMD rate limit, and delivering a batch.

`deliver` returns only when every event is either accepted or rejected by the service as invalid;
transient errors are retried without end (the caller pauses consumption meanwhile), so nothing is
dropped. botocore's own retries are off: ours know about the quota and the batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import aioboto3
from aiobotocore.config import AioConfig

from worker.config import PersonalizeSettings
from worker.metrics import Metrics
from worker.retry import Action, Backoff, classify

log = logging.getLogger(__name__)


class RateLimiter:
    """Requests per second with AIMD: throttling cuts the rate, free quota is probed additively.

    Replicas sharing one dataset group's quota converge on fair shares without talking to each other.
    """

    DECREASE = 0.7
    INCREASE_PER_SECOND = 0.02  # of the configured maximum
    MIN_FRACTION = 0.01

    def __init__(self, max_rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_rate = max_rate
        self.rate = max_rate
        self._clock = clock
        self._next_slot = 0.0
        self._last_change = clock()
        self._last_decrease = -1e9

    def reserve(self) -> float:
        """Claim the next send slot; returns how long to wait for it."""
        now = self._clock()
        self._probe(now)
        slot = max(self._next_slot, now)
        self._next_slot = slot + 1.0 / self.rate
        return slot - now

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)

    def _probe(self, now: float) -> None:
        elapsed = now - self._last_change
        if elapsed > 0 and self.rate < self.max_rate:
            self.rate = min(self.max_rate, self.rate + self.max_rate * self.INCREASE_PER_SECOND * elapsed)
        self._last_change = now

    def throttled(self) -> None:
        """One cut per round trip: a burst of throttles from one congestion event counts once."""
        now = self._clock()
        if now - self._last_decrease < max(0.1, 1.0 / self.rate):
            return
        self._probe(now)
        self._last_decrease = now
        self.rate = max(self.max_rate * self.MIN_FRACTION, self.rate * self.DECREASE)
        # Re-space the queue at the new rate instead of letting reserved slots burst out.
        self._next_slot = max(self._next_slot, now + 1.0 / self.rate)


Rejection = tuple[int, str]
"""(index of the event in the batch, the service's message)."""


class Sink:
    def __init__(self, settings: PersonalizeSettings, metrics: Metrics, backoff: Backoff | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self.limiter = RateLimiter(settings.max_requests_per_second)
        self._stack = AsyncExitStack()
        self._client: Any = None
        self.last_error: str | None = None
        """The latest unresolved call error, for /readyz and logs; cleared by the next success."""

    async def start(self) -> None:
        s = self._settings
        config = AioConfig(
            retries={"total_max_attempts": 1},
            # The worker validates every event against the same model before sending.
            parameter_validation=False,
            max_pool_connections=s.max_in_flight,
            connect_timeout=s.request_timeout_seconds,
            read_timeout=s.request_timeout_seconds,
            tcp_keepalive=True,
        )
        session = aioboto3.Session()
        self._client = await self._stack.enter_async_context(
            session.client(
                "personalize-events",
                region_name=s.region,
                endpoint_url=s.endpoint_url or None,
                config=config,
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()

    async def deliver(self, session_id: str, user_id: str | None, events: list[dict[str, Any]]) -> list[Rejection]:
        """Send until every event is accepted or rejected as invalid; returns the rejected ones."""
        rejected: list[Rejection] = []
        pending: list[tuple[int, list[dict[str, Any]]]] = [(0, events)]
        while pending:
            offset, chunk = pending.pop(0)
            verdict_message = await self._send_until_final(session_id, user_id, chunk)
            if verdict_message is None:
                continue
            if len(chunk) == 1:
                rejected.append((offset, verdict_message))
                continue
            # Halves go first, in order, so the session's events keep their order.
            half = len(chunk) // 2
            pending[:0] = [(offset, chunk[:half]), (offset + half, chunk[half:])]
        return rejected

    async def _send_until_final(self, session_id: str, user_id: str | None, events: list[dict[str, Any]]) -> str | None:
        """None once accepted; the service's message when it rejects the content."""
        request: dict[str, Any] = {
            "trackingId": self._settings.tracking_id,
            "sessionId": session_id,
            "eventList": events,
        }
        if user_id is not None:
            request["userId"] = user_id
        metrics = self._metrics
        attempt = 0
        while True:
            await self.limiter.acquire()
            started = time.perf_counter()
            metrics.in_flight.inc()
            try:
                await self._client.put_events(**request)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                verdict = classify(error, len(events))
                metrics.calls.labels(verdict.outcome).inc()
                if verdict.action is not Action.RETRY:
                    return verdict.message
                if verdict.outcome == "throttled":
                    self.limiter.throttled()
                    metrics.rate_limit.set(self.limiter.rate)
                elif self.last_error != verdict.message:
                    log.warning("PutEvents failed, retrying", extra={"error": verdict.message})
                self.last_error = verdict.message
                attempt += 1
                metrics.retries.inc()
                await asyncio.sleep(self._backoff.delay(attempt))
                continue
            finally:
                metrics.in_flight.dec()
                metrics.call_latency.observe(time.perf_counter() - started)
            self.last_error = None
            metrics.calls_ok.inc()
            metrics.events_sent.inc(len(events))
            metrics.events_per_call.observe(len(events))
            now = time.time()
            for event in events:
                metrics.event_age.observe(now - event["sentAt"])
            return None
