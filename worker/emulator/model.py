"""Request validation compiled from botocore's shipped ``personalize-events`` model.

Every constraint (lengths, patterns, list sizes, required members) comes from the model the SDK itself
ships, compiled once into closures, so the emulator's limits can never drift from what the client knows.
The one limit the model does not carry, 10 KB per event, is a documented service quota (see
``oversized_events``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import orjson
from botocore.loaders import Loader

from worker.mapping.limits import MAX_EVENT_BYTES, reserved_property_keys

SERVICE_NAME = "personalize-events"

# A validation problem: (member path relative to the value checked, constraint message).
Problems = list[tuple[str, str]]
# A compiled check of one JSON value: None when valid (the fast path allocates nothing).
Validator = Callable[[Any], Problems | None]

_FLOAT_WORDS = frozenset({"NaN", "Infinity", "-Infinity"})  # how botocore sends non-finite floats


def _problem(message: str) -> Problems:
    return [("", message)]


def _under(segment: str, problems: Problems) -> Problems:
    """Prefix child paths only when something failed, so valid requests build no strings."""
    return [(f"{segment}.{path}" if path else segment, message) for path, message in problems]


def _length_problems(size: int, low: int, high: float) -> Problems:
    problems: Problems = []
    if size < low:
        problems.append(("", f"Member must have length greater than or equal to {low}"))
    if size > high:
        problems.append(("", f"Member must have length less than or equal to {int(high)}"))
    return problems


def _string_validator(spec: dict[str, Any]) -> Validator:
    low: int = spec.get("min", 0)
    high: float = spec.get("max", math.inf)
    # Smithy patterns are not implicitly anchored: search, don't match.
    regex = re.compile(spec["pattern"]) if "pattern" in spec else None
    enum = frozenset(spec["enum"]) if "enum" in spec else None

    def slow(value: str) -> Problems:
        problems = _length_problems(len(value), low, high)
        if regex is not None and not regex.search(value):
            problems.append(("", f"Member must satisfy regular expression pattern: {regex.pattern}"))
        if enum is not None and value not in enum:
            problems.append(("", f"Member must satisfy enum value set: [{', '.join(sorted(enum))}]"))
        return problems

    def validate(value: Any) -> Problems | None:
        if type(value) is not str:
            return _problem("Member must be of type string")
        if low <= len(value) <= high and (regex is None or regex.search(value)) and (enum is None or value in enum):
            return None
        return slow(value)

    return validate


def _float_validator(spec: dict[str, Any]) -> Validator:
    def validate(value: Any) -> Problems | None:
        kind = type(value)
        if kind is float or kind is int or (kind is str and value in _FLOAT_WORDS):
            return None
        return _problem("Member must be of type number")

    return validate


def _integer_validator(spec: dict[str, Any]) -> Validator:
    low: float = spec.get("min", -math.inf)
    high: float = spec.get("max", math.inf)

    def validate(value: Any) -> Problems | None:
        if type(value) is not int:
            return _problem("Member must be of type integer")
        if value < low:
            return _problem(f"Member must have value greater than or equal to {int(low)}")
        if value > high:
            return _problem(f"Member must have value less than or equal to {int(high)}")
        return None

    return validate


def _is_iso_timestamp(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _timestamp_validator(spec: dict[str, Any]) -> Validator:
    """botocore sends REST-JSON timestamps as whole epoch seconds; ISO strings accepted defensively."""

    def validate(value: Any) -> Problems | None:
        kind = type(value)
        if kind is int or (kind is float and math.isfinite(value)):
            return None
        if kind is str and _is_iso_timestamp(value):
            return None
        return _problem("Member must be a timestamp (epoch seconds or ISO 8601)")

    return validate


def _type_validator(kind: type, name: str) -> Validator:
    def validate(value: Any) -> Problems | None:
        return None if type(value) is kind else _problem(f"Member must be of type {name}")

    return validate


def _json_object_validator(inner: Validator, reserved: frozenset[str]) -> Validator:
    """``jsonvalue`` members travel as a string that must itself hold a JSON object."""

    def validate(value: Any) -> Problems | None:
        problems = inner(value)
        if problems:
            return problems
        try:
            decoded = orjson.loads(value)
        except orjson.JSONDecodeError:
            decoded = None
        if type(decoded) is not dict:
            return _problem("Member must be a JSON object encoded as a string")
        if reserved:
            for key in decoded:
                if key.lower() in reserved:
                    clashes = sorted(k for k in decoded if k.lower() in reserved)
                    return _problem(f"Member must not use the reserved keys {clashes}")
        return None

    return validate


class _ModelCompiler:
    """Turns botocore shape dicts into validator closures, once per shape."""

    def __init__(self, shapes: dict[str, dict[str, Any]]) -> None:
        self._shapes = shapes
        self._compiled: dict[str, Validator] = {}

    def shape(self, name: str) -> Validator:
        if name in self._compiled:
            return self._compiled[name]
        late: list[Validator] = []

        def forward(value: Any) -> Problems | None:
            return late[0](value)

        self._compiled[name] = forward  # lets recursive shapes refer to themselves while being built
        built = self._build(self._shapes[name])
        late.append(built)
        self._compiled[name] = built
        return built

    def member(self, ref: dict[str, Any]) -> Validator:
        check = self.shape(ref["shape"])
        if ref.get("jsonvalue"):
            check = _json_object_validator(check, reserved_property_keys(ref.get("documentation", "")))
        return check

    def _build(self, spec: dict[str, Any]) -> Validator:
        kind = spec["type"]
        if kind == "structure":
            return self._structure(spec)
        if kind == "list":
            return self._list(spec)
        if kind == "map":
            return self._map(spec)
        builders: dict[str, Callable[[dict[str, Any]], Validator]] = {
            "string": _string_validator,
            "float": _float_validator,
            "double": _float_validator,
            "integer": _integer_validator,
            "long": _integer_validator,
            "timestamp": _timestamp_validator,
            "boolean": lambda _: _type_validator(bool, "boolean"),
            "blob": lambda _: _type_validator(str, "blob (base64 string)"),
        }
        return builders[kind](spec)

    def _structure(self, spec: dict[str, Any]) -> Validator:
        members = {name: self.member(ref) for name, ref in spec.get("members", {}).items()}
        required = tuple(spec.get("required", ()))

        def validate(value: Any) -> Problems | None:
            if type(value) is not dict:
                return _problem("Member must be of type structure")
            problems: Problems | None = None
            for name in required:
                if value.get(name) is None:
                    problems = (problems or []) + [(name, "Member must not be null")]
            for name, item in value.items():
                check = members.get(name)
                if check is None or item is None:
                    continue  # unknown members are ignored, as AWS does
                found = check(item)
                if found:
                    problems = (problems or []) + _under(name, found)
            return problems

        return validate

    def _list(self, spec: dict[str, Any]) -> Validator:
        element = self.member(spec["member"])
        low: int = spec.get("min", 0)
        high: float = spec.get("max", math.inf)

        def validate(value: Any) -> Problems | None:
            if type(value) is not list:
                return _problem("Member must be of type list")
            problems: Problems | None = None
            if not low <= len(value) <= high:
                problems = _length_problems(len(value), low, high)
            for index, item in enumerate(value, start=1):
                found = element(item) if item is not None else _problem("Member must not be null")
                if found:
                    problems = (problems or []) + _under(f"{index}.member", found)
            return problems

        return validate

    def _map(self, spec: dict[str, Any]) -> Validator:
        key_check = self.member(spec["key"])
        value_check = self.member(spec["value"])
        low: int = spec.get("min", 0)
        high: float = spec.get("max", math.inf)

        def validate(value: Any) -> Problems | None:
            if type(value) is not dict:
                return _problem("Member must be of type map")
            problems: Problems | None = None
            if not low <= len(value) <= high:
                problems = _length_problems(len(value), low, high)
            for key, item in value.items():
                found = (key_check(key) or []) + (value_check(item) or [])
                if found:
                    problems = (problems or []) + _under(str(key), found)
            return problems

        return validate


@dataclass(frozen=True)
class Operation:
    """One modeled operation: its route, its compiled validator, how to store what it accepted, and
    which member names its destination (the event tracker or the dataset the records go to)."""

    name: str
    uri: str
    validate: Validator
    records_member: str  # the list of records (eventList, items, users, ...)
    context_members: tuple[str, ...]  # the per-call members copied onto every stored record
    destination_member: str  # trackingId or datasetArn

    @property
    def slug(self) -> str:
        return self.uri.strip("/")

    @property
    def key(self) -> str:
        """The operation's short name in quotas and stats: events, items, action_interactions, ..."""
        return self.slug.replace("-", "_")

    @property
    def tracked(self) -> bool:
        """Whether its destination is an event tracker (whose quota is its dataset group's)."""
        return self.destination_member == "trackingId"


