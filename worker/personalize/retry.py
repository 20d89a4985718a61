"""What a failed PutEvents call means, what to do next, and how long to wait before trying again.

Pure: `classify` looks at the exception only; `Tries` and `about_content` decide from counts they are
handed (the waits are `worker.backoff`'s). The loop that sleeps and re-sends lives in the sink, so every
decision here is tested without a clock or a network.

The two questions behind every decision: is the failure about the *events* (then isolate them, and a
single event that can never go through becomes a dead letter) or about the *request* (tracker,
credentials, an outage: retry with an alarm, never a dead letter)? And is the service healthy for
other calls meanwhile? Only then can an event that keeps failing be blamed for it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import botocore.retries.standard
from botocore.exceptions import BotoCoreError, ClientError

_standard: Any = botocore.retries.standard  # the code lists are class attributes the stubs don't declare

THROTTLING_CODES: Final = frozenset(_standard.ThrottledRetryableChecker._THROTTLED_ERROR_CODES)
"""botocore's own union of every code AWS services use for throttling."""
TRANSIENT_CODES: Final = frozenset(_standard.TransientRetryableChecker._TRANSIENT_ERROR_CODES)
"""Codes botocore retries as transient whatever their HTTP status (RequestTimeout is a 4xx)."""
INVALID_CODES: Final = frozenset({"InvalidInputException", "ValidationException", "SerializationException"})
EXHAUSTED: Final = "retries_exhausted"

_CREDENTIALS = "credentials or permissions"
_SIGNATURE = "request signature refused: secret key or clock"
_EXPIRED = "credentials expired or clock skew"
REFUSALS: Final = {
    "AccessDeniedException": _CREDENTIALS,
    "AccessDenied": _CREDENTIALS,
    "NotAuthorized": _CREDENTIALS,
    "UnrecognizedClientException": "credentials not recognised",
    "InvalidClientTokenId": "credentials not recognised",
    "MissingAuthenticationTokenException": "request not signed",
    "IncompleteSignatureException": _SIGNATURE,
    "InvalidSignatureException": _SIGNATURE,
    "SignatureDoesNotMatch": _SIGNATURE,
    "ExpiredTokenException": _EXPIRED,
    "ExpiredToken": _EXPIRED,
    "RequestExpired": _EXPIRED,
    "ResourceNotFoundException": "unknown event tracker: check personalize.tracking_id and region",
}
"""Request-level refusals, with the fixed phrase /readyz shows: whatever the events, the answer would be
the same. Splitting a deleted tracker's traffic into dead letters would turn a configuration mistake into
data loss, so these are retried with an alarm until someone fixes the cause."""

MAX_MESSAGE_CHARS: Final = 300
"""The service's message is cut here for logs and dead letters: it can be long, and can name the account."""
_SAFE_CODE = re.compile(r"[^A-Za-z0-9_.:-]")
_EVENT_MEMBER = re.compile(r"eventList\.\d+")


class Kind(enum.Enum):
    THROTTLED = "throttled"
    """The quota: slow down and retry; says nothing about the events."""
    TRANSIENT = "transient"
    """5xx, timeouts, connections, the unknown: retry; isolated when it keeps failing while others succeed."""
    INVALID = "invalid"
    """The service refused the content: halve the call; a single event refused is a dead letter."""
    TOO_LARGE = "too_large"
    """HTTP 413 (a proxy's, without an error code): halve the call; a single event refused is a dead letter."""
    REFUSED = "refused"
    """Request-level (tracker, credentials, signature): retry with the alarm; never split, never a dead letter."""
    UNEXPECTED = "unexpected"
    """Another 4xx (no code, or one not known here): bounded like TRANSIENT while others succeed, else the alarm."""


class Verdict(NamedTuple):
    kind: Kind
    outcome: str
    """Label for the calls metric: throttled | invalid | server_error | client_error | connection | error."""
    code: str
    """The error code, `HTTP <status>` without one, or the exception's type: safe for /readyz and metrics."""
    message: str
    """Code and the service's message cut to MAX_MESSAGE_CHARS: for logs and dead letters, not /readyz."""
    alarm: str
    """The /readyz reason should this failure stop everything: the code and a fixed phrase, nothing of the
    service's message (it can name the account and the role)."""


def _refused(code: str, phrase: str) -> str:
    return f"PutEvents refused: {code} ({phrase})"


