"""What the emulator injects and enforces: the fault settings, the registry of known destinations, and
the quotas as token buckets per operation and destination.

Quotas are per destination because AWS's are: one dataset group at its PutEvents quota does not slow
another, and a worker must show that one route's throttling never stalls another's. Buckets read an
injected clock, so tests can freeze or step time instead of racing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# An error answer: (HTTP status, x-amzn-ErrorType, message).
Rejection = tuple[int, str, str]

DOCUMENTED_QUOTAS: Mapping[str, float | None] = {
    "events": 1000.0,  # PutEvents: 1,000 requests/s per dataset group (documented, adjustable)
    "items": 10.0,  # PutItems: 10 requests/s per dataset (documented)
    "users": 10.0,  # PutUsers: 10 requests/s per dataset (documented)
    # No published figure was found for these two: 10/s, the conservative one of the upserts, until one is.
    "actions": 10.0,
    "action_interactions": 10.0,
}
"""Requests per second of each operation, keyed by its URI slug (``action-interactions`` ->
``action_interactions``); None is unlimited. Not in botocore's model, hence written down here."""

MAX_DESTINATIONS = 10_000
"""Buckets and per-destination counters kept at most: a client inventing tracking IDs must not grow the
emulator without bound. Past it the oldest bucket is dropped (it comes back full: lenient, never wrong
in the other direction) and new destinations are counted together under ``OTHER``."""
OTHER = "(other)"

_BOOLEANS = frozenset({"outage", "access_denied"})
_ID_LISTS = frozenset({"tracking_ids", "dataset_arns", "reject_item_ids", "fail_item_ids"})
_RATES = frozenset({"error_rate", "throttle_rate"})


def _documented() -> dict[str, float | None]:
    return dict(DOCUMENTED_QUOTAS)


@dataclass
class FaultConfig:
    """What the emulator injects and enforces; mutable at run time through ``POST /_emulator/config``."""

    max_tps: float | None = DOCUMENTED_QUOTAS["events"]
    """The PutEvents quota per dataset group: the same number as ``quotas["events"]``, kept by its old name."""
    quotas: dict[str, float | None] = field(default_factory=_documented)
    """Requests/s per operation and destination (dataset group for trackers, dataset for the others);
    None or 0 is unlimited. A partial mapping in an update changes only the operations it names."""
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    """Fraction of requests throttled at random, whatever the rate: stands in for a quota shared with others."""
    outage: bool = False
    tracking_ids: list[str] | None = None
    """Known event trackers (PutEvents and PutActionInteractions); others get ResourceNotFoundException.
    None accepts any."""
    dataset_arns: list[str] | None = None
    """Known datasets (PutItems, PutUsers, PutActions); others get ResourceNotFoundException. None accepts any."""
    tracker_groups: dict[str, str] | None = None
    """Tracker -> dataset group, so trackers of one group share its quota; an unlisted tracker is its own group."""
    reject_item_ids: list[str] | None = None
    """Events with these itemIds are refused as invalid: stands in for the service-side rejections
    (schema mismatches, say) that no client-side check can predict, so batch splitting can be tested."""
    fail_item_ids: list[str] | None = None
    """A call carrying an event with one of these itemIds is answered 500 InternalFailure, every time, while
    the rest is accepted: a poison event, so isolating it by its repeated failures can be tested."""
    access_denied: bool = False
    """Answer every request 403 AccessDeniedException, its message naming an account and a role as AWS's
    does: credentials without personalize:PutEvents (the message must never reach /readyz)."""
    max_body_bytes: int | None = None
    """Bodies over this size are answered 413 with an HTML page and no error code, as a proxy in front would."""
    clock_skew_seconds: float = 0.0
    """The emulator's clock runs this far ahead of the real one (negative: behind), as if the worker's host
    clock had drifted: past 5 minutes either way, signed requests are refused (with ``--secret-key``)."""

    def update(self, changes: Mapping[str, Any]) -> set[str]:
        """Apply a partial update, all or nothing, refusing unknown keys and wrong types (ValueError);
        returns the operation keys whose quota changed."""
        known = {f.name for f in fields(self)}
        coerced: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown setting {key!r}")
            coerced[key] = _coerce_setting(key, value)
        before = dict(self.quotas)
        for key, value in coerced.items():
            if key == "quotas":
                self.quotas = {**self.quotas, **value}
                self.max_tps = self.quotas["events"]
            elif key == "max_tps":
                self.max_tps = value
                self.quotas = {**self.quotas, "events": value}
            else:
                setattr(self, key, value)
        return {key for key, rate in self.quotas.items() if before.get(key) != rate}


def _rate(key: str, value: Any) -> float | None:
    if value is None or value == 0:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be a non-negative number, or 0 / null for no limit")
    return float(value)


