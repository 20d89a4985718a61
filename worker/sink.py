"""The Personalize side: one long-lived aioboto3 client, an AIMD rate limit, and delivering a batch.

`deliver` returns only when every event is either accepted or rejected by the service as invalid;
transient errors are retried without end (the caller pauses consumption meanwhile), so nothing is
dropped. botocore's own retries are off: ours know about the quota and the batch.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable
from contextlib import AsyncExitStack
from hashlib import sha256
from typing import Any, cast
from urllib.parse import urlsplit

import aioboto3
import botocore.auth
import orjson
from aiobotocore.config import AioConfig
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import ClientError
from botocore.httpsession import get_cert_path

from worker import __version__
from worker.config import PersonalizeSettings
from worker.http import HttpClient, host_header
from worker.metrics import Metrics
from worker.ratelimit import RateLimiter
from worker.retry import Action, Backoff, classify

log = logging.getLogger(__name__)


Rejection = tuple[int, str]
"""(index of the event in the batch, the service's message)."""

USER_AGENT = f"personalize-worker/{__version__} aioboto3/{aioboto3.__version__}"


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

    aioboto3 resolves the credentials (the standard chain, refreshed when they expire), the region,
    the endpoint and the CA bundle, and botocore's signer signs; what is skipped is the generic
    per-call machinery — model validation (the mapping already checked every rule), the model-walking
    serializer, the event hooks, the user-agent assembly and a general-purpose HTTP client — which
    cost ~1.5 ms of CPU per call, ten times the rest. `tests/test_sink.py` holds this request equal
    to what botocore's own client sends.
    """

    def __init__(self, settings: PersonalizeSettings) -> None:
        self._settings = settings
        self._stack = AsyncExitStack()
        self._credentials: Any = None
        self._http: HttpClient | None = None
        self.url = ""
        self._signer_name = ""
        self.region = ""
        self._signer: FixedRequestSigV4 | None = None

    async def start(self) -> None:
        s = self._settings
        session = aioboto3.Session()
        config = AioConfig(retries={"total_max_attempts": 1}, parameter_validation=False)
        client = await self._stack.enter_async_context(
            session.client(
                "personalize-events", region_name=s.region, endpoint_url=s.endpoint_url or None, config=config
            )
        )
        self.url = client.meta.endpoint_url.rstrip("/") + "/events"
        self.region = client.meta.region_name
        self._signer_name = client.meta.service_model.signing_name
        # aioboto3 returns a coroutine here, whatever its stubs say.
        self._credentials = await cast(Awaitable[Any], session.get_credentials())
        if self._credentials is None:
            raise RuntimeError("no AWS credentials found (environment, profile, IRSA or instance role)")
        context = None
        if self.url.startswith("https:"):  # loading a CA bundle costs ~50 ms of start-up
            # The CA bundle as botocore resolves it: AWS_CA_BUNDLE, the profile's ca_bundle, else certifi's.
            ca_bundle = cast(Any, session)._session.get_config_variable("ca_bundle")
            context = ssl.create_default_context(cafile=get_cert_path(ca_bundle or True))
        self._http = HttpClient(
            self.url,
            timeout=s.request_timeout_seconds,
            ssl_context=context,
            fixed_headers=[("User-Agent", USER_AGENT)],
        )
        self._stack.push_async_callback(self._http.close)

    async def close(self) -> None:
        await self._stack.aclose()

    async def put_events(self, body: bytes) -> None:
        """Raises botocore's ClientError for an error answer, as `client.put_events` would."""
        assert self._http is not None, "start() first"
        frozen = await self._credentials.get_frozen_credentials()
        signer = self._signer
        if signer is None or signer.credentials != frozen:  # a new tuple per call; equal until refreshed
            signer = self._signer = FixedRequestSigV4(frozen, self._signer_name, self.region, self.url)
        response = await self._http.post(signer.headers(body), body)
        if response.status != 200:
            raise _client_error(response.status, response.headers, response.body)


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


class Sink:
    def __init__(self, settings: PersonalizeSettings, metrics: Metrics, backoff: Backoff | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self.limiter = RateLimiter(settings.max_requests_per_second)
        self.client = PutEventsClient(settings)
        self.last_error: str | None = None
        """The latest unresolved call error, for /readyz and logs; cleared by the next success."""
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: self.in_flight)  # read at scrape time, not kept per call

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        """Send until every event (as JSON) is accepted or rejected as invalid; returns the rejected ones.
        `sent_at` is the first event's: the age of the oldest event in the call."""
        rejected: list[Rejection] = []
        pending: list[tuple[int, list[str]]] = [(0, events)]
        while pending:
            offset, chunk = pending.pop(0)
            verdict_message = await self._send_until_final(session_id, user_id, chunk, sent_at)
            if verdict_message is None:
                continue
            if len(chunk) == 1:
                rejected.append((offset, verdict_message))
                continue
            # Halves go first, in order, so the session's events keep their order.
            half = len(chunk) // 2
            pending[:0] = [(offset, chunk[:half]), (offset + half, chunk[half:])]
        return rejected

    async def _send_until_final(
        self, session_id: str, user_id: str | None, events: list[str], sent_at: float
    ) -> str | None:
        """None once accepted; the service's message when it rejects the content."""
        body = request_body(self._settings.tracking_id, session_id, user_id, events)
        metrics = self._metrics
        attempt = 0
        while True:
            await self.limiter.acquire()
            started = time.perf_counter()
            self.in_flight += 1
            try:
                await self.client.put_events(body)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # every failure is classified; none escapes
                verdict = classify(error, len(events))
                metrics.calls.labels(verdict.outcome).inc()
                if verdict.action is not Action.RETRY:
                    return verdict.message
                if verdict.outcome == "throttled":
                    self.limiter.throttled(time.perf_counter() - started)
                elif self.last_error != verdict.message:
                    log.warning("PutEvents failed, retrying", extra={"error": verdict.message})
                self.last_error = verdict.message
                attempt += 1
                metrics.retries.inc()
                await asyncio.sleep(self._backoff.delay(attempt))
                continue
            finally:
                self.in_flight -= 1
                metrics.call_latency.observe(time.perf_counter() - started)
            self.limiter.succeeded(time.perf_counter() - started)
            self.last_error = None
            metrics.calls_ok.inc()
            metrics.events_sent.inc(len(events))
            metrics.events_per_call.observe(len(events))
            # Once per call, for the first (in session order, the oldest) event: a bound for the rest.
            metrics.event_age.observe(time.time() - sent_at)
            return None
