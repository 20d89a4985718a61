"""classify(): what a failed PutEvents call means; Tries/Health/about_content: what to do about it, from
counts alone; Backoff: full jitter under a cap."""

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

from worker.backoff import Backoff
from worker.personalize.http import HttpProtocolError
from worker.personalize.retry import (
    MAX_MESSAGE_CHARS,
    SPLIT_AFTER,
    THROTTLING_CODES,
    Action,
    Health,
    Kind,
    Tries,
    Verdict,
    about_content,
    classify,
)


def client_error(code: str, status: int, message: str = "boom") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "r-1"},
    }
    return ClientError(response, "PutEvents")


@pytest.mark.parametrize(
    ("error", "kind", "outcome"),
    [
        (client_error("ThrottlingException", 400, "Rate exceeded"), Kind.THROTTLED, "throttled"),
        (client_error("TooManyRequestsException", 429), Kind.THROTTLED, "throttled"),
        (client_error("SomethingNew", 429), Kind.THROTTLED, "throttled"),
        # botocore's codes the old hand-copied subset missed:
        (client_error("ThrottledException", 400), Kind.THROTTLED, "throttled"),
        (client_error("LimitExceededException", 400), Kind.THROTTLED, "throttled"),
        (client_error("ProvisionedThroughputExceededException", 400), Kind.THROTTLED, "throttled"),
        (client_error("InternalFailure", 500), Kind.TRANSIENT, "server_error"),
        (client_error("ServiceUnavailable", 503), Kind.TRANSIENT, "server_error"),
        (client_error("RequestTimeout", 408), Kind.TRANSIENT, "server_error"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), Kind.TRANSIENT, "connection"),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), Kind.TRANSIENT, "connection"),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), Kind.TRANSIENT, "connection"),
        (NoCredentialsError(), Kind.TRANSIENT, "connection"),
        (TimeoutError(), Kind.TRANSIENT, "connection"),  # asyncio.TimeoutError is this builtin since 3.11
        (ConnectionResetError("reset by peer"), Kind.TRANSIENT, "connection"),
        (HttpProtocolError("not an HTTP/1.x status line"), Kind.TRANSIENT, "connection"),
        (RuntimeError("surprise"), Kind.TRANSIENT, "error"),
        (ClientError({}, "PutEvents"), Kind.TRANSIENT, "error"),  # no status: nothing says it is the client's
    ],
)
def test_transient_errors_are_retried(error: BaseException, kind: Kind, outcome: str) -> None:
    verdict = classify(error)
    assert (verdict.kind, verdict.outcome) == (kind, outcome)


def test_throttling_codes_are_botocores_own_set() -> None:
    from botocore.retries.standard import ThrottledRetryableChecker

    assert frozenset(ThrottledRetryableChecker._THROTTLED_ERROR_CODES) == THROTTLING_CODES  # type: ignore[attr-defined]
    assert len(THROTTLING_CODES) > 5


def test_client_error_message_carries_code_and_service_message() -> None:
    verdict = classify(client_error("ThrottlingException", 400, "Rate exceeded"))
    assert verdict.message == "ThrottlingException: Rate exceeded"
    assert verdict.code == "ThrottlingException"


def test_service_message_is_cut() -> None:
    verdict = classify(client_error("InternalFailure", 500, "x" * 10_000))
    assert len(verdict.message) == MAX_MESSAGE_CHARS


