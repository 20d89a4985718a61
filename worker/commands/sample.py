"""A realistic synthetic clickstream for the demo, the end-to-end tests and the benchmark.

Many concurrent sessions with heavy-tailed lengths, Zipf-distributed items, a share of re-delivered
duplicates (byte-identical copies of earlier messages) and of malformed records. The shape matches
the default `[mapping]` (config/example-message.json). Deterministic for a given seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import orjson

EVENT_TYPES = ("click", "view", "add_to_cart", "purchase")
EVENT_TYPE_WEIGHTS = (50, 35, 10, 5)
CATEGORIES = ("shoes", "shirts", "bags", "watches", "hats", "socks")
HOT_SESSION_ID = "sess-hot"
HOT_USER_ID = "user-hot"
"""The one session (and user) `generate(hot_session_share=...)` gives a share of the events."""


@dataclass(slots=True)
class Message:
    key: bytes
    value: bytes
    kind: str
    """valid | duplicate | malformed"""
    source: dict[str, Any] | None = None
    """The object behind a valid message (None for malformed ones)."""


@dataclass(slots=True)
class Clickstream:
    messages: list[Message] = field(default_factory=list)

    @property
    def valid(self) -> list[Message]:
        return [m for m in self.messages if m.kind == "valid"]

    def count(self, kind: str) -> int:
        return sum(1 for m in self.messages if m.kind == kind)


def _malformed(rng: random.Random, template: dict[str, Any]) -> bytes:
    """One of the ways real producers get it wrong; each must end in the dead-letter topic."""
    choice = rng.randrange(8)
    broken = dict(template)
    if choice == 0:
        return b'{"event_type": "click", "session_id": '  # truncated JSON
    if choice == 1:
        return b"\xff\xfe not utf-8"
    if choice == 2:
        return b'["not", "an", "object"]'
    if choice == 3:
        broken.pop("session_id")
    elif choice == 4:
        broken["event_type"] = "x" * 257
    elif choice == 5:
        broken["timestamp"] = "not a timestamp"
    elif choice == 6:
        broken["item_id"] = {"nested": True}
    else:
        broken["impression"] = [f"i{n}" for n in range(26)]
    return orjson.dumps(broken)


def generate(
    records: int,
    *,
    seed: int = 7,
    concurrent_sessions: int = 500,
    items: int = 5000,
    duplicate_rate: float = 0.02,
    malformed_rate: float = 0.005,
    start: float = 1_790_000_000.0,
    events_per_second: float = 200.0,
    with_event_ids: bool = True,
    min_session_events: int = 1,
    hot_session_share: float = 0.0,
) -> Clickstream:
    """`records` messages in total, duplicates and malformed ones included.

    Session lengths are Pareto-distributed (heavy tail) from `min_session_events` up to 20 times
    that (at least 200): 1 gives the short sessions of browsing traffic, where most calls carry few
    events; 40 gives sessions long enough that nearly every call can be full.

    `hot_session_share` of the events are moved to one session, `HOT_SESSION_ID` whatever the seed (a
    bot reusing one sessionId and userId). Which ones is drawn from a random stream of its own, so the
    backlog is otherwise the one the same seed gives without it.
    """
    rng = random.Random(seed)
    hot_rng = random.Random(f"hot-{seed}")
    cumulative = list(accumulate(1.0 / (rank**1.1) for rank in range(1, items + 1)))
    longest = max(200, 20 * min_session_events)
    item_ids = [f"item-{n}" for n in range(items)]
    sessions: list[list[Any]] = []  # [session_id, user_id, remaining events]
    serial = 0

    def new_session() -> list[Any]:
        nonlocal serial
        serial += 1
        length = min(longest, max(1, int(min_session_events * rng.paretovariate(1.2))))
        user = f"user-{rng.randrange(concurrent_sessions * 20)}" if rng.random() < 0.8 else None
        return [f"sess-{seed}-{serial}", user, length]

    sessions = [new_session() for _ in range(concurrent_sessions)]
    stream = Clickstream()
    emitted: list[Message] = []
    now = start
    for n in range(records):
        now += rng.expovariate(events_per_second)
        if emitted and rng.random() < duplicate_rate:
            original = emitted[rng.randrange(max(0, len(emitted) - 2000), len(emitted))]
            stream.messages.append(Message(original.key, original.value, "duplicate", original.source))
            continue
        slot = rng.randrange(len(sessions))
        session = sessions[slot]
        session[2] -= 1
        if session[2] <= 0:
            sessions[slot] = new_session()
        if hot_session_share and hot_rng.random() < hot_session_share:
            session = [HOT_SESSION_ID, HOT_USER_ID, 0]
        obj: dict[str, Any] = {
            "session_id": session[0],
            "event_type": rng.choices(EVENT_TYPES, EVENT_TYPE_WEIGHTS)[0],
            "item_id": rng.choices(item_ids, cum_weights=cumulative)[0],
            "timestamp": round(now, 3),
            "ctx": {
                "page_category": rng.choice(CATEGORIES),
                "device_type": rng.choice(("web", "ios", "android")),
            },
        }
        if with_event_ids:
            obj["event_id"] = f"evt-{seed}-{n}"
        if session[1] is not None:
            obj["user_id"] = session[1]
        if obj["event_type"] == "purchase":
            obj["event_value"] = round(rng.uniform(5, 300), 2)
        key = str(session[0]).encode()
        if rng.random() < malformed_rate:
            stream.messages.append(Message(key, _malformed(rng, obj), "malformed"))
            continue
        message = Message(key, orjson.dumps(obj), "valid", obj)
        stream.messages.append(message)
        emitted.append(message)
    return stream


def optimal_calls(stream: Clickstream, max_events: int = 10) -> int:
    """Fewest PutEvents calls for the valid unique events: each session packed `max_events` per call."""
    per_session: dict[tuple[str, str | None], int] = {}
    for message in stream.valid:
        assert message.source is not None
        key = (message.source["session_id"], message.source.get("user_id"))
        per_session[key] = per_session.get(key, 0) + 1
    return sum(-(-count // max_events) for count in per_session.values())
