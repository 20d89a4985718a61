"""The Personalize Events emulator, exercised through a real aioboto3 client over HTTP.

Client-side parameter validation is off, so invalid requests reach the emulator exactly as a buggy
worker would send them; botocore retries are off, so each call is one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aioboto3
import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiobotocore.config import AioConfig
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from worker.emulator import RunningEmulator, run_emulator
from worker.emulator.faults import DOCUMENTED_QUOTAS

REGION = "us-east-1"
ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/ITEMS"
CLIENT_CONFIG = AioConfig(parameter_validation=False, retries={"total_max_attempts": 1})
NO_FAULTS: dict[str, Any] = {
    "max_tps": None,
    "quotas": dict.fromkeys(DOCUMENTED_QUOTAS),
    "latency_ms": 0,
    "jitter_ms": 0,
    "error_rate": 0,
    "throttle_rate": 0,
    "outage": False,
    "tracking_ids": None,
    "reject_item_ids": None,
    "fail_item_ids": None,
    "access_denied": False,
    "max_body_bytes": None,
    "dataset_arns": None,
    "tracker_groups": None,
    "clock_skew_seconds": 0.0,
}
REPO_ROOT = Path(__file__).resolve().parents[1]
MISSING: Any = object()  # marks a member to leave out of a request


# --------------------------------------------------------------------------- request builders


def _build(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **overrides}
    return {key: value for key, value in merged.items() if value is not MISSING}


def event(**overrides: Any) -> dict[str, Any]:
    base = {
        "eventId": "ev-1",
        "eventType": "click",
        "eventValue": 4.5,
        "itemId": "item-1",
        "sentAt": 1_700_000_000,
        "properties": '{"numberOfRatings": "12"}',
        "recommendationId": "rec-1",
        "impression": ["item-1", "item-2"],
        "metricAttribution": {"eventAttributionSource": "newsletter"},
    }
    return _build(base, overrides)


def put_events(**overrides: Any) -> dict[str, Any]:
    base = {"trackingId": "tracker", "sessionId": "session-1", "userId": "user-1", "eventList": [event()]}
    return _build(base, overrides)


def put_items(**overrides: Any) -> dict[str, Any]:
    base = {"datasetArn": ARN, "items": [{"itemId": "item-1", "properties": '{"genre": "Horror|Action"}'}]}
    return _build(base, overrides)


def put_users(**overrides: Any) -> dict[str, Any]:
    base = {"datasetArn": ARN, "users": [{"userId": "user-1", "properties": '{"tier": "gold"}'}]}
    return _build(base, overrides)


def json_string(length: int) -> str:
    """A JSON object encoded as a string of exactly ``length`` characters."""
    shell = '{"note": ""}'
    return '{"note": "' + "x" * (length - len(shell)) + '"}'


# --------------------------------------------------------------------------- fixtures and helpers


@contextlib.asynccontextmanager
async def personalize(url: str, access_key: str = "test", secret_key: str = "test") -> AsyncIterator[Any]:
    async with aioboto3.Session().client(
        "personalize-events",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=CLIENT_CONFIG,
    ) as client:
        yield client


@pytest_asyncio.fixture(scope="module")
async def running() -> AsyncIterator[RunningEmulator]:
    async with run_emulator() as emulator:
        yield emulator


@pytest_asyncio.fixture(scope="module")
async def client(running: RunningEmulator) -> AsyncIterator[Any]:
    async with personalize(running.url) as shared:
        yield shared


@pytest.fixture
def emu(running: RunningEmulator) -> RunningEmulator:
    """The shared emulator, emptied and without faults, so tests don't see each other."""
    running.emulator.reset()
    running.emulator.configure(**NO_FAULTS)
    return running


async def http(method: str, url: str, payload: Any = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=payload) as response:
        return response.status, await response.read()


async def ndjson(url: str) -> list[dict[str, Any]]:
    status, body = await http("GET", url)
    assert status == 200
    return [orjson.loads(line) for line in body.splitlines()]


