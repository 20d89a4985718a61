"""The sink's PutEvents fast path against the emulator: the same request botocore's client makes,
the same errors, signatures that verify, and the retry / split behaviour on top; the isolation of
failing events and the request-level alarm against a fake client whose loop turns are the clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import aioboto3
import orjson
import pytest
import pytest_asyncio
from aiobotocore.config import AioConfig
from botocore.exceptions import ClientError

from worker.backoff import Backoff
from worker.config import PersonalizeSettings
from worker.emulator import RunningEmulator, run_emulator
from worker.observe.metrics import Metrics
from worker.personalize.client import request_body
from worker.personalize.retry import classify
from worker.personalize.sink import Sink

KEY, SECRET = "AKIDTEST", "secret-for-tests"
MINIMAL = b'{"trackingId":"trk","sessionId":"s","eventList":[{"eventType":"x","sentAt":1}]}'


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest_asyncio.fixture(loop_scope="session")
async def running() -> AsyncIterator[RunningEmulator]:
    async with run_emulator(access_key=KEY, secret_key=SECRET) as emulator:
        yield emulator


@pytest_asyncio.fixture(loop_scope="session")
async def sink(running: RunningEmulator) -> AsyncIterator[Sink]:
    settings = PersonalizeSettings(tracking_id="trk", endpoint_url=running.url, max_requests_per_second=10_000)
    sink = Sink(settings, Metrics(), Backoff(base=0.001, cap=0.01))
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


def sample_events(count: int, item: str = "item-1") -> list[dict[str, Any]]:
    return [
        {
            "eventId": f"e-{n}",
            "eventType": "click",
            "sentAt": 1_790_000_000.25 + n,
            "itemId": item,
            "eventValue": 2.5,
            "properties": '{"pageCategory":"shoes"}',
            "impression": ["a", "b"],
            "recommendationId": "rec-1",
            "metricAttribution": {"eventAttributionSource": "email campaign"},
        }
        for n in range(count)
    ]


def as_sent(events: list[dict[str, Any]]) -> tuple[list[str], float]:
    """The events as the pipeline hands them to the sink: serialized, with the first one's sentAt."""
    return [orjson.dumps(e).decode() for e in events], events[0]["sentAt"]


async def test_request_matches_botocore_and_signature_verifies(running: RunningEmulator, sink: Sink) -> None:
    events = sample_events(3)
    assert await sink.deliver("sess-1", "user-1", *as_sent(events)) == []
    config = AioConfig(retries={"total_max_attempts": 1})
    async with aioboto3.Session().client(
        "personalize-events", region_name="us-east-1", endpoint_url=running.url, config=config
    ) as client:
        await client.put_events(trackingId="trk", sessionId="sess-1", userId="user-1", eventList=events)  # type: ignore[arg-type]
    received = list(running.emulator.events())
    ours, botocores = received[:3], received[3:]
    assert len(botocores) == 3
    for mine, theirs in zip(ours, botocores, strict=True):
        volatile = {"request_id", "received_at", "sentAt"}
        assert {k: v for k, v in mine.items() if k not in volatile} == {
            k: v for k, v in theirs.items() if k not in volatile
        }
        assert theirs["sentAt"] == int(mine["sentAt"]), "botocore cuts the fraction"
    assert [e["sentAt"] for e in ours] == [e["sentAt"] for e in events], "milliseconds survive our path"


