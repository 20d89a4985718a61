"""PutEvents (and the other operations' calls) on the wire: credentials and endpoint from botocore, its SigV4
computed per call without an AWSRequest, one request on a kept-alive connection of the lean HTTP client.

What to send and what an answer means is the sink's (`sink.Sink`): this module makes the call and hands
back botocore's `ClientError` for a refusal, as aiobotocore would.

Why botocore's session and not aioboto3's: aioboto3/aiobotocore resolve the same credential chain, region
and endpoint (they subclass botocore's), but importing them and aiohttp cost ~0.6 s of a worker's start-up
(1.0-1.2 s -> 0.38-0.45 s without them; the first call 0.74-1.0 s after exec instead of 1.39-1.68 s), which
held the drain from start to exit at 93% of the quota's ceiling. The blocking parts of botocore's chain
(IMDS, STS, refreshes) run in a daemon thread, so the loop never waits on them and a stop never waits for them.
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
from worker.mapping.limits import LOADER
from worker.personalize.http import HttpClient, host_header
from worker.personalize.operations.spec import EVENTS
from worker.personalize.proxy import Proxy, client_options, resolve_proxy

log = logging.getLogger("worker.sink")  # the sink's logger, as before the split: log filters match it

R = TypeVar("R")
USER_AGENT = f"personalize-worker/{__version__} botocore/{botocore.__version__}"
MANDATORY_REFRESH_SECONDS = 10 * 60
"""botocore's RefreshableCredentials: within this of expiry a refresh must succeed before signing."""


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
        self._frozen: Any = None
        """The credentials the last call signed with."""
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
                self._refreshing.add_done_callback(_retrieved)
            # Only a mandatory refresh (or none in hand yet) is waited for. In the advisory window (15 to 10
            # minutes before expiry) botocore signs with the current credentials while one caller refreshes:
            # waiting there held every call for as long as an unreachable STS took to fail, again and again.
            mandatory = getattr(credentials, "_mandatory_refresh_timeout", MANDATORY_REFRESH_SECONDS)
            if self._frozen is None or credentials.refresh_needed(mandatory):
                self._frozen = await asyncio.shield(self._refreshing)
        else:
            self._frozen = credentials.get_frozen_credentials()
        frozen = self._frozen
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
        except BaseException as caught:  # a thread ends silently on SystemExit: the awaiting would never end
            result, error = None, RuntimeError(f"{type(caught).__name__} in {getattr(function, '__name__', '?')}")
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="aws-credentials", daemon=True).start()
    return await future


def _retrieved(future: asyncio.Future[Any]) -> None:
    """A refresh nobody waited for (advisory) that failed: the next call tries again; no 'never retrieved'."""
    if not future.cancelled():
        future.exception()


def _botocore_client(settings: PersonalizeSettings) -> tuple[Any, Any, Any]:
    """The client (for its resolved endpoint, region and signing name; it sends nothing), the credentials
    and the CA bundle setting, exactly as botocore resolves them: the standard chain, refreshed when they
    expire, AWS_CA_BUNDLE or the profile's. aiobotocore would resolve the same, at ~0.3 s more imports."""
    import botocore.session
    from botocore.config import Config

    session = botocore.session.Session()
    if session.get_config_variable("data_path") is None:  # the loader it would build: reuse its caches
        session.register_component("data_loader", LOADER)
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