async def signed_post(url: str, body: bytes, service: str = "personalize", secret_key: str = "test") -> tuple[int, str]:
    """A hand-made SigV4 request, for what aioboto3 cannot put on the wire."""
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials("test", secret_key), service, REGION).add_auth(request)
    headers = dict(request.headers.items())
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        await response.read()
        return response.status, response.headers.get("x-amzn-ErrorType", "")


def error_code(error: ClientError) -> str:
    return str(error.response["Error"]["Code"])


def status_of(error: ClientError) -> int:
    return int(error.response["ResponseMetadata"]["HTTPStatusCode"])


# --------------------------------------------------------------------------- validation, table-driven

VALID = [
    pytest.param("put_events", put_events(), {"events": 1}, id="events-full"),
    pytest.param(
        "put_events",
        {"trackingId": "t", "sessionId": "s", "eventList": [{"eventType": "view", "sentAt": 1}]},
        {"events": 1},
        id="events-minimal-anonymous",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(eventId=f"ev-{n}") for n in range(10)]),
        {"events": 10},
        id="events-10",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(impression=[f"i{n}" for n in range(25)], properties=json_string(1024))]),
        {"events": 1},
        id="events-at-upper-limits",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(sentAt=datetime.now(UTC), eventValue=float("nan"))]),
        {"events": 1},
        id="events-datetime-and-nan",
    ),
    pytest.param("put_items", put_items(), {"items": 1}, id="items"),
    pytest.param("put_users", put_users(), {"users": 1}, id="users"),
    pytest.param(
        "put_actions",
        {"datasetArn": ARN, "actions": [{"actionId": "a-1", "properties": '{"value": "100"}'}]},
        {"actions": 1},
        id="actions",
    ),
    pytest.param(
        "put_action_interactions",
        {
            "trackingId": "tracker",
            "actionInteractions": [
                {"actionId": "a-1", "sessionId": "s", "timestamp": 1_700_000_000, "eventType": "Taken"}
            ],
        },
        {"action_interactions": 1},
        id="action-interactions",
    ),
]


@pytest.mark.parametrize(("method", "params", "counts"), VALID)
async def test_valid_request_accepted(
    emu: RunningEmulator, client: Any, method: str, params: dict[str, Any], counts: dict[str, int]
) -> None:
    response = await getattr(client, method)(**params)

    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    stats = emu.emulator.snapshot()
    assert {key: stats[key] for key in counts} == counts
    assert stats["rejected"] == {}


