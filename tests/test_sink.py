"""The sink's PutEvents fast path against the emulator: the same request botocore's client makes,
the same errors, signatures that verify, and the retry / split behaviour on top."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import orjson
import pytest
import pytest_asyncio
from aiobotocore.config import AioConfig
from botocore.exceptions import ClientError

from worker.config import PersonalizeSettings
from worker.emulator import RunningEmulator, run_emulator
from worker.metrics import Metrics
from worker.retry import Backoff, classify
from worker.sink import Sink

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
    assert classify(caught.value, 1).outcome == "client_error"


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
    assert classify(caught.value, 1).outcome == outcome


async def test_invalid_events_are_split_out_and_the_rest_delivered(running: RunningEmulator, sink: Sink) -> None:
    running.emulator.reset()
    events = sample_events(10)
    events[3]["itemId"] = events[8]["itemId"] = "refused"
    running.emulator.configure(reject_item_ids=["refused"])
    try:
        rejected = await sink.deliver("sess-2", None, *as_sent(events))
    finally:
        running.emulator.configure(reject_item_ids=None)
    assert [index for index, _ in rejected] == [3, 8]
    assert all("itemId" in message for _, message in rejected)
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

    from worker.sink import FixedRequestSigV4

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

    from worker.sink import FixedRequestSigV4

    signer = FixedRequestSigV4(Credentials(KEY, SECRET), "personalize", "us-east-1", "http://127.0.0.1:1/events")
    for now in (1_795_391_999.9, 1_795_392_000.0, 1_795_392_000.7, 1_795_478_400.2):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        expected = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime(SIGV4_TIMESTAMP)
        assert signer.timestamp() == expected
        assert dict(signer.headers(b"{}"))["X-Amz-Date"] == expected