async def test_wrong_secret_is_refused_and_classified(
    running: RunningEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    sink = Sink(PersonalizeSettings(tracking_id="trk", endpoint_url=running.url), Metrics())
    await sink.start()
    try:
        with pytest.raises(ClientError) as caught:
            await sink.client.put_events(MINIMAL)
    finally:
        await sink.close()
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert classify(caught.value).outcome == "client_error"


@pytest.mark.parametrize(
    ("fault", "code", "status", "outcome"),
    [
        ({"max_tps": 0.001}, "ThrottlingException", 400, "throttled"),
        ({"error_rate": 1.0}, "InternalFailure", 500, "server_error"),
        ({"outage": True}, "ServiceUnavailable", 503, "server_error"),
        ({"tracking_ids": ["other"]}, "ResourceNotFoundException", 404, "client_error"),
    ],
)
async def test_error_answers_become_botocore_errors(
    running: RunningEmulator, sink: Sink, fault: dict[str, Any], code: str, status: int, outcome: str
) -> None:
    running.emulator.configure(**fault)
    try:
        if "max_tps" in fault:  # drain the burst allowance first
            for _ in range(3):
                with contextlib.suppress(ClientError):
                    await sink.client.put_events(MINIMAL)
        with pytest.raises(ClientError) as caught:
            await sink.client.put_events(MINIMAL)
    finally:
        running.emulator.configure(max_tps=0, error_rate=0.0, outage=False, tracking_ids=None)
    assert caught.value.response["Error"]["Code"] == code
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert classify(caught.value).outcome == outcome


async def test_invalid_events_are_split_out_and_the_rest_delivered(running: RunningEmulator, sink: Sink) -> None:
    running.emulator.reset()
    events = sample_events(10)
    events[3]["itemId"] = events[8]["itemId"] = "refused"
    running.emulator.configure(reject_item_ids=["refused"])
    try:
        rejected = await sink.deliver("sess-2", None, *as_sent(events))
    finally:
        running.emulator.configure(reject_item_ids=None)
    assert [(r.position, r.reason) for r in rejected] == [(3, "rejected"), (8, "rejected")]
    assert all("itemId" in r.message for r in rejected)
    delivered = [e["eventId"] for e in running.emulator.events()]
    assert delivered == [e["eventId"] for i, e in enumerate(events) if i not in (3, 8)], "order kept"


async def test_transient_errors_are_retried_until_delivered(running: RunningEmulator, sink: Sink) -> None:
    running.emulator.reset()
    running.emulator.configure(error_rate=0.5)
    try:
        for n in range(20):
            assert await sink.deliver(f"sess-{n}", None, *as_sent(sample_events(2))) == []
    finally:
        running.emulator.configure(error_rate=0.0)
    stats = running.emulator.snapshot()
    assert stats["calls"] == 20
    assert stats["rejected"].get("InternalFailure", 0) > 0, "the fault must have been exercised"


@pytest.mark.parametrize(
    ("url", "token"),
    [
        ("https://personalize-events.us-east-1.amazonaws.com/events", None),
        ("https://personalize-events.eu-west-1.amazonaws.com:443/events", "session-token"),
        ("http://127.0.0.1:8787/events", None),
    ],
)
def test_fixed_request_signer_signs_exactly_like_botocore(
    url: str, token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime

    import botocore.auth
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from worker.personalize.client import FixedRequestSigV4

    credentials = Credentials(KEY, SECRET, token)
    fixed = FixedRequestSigV4(credentials, "personalize", "us-east-1", url)
    for moment in (datetime.datetime(2026, 11, 22, 23, 59, 59), datetime.datetime(2026, 11, 23, 0, 0, 1)):
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda moment=moment: moment)
        signed = []
        for signer in (SigV4Auth(credentials, "personalize", "us-east-1"), fixed):
            request = AWSRequest(method="POST", url=url, data=b'{"a":1}', headers={"Content-Type": "application/json"})
            signer.add_auth(request)
            signed.append(dict(request.headers.items()))
        assert signed[0] == signed[1], "same headers and signature, also across a date change"


def test_signing_clock_is_botocores_to_the_second(monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime

    from botocore.auth import SIGV4_TIMESTAMP
    from botocore.credentials import Credentials

    from worker.personalize.client import FixedRequestSigV4

    signer = FixedRequestSigV4(Credentials(KEY, SECRET), "personalize", "us-east-1", "http://127.0.0.1:1/events")
    for now in (1_795_391_999.9, 1_795_392_000.0, 1_795_392_000.7, 1_795_478_400.2):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        expected = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime(SIGV4_TIMESTAMP)
        assert signer.timestamp() == expected
        assert dict(signer.headers(b"{}"))["X-Amz-Date"] == expected


# --------------------------------------------------------------------------- isolating failures (fake client)


def failure(code: str, status: int, message: str = "boom") -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutEvents")


SERVER_ERROR = failure("InternalFailure", 500, "The request processing has failed because of an unknown error.")
DENIED = failure("AccessDeniedException", 403, "User: arn:aws:sts::123456789012:assumed-role/w/i-1 is not authorized")


class FakeClient:
    """PutEvents decided by the body, instantly: calls carrying a poison itemId fail with `poison_error`;
    while `down` is set, every call (or every call of `down_sessions`) fails with it."""

    def __init__(self) -> None:
        self.poison: set[str] = set()
        self.poison_error: Exception = SERVER_ERROR
        self.down: Exception | None = None
        self.down_sessions: set[str] | None = None
        self.calls: list[tuple[str, list[str]]] = []
        self.accepted: list[str] = []
        self.on_call: Any = None

    async def put_events(self, body: bytes) -> None:
        await asyncio.sleep(0)  # one turn of the loop, as a network call would take
        doc = orjson.loads(body)
        ids = [e["eventId"] for e in doc["eventList"]]
        self.calls.append((doc["sessionId"], ids))
        if self.on_call is not None:
            self.on_call(self)
        if self.down is not None and (self.down_sessions is None or doc["sessionId"] in self.down_sessions):
            raise self.down
        if any(e.get("itemId") in self.poison for e in doc["eventList"]):
            raise self.poison_error
        self.accepted.extend(ids)

    def calls_of(self, event_id: str) -> list[int]:
        """Sizes of the calls that carried this event, in order."""
        return [len(ids) for _, ids in self.calls if event_id in ids]


def fake_sink(max_event_attempts: int = 10) -> tuple[Sink, FakeClient, Metrics]:
    settings = PersonalizeSettings(
        tracking_id="trk", max_requests_per_second=1e9, max_event_attempts=max_event_attempts
    )
    metrics = Metrics()
    sink = Sink(settings, metrics, Backoff(rng=lambda low, high: 0.0))  # no waiting: the loop's turns are the clock
    client = FakeClient()
    sink.client = cast(Any, client)
    return sink, client, metrics


def batch(prefix: str, count: int, poison_at: int | None = None) -> list[str]:
    return [
        orjson.dumps(
            {"eventId": f"{prefix}-{n}", "eventType": "click", "sentAt": 1, "itemId": "bad" if n == poison_at else "ok"}
        ).decode()
        for n in range(count)
    ]


@contextlib.asynccontextmanager
async def other_traffic(sink: Sink) -> AsyncIterator[list[int]]:
    """Other sessions' calls, one after another, for as long as the block runs: what 'healthy for other
    calls' is measured against."""
    sent = [0]

    async def run() -> None:
        while True:
            assert await sink.deliver(f"other-{sent[0]}", None, batch(f"o{sent[0]}", 1), 0.0) == []
            sent[0] += 1

    task = asyncio.create_task(run())
    try:
        yield sent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize(
    "error",
    [SERVER_ERROR, failure("400", 400, "<html>Bad Request</html>"), TimeoutError(), failure("Teapot", 418)],
    ids=["5xx", "uncoded-4xx", "timeout", "unknown-4xx"],
)
async def test_a_poison_event_is_isolated_and_dead_lettered_while_others_succeed(error: Exception) -> None:
    sink, client, _ = fake_sink(max_event_attempts=4)
    client.poison, client.poison_error = {"bad"}, error
    events = batch("main", 10, poison_at=3)
    async with other_traffic(sink), asyncio.timeout(30):
        rejected = await sink.deliver("main", None, events, 0.0)
    assert [(r.position, r.reason) for r in rejected] == [(3, "retries_exhausted")]
    assert "failed alone 4 times" in rejected[0].message
    assert rejected[0].message.endswith(classify(error).message), "the last error, code and cut message"
    assert [i for i in client.accepted if i.startswith("main")] == [f"main-{n}" for n in range(10) if n != 3]
    # Halved in order after two isolated failures per level (10 → 5 → 3 → 2), then alone max_event_attempts
    # times; a failure before any other call got through (the very first, say) is not isolated.
    sizes = client.calls_of("main-3")
    assert sizes == sorted(sizes, reverse=True) and set(sizes) == {10, 5, 3, 2, 1}
    assert sizes.count(1) == 4 and all(sizes.count(n) >= 2 for n in (10, 5, 3, 2))
    assert len(sizes) <= 12 + 2
    assert sink.refused is None


async def test_an_outage_for_everyone_counts_nothing_then_the_poison_is_isolated() -> None:
    sink, client, _ = fake_sink(max_event_attempts=3)
    client.poison = {"bad"}
    client.down = failure("ServiceUnavailable", 503, "Service Unavailable")
    events = batch("main", 10, poison_at=9)

    def outage_ends_after_300_calls(fake: FakeClient) -> None:
        if len(fake.calls) == 300:
            fake.down = None

    client.on_call = outage_ends_after_300_calls
    async with other_traffic(sink) as others, asyncio.timeout(30):
        rejected = await sink.deliver("main", None, events, 0.0)
    outage = client.calls[:300]
    assert all(len(ids) == 10 for session, ids in outage if session == "main"), "never split in the outage"
    assert sum(1 for session, _ in outage if session == "main") > 100
    assert others[0] > 0
    assert [(r.position, r.reason) for r in rejected] == [(9, "retries_exhausted")]
    assert "ServiceUnavailable" not in rejected[0].message and "InternalFailure" in rejected[0].message
    assert client.calls_of("main-9")[-3:] == [1, 1, 1], "only failures after the outage counted"
    assert len(set(client.accepted)) == len(client.accepted), "everything else exactly once"


async def test_with_no_other_traffic_nothing_is_blamed() -> None:
    """Nothing tells a poison event from an outage when it is the only call: it keeps retrying (the stall
    watchdog says so) until other calls go through, then it is isolated."""
    sink, client, _ = fake_sink(max_event_attempts=2)
    client.poison = {"bad"}
    two_hundred = asyncio.Event()
    client.on_call = lambda fake: two_hundred.set() if len(fake.calls) >= 200 else None
    delivering = asyncio.create_task(sink.deliver("main", None, batch("main", 4, poison_at=0), 0.0))
    await two_hundred.wait()
    assert not delivering.done()
    assert {len(ids) for _, ids in client.calls} == {4}
    assert sink.last_error == "InternalFailure"
    async with other_traffic(sink), asyncio.timeout(30):
        rejected = await delivering
    assert [(r.position, r.reason) for r in rejected] == [(0, "retries_exhausted")]


async def test_request_level_refusals_are_retried_with_the_alarm_never_dead_lettered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="worker.sink")
    sink, client, metrics = fake_sink(max_event_attempts=1)
    client.down, client.down_sessions = DENIED, {"main"}  # even while other calls are accepted
    refused = "personalize_worker_put_events_refused"

    def recovers_after_200_calls(fake: FakeClient) -> None:
        if len(fake.calls) == 200:
            assert sink.refused == "PutEvents refused: AccessDeniedException (credentials or permissions)"
            assert metrics.registry.get_sample_value(refused) == 1
            fake.down = None

    client.on_call = recovers_after_200_calls
    async with other_traffic(sink), asyncio.timeout(30):
        assert await sink.deliver("main", None, batch("main", 10), 0.0) == []
    assert {len(ids) for session, ids in client.calls if session == "main"} == {10}, "never split"
    assert sink.refused is None and metrics.registry.get_sample_value(refused) == 0
    # The alarm came and went with every call (the others' were accepted): still one line each way.
    messages = [r.getMessage() for r in caplog.records if r.name == "worker.sink"]
    assert messages.count("PutEvents refuses the request itself; retrying, nothing is dead-lettered") == 1
    assert messages.count("PutEvents accepts requests again") == 1


async def test_the_same_refusal_for_every_event_is_about_the_request() -> None:
    """A refusal that names no event, the same for every piece, nothing accepted anywhere: not the content."""
    sink, client, _ = fake_sink()
    client.down = failure("InvalidInputException", 400, "The event tracker is not active.")

    def recovers_after_100_calls(fake: FakeClient) -> None:
        if len(fake.calls) == 100:
            fake.down = None

    client.on_call = recovers_after_100_calls
    async with asyncio.timeout(30):
        assert await sink.deliver("main", None, batch("main", 4), 0.0) == []
    sizes = [len(ids) for _, ids in client.calls]
    assert sizes[:7] == [4, 2, 1, 1, 2, 1, 1], "explored once"
    assert set(sizes[7:]) == {4}, "then retried whole"
    assert client.accepted == [f"main-{n}" for n in range(4)]


async def test_the_same_refusal_while_others_are_accepted_is_about_the_events() -> None:
    sink, client, _ = fake_sink()
    client.down = failure("InvalidInputException", 400, "Properties do not match the schema.")
    client.down_sessions = {"main"}
    async with other_traffic(sink), asyncio.timeout(30):
        rejected = await sink.deliver("main", None, batch("main", 4), 0.0)
    assert [(r.position, r.reason) for r in rejected] == [(n, "rejected") for n in range(4)]


async def test_an_event_too_large_for_a_proxy_is_dead_lettered(running: RunningEmulator, sink: Sink) -> None:
    """A 413 without an error code, over real sockets: halved until the event that alone is too large."""
    running.emulator.reset()
    events = sample_events(6)
    events[4]["properties"] = orjson.dumps({"note": "x" * 900}).decode()
    events[4]["impression"] = [f"impression-{n:03d}" * 4 for n in range(25)]
    serialized, sent_at = as_sent(events)
    small = len(request_body("trk", "sess-413", None, [e for n, e in enumerate(serialized) if n != 4]))
    running.emulator.configure(max_body_bytes=small)
    try:
        rejected = await sink.deliver("sess-413", None, serialized, sent_at)
    finally:
        running.emulator.configure(max_body_bytes=None)
    assert [(r.position, r.reason) for r in rejected] == [(4, "too_large")]
    assert rejected[0].message.startswith("HTTP 413: ")
    assert [e["eventId"] for e in running.emulator.events()] == [f"e-{n}" for n in range(6) if n != 4]


async def test_a_poison_event_at_the_emulator_is_isolated(running: RunningEmulator, sink: Sink) -> None:
    """fail_item_ids over real sockets: the emulator answers 500 to every call carrying the event."""
    running.emulator.reset()
    events = sample_events(10)
    events[6]["itemId"] = "poison"
    running.emulator.configure(fail_item_ids=["poison"])
    try:
        async with other_traffic(sink), asyncio.timeout(120):
            rejected = await sink.deliver("sess-poison", None, *as_sent(events))
    finally:
        running.emulator.configure(fail_item_ids=None)
    assert [(r.position, r.reason) for r in rejected] == [(6, "retries_exhausted")]
    assert "InternalFailure" in rejected[0].message
    mine = [e["eventId"] for e in running.emulator.events() if e["sessionId"] == "sess-poison"]
    assert mine == [f"e-{n}" for n in range(10) if n != 6]


async def test_a_session_whose_call_is_being_retried_is_known_until_the_call_ends() -> None:
    """The watchdog says a stuck record waits on `retry` (not merely `call`) from this."""
    sink, client, _ = fake_sink()
    client.down, client.down_sessions = SERVER_ERROR, {"main"}
    retried = asyncio.Event()
    client.on_call = lambda fake: retried.set() if len(fake.calls) >= 3 else None
    delivering = asyncio.create_task(sink.deliver("main", None, batch("main", 2), 0.0))
    await retried.wait()
    assert sink.retrying == {"main": 1}
    assert await sink.deliver("other", None, batch("other", 1), 0.0) == []
    assert "other" not in sink.retrying, "a call that went through at once was never retried"
    client.down = None
    async with asyncio.timeout(30):
        assert await delivering == []
    assert sink.retrying == {}