INVALID = [
    # PutEvents, request level
    pytest.param("put_events", put_events(trackingId=MISSING), "trackingId", "must not be null", id="tid-missing"),
    pytest.param("put_events", put_events(trackingId=""), "trackingId", "greater than or equal to 1", id="tid-empty"),
    pytest.param(
        "put_events",
        put_events(trackingId="t" * 257),
        "trackingId",
        "less than or equal to 256",
        id="tid-257",
    ),
    pytest.param("put_events", put_events(sessionId=MISSING), "sessionId", "must not be null", id="sid-missing"),
    pytest.param("put_events", put_events(sessionId=""), "sessionId", "greater than or equal to 1", id="sid-empty"),
    pytest.param("put_events", put_events(sessionId="s" * 257), "sessionId", "less than or equal to 256", id="sid-257"),
    pytest.param("put_events", put_events(userId=""), "userId", "greater than or equal to 1", id="uid-empty"),
    pytest.param("put_events", put_events(userId="u" * 257), "userId", "less than or equal to 256", id="uid-257"),
    pytest.param("put_events", put_events(userId=42), "userId", "of type string", id="uid-number"),
    pytest.param("put_events", put_events(eventList=MISSING), "eventList", "must not be null", id="list-missing"),
    pytest.param("put_events", put_events(eventList=[]), "eventList", "greater than or equal to 1", id="list-empty"),
    pytest.param(
        "put_events",
        put_events(eventList=[event()] * 11),
        "eventList",
        "less than or equal to 10",
        id="list-11",
    ),
    # PutEvents, event level
    pytest.param(
        "put_events",
        put_events(eventList=[event(eventType=MISSING)]),
        "eventList.1.member.eventType",
        "must not be null",
        id="type-missing",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(eventType="")]),
        "eventList.1.member.eventType",
        "greater than or equal to 1",
        id="type-empty",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(eventType="e" * 257)]),
        "eventList.1.member.eventType",
        "less than or equal to 256",
        id="type-257",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(), event(eventType=7)]),
        "eventList.2.member.eventType",
        "of type string",
        id="type-number-second-event",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(sentAt=MISSING)]),
        "eventList.1.member.sentAt",
        "must not be null",
        id="sentAt-missing",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(eventId="")]),
        "eventList.1.member.eventId",
        "greater than or equal to 1",
        id="eventId-empty",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(eventId="x" * 257)]),
        "eventList.1.member.eventId",
        "less than or equal to 256",
        id="eventId-257",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(itemId="x" * 257)]),
        "eventList.1.member.itemId",
        "less than or equal to 256",
        id="itemId-257",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(properties=json_string(1025))]),
        "eventList.1.member.properties",
        "less than or equal to 1024",
        id="properties-1025",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(properties="")]),
        "eventList.1.member.properties",
        "greater than or equal to 1",
        id="properties-empty",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(properties={"numberOfRatings": "12"})]),
        "eventList.1.member.properties",
        "of type string",
        id="properties-dict-not-encoded",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(properties="rating=5")]),
        "eventList.1.member.properties",
        "JSON object",
        id="properties-not-json",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(properties='{"userId": "u"}')]),
        "eventList.1.member.properties",
        "reserved keys ['userId']",
        id="properties-reserved-key",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(recommendationId="r" * 41)]),
        "eventList.1.member.recommendationId",
        "less than or equal to 40",
        id="recommendationId-41",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(impression=[f"i{n}" for n in range(26)])]),
        "eventList.1.member.impression",
        "less than or equal to 25",
        id="impression-26",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(impression=[])]),
        "eventList.1.member.impression",
        "greater than or equal to 1",
        id="impression-empty",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(impression=["ok", ""])]),
        "eventList.1.member.impression.2.member",
        "greater than or equal to 1",
        id="impression-item-empty",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(metricAttribution={})]),
        "eventList.1.member.metricAttribution.eventAttributionSource",
        "must not be null",
        id="attribution-source-missing",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(metricAttribution={"eventAttributionSource": "   "})]),
        "eventList.1.member.metricAttribution.eventAttributionSource",
        "regular expression pattern",
        id="attribution-source-blank",
    ),
    pytest.param(
        "put_events",
        put_events(eventList=[event(metricAttribution={"eventAttributionSource": "s" * 1025})]),
        "eventList.1.member.metricAttribution.eventAttributionSource",
        "less than or equal to 1024",
        id="attribution-source-1025",
    ),
    # PutItems
    pytest.param("put_items", put_items(datasetArn=MISSING), "datasetArn", "must not be null", id="items-arn-missing"),
    pytest.param(
        "put_items",
        put_items(datasetArn="dataset/shop"),
        "datasetArn",
        "regular expression",
        id="items-arn-pattern",
    ),
    pytest.param(
        "put_items",
        put_items(datasetArn=ARN + "x" * (257 - len(ARN))),
        "datasetArn",
        "less than or equal to 256",
        id="items-arn-257",
    ),
    pytest.param("put_items", put_items(items=[]), "items", "greater than or equal to 1", id="items-empty"),
    pytest.param(
        "put_items",
        put_items(items=[{"itemId": f"i{n}"} for n in range(11)]),
        "items",
        "less than or equal to 10",
        id="items-11",
    ),
    pytest.param(
        "put_items",
        put_items(items=[{"properties": "{}"}]),
        "items.1.member.itemId",
        "not be null",
        id="itemId-gone",
    ),
    pytest.param(
        "put_items",
        put_items(items=[{"itemId": ""}]),
        "items.1.member.itemId",
        "greater than or equal to 1",
        id="iid-0",
    ),
    pytest.param(
        "put_items",
        put_items(items=[{"itemId": "i", "properties": json_string(32001)}]),
        "items.1.member.properties",
        "less than or equal to 32000",
        id="items-properties-32001",
    ),
    # PutUsers
    pytest.param("put_users", put_users(users=MISSING), "users", "must not be null", id="users-missing"),
    pytest.param(
        "put_users",
        put_users(users=[{"userId": f"u{n}"} for n in range(11)]),
        "users",
        "less than or equal to 10",
        id="users-11",
    ),
    pytest.param(
        "put_users",
        put_users(users=[{"userId": "u" * 257}]),
        "users.1.member.userId",
        "less than or equal to 256",
        id="users-userId-257",
    ),
    pytest.param(
        "put_users",
        put_users(users=[{"userId": "u", "properties": json_string(24001)}]),
        "users.1.member.properties",
        "less than or equal to 24000",
        id="users-properties-24001",
    ),
]


