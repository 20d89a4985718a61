"""What identifies a mapped event and what it weighs: the derived eventId, and its size against the quota.

The eventId is a content hash, never left to Personalize: a replay after a crash or a rebalance yields the
same ID, and Personalize does not train on the copy. Shared by the events mapper and the other operations'
record mappers (`personalize.operations.records`).
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

import orjson

from worker.mapping import limits

EVENT_ID_PREFIX = "pw1-"


def may_exceed_quota(event: dict[str, Any]) -> bool:
    """A cheap upper bound first: JSON escaping grows a character to at most 6 bytes."""
    if "impression" in event:
        return True
    text = sum(len(v) for v in event.values() if type(v) is str)
    attribution = event.get("metricAttribution")
    if attribution is not None:
        text += len(attribution["eventAttributionSource"])
    return 6 * text + 256 > limits.MAX_EVENT_BYTES


def event_bytes(event: dict[str, Any]) -> int:
    return len(orjson.dumps(event))


# Copied per event ID: cheaper than a new blake2b, whose parameters would be parsed every time.
_EVENT_ID_HASH = blake2b(digest_size=16)


def derive_event_id(session_id: str, user_id: str | None, event: dict[str, Any]) -> str:
    """A content hash, so a replay after a crash or rebalance yields the same ID and Personalize ignores it."""
    digest = _EVENT_ID_HASH.copy()
    digest.update(orjson.dumps((session_id, user_id, event), option=orjson.OPT_SORT_KEYS))
    return EVENT_ID_PREFIX + digest.hexdigest()
