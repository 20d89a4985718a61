"""The Personalize side: one long-lived PutEvents client, an AIMD rate limit, and delivering a batch.

`deliver` returns only when every event is either accepted or final as a dead letter: refused as
invalid, or failing alone while other calls are accepted (`retry.Health`). Everything else — outages,
throttling, refusals of the request itself — is retried without end (the caller pauses consumption
meanwhile, the alarm says why), so nothing is dropped. botocore's own retries are off: ours know about
the quota and the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from hashlib import sha256
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import botocore
import botocore.auth
import orjson
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import ClientError
from botocore.httpsession import get_cert_path

from worker import __version__
from worker.config import PersonalizeSettings
from worker.http import HttpClient, host_header
from worker.metrics import Metrics, RouteMetrics
from worker.operations.bodies import BODIES
from worker.operations.spec import EVENTS, OperationSpec
from worker.proxy import Proxy, client_options, resolve_proxy
from worker.ratelimit import RateLimiter
from worker.retry import (
    EXHAUSTED,
    Action,
    Backoff,
    Health,
    Kind,
    Mark,
    Rejection,
    Tries,
    Verdict,
    about_content,
    classify,
)

log = logging.getLogger(__name__)
R = TypeVar("R")


USER_AGENT = f"personalize-worker/{__version__} botocore/{botocore.__version__}"


_botocore_auth: Any = botocore.auth  # get_current_datetime is not in the stubs
_SigV4Base: Any = SigV4Auth  # its private helpers are not in the stubs
CONTENT_TYPE = "application/json"


class FixedRequestSigV4(_SigV4Base):  # type: ignore[misc]
    """botocore's SigV4 for the one request the worker makes: a JSON POST to a fixed URL.

    Its canonical path, empty query and host are derived once; the signing key once a day (botocore
    derives it per call). Per call, only the date, the payload hash and the signature are computed —
    the same strings botocore's `add_auth` builds (tests/test_sink.py holds the headers byte-equal,
    with and without a session token and across a date change), without an AWSRequest to carry them.
    """

    def __init__(self, credentials: Any, service: str, region: str, url: str) -> None:
        super().__init__(credentials, service, region)
        parts = urlsplit(url)
        self._path = self._normalize_url_path(parts.path or "/")
        self._query = self._canonical_query_string_url(parts)
        self._host = host_header(url)
        self._key_date = ""
        self._key = b""
        self._second = -1
        self._timestamp = ""

    def timestamp(self) -> str:
        """X-Amz-Date for now, formatted once a second: botocore's datetime.now() and strftime per call
        were ~2% of the worker's CPU."""
        second = int(time.time())
        if second != self._second:
            self._timestamp = time.strftime(SIGV4_TIMESTAMP, time.gmtime(second))
            self._second = second
        return self._timestamp

    def add_auth(self, request: AWSRequest) -> None:
        """botocore's entry point, for comparing with it: signs an AWSRequest via `headers`, at
        botocore's clock (looked up on its module, as botocore does, so a test can fix both)."""
        body = request.body or b""
        body = body.encode() if isinstance(body, str) else body
        timestamp = _botocore_auth.get_current_datetime().strftime(SIGV4_TIMESTAMP)
        for name, value in self.headers(body, request.headers.get("Content-Type", CONTENT_TYPE), timestamp):
            request.headers[name] = value

    def headers(
        self, body: bytes, content_type: str = CONTENT_TYPE, timestamp: str | None = None
    ) -> list[tuple[str, str]]:
        """Content-Type, X-Amz-Date, the session token if any, and Authorization for this body."""
        timestamp = timestamp or self.timestamp()
        date = timestamp[:8]
        token = self.credentials.token
        canonical_headers = f"content-type:{content_type}\nhost:{self._host}\nx-amz-date:{timestamp}\n"
        signed_headers = "content-type;host;x-amz-date"
        if token:
            canonical_headers += f"x-amz-security-token:{token}\n"
            signed_headers += ";x-amz-security-token"
        canonical_request = "\n".join(
            ("POST", self._path, self._query, canonical_headers, signed_headers, sha256(body).hexdigest())
        )
        scope = f"{date}/{self._region_name}/{self._service_name}/aws4_request"
        string_to_sign = f"AWS4-HMAC-SHA256\n{timestamp}\n{scope}\n{sha256(canonical_request.encode()).hexdigest()}"
        if date != self._key_date:
            k_date = self._sign(f"AWS4{self.credentials.secret_key}".encode(), date)
            k_region = self._sign(k_date, self._region_name)
            self._key = self._sign(self._sign(k_region, self._service_name), "aws4_request")
            self._key_date = date
        signature = self._sign(self._key, string_to_sign, hex=True)
        headers = [("Content-Type", content_type), ("X-Amz-Date", timestamp)]
        if token:
            headers.append(("X-Amz-Security-Token", token))
        credential = f"{self.credentials.access_key}/{scope}"
        headers.append(
            (
                "Authorization",
                f"AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders={signed_headers}, Signature={signature}",
            )
        )
        return headers


