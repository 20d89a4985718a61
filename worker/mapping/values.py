"""One mapped value → one PutEvents member, or an `InvalidRecord` a user can act on.

Each error names the member, where its value came from and a short excerpt of it
(`eventValue: 'abc' at properties.price is not a number`), so a dead letter says what to fix. These
are the mapper's slow paths: the hot path checks the common case inline and calls these otherwise.
User ids are never quoted (they are personal data; a dead-letter header may be read widely).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, tzinfo
from typing import Any

from worker.errors import WorkerError
from worker.mapping import limits

# Epoch seconds up to the end of year 9999: beyond it no datetime (and no real click) exists.
MAX_EPOCH_SECONDS = 253_402_300_799.0
# In `auto` mode a number above this is taken as milliseconds (1e11 s is year 5138; 1e11 ms is 1973).
AUTO_MS_THRESHOLD = 1e11
EXCERPT = 40
"""Characters of a value quoted in an error: enough to recognise it, short enough for a header."""
_NOT_QUOTED = frozenset({"userId"})


class InvalidRecord(WorkerError):
    """A record that can never be sent; `stage` and `reason` go to the dead-letter headers and metrics."""

    def __init__(self, stage: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.reason = reason
        self.message = message


def excerpt(value: Any) -> str:
    """`repr` cut to EXCERPT characters: the value can be any size, and it ends up in a header."""
    text = repr(value)
    return text if len(text) <= EXCERPT else text[: EXCERPT - 1] + "…"


def _shown(value: Any, member: str, source: str) -> str:
    """`'abc' at properties.price` (the value left out for a user id), or the value alone without a source."""
    shown = "the value" if member in _NOT_QUOTED else excerpt(value)
    return f"{shown} at {source}" if source else shown


def missing(member: str, source: str) -> InvalidRecord:
    return InvalidRecord("mapping", "missing_field", f"{member}: required field {source!r} is missing")


def check_length(value: str, member: str, limit: limits.StringLimit, source: str = "") -> None:
    if len(value) > limit.max:
        message = f"{member}: {_shown(value, member, source)} is {len(value)} characters, over {limit.max}"
        raise InvalidRecord("validation", "too_long", message)
    if len(value) < limit.min:
        message = f"{member}: {_shown(value, member, source)} is {len(value)} characters, below {limit.min}"
        raise InvalidRecord("validation", "too_short", message)


def identifier(value: Any, member: str, limit: limits.StringLimit, source: str = "") -> str:
    """IDs are strings; integer IDs are common in clickstreams and map to their decimal text."""
    kind = type(value)
    if kind is str:
        if limit.min <= len(value) <= limit.max:  # the common case, without a call
            return value  # type: ignore[no-any-return]
        check_length(value, member, limit, source)
    if kind is int:
        text = str(value)
        if not limit.min <= len(text) <= limit.max:
            check_length(text, member, limit, source)
        return text
    message = f"{member}: {_shown(value, member, source)} is {type_name(value)}, not a string"
    raise InvalidRecord("mapping", "wrong_type", message)


def type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", float: "a number", int: "a number"}.get(
        type(value), "null" if value is None else "a string"
    )


def _epoch_number(value: Any, member: str, source: str) -> float:
    if type(value) in (int, float):
        return float(value)
    if type(value) is str:
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise InvalidRecord("mapping", "bad_timestamp", f"{member}: {_shown(value, member, source)} is not an epoch number")


def _iso(value: Any, member: str, source: str, zone: tzinfo) -> float:
    if type(value) is not str:
        message = f"{member}: {_shown(value, member, source)} is not an ISO 8601 string"
        raise InvalidRecord("mapping", "bad_timestamp", message)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        message = f"{member}: {_shown(value, member, source)} is not an ISO 8601 timestamp"
        raise InvalidRecord("mapping", "bad_timestamp", message) from None
    if parsed.tzinfo is None:
        # A naive time is read in `mapping.timezone` (UTC unless configured): said once, in the config.
        parsed = parsed.replace(tzinfo=zone)
    return parsed.timestamp()


def parse_sent_at(value: Any, fmt: str, member: str = "sentAt", *, source: str = "", zone: tzinfo = UTC) -> float:
    """Epoch seconds (with fractions) from the configured format; absurd values are rejected, not clamped."""
    if fmt == "epoch_s":
        seconds = _epoch_number(value, member, source)
    elif fmt == "epoch_ms":
        seconds = _epoch_number(value, member, source) / 1000.0
    elif fmt == "iso8601" or (
        type(value) is str and value and not value.strip().lstrip("-").replace(".", "", 1).isdigit()
    ):
        seconds = _iso(value, member, source, zone)
    else:
        seconds = _epoch_number(value, member, source)
        if seconds > AUTO_MS_THRESHOLD:
            seconds /= 1000.0
    # Milliseconds are what clickstreams carry and what the wire format keeps (see client.request_body).
    seconds = round_ms(seconds)
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_EPOCH_SECONDS):
        message = f"{member}: {_shown(value, member, source)} is outside 1970..9999"
        raise InvalidRecord("validation", "bad_timestamp", message)
    return seconds


def round_ms(seconds: float) -> float:
    """`round(seconds, 3) if math.isfinite(seconds) else seconds`, a few times cheaper for real instants.

    round() goes through decimal digit strings. Within 1970..9999, seconds·1000 is below 2**48, so its
    rounding error is at most 1/64: unless it lies within 1/32 of a half, the whole number nearest to
    it is the exact product's nearest, and n / 1000.0 is the double nearest n ms, as round() returns.
    """
    if 0.0 < seconds <= MAX_EPOCH_SECONDS:
        scaled = seconds * 1000.0
        fraction = scaled % 1.0
        if fraction < 0.46875:
            return (scaled - fraction) / 1000.0
        if fraction > 0.53125:
            return (scaled - fraction + 1.0) / 1000.0
    return round(seconds, 3) if math.isfinite(seconds) else seconds


def to_float(value: Any, source: str = "") -> float:
    if type(value) in (int, float):
        number = float(value)
    elif type(value) is str:
        try:
            number = float(value)
        except ValueError:
            raise InvalidRecord(
                "mapping", "wrong_type", f"eventValue: {_shown(value, 'eventValue', source)} is not a number"
            ) from None
    else:
        message = f"eventValue: {_shown(value, 'eventValue', source)} is {type_name(value)}, not a number"
        raise InvalidRecord("mapping", "wrong_type", message)
    if not math.isfinite(number) or abs(number) > 3.4e38:
        message = f"eventValue: {_shown(value, 'eventValue', source)} is not a finite 32-bit float"
        raise InvalidRecord("validation", "out_of_range", message)
    return number


def impression(value: Any, source: str = "") -> list[str]:
    if type(value) is str:
        items: list[Any] = value.split(",")
    elif type(value) is list:
        items = value
    else:
        message = f"impression: {_shown(value, 'impression', source)} is {type_name(value)}, not a list"
        raise InvalidRecord("mapping", "wrong_type", message)
    low, high = limits.IMPRESSION_ITEMS
    if not low <= len(items) <= high:
        message = f"impression: {len(items)} items at {source or 'its source'}, allowed {low}..{high}"
        raise InvalidRecord("validation", "too_long" if items else "too_short", message)
    items = [item.strip() if type(item) is str else item for item in items]
    item_min, item_max = limits.IMPRESSION_ITEM.min, limits.IMPRESSION_ITEM.max
    for item in items:
        if type(item) is not str or not item_min <= len(item) <= item_max:
            # Not all strings of valid length: convert or reject each in order, as `identifier` does.
            return [identifier(item, "impression", limits.IMPRESSION_ITEM, source) for item in items]
    return items


def attribution_source(value: Any, source: str = "") -> str:
    member = "metricAttribution.eventAttributionSource"
    if type(value) is not str:
        message = f"{member}: {_shown(value, member, source)} is {type_name(value)}, not a string"
        raise InvalidRecord("mapping", "wrong_type", message)
    limit = limits.ATTRIBUTION_SOURCE
    check_length(value, member, limit, source)
    if limit.pattern is not None and not limit.pattern.match(value):
        message = f"{member}: {_shown(value, member, source)} is not printable ASCII"
        raise InvalidRecord("validation", "bad_value", message)
    return value
