"""The emulator's quotas per operation and destination, its registry of trackers and datasets, the 10 KB
event quota and the signature's age, each through a real aioboto3 client over HTTP.

Quota tests freeze the emulator's bucket clock, so a slow, shared machine cannot refill a bucket halfway
through: the counts are exact, and stepping the clock shows the refill.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError

from tests.stack import EmulatorProcess
from tests.test_emulator import ARN, REPO_ROOT, error_code, event, http, personalize, put_events, put_items, status_of
from worker.emulator import run_emulator
from worker.mapping.limits import MAX_EVENT_BYTES

OTHER_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/other/ITEMS"
AMZ_DATE = r"\d{8}T\d{6}Z"


class FrozenClock:
    """The emulator's monotonic clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def interactions(tracking_id: str = "tracker") -> dict[str, Any]:
    record = {"actionId": "a-1", "sessionId": "s", "timestamp": 1_700_000_000, "eventType": "Taken"}
    return {"trackingId": tracking_id, "actionInteractions": [record]}


# quota key -> (client method, request for a destination, a destination of the right kind)
OPERATIONS: dict[str, tuple[str, Callable[[str], dict[str, Any]], str]] = {
    "items": ("put_items", lambda arn: put_items(datasetArn=arn), ARN),
    "users": ("put_users", lambda arn: {"datasetArn": arn, "users": [{"userId": "u-1"}]}, ARN),
    "actions": ("put_actions", lambda arn: {"datasetArn": arn, "actions": [{"actionId": "a-1"}]}, ARN),
    "action_interactions": ("put_action_interactions", interactions, "tracker"),
    "events": ("put_events", lambda tid: put_events(trackingId=tid), "tracker"),
}


async def outcomes(client: Any, method: str, requests: list[dict[str, Any]]) -> list[str]:
    """Send all at once; 'ok' or the error code of each, in order."""
    results = await asyncio.gather(*(getattr(client, method)(**r) for r in requests), return_exceptions=True)
    codes = []
    for result in results:
        if isinstance(result, ClientError):
            codes.append(error_code(result))
        elif isinstance(result, BaseException):
            raise result
        else:
            codes.append("ok")
    return codes


# --------------------------------------------------------------------------- quotas per destination


async def test_two_trackers_each_fill_their_own_quota_at_the_same_time() -> None:
    clock = FrozenClock()
    async with run_emulator(clock=clock, quotas={"events": 20}) as running, personalize(running.url) as client:
        mixed = [put_events(trackingId=tid, eventList=[event(eventId=f"{tid}-{n}")]) for n in range(25) for tid in "ab"]
        first = await outcomes(client, "put_events", mixed)
        clock.now += 1.0
        refilled = await outcomes(client, "put_events", mixed)
        stats = running.emulator.snapshot()

    for codes in (first, refilled):
        assert codes[0::2].count("ok") == 20, "tracker a got its whole quota"
        assert codes[1::2].count("ok") == 20, "and so did tracker b, at the same time"
        assert set(codes) == {"ok", "ThrottlingException"}
    assert stats["destinations"]["PutEvents"] == {
        "a": {"calls": 40, "records": 40, "throttled": 10},
        "b": {"calls": 40, "records": 40, "throttled": 10},
    }
    assert stats["operations"]["PutEvents"] == {"calls": 80, "records": 80, "throttled": 20}
    assert stats["throttled"] == 20


async def test_trackers_of_one_dataset_group_share_its_quota() -> None:
    options: dict[str, Any] = {"quotas": {"events": 20}, "tracker_groups": {"a": "shop", "b": "shop"}}
    async with run_emulator(clock=FrozenClock(), **options) as running, personalize(running.url) as client:
        codes = await outcomes(client, "put_events", [put_events(trackingId=tid) for _ in range(15) for tid in "abc"])
        destinations = running.emulator.snapshot()["destinations"]["PutEvents"]

    assert codes[0::3].count("ok") + codes[1::3].count("ok") == 20, "a and b draw from one bucket"
    assert codes[2::3].count("ok") == 15, "c is a group of its own"
    assert destinations["a"]["throttled"] + destinations["b"]["throttled"] == 10


async def test_two_datasets_fill_their_documented_quota_independently() -> None:
    async with run_emulator(clock=FrozenClock()) as running, personalize(running.url) as client:
        codes = await outcomes(
            client, "put_items", [put_items(datasetArn=arn) for _ in range(12) for arn in (ARN, OTHER_ARN)]
        )
        destinations = running.emulator.snapshot()["destinations"]["PutItems"]

    assert (codes[0::2].count("ok"), codes[1::2].count("ok")) == (10, 10)
    assert destinations == {
        ARN: {"calls": 10, "records": 10, "throttled": 2},
        OTHER_ARN: {"calls": 10, "records": 10, "throttled": 2},
    }


