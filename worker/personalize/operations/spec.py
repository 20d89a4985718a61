"""One `OperationSpec` per Personalize Events operation, derived from botocore's shipped model.

Paths, member names, list bounds, string limits and the reserved property keys all come from the model
(`botocore/data/personalize-events/*/service-2.json`), so a botocore upgrade that changes a limit changes
the worker with it; tests/test_operations_spec.py pins what the worker relies on, so such a change is
noticed. Only the request quotas are not in the model (see `DEFAULT_REQUESTS_PER_SECOND`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from worker.mapping.limits import SERVICE_MODEL, StringLimit, reserved_property_keys

SERVICE = "personalize-events"

DEFAULT_REQUESTS_PER_SECOND: Mapping[str, float] = MappingProxyType(
    {
        "PutEvents": 1000.0,
        "PutItems": 10.0,
        "PutUsers": 10.0,
        "PutActions": 10.0,
        "PutActionInteractions": 10.0,
    }
)
"""Default request quotas per destination (dataset group), as AWS's service-quotas page documents them:
PutEvents 1,000 requests/s, PutItems and PutUsers 10 requests/s. For PutActions and PutActionInteractions
no figure could be confirmed in the documentation searched (the quotas table did not show them), so they
default conservatively to 10 requests/s: too low costs throughput, which the AIMD limiter cannot win back
above its maximum; too high costs throttling on every call. Each route can raise its own maximum."""

_EVENT_TYPE_SENTENCE = re.compile(r"You can specify (.+?) event types", re.IGNORECASE | re.DOTALL)
_CODE = re.compile(r"<code>\s*([^<]+?)\s*</code>")


@dataclass(frozen=True, slots=True)
class Member:
    """One member of a record, as the model describes it."""

    name: str
    kind: str
    """The model's type: string, timestamp, float, list or structure."""
    required: bool
    sensitive: bool
    """The model marks the value sensitive (user and item ids, properties): it is never echoed in errors."""
    limit: StringLimit | None = None
    """Strings: length bounds and pattern. Lists: the bounds of each (string) element."""
    count: tuple[int, int] | None = None
    """Lists: how many elements."""
    json: bool = False
    """A `jsonvalue` string: a JSON object serialized into a string (the `properties` members)."""
    reserved_keys: frozenset[str] = frozenset()
    """JSON members: keys the documentation forbids (lower case, compared case-insensitively)."""
    values: tuple[str, ...] = ()
    """The values the documentation allows (ActionInteraction.eventType); empty: any."""


@dataclass(frozen=True, slots=True)
class OperationSpec:
    """What the flow needs to know about one operation; nothing here is copied by hand from the docs."""

    key: str
    """The route's name for it: `events`, `items`, `users`, `actions`, `action_interactions`."""
    name: str
    """botocore's operation name (PutItems): the metrics label and the emulator's route."""
    http_path: str
    destination: str
    """The request member naming where records go: trackingId (an event tracker) or datasetArn."""
    destination_limit: StringLimit
    session_members: tuple[str, ...]
    """Other per-call members (PutEvents: sessionId, userId): one call carries one value of them, so they
    join the destination in the batch key. Empty: any records of one destination share a call."""
    list_member: str
    records_per_call: tuple[int, int]
    record_shape: str
    members: Mapping[str, Member]
    id_member: str
    """The record member that identifies it: eventId (deduplicated) or the item/user/action id (coalesced)."""
    deduplicated: bool
    """True: records are events, deduplicated by eventId. False: records are upserts, coalesced by id."""
    errors: frozenset[str]
    """The exceptions the model declares (InvalidInputException, ResourceNotFoundException, ...)."""
    default_requests_per_second: float

    @property
    def coalesced(self) -> bool:
        return not self.deduplicated

    @property
    def properties(self) -> Member:
        """The record's JSON properties member (every operation has exactly one)."""
        return next(member for member in self.members.values() if member.json)

    def check_destination(self, value: str) -> str | None:
        """Why `value` cannot be this operation's destination, or None: for config validation."""
        limit = self.destination_limit
        if not max(limit.min, 1) <= len(value) <= limit.max:
            return f"{self.destination} must be 1-{limit.max} characters"
        # Smithy patterns are not anchored: search, as the service does.
        if limit.pattern is not None and not limit.pattern.search(value):
            return f"{self.destination} must match {limit.pattern.pattern!r}"
        return None


