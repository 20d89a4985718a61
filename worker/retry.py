"""What to do about a failed PutEvents call, and how long to wait before trying again.

Pure: `classify` looks at the exception only; `Backoff` takes its randomness from the caller. The
loop that sleeps and re-sends lives in the sink, so these decisions can be tested with a fake clock.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError


class Action(enum.Enum):
    RETRY = "retry"
    """Transient: the same request may succeed later (throttling, 5xx, timeouts, connections)."""
    SPLIT = "split"
    """The service rejected the content: halve the batch to isolate the offending events."""
    DEAD_LETTER = "dead_letter"
    """A single event the service will never accept."""


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    outcome: str
    """Label for the calls metric: throttled | invalid | server_error | client_error | connection | error."""
    message: str


THROTTLING_CODES = frozenset(
    {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded", "SlowDown"}
)
INVALID_CODES = frozenset({"InvalidInputException", "ValidationException", "SerializationException"})


def classify(error: BaseException, batch_size: int) -> Verdict:
    """Throttling, server and unknown errors are retried without end; only invalid input is final.

    Auth and not-found errors are retried too: they are configuration problems that dead-lettering
    every event would not solve; the worker reports them loudly and stays not ready.
    """
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        code = str(info.get("Code", ""))
        message = f"{code}: {info.get('Message', '')}"
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in THROTTLING_CODES or status == 429:
            return Verdict(Action.RETRY, "throttled", message)
        if code in INVALID_CODES:
            action = Action.SPLIT if batch_size > 1 else Action.DEAD_LETTER
            return Verdict(action, "invalid", message)
        if status >= 500:
            return Verdict(Action.RETRY, "server_error", message)
        return Verdict(Action.RETRY, "client_error", message)
    if isinstance(error, (TimeoutError, OSError, BotoCoreError)):
        return Verdict(Action.RETRY, "connection", f"{type(error).__name__}: {error}")
    return Verdict(Action.RETRY, "error", f"{type(error).__name__}: {error}")


class Backoff:
    """Exponential backoff with full jitter (AWS's recommendation): no herd of replicas retrying in step."""

    def __init__(
        self, base: float = 0.05, cap: float = 10.0, rng: Callable[[float, float], float] = random.uniform
    ) -> None:
        self.base = base
        self.cap = cap
        self._rng = rng

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        ceiling = min(self.cap, self.base * (2 ** min(attempt - 1, 32)))
        return self._rng(0.0, ceiling)