@pytest.mark.parametrize(("method", "params", "path", "constraint"), INVALID)
async def test_invalid_request_rejected(
    emu: RunningEmulator, client: Any, *, method: str, params: dict[str, Any], path: str, constraint: str
) -> None:
    with pytest.raises(client.exceptions.InvalidInputException) as caught:
        await getattr(client, method)(**params)

    message = caught.value.response["Error"]["Message"]
    assert message.startswith("1 validation error detected: "), message
    assert f"Value at '{path}' failed to satisfy constraint: Member " in message
    assert constraint in message
    assert status_of(caught.value) == 400
    stats = emu.emulator.snapshot()
    assert not any(stats["calls_by_operation"].values())
    assert stats["rejected"] == {"InvalidInputException": 1}


async def test_several_violations_are_all_listed(emu: RunningEmulator, client: Any) -> None:
    params = put_events(sessionId=MISSING, eventList=[event(eventType=""), event(recommendationId="r" * 41)])

    with pytest.raises(client.exceptions.InvalidInputException) as caught:
        await client.put_events(**params)

    message = caught.value.response["Error"]["Message"]
    assert message.startswith("3 validation errors detected: ")
    for path in ("sessionId", "eventList.1.member.eventType", "eventList.2.member.recommendationId"):
        assert f"Value at '{path}'" in message


def wire_events(**event_members: Any) -> dict[str, Any]:
    return {"trackingId": "t", "sessionId": "s", "eventList": [{"eventType": "click", **event_members}]}


@pytest.mark.parametrize(
    ("body", "accepted"),
    [
        pytest.param(wire_events(sentAt="2024-05-01T12:00:00Z"), True, id="iso-timestamp"),
        pytest.param(wire_events(sentAt=1700000000.25, eventValue="Infinity"), True, id="fraction-infinity"),
        pytest.param(wire_events(sentAt="yesterday"), False, id="bad-timestamp"),
        pytest.param(wire_events(sentAt=True), False, id="boolean-timestamp"),
        pytest.param(wire_events(sentAt=1, eventValue="high"), False, id="string-float"),
        pytest.param({"trackingId": "t", "sessionId": "s", "eventList": {"eventType": "x"}}, False, id="not-list"),
    ],
)
async def test_wire_level_types(emu: RunningEmulator, body: dict[str, Any], accepted: bool) -> None:
    """What botocore's serializer would refuse to send, sent by hand."""
    status, error_type = await signed_post(emu.url + "/events", orjson.dumps(body))

    assert (status, error_type) == ((200, "") if accepted else (400, "InvalidInputException"))