class PutEventsClient:
    """PutEvents on the wire: one orjson body, botocore's SigV4, one request on a kept-alive connection.

    botocore resolves the credentials (the standard chain, refreshed when they expire), the region,
    the endpoint and the CA bundle, and botocore's signer signs; what is skipped is the generic
    per-call machinery — model validation (the mapping already checked every rule), the model-walking
    serializer, the event hooks, the user-agent assembly and a general-purpose HTTP client — which
    cost ~1.5 ms of CPU per call, ten times the rest. `tests/test_sink.py` holds this request equal
    to what botocore's own client sends.
    """

    def __init__(self, settings: PersonalizeSettings, path: str = EVENTS.http_path) -> None:
        self._settings = settings
        self._path = path
        """The operation's request path: the signature covers it, so each operation has its own signer."""
        self._stack = AsyncExitStack()
        self._credentials: Any = None
        self._refreshable = False
        self._refreshing: asyncio.Future[Any] | None = None
        self._http: HttpClient | None = None
        self.url = ""
        self._signer_name = ""
        self.region = ""
        self._signer: FixedRequestSigV4 | None = None
        self.proxy: Proxy | None = None

    async def start(self) -> None:
        # botocore's own session and client, built in a thread: the credential chain may wait on the network
        # (IMDS, STS) and building the client is ~0.1 s of CPU, both overlapping the Kafka start-up meanwhile.
        client, credentials, ca_bundle = await in_daemon_thread(_botocore_client, self._settings)
        self.url = client.meta.endpoint_url.rstrip("/") + self._path
        self.region = client.meta.region_name
        self._signer_name = client.meta.service_model.signing_name
        if credentials is None:
            raise RuntimeError("no AWS credentials found (environment, profile, IRSA or instance role)")
        self._credentials = credentials
        self._refreshable = hasattr(credentials, "refresh_needed")
        context = None
        # The CA bundle as botocore resolves it: AWS_CA_BUNDLE, the profile's ca_bundle, else certifi's.
        cafile = get_cert_path(ca_bundle or True)
        if self.url.startswith("https:"):  # loading a CA bundle costs ~50 ms of start-up
            context = ssl.create_default_context(cafile=cafile)
        self.proxy = resolve_proxy(client.meta.endpoint_url, client.meta.config, cafile)
        if self.proxy is not None:
            how = "CONNECT tunnel" if context is not None else "forwarding"
            log.info("PutEvents through a proxy", extra={"proxy": self.proxy.url, "mode": how})
        self._http = HttpClient(
            self.url,
            timeout=self._settings.request_timeout_seconds,
            ssl_context=context,
            fixed_headers=[("User-Agent", USER_AGENT)],
            proxy=self.proxy,
        )
        self._stack.push_async_callback(self._http.close)

    async def close(self) -> None:
        await self._stack.aclose()

    async def put_events(self, body: bytes) -> None:
        """Raises botocore's ClientError for an error answer, as `client.put_events` would."""
        assert self._http is not None, "start() first"
        credentials = self._credentials
        if self._refreshable and credentials.refresh_needed():
            # botocore refreshes (STS, IMDS) synchronously: in a thread, so the loop never waits on it; one
            # refresh for all the calls that find it due (shielded: one call cancelled must not cancel it).
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.ensure_future(in_daemon_thread(credentials.get_frozen_credentials))
            frozen = await asyncio.shield(self._refreshing)
        else:
            frozen = credentials.get_frozen_credentials()
        signer = self._signer
        if signer is None or signer.credentials != frozen:  # a new tuple per call; equal until refreshed
            signer = self._signer = FixedRequestSigV4(frozen, self._signer_name, self.region, self.url)
        response = await self._http.post(signer.headers(body), body)
        if response.status != 200:
            raise _client_error(response.status, response.headers, response.body)


