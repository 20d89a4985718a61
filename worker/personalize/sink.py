"""Delivering a batch: the send loop, with an AIMD rate limit, retries and isolation of failing events.

`deliver` returns only when every event is either accepted or final as a dead letter: refused as
invalid, or failing alone while other calls are accepted (`retry.Health`). Everything else — outages,
throttling, refusals of the request itself — is retried without end (the caller pauses consumption
meanwhile, the alarm says why), so nothing is dropped. botocore's own retries are off: ours know about
the quota and the batch. The call itself is `client.PutEventsClient`'s.
"""

from __future__ import annotations

import asyncio
import logging
import time

from worker.backoff import Backoff
from worker.config import PersonalizeSettings
from worker.observe.metrics import Metrics, RouteMetrics
from worker.personalize.client import PutEventsClient, request_body
from worker.personalize.operations.bodies import BODIES
from worker.personalize.operations.spec import EVENTS, OperationSpec
from worker.personalize.ratelimit import RateLimiter
from worker.personalize.retry import (
    EXHAUSTED,
    Action,
    Health,
    Kind,
    Mark,
    Rejection,
    Tries,
    Verdict,
    about_content,
    classify,
)

log = logging.getLogger("worker.sink")  # the pre-move name: log filters match it


WARN_LOG_SECONDS = 10.0
ALARM_LOG_SECONDS = 60.0
"""A failure's log line repeats at most this often per reason (the alarm's at most once a minute): an error
that comes and goes, or alternates with throttling, must not flood the logs."""


