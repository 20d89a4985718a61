"""classify(): what a failed PutEvents call means; Backoff: full jitter under a cap."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from worker.http import HttpProtocolError
from worker.retry import Action, Backoff, classify


def client_error(code: str, status: int, message: str = "boom") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "r-1"},
    }
    return ClientError(response, "PutEvents")


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (client_error("ThrottlingException", 400, "Rate exceeded"), "throttled"),
        (client_error("TooManyRequestsException", 429), "throttled"),
        (client_error("SomethingNew", 429), "throttled"),
        (client_error("InternalFailure", 500), "server_error"),
        (client_error("ServiceUnavailable", 503), "server_error"),
        (client_error("ResourceNotFoundException", 404, "tracker not found"), "client_error"),
        (client_error("AccessDeniedException", 403), "client_error"),
        (client_error("UnrecognizedClientException", 400), "client_error"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "connection"),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), "connection"),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), "connection"),
        (NoCredentialsError(), "connection"),
        (TimeoutError(), "connection"),  # asyncio.TimeoutError is this builtin since 3.11
        (ConnectionResetError("reset by peer"), "connection"),
        (HttpProtocolError("not an HTTP/1.x status line"), "connection"),
        (RuntimeError("surprise"), "error"),
    ],
)
@pytest.mark.parametrize("batch_size", [1, 10])
def test_transient_and_unknown_errors_are_retried(error: BaseException, outcome: str, batch_size: int) -> None:
    verdict = classify(error, batch_size)
    assert verdict.action is Action.RETRY
    assert verdict.outcome == outcome


def test_client_error_message_carries_code_and_service_message() -> None:
    verdict = classify(client_error("ThrottlingException", 400, "Rate exceeded"), 10)
    assert verdict.message == "ThrottlingException: Rate exceeded"


def test_other_error_message_names_the_type() -> None:
    verdict = classify(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), 3)
    assert verdict.message.startswith("EndpointConnectionError: ")
    assert "127.0.0.1:1" in verdict.message


@pytest.mark.parametrize("code", ["InvalidInputException", "ValidationException", "SerializationException"])
def test_invalid_input_splits_a_batch(code: str) -> None:
    verdict = classify(client_error(code, 400, "bad event"), 10)
    assert (verdict.action, verdict.outcome) == (Action.SPLIT, "invalid")
    assert verdict.message == f"{code}: bad event"
    assert classify(client_error(code, 400), 2).action is Action.SPLIT


def test_invalid_input_for_a_single_event_is_dead_lettered() -> None:
    verdict = classify(client_error("InvalidInputException", 400, "eventType too long"), 1)
    assert (verdict.action, verdict.outcome) == (Action.DEAD_LETTER, "invalid")
    assert "eventType too long" in verdict.message


def test_modeled_invalid_input_subclass_is_classified_by_code() -> None:
    class InvalidInputException(ClientError):  # like client.exceptions.InvalidInputException
        pass

    response: Any = {
        "Error": {"Code": "InvalidInputException", "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }
    error = InvalidInputException(response, "PutEvents")
    assert classify(error, 1).action is Action.DEAD_LETTER


def test_client_error_without_metadata_is_still_classified() -> None:
    bare = ClientError({"Error": {"Code": "InvalidInputException"}}, "PutEvents")
    assert classify(bare, 4).action is Action.SPLIT
    empty = ClientError({}, "PutEvents")
    assert classify(empty, 4).action is Action.RETRY


class Top:
    """An rng that always draws the ceiling, so the schedule itself is visible."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def __call__(self, low: float, high: float) -> float:
        self.calls.append((low, high))
        return high


def test_backoff_doubles_from_base_up_to_the_cap() -> None:
    rng = Top()
    backoff = Backoff(base=0.05, cap=1.0, rng=rng)
    delays = [backoff.delay(attempt) for attempt in range(1, 8)]
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert all(low == 0.0 for low, _ in rng.calls)


def test_backoff_draws_full_jitter_between_zero_and_the_ceiling() -> None:
    backoff = Backoff(base=0.05, cap=10.0, rng=lambda low, high: (low + high) / 2)
    assert backoff.delay(3) == pytest.approx(0.1)


@pytest.mark.parametrize("attempt", [33, 100, 10_000, 10**9])
def test_backoff_never_overflows_for_huge_attempt_numbers(attempt: int) -> None:
    assert Backoff(base=0.05, cap=10.0, rng=Top()).delay(attempt) == 10.0


def test_backoff_default_rng_stays_within_bounds() -> None:
    backoff = Backoff(base=0.05, cap=0.3)
    for attempt in range(1, 20):
        assert 0.0 <= backoff.delay(attempt) <= 0.3


async def test_a_real_asyncio_timeout_is_retried_as_connection() -> None:
    with pytest.raises(TimeoutError) as info:
        async with asyncio.timeout(0):
            await asyncio.sleep(1)
    verdict = classify(info.value, 10)
    assert (verdict.action, verdict.outcome) == (Action.RETRY, "connection")