async def test_malformed_json_is_a_serialization_error(emu: RunningEmulator) -> None:
    status, error_type = await signed_post(emu.url + "/events", b'{"trackingId": ')

    assert (status, error_type) == (400, "SerializationException")


# --------------------------------------------------------------------------- fault injection


async def test_throttling_over_max_tps(emu: RunningEmulator, client: Any) -> None:
    emu.emulator.configure(max_tps=5)

    results = await asyncio.gather(*(client.put_events(**put_events()) for _ in range(50)), return_exceptions=True)

    throttled = [r for r in results if isinstance(r, ClientError) and error_code(r) == "ThrottlingException"]
    accepted = [r for r in results if isinstance(r, dict)]
    assert len(throttled) >= 40
    assert len(throttled) + len(accepted) == 50
    assert throttled[0].response["Error"]["Message"] == "Rate exceeded"
    assert status_of(throttled[0]) == 400
    stats = emu.emulator.snapshot()
    assert stats["throttled"] == len(throttled)
    assert stats["calls"] == len(accepted)


async def test_latency_injection(emu: RunningEmulator, client: Any) -> None:
    emu.emulator.configure(latency_ms=150, jitter_ms=20)

    started = time.monotonic()
    await client.put_events(**put_events())

    assert time.monotonic() - started >= 0.13


async def test_error_injection(emu: RunningEmulator, client: Any) -> None:
    emu.emulator.configure(error_rate=1.0)

    with pytest.raises(ClientError) as caught:
        await client.put_events(**put_events())

    assert (error_code(caught.value), status_of(caught.value)) == ("InternalFailure", 500)
    assert emu.emulator.snapshot()["calls"] == 0


async def test_faults_come_before_validation_in_order(emu: RunningEmulator, client: Any) -> None:
    emu.emulator.configure(outage=True, error_rate=1.0)
    with pytest.raises(ClientError) as outage:
        await client.put_events(**put_events(trackingId=""))
    emu.emulator.configure(outage=False)
    with pytest.raises(ClientError) as failure:
        await client.put_events(**put_events(trackingId=""))

    assert (error_code(outage.value), status_of(outage.value)) == ("ServiceUnavailable", 503)
    assert error_code(failure.value) == "InternalFailure"


async def test_failing_items_get_500_every_time_while_the_rest_is_accepted(emu: RunningEmulator, client: Any) -> None:
    emu.emulator.configure(fail_item_ids=["poison"])
    for _ in range(3):
        with pytest.raises(ClientError) as caught:
            await client.put_events(**put_events(eventList=[event(eventId="a"), event(eventId="b", itemId="poison")]))
        assert (error_code(caught.value), status_of(caught.value)) == ("InternalFailure", 500)
    await client.put_events(**put_events(eventList=[event(eventId="a")]))

    assert [e["eventId"] for e in emu.emulator.events()] == ["a"]
    assert emu.emulator.snapshot()["rejected"] == {"InternalFailure": 3}
    with pytest.raises(ValueError, match="fail_item_ids"):
        emu.emulator.configure(fail_item_ids="poison")


async def test_access_denied_names_the_account_like_aws(emu: RunningEmulator, client: Any) -> None:
    emu.emulator.configure(access_denied=True)
    with pytest.raises(ClientError) as caught:
        await client.put_events(**put_events())
    emu.emulator.configure(access_denied=False)
    await client.put_events(**put_events())

    assert (error_code(caught.value), status_of(caught.value)) == ("AccessDeniedException", 403)
    assert "arn:aws:sts::123456789012:assumed-role/" in caught.value.response["Error"]["Message"]
    assert emu.emulator.snapshot()["calls"] == 1