def route_key(operation: str) -> str:
    """`PutActionInteractions` → `action_interactions`."""
    words = re.findall(r"[A-Z][a-z0-9]*", operation.removeprefix("Put"))
    return "_".join(word.lower() for word in words)


def _string_limit(shape: dict[str, Any]) -> StringLimit:
    pattern = shape.get("pattern")
    return StringLimit(
        min=int(shape.get("min", 0)),
        max=int(shape["max"]),
        pattern=re.compile(pattern) if pattern else None,
    )


def allowed_values(documentation: str) -> tuple[str, ...]:
    """The values a member's documentation enumerates ("You can specify <code>A</code>, ... event types")."""
    sentence = _EVENT_TYPE_SENTENCE.search(documentation)
    return tuple(_CODE.findall(sentence.group(1))) if sentence else ()


def _member(name: str, ref: dict[str, Any], required: bool, shapes: dict[str, Any]) -> Member:
    shape = shapes[ref["shape"]]
    kind = shape["type"]
    # The model marks ActionInteraction.userId sensitive but not User.userId: a user id is always treated so.
    sensitive = bool(shape.get("sensitive")) or name == "userId"
    if kind == "list":
        element = shapes[shape["member"]["shape"]]
        return Member(
            name,
            kind,
            required,
            sensitive or bool(element.get("sensitive")),
            limit=_string_limit(element),
            count=(int(shape["min"]), int(shape["max"])),
        )
    if kind != "string":
        return Member(name, kind, required, sensitive)
    documentation = ref.get("documentation", "")
    return Member(
        name,
        kind,
        required,
        sensitive,
        limit=_string_limit(shape),
        json=bool(ref.get("jsonvalue")),
        reserved_keys=reserved_property_keys(documentation) if ref.get("jsonvalue") else frozenset(),
        values=allowed_values(documentation),
    )


def _spec(operation: dict[str, Any], shapes: dict[str, Any]) -> OperationSpec:
    request = shapes[operation["input"]["shape"]]
    required = request.get("required", [])
    lists = [m for m, ref in request["members"].items() if shapes[ref["shape"]]["type"] == "list"]
    if len(lists) != 1:
        raise RuntimeError(f"{operation['name']}: expected one list of records, the model has {lists}")
    list_member = lists[0]
    scalars = [m for m in required if m != list_member]
    # The first required scalar is where the records go; the other per-call members (PutEvents'
    # sessionId, userId) describe one session.
    destination = scalars[0]
    list_shape = shapes[request["members"][list_member]["shape"]]
    record_shape = list_shape["member"]["shape"]
    record = shapes[record_shape]
    record_required = set(record.get("required", ()))
    members = {name: _member(name, ref, name in record_required, shapes) for name, ref in record["members"].items()}
    # Events carry an eventId (Personalize ignores a repeat in training): deduplicated. The others carry
    # only their id, and sending it again replaces the record: coalesced by that id.
    deduplicated = "eventId" in members
    id_member = "eventId" if deduplicated else sorted(record_required)[0]
    if not deduplicated and len(record_required) != 1:
        raise RuntimeError(f"{operation['name']}: an upsert record should require only its id: {record_required}")
    return OperationSpec(
        key=route_key(operation["name"]),
        name=operation["name"],
        http_path=operation["http"]["requestUri"],
        destination=destination,
        destination_limit=_string_limit(shapes[request["members"][destination]["shape"]]),
        session_members=tuple(m for m in request["members"] if m not in (destination, list_member)),
        list_member=list_member,
        records_per_call=(int(list_shape["min"]), int(list_shape["max"])),
        record_shape=record_shape,
        members=MappingProxyType(members),
        id_member=id_member,
        deduplicated=deduplicated,
        errors=frozenset(error["shape"] for error in operation.get("errors", ())),
        default_requests_per_second=DEFAULT_REQUESTS_PER_SECOND[operation["name"]],
    )


def _specs() -> Mapping[str, OperationSpec]:
    model = SERVICE_MODEL  # read once, by the limits
    specs = (_spec(operation, model["shapes"]) for operation in model["operations"].values())
    return MappingProxyType({spec.key: spec for spec in sorted(specs, key=lambda s: s.key)})


SPECS = _specs()
"""Every operation by its route key; read once at import (the model is part of the installed botocore)."""

EVENTS = SPECS["events"]
ITEMS = SPECS["items"]
USERS = SPECS["users"]
ACTIONS = SPECS["actions"]
ACTION_INTERACTIONS = SPECS["action_interactions"]