def classify(error: BaseException) -> Verdict:
    """Throttling by botocore's codes (or 429); request-level refusals by code (or 401/403); invalid input
    by code; 413; 5xx and botocore's transient codes; any other 4xx is unexpected; the rest transient."""
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        code = _SAFE_CODE.sub("", str(info.get("Code", "") or ""))[:64]
        if code == str(status):  # what botocore and `client._client_error` put when the answer has no code
            code = ""
        shown = code or (f"HTTP {status}" if status else "unknown error")
        message = f"{shown}: {info.get('Message', '')}"[:MAX_MESSAGE_CHARS]

        def verdict(kind: Kind, outcome: str, phrase: str) -> Verdict:
            return Verdict(kind, outcome, shown, message, _refused(shown, phrase))

        if code in THROTTLING_CODES or status == 429:
            return verdict(Kind.THROTTLED, "throttled", "throttled")
        if code in REFUSALS:
            phrase = REFUSALS[code]
            if "signature expired" in message.lower():
                phrase = _EXPIRED
            return verdict(Kind.REFUSED, "client_error", phrase)
        if status in (401, 403):
            return verdict(Kind.REFUSED, "client_error", _CREDENTIALS)
        if code in INVALID_CODES:
            return verdict(Kind.INVALID, "invalid", "the same answer for every event of a call: not about content")
        if status == 413:
            return verdict(Kind.TOO_LARGE, "client_error", "request too large for the endpoint or a proxy before it")
        if status >= 500 or code in TRANSIENT_CODES:
            return verdict(Kind.TRANSIENT, "server_error", "server errors")
        if 400 <= status < 500:
            phrase = (
                "an error without a code: a proxy in the way?" if not code else "an error this worker does not know"
            )
            return verdict(Kind.UNEXPECTED, "client_error", phrase)
        return verdict(Kind.TRANSIENT, "error", "unexpected answer")
    name = type(error).__name__
    answered = getattr(error, "status", None)  # a proxy's answer (worker.personalize.proxy.ProxyError): 407 says a lot
    if isinstance(answered, int):
        name = f"{name} {answered}"
    message = f"{name}: {error}"[:MAX_MESSAGE_CHARS]
    outcome = "connection" if isinstance(error, (TimeoutError, OSError, BotoCoreError)) else "error"
    return Verdict(Kind.TRANSIENT, outcome, name, message, _refused(name, "no answer"))


class Rejection(NamedTuple):
    """An event of a call that will not go through: it becomes a dead letter (stage `personalize`)."""

    position: int
    """Its index in the call's events."""
    reason: str
    """rejected (invalid content) | too_large (HTTP 413) | retries_exhausted (failed alone too often)."""
    message: str
    """The last error: code and the service's message, cut."""


Mark = tuple[int, int]
"""(accepted, failed) attempts as `Health` counted them at some moment."""


class Health:
    """Every PutEvents attempt's result, all sessions together, as two counters.

    **Healthy for other calls** since a mark means: more attempts were accepted than failed since then,
    not counting the asking call's own current failure. The mark a call compares with is taken right
    after its own previous failure (a half's first failure compares with its parent's last one). So a
    lone call failing amid accepted traffic, or beside its own accepted halves, is isolated; an outage,
    throttling for everyone or an endpoint failing most calls never is; and with no other traffic at all
    nothing is known, so nothing is blamed (the call keeps retrying and the stall alarm says why).
    """

    __slots__ = ("accepted", "failed")

    def __init__(self) -> None:
        self.accepted = 0
        self.failed = 0

    def mark(self) -> Mark:
        return self.accepted, self.failed

    def healthy_since(self, mark: Mark, own_failures: int = 0) -> bool:
        """`own_failures`: the asker's failures counted since `mark`, which are not evidence about others."""
        return self.accepted - mark[0] > self.failed - mark[1] - own_failures


class Action(enum.Enum):
    RETRY = "retry"
    """Wait, then send the same request again."""
    ALARM = "alarm"
    """As RETRY, and raise the request-level alarm: the request itself is refused."""
    SPLIT = "split"
    """Send the two halves instead, first half first (the session's order)."""
    DEAD_LETTER = "dead_letter"
    """A single event that will not go through: final."""


SPLIT_AFTER: Final = 2
"""Isolated failures of a multi-event call before it is halved: one is bad luck (a random 5xx), two in a row
while others succeed is a pattern worth one extra call. Halving costs a call per level: 10 → 5 → 3 → 2 → 1."""


class Tries:
    """One request's failures so far: what the next one means."""

    __slots__ = ("attempt", "isolated", "max_event_attempts", "since", "size", "suspect")

    def __init__(self, size: int, since: Mark, max_event_attempts: int, suspect: str | None = None) -> None:
        self.size = size
        self.since = since
        """Health's mark after this request's previous failure (or its parent's)."""
        self.max_event_attempts = max_event_attempts
        self.suspect = suspect
        """A content refusal already shown to be the same for every event of the call: request-level."""
        self.attempt = 0
        """Failures of any kind: the backoff's step."""
        self.isolated = 0
        """Failures while the service was healthy for other calls."""

    def failed(self, verdict: Verdict, healthy: bool) -> Action:
        self.attempt += 1
        kind = verdict.kind
        if kind is Kind.THROTTLED:
            return Action.RETRY
        if kind is Kind.REFUSED:
            return Action.ALARM
        if kind is Kind.INVALID or kind is Kind.TOO_LARGE:
            if verdict.message == self.suspect and not healthy:
                return Action.ALARM
            return Action.SPLIT if self.size > 1 else Action.DEAD_LETTER
        if not healthy:
            return Action.ALARM if kind is Kind.UNEXPECTED else Action.RETRY
        self.isolated += 1
        if self.size > 1:
            return Action.SPLIT if self.isolated >= SPLIT_AFTER else Action.RETRY
        return Action.DEAD_LETTER if self.isolated >= self.max_event_attempts else Action.RETRY


def about_content(messages: Sequence[str], accepted_any: bool, healthy: bool) -> bool:
    """Whether the service's refusals of single events (invalid, too large) are about those events — dead
    letters — or about the request itself: retried whole with the alarm.

    About the events when anything sets them apart: part of the call was accepted, other calls were
    accepted meanwhile, the refusals differ, or one names an event (`eventList.N`, as AWS validation
    messages do). About the request when every event of the call was refused alike and nothing got
    through anywhere: a deleted tracker's traffic never becomes thousands of letters.
    """
    if accepted_any or healthy or len(set(messages)) > 1:
        return True
    return any(_EVENT_MEMBER.search(message) for message in messages)