@pytest.mark.parametrize("key", ["items", "users", "actions", "action_interactions"])
async def test_each_operation_throttles_at_its_own_default_quota(key: str) -> None:
    method, build, destination = OPERATIONS[key]
    async with run_emulator(clock=FrozenClock()) as running, personalize(running.url) as client:
        codes = await outcomes(client, method, [build(destination) for _ in range(11)])
        events_ok = await outcomes(client, "put_events", [put_events() for _ in range(11)])
        with pytest.raises(ClientError) as caught:
            await getattr(client, method)(**build(destination))

    assert running.emulator.config.quotas == {**dict.fromkeys(OPERATIONS, 10.0), "events": 1000.0}
    assert codes.count("ok") == 10
    assert events_ok == ["ok"] * 11, "another operation's quota is not spent"
    assert (error_code(caught.value), status_of(caught.value)) == ("ThrottlingException", 400)
    assert caught.value.response["Error"]["Message"] == "Rate exceeded"


async def test_quotas_change_at_run_time_over_http() -> None:
    async with run_emulator(clock=FrozenClock()) as running, personalize(running.url) as client:
        status, body = await http("POST", running.url + "/_emulator/config", {"quotas": {"items": 2}})
        limited = await outcomes(client, "put_items", [put_items() for _ in range(3)])
        await http("POST", running.url + "/_emulator/config", {"quotas": {"items": 0}, "max_tps": 1})
        unlimited = await outcomes(client, "put_items", [put_items() for _ in range(30)])
        events = await outcomes(client, "put_events", [put_events() for _ in range(2)])
        refused, message = await http("POST", running.url + "/_emulator/config", {"quotas": {"bogus": 1}})
        _, current = await http("GET", running.url + "/_emulator/config")

    assert status == 200
    assert orjson.loads(body)["quotas"] == {**dict.fromkeys(OPERATIONS, 10.0), "events": 1000.0, "items": 2.0}
    assert limited == ["ok", "ok", "ThrottlingException"]
    assert unlimited == ["ok"] * 30
    assert events == ["ok", "ThrottlingException"], "max_tps is the PutEvents quota"
    assert refused == 400
    assert b"bogus" in message
    assert orjson.loads(current)["quotas"] == {**dict.fromkeys(OPERATIONS, 10.0), "events": 1.0, "items": None}


# --------------------------------------------------------------------------- registry


async def test_unknown_datasets_and_trackers_are_not_found() -> None:
    options: dict[str, Any] = {"dataset_arns": [ARN], "tracking_ids": ["tracker"]}
    async with run_emulator(**options) as running, personalize(running.url) as client:
        for key in ("items", "users", "actions"):
            method, build, _ = OPERATIONS[key]
            await getattr(client, method)(**build(ARN))
            with pytest.raises(client.exceptions.ResourceNotFoundException) as unknown:
                await getattr(client, method)(**build(OTHER_ARN))
            assert status_of(unknown.value) == 404
            assert OTHER_ARN in unknown.value.response["Error"]["Message"]
        await client.put_action_interactions(**interactions("tracker"))
        with pytest.raises(client.exceptions.ResourceNotFoundException):
            await client.put_action_interactions(**interactions("stranger"))
        with pytest.raises(client.exceptions.ResourceNotFoundException):
            await client.put_events(**put_events(trackingId="stranger"))
        with pytest.raises(client.exceptions.InvalidInputException):
            await client.put_items(**put_items(datasetArn=OTHER_ARN, items=[]))
        stats = running.emulator.snapshot()

    assert stats["calls_by_operation"] == {
        "PutActionInteractions": 1,
        "PutActions": 1,
        "PutEvents": 0,
        "PutItems": 1,
        "PutUsers": 1,
    }
    assert stats["rejected"] == {"ResourceNotFoundException": 5, "InvalidInputException": 1}, "validation first"


async def test_without_a_registry_every_destination_is_accepted() -> None:
    async with run_emulator() as running, personalize(running.url) as client:
        for method, build, known in OPERATIONS.values():
            destination = OTHER_ARN if known == ARN else "any-tracker"
            response = await getattr(client, method)(**build(destination))
            assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert running.emulator.snapshot()["rejected"] == {}


# --------------------------------------------------------------------------- 10 KB per event