_DESTINATIONS = ("trackingId", "datasetArn")


def _operation(name: str, spec: dict[str, Any], model: dict[str, Any], compiler: _ModelCompiler) -> Operation:
    input_name = spec["input"]["shape"]
    members = model["shapes"][input_name]["members"]
    lists = [m for m, ref in members.items() if model["shapes"][ref["shape"]]["type"] == "list"]
    return Operation(
        name=name,
        uri=spec["http"]["requestUri"],
        validate=compiler.shape(input_name),
        records_member=lists[0],
        context_members=tuple(m for m in members if m not in lists),
        destination_member=next(m for m in _DESTINATIONS if m in members),
    )


@dataclass(frozen=True)
class CompiledModel:
    signing_name: str
    operations: tuple[Operation, ...]


@cache
def compiled_model() -> CompiledModel:
    """Load botocore's shipped model and compile it; cached, so it happens once per process."""
    model: dict[str, Any] = Loader().load_service_model(SERVICE_NAME, "service-2")
    compiler = _ModelCompiler(model["shapes"])
    operations = tuple(
        _operation(name, spec, model, compiler)
        for name, spec in sorted(model["operations"].items())
        if spec["http"]["method"] == "POST"
    )
    return CompiledModel(signing_name=model["metadata"]["signingName"], operations=operations)


def format_problems(problems: Problems) -> str:
    """Render problems the way AWS (Coral) words validation errors."""
    count = len(problems)
    noun = "error" if count == 1 else "errors"
    details = "; ".join(f"Value at '{path}' failed to satisfy constraint: {message}" for path, message in problems)
    return f"{count} validation {noun} detected: {details}"


def oversized_events(events: list[Any], limit: int = MAX_EVENT_BYTES) -> Problems:
    """The documented 10 KB per-event quota, which the model cannot express. An event's size is its
    compact UTF-8 JSON, as the worker measures it before sending (``worker.mapping.mapper``), so what the worker
    lets through the emulator accepts; the wire form (ASCII-escaped by botocore) is never smaller, which
    is why callers may skip this when the whole body is within the limit."""
    return [
        (f"eventList.{index}.member", f"Member must have size less than or equal to {limit} bytes")
        for index, event in enumerate(events, start=1)
        if len(orjson.dumps(event)) > limit
    ]