def _coerce_setting(key: str, value: Any) -> Any:
    if key in _BOOLEANS:
        if type(value) is not bool:
            raise ValueError(f"{key} must be a boolean")
        return value
    if key == "max_body_bytes":
        if value is None or value == 0:
            return None
        if type(value) is not int or value < 0:
            raise ValueError("max_body_bytes must be a positive integer or null")
        return value
    if key in _ID_LISTS:
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{key} must be a list of strings or null")
        return value
    if key == "tracker_groups":
        if value is not None and not (
            isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        ):
            raise ValueError("tracker_groups must map tracker ids to dataset group names, or be null")
        return value
    if key == "quotas":
        if not isinstance(value, dict):
            raise ValueError("quotas must map operations to requests per second")
        unknown = sorted(set(value) - set(DOCUMENTED_QUOTAS))
        if unknown:
            raise ValueError(f"quotas: unknown operation(s) {unknown}; known: {sorted(DOCUMENTED_QUOTAS)}")
        return {op: _rate(f"quotas.{op}", rate) for op, rate in value.items()}
    if key == "max_tps":
        return _rate(key, value)
    if key == "clock_skew_seconds":
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError("clock_skew_seconds must be a number of seconds")
        return float(value)
    if type(value) not in (int, float) or value < 0:
        raise ValueError(f"{key} must be a non-negative number")
    if key in _RATES and value > 1:
        raise ValueError(f"{key} must be between 0 and 1")
    return float(value)


def parse_quotas(text: str) -> dict[str, float | None]:
    """``events=1000,items=10``: the operations named, requests/s each (0, none or off: unlimited);
    ``off`` alone lifts every quota. ValueError names what is wrong."""
    if text.strip().lower() in ("off", "none"):
        return dict.fromkeys(DOCUMENTED_QUOTAS)
    quotas: dict[str, Any] = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--quota: expected OPERATION=RATE, got {pair!r}")
        word = value.strip().lower()
        try:
            quotas[key.strip()] = None if word in ("none", "off") else float(word)
        except ValueError:
            raise ValueError(f"--quota: {key.strip()} must be a number of requests per second") from None
    coerced: dict[str, float | None] = _coerce_setting("quotas", quotas)
    return coerced


def parse_groups(text: str) -> dict[str, str]:
    """``tracker-a=shop,tracker-b=shop``: which dataset group each tracker belongs to."""
    groups: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        tracker, sep, group = pair.partition("=")
        if not sep or not tracker.strip() or not group.strip():
            raise ValueError(f"--tracker-groups: expected TRACKER=GROUP, got {pair!r}")
        groups[tracker.strip()] = group.strip()
    return groups


class TokenBucket:
    """``rate`` requests per second with a one-second burst (at least one request), like AWS's quotas."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + max(now - self.stamp, 0.0) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class QuotaBuckets:
    """One bucket per (operation, destination), made full on first use: destinations fill independently."""

    def __init__(self, clock: Callable[[], float], limit: int = MAX_DESTINATIONS) -> None:
        self._clock = clock
        self._limit = limit
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def take(self, operation: str, destination: str, rate: float | None) -> bool:
        """Whether a request may go through now; None is unlimited."""
        if rate is None:
            return True
        now = self._clock()
        bucket = self._buckets.get((operation, destination))
        if bucket is None:
            if len(self._buckets) >= self._limit:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[(operation, destination)] = TokenBucket(rate, now)
        return bucket.take(now)

    def forget(self, operations: set[str] | None = None) -> None:
        """Drop buckets (of these operations, or all), so a changed quota or grouping applies at once."""
        if operations is None:
            self._buckets.clear()
            return
        for key in [key for key in self._buckets if key[0] in operations]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def quota_group(tracked: bool, destination: str, config: FaultConfig) -> str:
    """The bucket a destination draws from: a tracker's dataset group, or the dataset itself."""
    groups = config.tracker_groups
    if tracked and groups:
        return groups.get(destination, destination)
    return destination


def unknown_destination(tracked: bool, destination: str, config: FaultConfig) -> Rejection | None:
    """ResourceNotFoundException (404) for a tracker or dataset outside a configured registry.

    botocore models it for PutItems, PutUsers, PutActions and PutActionInteractions; for PutEvents the
    model lists only InvalidInputException, and the emulator answers the same service-wide 404 there too:
    a request-level refusal that the worker must alarm on and retry, never turn into dead letters."""
    if tracked:
        if config.tracking_ids is not None and destination not in config.tracking_ids:
            return 404, "ResourceNotFoundException", f"Event tracker {destination} does not exist."
    elif config.dataset_arns is not None and destination not in config.dataset_arns:
        return 404, "ResourceNotFoundException", f"Dataset {destination} does not exist."
    return None