async def in_daemon_thread(function: Callable[..., R], *args: Any) -> R:
    """`function(*args)` in a daemon thread: botocore's credential chain blocks (IMDS, STS: up to its own
    timeouts), and a stop meanwhile must neither wait for it (cancelling the await leaves it running) nor be
    held at exit as `asyncio.to_thread`'s executor threads are joined."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[R] = loop.create_future()

    def settle(result: R | None, error: BaseException | None) -> None:
        if not future.done():
            if error is None:
                future.set_result(cast(R, result))
            else:
                future.set_exception(error)

    def run() -> None:
        try:
            result, error = function(*args), None
        except Exception as caught:  # handed to the awaiting coroutine
            result, error = None, caught
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="aws-credentials", daemon=True).start()
    return await future


def _botocore_client(settings: PersonalizeSettings) -> tuple[Any, Any, Any]:
    """The client (for its resolved endpoint, region and signing name; it sends nothing), the credentials
    and the CA bundle setting, exactly as botocore resolves them: the standard chain, refreshed when they
    expire, AWS_CA_BUNDLE or the profile's. aiobotocore would resolve the same, at ~0.3 s more imports."""
    import botocore.session
    from botocore.config import Config

    session = botocore.session.Session()
    config = Config(retries={"total_max_attempts": 1}, parameter_validation=False, **client_options(settings))
    client = session.create_client(
        "personalize-events", region_name=settings.region, endpoint_url=settings.endpoint_url or None, config=config
    )
    client.close()
    return client, session.get_credentials(), session.get_config_variable("ca_bundle")


def _client_error(status: int, headers: dict[str, str], raw: bytes) -> ClientError:
    """The same error shape botocore builds from a REST-JSON error answer."""
    code = headers.get("x-amzn-errortype", "").split(":", 1)[0]
    message = ""
    try:
        body = orjson.loads(raw) if raw else {}
        if isinstance(body, dict):
            message = str(body.get("message") or body.get("Message") or "")
            code = code or str(body.get("__type", "")).rsplit("#", 1)[-1]
    except orjson.JSONDecodeError:
        message = raw[:200].decode("utf-8", "replace")
    if not code:
        code = "InternalFailure" if status >= 500 else str(status)
    response: dict[str, Any] = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": headers.get("x-amzn-requestid", "")},
    }
    return ClientError(response, "PutEvents")  # type: ignore[arg-type]


def request_body(tracking_id: str, session_id: str, user_id: str | None, events: list[str]) -> bytes:
    """The PutEvents JSON body around events already serialized (see `pipeline.Item`). sentAt goes out
    as epoch seconds with milliseconds, which the REST-JSON timestamp format allows; botocore's own
    serializer would cut it to whole seconds."""
    head: dict[str, str] = {"trackingId": tracking_id, "sessionId": session_id}
    if user_id is not None:
        head["userId"] = user_id
    return b"".join((orjson.dumps(head)[:-1], b',"eventList":[', ",".join(events).encode(), b"]}"))


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
                    self._retrying(verdict, action)
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
                metrics.calls_ok.inc()
                route.calls_ok.inc()
                metrics.events_sent.inc(len(events))
                route.sent.inc(len(events))
                metrics.events_per_call.observe(len(events))
                # Once per call, for the first (in session order, the oldest) event: a bound for the rest.
                metrics.event_age.observe(time.time() - sent_at)
                return None
        finally:
            if marked:
                left = self.retrying.pop(session_id) - 1
                if left:
                    self.retrying[session_id] = left

    def _retrying(self, verdict: Verdict, action: Action) -> None:
        if action is Action.ALARM:
            self._alarm(verdict)
        elif verdict.kind is Kind.THROTTLED:
            self.limiter.throttled()
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