async def test_a_proxy_size_limit_answers_413_without_an_error_code(emu: RunningEmulator) -> None:
    emu.emulator.configure(max_body_bytes=100)
    async with aiohttp.ClientSession() as session:
        async with session.post(emu.url + "/events", data=b"x" * 101) as response:
            status, headers, body = response.status, response.headers, await response.read()
        async with session.post(emu.url + "/events", data=b"x" * 100) as response:
            within = response.status

    assert (status, "x-amzn-ErrorType" in headers) == (413, False)
    assert body.startswith(b"<html>")
    assert within == 403, "within the limit, the request goes on to authentication"
    with pytest.raises(ValueError, match="max_body_bytes"):
        emu.emulator.configure(max_body_bytes=-1)


async def test_random_throttling(emu: RunningEmulator, client: Any) -> None:
    emu.emulator.configure(throttle_rate=1.0)
    with pytest.raises(ClientError) as throttled:
        await client.put_events(**put_events())
    emu.emulator.configure(throttle_rate=0.0)
    await client.put_events(**put_events())

    assert (error_code(throttled.value), status_of(throttled.value)) == ("ThrottlingException", 400)
    assert emu.emulator.snapshot()["throttled"] == 1
    with pytest.raises(ValueError, match="throttle_rate"):
        emu.emulator.configure(throttle_rate=1.5)


async def test_runtime_config_over_http(emu: RunningEmulator, client: Any) -> None:
    status, body = await http("POST", emu.url + "/_emulator/config", {"outage": True, "latency_ms": 5})
    assert status == 200
    assert orjson.loads(body) | {"outage": True} == NO_FAULTS | {"outage": True, "latency_ms": 5.0}

    with pytest.raises(ClientError) as caught:
        await client.put_events(**put_events())
    assert error_code(caught.value) == "ServiceUnavailable"

    await http("POST", emu.url + "/_emulator/config", {"outage": False})
    response = await client.put_events(**put_events())
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200

    status, _ = await http("POST", emu.url + "/_emulator/config", {"bogus": 1})
    assert status == 400


# --------------------------------------------------------------------------- authentication and trackers


async def test_unsigned_request_refused(emu: RunningEmulator) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(emu.url + "/events", json=put_events()) as response,
    ):
        assert response.status == 403
        assert response.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"


async def test_wrong_service_in_credential_scope_refused(emu: RunningEmulator) -> None:
    status, error_type = await signed_post(emu.url + "/events", orjson.dumps(put_events()), service="s3")

    assert (status, error_type) == (403, "InvalidSignatureException")


async def test_signature_verified_with_configured_secret() -> None:
    async with run_emulator(access_key="test", secret_key="right") as running:
        async with personalize(running.url, secret_key="wrong") as client:
            with pytest.raises(ClientError) as caught:
                await client.put_events(**put_events())
        async with personalize(running.url, access_key="stranger", secret_key="right") as client:
            with pytest.raises(ClientError) as stranger:
                await client.put_events(**put_events())
        async with personalize(running.url, secret_key="right") as client:
            response = await client.put_events(**put_events())

    assert (error_code(caught.value), status_of(caught.value)) == ("InvalidSignatureException", 403)
    assert error_code(stranger.value) == "UnrecognizedClientException"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200


async def test_unknown_tracking_id_not_found() -> None:
    async with run_emulator(tracking_ids=["known"]) as running, personalize(running.url) as client:
        with pytest.raises(client.exceptions.ResourceNotFoundException) as caught:
            await client.put_events(**put_events(trackingId="other"))
        response = await client.put_events(**put_events(trackingId="known"))
        await client.put_items(**put_items())  # datasets are not restricted

    assert status_of(caught.value) == 404
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200


# --------------------------------------------------------------------------- inspection