def event_of_size(size: int, event_id: str) -> dict[str, Any]:
    """A valid event whose compact UTF-8 JSON (what the worker measures) is exactly ``size`` bytes:
    4-byte characters in properties, then ASCII impressions trimmed to the byte."""
    properties = '{"n": "' + "\U0001f600" * 1014 + '"}'
    built = event(eventId=event_id, impression=["i" * 256] * 25, properties=properties)
    excess = len(orjson.dumps(built)) - size
    impression = built["impression"]
    for index in range(len(impression)):
        cut = min(excess, len(impression[index]) - 1)
        impression[index] = impression[index][cut:]
        excess -= cut
    assert excess == 0 and len(orjson.dumps(built)) == size
    return built


async def test_events_over_10_kb_are_invalid_naming_their_index() -> None:
    at_limit = event_of_size(MAX_EVENT_BYTES, "at-limit")
    over = event_of_size(MAX_EVENT_BYTES + 1, "over")
    async with run_emulator() as running, personalize(running.url) as client:
        accepted = await client.put_events(**put_events(eventList=[event(eventId="small"), at_limit]))
        with pytest.raises(client.exceptions.InvalidInputException) as caught:
            await client.put_events(**put_events(eventList=[at_limit, over]))
        with pytest.raises(client.exceptions.InvalidInputException) as both:
            await client.put_events(**put_events(eventList=[over, event(eventType="")]))
        delivered = [e["eventId"] for e in running.emulator.events()]

    assert accepted["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert delivered == ["small", "at-limit"]
    assert caught.value.response["Error"]["Message"] == (
        "1 validation error detected: Value at 'eventList.2.member' failed to satisfy constraint: "
        f"Member must have size less than or equal to {MAX_EVENT_BYTES} bytes"
    )
    message = both.value.response["Error"]["Message"]
    assert message.startswith("2 validation errors detected: ")
    assert "'eventList.1.member' failed" in message
    assert "'eventList.2.member.eventType' failed" in message


# --------------------------------------------------------------------------- signature age


@pytest.mark.parametrize(
    ("skew", "expected"),
    [
        pytest.param(
            360, rf"Signature expired: {AMZ_DATE} is now earlier than {AMZ_DATE} \({AMZ_DATE} - 5 min\.\)", id="old"
        ),
        pytest.param(
            -360,
            rf"Signature not yet current: {AMZ_DATE} is still later than {AMZ_DATE} \({AMZ_DATE} \+ 5 min\.\)",
            id="future",
        ),
        pytest.param(240, None, id="within-5-minutes"),
        pytest.param(-240, None, id="within-5-minutes-ahead"),
    ],
)
async def test_a_signature_more_than_5_minutes_off_is_refused(skew: float, expected: str | None) -> None:
    async with run_emulator(access_key="test", secret_key="test") as running, personalize(running.url) as client:
        running.emulator.configure(clock_skew_seconds=skew)
        if expected is None:
            response = await client.put_events(**put_events())
            assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
            return
        with pytest.raises(ClientError) as caught:
            await client.put_events(**put_events())

    assert (error_code(caught.value), status_of(caught.value)) == ("InvalidSignatureException", 403)
    assert re.fullmatch(expected, caught.value.response["Error"]["Message"])
    assert running.emulator.snapshot()["calls"] == 0


async def test_signature_age_is_not_checked_without_verification() -> None:
    async with run_emulator() as running, personalize(running.url) as client:
        running.emulator.configure(clock_skew_seconds=3600)
        response = await client.put_events(**put_events())

    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200


# --------------------------------------------------------------------------- the command line


def test_command_line_options_reach_the_running_emulator() -> None:
    process = EmulatorProcess(
        args=[
            "--quota",
            "items=2,actions=off",
            "--max-tps",
            "7",
            "--dataset-arns",
            f"{ARN},{OTHER_ARN}",
            "--tracker-groups",
            "a=shop,b=shop",
        ]
    )
    process.start()
    try:
        config = process.config()
    finally:
        process.stop()

    assert config["quotas"] == {
        "events": 7.0,
        "items": 2.0,
        "users": 10.0,
        "actions": None,
        "action_interactions": 10.0,
    }
    assert config["max_tps"] == 7.0
    assert config["dataset_arns"] == [ARN, OTHER_ARN]
    assert config["tracker_groups"] == {"a": "shop", "b": "shop"}


@pytest.mark.parametrize("args", [["--quota", "items=fast"], ["--quota", "bogus=1"], ["--tracker-groups", "a"]])
def test_malformed_options_exit_1_saying_why(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.emulator", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )

    assert result.returncode == 1
    assert result.stderr.startswith("emulator: ")