class Sink:
    """Delivers one session's batch: retries, isolating the events that fail, and the request-level alarm."""

    def __init__(
        self,
        settings: PersonalizeSettings,
        metrics: Metrics,
        backoff: Backoff | None = None,
        *,
        operation: OperationSpec = EVENTS,
        destination: str | None = None,
        max_rate: float | None = None,
        route: RouteMetrics | None = None,
        destination_name: str = "",
    ) -> None:
        """One destination (a tracker or a dataset) of one operation: its own client, signer and AIMD limiter.
        Defaults: the single flow's PutEvents to `personalize.tracking_id`."""
        self._settings = settings
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self.operation = operation
        self.destination = destination or settings.tracking_id or ""
        self._list_body = None if operation is EVENTS else BODIES[operation.key]
        self._route = route or metrics.route("default")
        self._rate_gauge = self._route.rate_limit(destination_name)
        self.limiter = limiter = RateLimiter(max_rate or settings.max_requests_per_second)
        # Read at scrape time: the rate moves between throttles too (probing, windows judged on successes).
        self._rate_gauge.set_function(lambda: limiter.rate)
        self.client = PutEventsClient(settings, operation.http_path)
        self.health = Health()
        self.last_error: str | None = None
        """The latest unresolved call error's code (never the service's message), for the stall reason."""
        self.refused: str | None = None
        """While PutEvents refuses the request itself: the /readyz reason. Cleared by the next accepted call."""
        self.retrying: dict[str, int] = {}
        """Sessions with calls that failed and are being retried (how many): for the watchdog."""
        self._alarm_logged: dict[str, float] = {}
        self._warned: dict[str, float] = {}
        self._episode_logged = False
        self.in_flight = 0

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        """Send until every event (as JSON) is accepted or final as a dead letter; returns the latter.
        `sent_at` is the first event's: the age of the oldest event in the call.

        A call is halved — first half first, so the session keeps its order — when the service refuses its
        content, or when it keeps failing while the service is healthy for other calls (`retry.Health`);
        down to one event, that is a dead letter. Refusals that prove the same for every event while nothing
        is accepted anywhere are about the request: the whole call is retried with the alarm instead."""
        start = self.health.mark()
        tries = Tries(len(events), start, self._settings.max_event_attempts)
        verdict = await self._send_until_final(session_id, user_id, events, sent_at, tries)
        if verdict is None:
            return []
        return await self._isolate(session_id, user_id, events, sent_at, start, tries, verdict)

    async def _isolate(
        self,
        session_id: str,
        user_id: str | None,
        events: list[str],
        sent_at: float,
        start: Mark,
        tries: Tries,
        verdict: Verdict | None,
    ) -> list[Rejection]:
        """The rest of `deliver` once the whole call has failed for good: its halves, theirs, ... in order."""
        health = self.health
        limit = self._settings.max_event_attempts
        rounds = 0
        while True:
            pending: list[tuple[int, list[str], Tries]] = []
            rejected: list[Rejection] = []
            refusal: Verdict | None = None
            accepted_any = False
            own_failures = 0
            offset, chunk = 0, events
            while True:
                own_failures += tries.attempt
                if verdict is None:
                    accepted_any = True
                elif len(chunk) > 1:
                    half = len(chunk) // 2
                    pending[:0] = [
                        (offset, chunk[:half], Tries(half, tries.since, limit, tries.suspect)),
                        (offset + half, chunk[half:], Tries(len(chunk) - half, tries.since, limit, tries.suspect)),
                    ]
                else:
                    rejected.append(self._rejection(offset, verdict, tries))
                    if verdict.kind is Kind.INVALID or verdict.kind is Kind.TOO_LARGE:
                        refusal = verdict
                if not pending:
                    break
                offset, chunk, tries = pending.pop(0)
                verdict = await self._send_until_final(session_id, user_id, chunk, sent_at, tries)
            refusals = [r.message for r in rejected if r.reason != EXHAUSTED]
            if refusal is None or about_content(
                refusals, accepted_any or len(refusals) < len(rejected), health.healthy_since(start, own_failures)
            ):
                return rejected
            # Every event refused alike, nothing accepted anywhere: the request, not the events. Again, whole.
            self._alarm(refusal)
            rounds += 1
            self._metrics.retries.inc()
            await asyncio.sleep(self._backoff.delay(rounds))
            start = health.mark()
            tries = Tries(len(events), start, limit, suspect=refusal.message)
            verdict = await self._send_until_final(session_id, user_id, events, sent_at, tries)
            if verdict is None:
                return []

    async def _send_until_final(
        self, session_id: str, user_id: str | None, events: list[str], sent_at: float, tries: Tries
    ) -> Verdict | None:
        """None once accepted; else the failure that ends the attempts: split the call, or dead-letter its event."""
        if self._list_body is None:
            body = request_body(self.destination, session_id, user_id, events)
        else:  # the other operations carry only a destination per call (`session_id` is it, unused here)
            body = self._list_body(self.destination, events)
        metrics = self._metrics
        route = self._route
        health = self.health
        marked = False
        try:
            while True:
                await self.limiter.acquire()
                started = time.perf_counter()
                self.in_flight += 1
                try:
                    await self.client.put_events(body)
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # every failure is classified; none escapes
                    verdict = classify(error)
                    healthy = health.healthy_since(tries.since)
                    health.failed += 1
                    tries.since = health.mark()
                    action = tries.failed(verdict, healthy)
                    metrics.calls.labels(verdict.outcome).inc()
                    route.calls.get(verdict.outcome, route.calls["error"]).inc()
                    if action is Action.SPLIT or action is Action.DEAD_LETTER:
                        return verdict
                    self._retrying(verdict, action, time.perf_counter() - started)
                    if not marked:  # the watchdog tells a record waiting on a retried call from one in a call
                        marked = True
                        self.retrying[session_id] = self.retrying.get(session_id, 0) + 1
                    metrics.retries.inc()
                    await asyncio.sleep(self._backoff.delay(tries.attempt))
                    continue
                finally:
                    self.in_flight -= 1
                    metrics.call_latency.observe(time.perf_counter() - started)
                self.limiter.succeeded(time.perf_counter() - started)
                health.accepted += 1
                self.last_error = None
                if self.refused is not None:
                    self._alarm_over()
                route.accepted(len(events))
                metrics.events_per_call.observe(len(events))
                # Once per call, for the first (in session order, the oldest) event: a bound for the rest.
                metrics.event_age.observe(time.time() - sent_at)
                return None
        finally:
            if marked:
                left = self.retrying.pop(session_id) - 1
                if left:
                    self.retrying[session_id] = left

    def _retrying(self, verdict: Verdict, action: Action, latency: float) -> None:
        if action is Action.ALARM:
            self._alarm(verdict)
        elif verdict.kind is Kind.THROTTLED:
            self.limiter.throttled(latency)  # the round trip: counted for when the call was sent, as successes are
        elif self._due(self._warned, verdict.code, WARN_LOG_SECONDS):
            log.warning(
                f"{self.operation.name} failed, retrying",
                extra={"error": verdict.message, "route": self._route.name},
            )
        self.last_error = verdict.code

    def _alarm(self, verdict: Verdict) -> None:
        """/readyz and the metric carry the alarm while it lasts; one log line when it starts — at most one a
        minute per reason, should it come and go (one session's calls refused while others are accepted)."""
        if self.refused == verdict.alarm:
            return
        self.refused = verdict.alarm
        self._metrics.refused.set(1)
        self._episode_logged = self._due(self._alarm_logged, verdict.alarm, ALARM_LOG_SECONDS)
        if self._episode_logged:
            log.error(
                "PutEvents refuses the request itself; retrying, nothing is dead-lettered",
                extra={"reason": verdict.alarm, "error": verdict.message},
            )

    @staticmethod
    def _due(logged: dict[str, float], key: str, interval: float) -> bool:
        """Whether `key` was last logged over `interval` seconds ago; if so, it counts as logged now."""
        now = time.monotonic()
        if now - logged.get(key, -interval) < interval:
            return False
        if len(logged) >= 100:  # keys include codes from the wire: keep this bounded
            logged.clear()
        logged[key] = now
        return True

    def _alarm_over(self) -> None:
        if self._episode_logged:
            log.info("PutEvents accepts requests again", extra={"was": self.refused})
        self.refused = None
        self._metrics.refused.set(0)

    @staticmethod
    def _rejection(offset: int, verdict: Verdict, tries: Tries) -> Rejection:
        if verdict.kind is Kind.INVALID:
            return Rejection(offset, "rejected", verdict.message)
        if verdict.kind is Kind.TOO_LARGE:
            return Rejection(offset, "too_large", verdict.message)
        log.warning(
            "an event failed alone while other calls were accepted; dead-lettering it",
            extra={"attempts": tries.isolated, "error": verdict.message},
        )
        message = f"failed alone {tries.isolated} times while other calls were accepted; last error: {verdict.message}"
        return Rejection(offset, EXHAUSTED, message)