async def test_stats_and_events_report_what_was_accepted(emu: RunningEmulator, client: Any) -> None:
    first = await client.put_events(
        **put_events(eventList=[event(eventId="a"), event(eventId="b", properties='{"x": "1"}')])
    )
    await client.put_events(
        **put_events(userId=MISSING, sessionId="session-2", eventList=[event(eventId="b"), event(eventId="c")])
    )
    await client.put_events(**put_events(eventList=[event(eventId=MISSING)]))
    await client.put_items(**put_items())
    await client.put_users(**put_users())

    status, body = await http("GET", emu.url + "/_emulator/stats")
    stats = orjson.loads(body)
    events = await ndjson(emu.url + "/_emulator/events")

    assert status == 200
    assert (stats["requests"], stats["events_without_id"], stats["rejected"]) == (5, 1, {})
    assert {k: stats[k] for k in ("calls", "events", "unique_event_ids", "duplicate_events")} == {
        "calls": 3,
        "events": 5,
        "unique_event_ids": 3,
        "duplicate_events": 1,
    }
    assert (stats["max_events_per_call"], stats["items"], stats["users"]) == (2, 1, 1)
    assert [e.get("eventId") for e in events] == ["a", "b", "b", "c", None]
    assert events[1] == {
        **event(eventId="b", properties='{"x": "1"}'),
        "trackingId": "tracker",
        "userId": "user-1",
        "sessionId": "session-1",
        "request_id": first["ResponseMetadata"]["RequestId"],
        "received_at": pytest.approx(time.time(), abs=10),
    }
    assert (events[2]["userId"], events[2]["sessionId"]) == (None, "session-2")
    assert [e.get("eventId") for e in await ndjson(emu.url + "/_emulator/events?since=3")] == ["c", None]
    items = await ndjson(emu.url + "/_emulator/items")
    assert [(i["itemId"], i["datasetArn"]) for i in items] == [("item-1", ARN)]
    assert [u["userId"] for u in await ndjson(emu.url + "/_emulator/users")] == ["user-1"]


async def test_rejections_counted_by_error_type(emu: RunningEmulator, client: Any) -> None:
    with pytest.raises(client.exceptions.InvalidInputException):
        await client.put_events(**put_events(sessionId=MISSING))
    await http("POST", emu.url + "/events")

    stats = emu.emulator.snapshot()

    assert stats["rejected"] == {"InvalidInputException": 1, "MissingAuthenticationTokenException": 1}
    assert stats["requests"] == 2


async def test_reset_clears_everything(emu: RunningEmulator, client: Any) -> None:
    await client.put_events(**put_events())

    status, body = await http("POST", emu.url + "/_emulator/reset")

    assert status == 200
    assert orjson.loads(body)["events"] == 0
    assert await ndjson(emu.url + "/_emulator/events") == []
    assert emu.emulator.snapshot()["unique_event_ids"] == 0


async def test_events_stream_many(emu: RunningEmulator) -> None:
    """Large logs stream line by line from the raw stored calls."""
    log = emu.emulator.logs["PutEvents"]
    raw = orjson.dumps(put_events(eventList=[event(eventId=str(n)) for n in range(10)]))
    for call in range(10_000):
        log.add(raw, 10, f"req-{call}", 0.0)

    lines = await ndjson(emu.url + "/_emulator/events?since=99995")

    assert len(lines) == 5
    assert (lines[0]["eventId"], lines[0]["request_id"]) == ("5", "req-9999")


async def test_record_file_gets_the_event_lines(tmp_path: Path) -> None:
    record = tmp_path / "events.ndjson"
    async with run_emulator(record=record) as running, personalize(running.url) as client:
        await client.put_events(**put_events(eventList=[event(eventId="a"), event(eventId="b")]))
        await client.put_events(**put_events(eventList=[event(eventId="c")]))
        served = await ndjson(running.url + "/_emulator/events")

    recorded = [orjson.loads(line) for line in record.read_bytes().splitlines()]
    assert recorded == served
    assert [r["eventId"] for r in recorded] == ["a", "b", "c"]


# --------------------------------------------------------------------------- as a process


async def test_runs_as_a_module_subprocess() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.emulator",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=20)).decode()
        assert line.startswith("emulator listening on http://127.0.0.1:")
        url = line.split()[-1]
        async with personalize(url) as client:
            response = await client.put_events(**put_events())
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=10)

    assert code == 0