def test_other_error_message_names_the_type() -> None:
    verdict = classify(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert verdict.message.startswith("EndpointConnectionError: ")
    assert "127.0.0.1:1" in verdict.message
    assert verdict.code == "EndpointConnectionError"


@pytest.mark.parametrize("code", ["InvalidInputException", "ValidationException", "SerializationException"])
def test_invalid_input_is_about_content(code: str) -> None:
    verdict = classify(client_error(code, 400, "bad event"))
    assert (verdict.kind, verdict.outcome) == (Kind.INVALID, "invalid")
    assert verdict.message == f"{code}: bad event"


def test_modeled_invalid_input_subclass_is_classified_by_code() -> None:
    class InvalidInputException(ClientError):  # like client.exceptions.InvalidInputException
        pass

    response: Any = {
        "Error": {"Code": "InvalidInputException", "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }
    assert classify(InvalidInputException(response, "PutEvents")).kind is Kind.INVALID


def test_client_error_without_metadata_is_still_classified() -> None:
    bare = ClientError({"Error": {"Code": "InvalidInputException"}}, "PutEvents")
    assert classify(bare).kind is Kind.INVALID


ACCOUNT_MESSAGE = "User: arn:aws:sts::123456789012:assumed-role/worker/i-0abc is not authorized"


@pytest.mark.parametrize(
    ("code", "status", "message", "phrase"),
    [
        ("AccessDeniedException", 403, ACCOUNT_MESSAGE, "credentials or permissions"),
        ("ResourceNotFoundException", 404, "tracker 123456789012 not found", "unknown event tracker"),
        ("UnrecognizedClientException", 400, "The security token included in the request is invalid.", "recognised"),
        ("InvalidSignatureException", 403, "The request signature we calculated does not match", "signature"),
        ("SignatureDoesNotMatch", 403, "nope", "signature"),
        ("ExpiredTokenException", 400, "The security token included in the request is expired", "expired"),
        ("ExpiredToken", 400, "The provided token has expired.", "expired"),
        ("RequestExpired", 400, "Request has expired.", "expired"),
        ("InvalidSignatureException", 403, "Signature expired: 20260101T000000Z is now earlier than", "expired"),
        ("Forbidden", 403, ACCOUNT_MESSAGE, "credentials or permissions"),
        ("403", 403, "<html>denied</html>", "credentials or permissions"),
    ],
)
def test_request_level_refusals_get_a_fixed_phrase_never_the_service_message(
    code: str, status: int, message: str, phrase: str
) -> None:
    verdict = classify(client_error(code, status, message))
    assert verdict.kind is Kind.REFUSED
    shown = code if code != str(status) else f"HTTP {status}"
    assert verdict.alarm.startswith(f"PutEvents refused: {shown} (")
    assert phrase in verdict.alarm
    assert message not in verdict.alarm and "123456789012" not in verdict.alarm
    assert message[:50] in verdict.message, "logs may carry the (cut) message"


def test_uncoded_413_is_too_large_and_other_4xx_unexpected() -> None:
    html = "<html><title>413 Request Entity Too Large</title></html>"
    too_large = classify(client_error("413", 413, html))
    assert (too_large.kind, too_large.code) == (Kind.TOO_LARGE, "HTTP 413")
    for code in ("400", "", "SomethingNew"):
        verdict = classify(client_error(code, 400, "<html>bad request</html>"))
        assert verdict.kind is Kind.UNEXPECTED, code
        assert "<html>" not in verdict.alarm
    assert (
        classify(client_error("", 400)).alarm
        == "PutEvents refused: HTTP 400 (an error without a code: a proxy in the way?)"
    )


def test_a_code_from_a_proxy_cannot_inject_text_into_the_reason() -> None:
    verdict = classify(client_error("Bad Code\n<script>" + "x" * 200, 400))
    assert verdict.code.isascii() and " " not in verdict.code and "<" not in verdict.code
    assert len(verdict.code) <= 64


# --------------------------------------------------------------------------- health and tries


def verdict_of(code: str, status: int, message: str = "m") -> Verdict:
    return classify(client_error(code, status, message))


SERVER_ERROR = verdict_of("InternalFailure", 500)


def test_health_counts_only_what_happened_since_the_mark() -> None:
    health = Health()
    health.failed = 5
    mark = health.mark()
    assert not health.healthy_since(mark), "nothing since: nothing known"
    health.accepted += 1
    assert health.healthy_since(mark)
    health.failed += 1
    assert not health.healthy_since(mark), "as many failures as successes: not healthy"
    assert health.healthy_since(mark, own_failures=1), "the asker's own failures are no evidence"


def test_a_lone_failing_event_is_dead_lettered_after_max_attempts_while_others_succeed() -> None:
    tries = Tries(1, (0, 0), max_event_attempts=4)
    assert [tries.failed(SERVER_ERROR, healthy=True) for _ in range(4)] == [Action.RETRY] * 3 + [Action.DEAD_LETTER]
    assert (tries.isolated, tries.attempt) == (4, 4)


def test_failures_while_everyone_fails_never_count() -> None:
    tries = Tries(1, (0, 0), max_event_attempts=2)
    for _ in range(1000):
        assert tries.failed(SERVER_ERROR, healthy=False) is Action.RETRY
    assert (tries.isolated, tries.attempt) == (0, 1000), "the backoff still grows"
    assert tries.failed(SERVER_ERROR, healthy=True) is Action.RETRY
    assert tries.failed(SERVER_ERROR, healthy=True) is Action.DEAD_LETTER


def test_a_batch_failing_while_others_succeed_is_split_after_two_failures() -> None:
    tries = Tries(10, (0, 0), max_event_attempts=10)
    assert tries.failed(SERVER_ERROR, healthy=True) is Action.RETRY, "one failure is bad luck"
    assert tries.failed(SERVER_ERROR, healthy=False) is Action.RETRY
    assert tries.failed(SERVER_ERROR, healthy=True) is Action.SPLIT
    assert SPLIT_AFTER == 2


def test_throttling_never_splits_nor_counts() -> None:
    tries = Tries(1, (0, 0), max_event_attempts=1)
    throttled = verdict_of("ThrottlingException", 400)
    assert all(tries.failed(throttled, healthy=True) is Action.RETRY for _ in range(100))


def test_request_level_refusals_raise_the_alarm_whatever_the_health() -> None:
    tries = Tries(1, (0, 0), max_event_attempts=1)
    denied = verdict_of("AccessDeniedException", 403)
    assert all(tries.failed(denied, healthy=healthy) is Action.ALARM for healthy in (True, False) * 50)


def test_unexpected_4xx_is_bounded_while_others_succeed_else_alarm() -> None:
    proxy = verdict_of("400", 400, "<html>")
    tries = Tries(1, (0, 0), max_event_attempts=3)
    assert tries.failed(proxy, healthy=False) is Action.ALARM
    assert [tries.failed(proxy, healthy=True) for _ in range(3)] == [Action.RETRY, Action.RETRY, Action.DEAD_LETTER]


@pytest.mark.parametrize("verdict", [verdict_of("InvalidInputException", 400), verdict_of("413", 413)])
def test_content_refusals_split_at_once_and_a_single_event_is_final(verdict: Verdict) -> None:
    assert Tries(2, (0, 0), 10).failed(verdict, healthy=False) is Action.SPLIT
    assert Tries(1, (0, 0), 10).failed(verdict, healthy=False) is Action.DEAD_LETTER


def test_a_suspected_request_level_refusal_is_retried_whole_until_others_succeed_or_it_changes() -> None:
    same = verdict_of("InvalidInputException", 400, "tracker is not active")
    tries = Tries(10, (0, 0), 10, suspect=same.message)
    assert tries.failed(same, healthy=False) is Action.ALARM
    assert tries.failed(same, healthy=True) is Action.SPLIT, "others are accepted: about this call after all"
    other = verdict_of("InvalidInputException", 400, "something else")
    assert Tries(10, (0, 0), 10, suspect=same.message).failed(other, healthy=False) is Action.SPLIT


@pytest.mark.parametrize(
    ("messages", "accepted_any", "healthy", "content"),
    [
        (["InvalidInputException: tracker is not active"] * 10, False, False, False),
        (["InvalidInputException: tracker is not active"] * 10, False, True, True),
        (["InvalidInputException: tracker is not active"] * 3, True, False, True),
        (["InvalidInputException: a", "InvalidInputException: b"], False, False, True),
        (["InvalidInputException: Value at 'eventList.1.member.itemId' failed"] * 2, False, False, True),
        (["HTTP 413: <html>"], False, False, False),
    ],
)
def test_refusals_are_about_content_unless_nothing_sets_them_apart(
    messages: list[str], accepted_any: bool, healthy: bool, content: bool
) -> None:
    assert about_content(messages, accepted_any, healthy) is content


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
    verdict = classify(info.value)
    assert (verdict.kind, verdict.outcome) == (Kind.TRANSIENT, "connection")
