"""Local stand-in for Amazon Personalize Events (neither moto nor LocalStack implements it).

It speaks the real REST-JSON wire protocol, so an unmodified aioboto3 client pointed at it with
``endpoint_url`` works. Every request is validated against the constraints of botocore's own shipped
``personalize-events`` model, compiled once at start-up into closures, so the limits can never drift
from what the SDK knows. SigV4 is checked, faults (throttling, latency, errors, outage) are injected
on demand, and everything accepted can be inspected over ``/_emulator/*``.

This module is a development and test tool: the worker's hot path must never import it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import hashlib
import hmac
import math
import random
import re
import signal
import ssl
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import orjson
from aiohttp import web
from botocore.loaders import Loader
from botocore.utils import normalize_url_path

from worker.limits import reserved_property_keys

SERVICE_NAME = "personalize-events"

# A validation problem: (member path relative to the value checked, constraint message).
Problems = list[tuple[str, str]]
# A compiled check of one JSON value: None when valid (the fast path allocates nothing).
Validator = Callable[[Any], Problems | None]
# An error answer: (HTTP status, x-amzn-ErrorType, message).
Rejection = tuple[int, str, str]

_FLOAT_WORDS = frozenset({"NaN", "Infinity", "-Infinity"})  # how botocore sends non-finite floats


# --------------------------------------------------------------------------- model compilation


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
    """One modeled operation: its route, its compiled validator and how to store what it accepted."""

    name: str
    uri: str
    validate: Validator
    records_member: str  # the list of records (eventList, items, users, ...)
    context_members: tuple[str, ...]  # the per-call members copied onto every stored record

    @property
    def slug(self) -> str:
        return self.uri.strip("/")


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


# --------------------------------------------------------------------------- SigV4


_AUTH_HEADER = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+)\s*,\s*Signature=(?P<signature>[0-9a-fA-F]+)\s*$"
)
_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)


def _canonical_query(query: str) -> str:
    """Same as botocore's URL-derived canonical query: raw pairs, sorted."""
    if not query:
        return ""
    pairs = sorted(pair.partition("=")[::2] for pair in query.split("&"))
    return "&".join(f"{key}={value}" for key, value in pairs)


def _canonical_headers(request: web.BaseRequest, names: Sequence[str]) -> str:
    lines = [f"{name}:{','.join(' '.join(v.split()) for v in request.headers.getall(name, []))}" for name in names]
    return "\n".join(lines) + "\n"


class SigV4Verifier:
    """Checks the Authorization header; verifies the signature itself when a secret is configured."""

    def __init__(self, signing_name: str, access_key: str | None, secret_key: str | None) -> None:
        self.signing_name = signing_name
        self.access_key = access_key
        self.secret_key = secret_key
        self._keys: dict[tuple[str, str, str], bytes] = {}

    def check(self, request: web.BaseRequest, body: bytes) -> Rejection | None:
        header = request.headers.get("Authorization")
        if not header:
            return 403, "MissingAuthenticationTokenException", "Missing Authentication Token"
        match = _AUTH_HEADER.match(header)
        if match is None:
            return 403, "IncompleteSignatureException", "Authorization header is not a valid SigV4 header."
        scope = match["credential"].split("/")
        if len(scope) != 5 or scope[4] != "aws4_request":
            return (
                403,
                "IncompleteSignatureException",
                "Credential must be KEY/DATE/REGION/SERVICE/aws4_request.",
            )
        if scope[3] != self.signing_name:
            return (
                403,
                "InvalidSignatureException",
                (f"Credential should be scoped to correct service: '{self.signing_name}'."),
            )
        if self.access_key is not None and scope[0] != self.access_key:
            return (
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        if self.secret_key is None:
            return None
        return self._verify(request, body, scope, match["signed"].split(";"), match["signature"].lower())

    def _verify(
        self, request: web.BaseRequest, body: bytes, scope: list[str], signed: list[str], signature: str
    ) -> Rejection | None:
        amz_date = request.headers.get("X-Amz-Date", "")
        if not amz_date.startswith(scope[1]):
            return 403, "IncompleteSignatureException", "X-Amz-Date is missing or does not match the scope."
        path, _, query = request.raw_path.partition("?")
        canonical = "\n".join(
            (
                request.method.upper(),
                quote(normalize_url_path(path), safe="/~"),
                _canonical_query(query),
                _canonical_headers(request, signed),
                ";".join(signed),
                request.headers.get("X-Amz-Content-SHA256") or hashlib.sha256(body).hexdigest(),
            )
        )
        to_sign = "\n".join(
            (
                "AWS4-HMAC-SHA256",
                amz_date,
                "/".join(scope[1:]),
                hashlib.sha256(canonical.encode()).hexdigest(),
            )
        )
        key = self._signing_key(scope[1], scope[2], scope[3])
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected, signature):
            return None
        return 403, "InvalidSignatureException", _MISMATCH

    def _signing_key(self, date: str, region: str, service: str) -> bytes:
        """Derived keys change once a day: cache them instead of four HMACs per request."""
        cached = self._keys.get((date, region, service))
        if cached is None:
            assert self.secret_key is not None
            cached = f"AWS4{self.secret_key}".encode()
            for part in (date, region, service, "aws4_request"):
                cached = hmac.new(cached, part.encode(), hashlib.sha256).digest()
            self._keys[(date, region, service)] = cached
        return cached


# --------------------------------------------------------------------------- state


@dataclass
class FaultConfig:
    """What the emulator injects; mutable at run time through ``POST /_emulator/config``."""

    max_tps: float | None = None
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    """Fraction of requests throttled at random, whatever the rate: stands in for a quota shared with others."""
    outage: bool = False
    tracking_ids: list[str] | None = None
    reject_item_ids: list[str] | None = None
    """Events with these itemIds are refused as invalid: stands in for the service-side rejections
    (schema mismatches, say) that no client-side check can predict, so batch splitting can be tested."""

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update, refusing unknown keys and wrong types (ValueError)."""
        for key, value in changes.items():
            if key not in self.__dataclass_fields__:
                raise ValueError(f"unknown setting {key!r}")
            setattr(self, key, _coerce_setting(key, value))


def _coerce_setting(key: str, value: Any) -> Any:
    if key == "outage":
        if type(value) is not bool:
            raise ValueError("outage must be a boolean")
        return value
    if key in ("tracking_ids", "reject_item_ids"):
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{key} must be a list of strings or null")
        return value
    if key == "max_tps" and (value is None or value == 0):
        return None
    if type(value) not in (int, float) or value < 0:
        raise ValueError(f"{key} must be a non-negative number")
    if key in ("error_rate", "throttle_rate") and value > 1:
        raise ValueError(f"{key} must be between 0 and 1")
    return float(value)


class TokenBucket:
    """Throttles like the PutEvents quota: ``rate`` per second with a one-second burst."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class CallLog:
    """Accepted calls of one operation, kept as raw request bytes (far smaller than parsed dicts)
    and expanded into one line per record only when read."""

    def __init__(self, operation: Operation) -> None:
        self.operation = operation
        self.calls: list[tuple[bytes, str, float]] = []
        self.starts: list[int] = []
        self.records = 0

    def add(self, raw: bytes, count: int, request_id: str, received_at: float) -> None:
        self.starts.append(self.records)
        self.calls.append((raw, request_id, received_at))
        self.records += count

    def expand(self, doc: dict[str, Any], request_id: str, received_at: float) -> Iterator[dict[str, Any]]:
        context = {member: doc.get(member) for member in self.operation.context_members}
        context["request_id"] = request_id
        context["received_at"] = received_at
        for record in doc[self.operation.records_member]:
            yield {**record, **context}

    def lines(self, since: int = 0) -> Iterator[bytes]:
        """ndjson lines from record ``since`` on; works on a snapshot, so appends and resets are safe."""
        calls, starts, count = self.calls, self.starts, len(self.calls)
        first = max(bisect.bisect_right(starts, since, 0, count) - 1, 0)
        for index in range(first, count):
            raw, request_id, received_at = calls[index]
            records = self.expand(orjson.loads(raw), request_id, received_at)
            for position, record in enumerate(records, start=starts[index]):
                if position >= since:
                    yield orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


@dataclass
class Stats:
    requests: int = 0
    events: int = 0
    duplicate_events: int = 0
    events_without_id: int = 0
    throttled: int = 0
    calls: int = 0
    max_events_per_call: int = 0


# --------------------------------------------------------------------------- the emulator


class Emulator:
    """Configuration, state and the aiohttp application of one emulated Personalize Events endpoint."""

    def __init__(
        self,
        *,
        tracking_ids: Sequence[str] | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        max_tps: float | None = None,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        error_rate: float = 0.0,
        outage: bool = False,
        record: str | Path | None = None,
        seed: int | None = None,
    ) -> None:
        self.model = compiled_model()
        self.config = FaultConfig()
        self._bucket: TokenBucket | None = None
        self.configure(
            max_tps=max_tps,
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
            error_rate=error_rate,
            outage=outage,
            tracking_ids=None if tracking_ids is None else list(tracking_ids),
        )
        self.auth = SigV4Verifier(self.model.signing_name, access_key, secret_key)
        self.record_path = Path(record) if record is not None else None
        self._record: IO[bytes] | None = None
        self._rng = random.Random(seed)
        self._request_prefix = str(uuid.uuid4())[:24]
        self._request_counter = 0
        self.reset()

    # ---- state

    def reset(self) -> None:
        """Forget everything received (the fault configuration stays)."""
        self.stats = Stats()
        self.rejected: Counter[str] = Counter()
        self.events_per_call: Counter[int] = Counter()
        self.event_ids: set[str] = set()
        self.logs = {op.name: CallLog(op) for op in self.model.operations}

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change fault injection at run time; returns the resulting configuration."""
        previous_tps = self.config.max_tps
        self.config.update(changes)
        if "max_tps" in changes and (self._bucket is None or self.config.max_tps != previous_tps):
            self._bucket = TokenBucket(self.config.max_tps) if self.config.max_tps else None
        return asdict(self.config)

    def snapshot(self) -> dict[str, Any]:
        """Counters for tests and humans: what was accepted, refused and throttled."""
        counts = {op.slug.replace("-", "_"): self.logs[op.name].records for op in self.model.operations}
        counts.pop("events", None)
        return {
            **asdict(self.stats),
            **counts,
            "unique_event_ids": len(self.event_ids),
            "rejected": dict(self.rejected),
            "events_per_call": {str(size): n for size, n in sorted(self.events_per_call.items())},
            "calls_by_operation": {name: len(log.calls) for name, log in self.logs.items()},
        }

    def log_for(self, slug: str) -> CallLog | None:
        return next((log for log in self.logs.values() if log.operation.slug == slug), None)

    def events(self, since: int = 0) -> Iterator[dict[str, Any]]:
        """Accepted PutEvents events as dicts, for in-process tests."""
        log = self.log_for("events")
        assert log is not None
        return (orjson.loads(line) for line in log.lines(since))

    def close(self) -> None:
        if self._record is not None:
            self._record.close()
            self._record = None

    # ---- request path

    def _next_request_id(self) -> str:
        self._request_counter += 1
        return f"{self._request_prefix}{self._request_counter:012x}"

    def _inject_fault(self) -> Rejection | None:
        config = self.config
        if config.outage:
            return 503, "ServiceUnavailable", "Service Unavailable"
        if self._bucket is not None and not self._bucket.take():
            self.stats.throttled += 1
            return 400, "ThrottlingException", "Rate exceeded"
        if config.throttle_rate > 0 and self._rng.random() < config.throttle_rate:
            self.stats.throttled += 1
            return 400, "ThrottlingException", "Rate exceeded"
        if config.error_rate > 0 and self._rng.random() < config.error_rate:
            return 500, "InternalFailure", "The request processing has failed because of an unknown error."
        return None

    async def _delay(self) -> None:
        config = self.config
        if config.latency_ms <= 0 and config.jitter_ms <= 0:
            return
        delay = config.latency_ms + self._rng.uniform(-config.jitter_ms, config.jitter_ms)
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)

    def _check_body(self, operation: Operation, body: bytes) -> dict[str, Any] | Rejection:
        """The parsed request when it is acceptable, else why not."""
        try:
            doc = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            return 400, "SerializationException", "The request body is not valid JSON."
        if type(doc) is not dict:
            return 400, "SerializationException", "The request body must be a JSON object."
        problems = operation.validate(doc)
        if problems:
            return 400, "InvalidInputException", format_problems(problems)
        allowed = self.config.tracking_ids
        tracking_id = doc.get("trackingId")
        if allowed is not None and tracking_id is not None and tracking_id not in allowed:
            return 404, "ResourceNotFoundException", f"Event tracker {tracking_id} does not exist."
        rejected_items = self.config.reject_item_ids
        if rejected_items and operation.records_member == "eventList":
            for index, event in enumerate(doc["eventList"], start=1):
                if event.get("itemId") in rejected_items:
                    return (
                        400,
                        "InvalidInputException",
                        (
                            f"1 validation error detected: Value at 'eventList.{index}.member.itemId' "
                            "failed to satisfy constraint: item is not accepted by this event tracker"
                        ),
                    )
        return doc

    def _accept(self, operation: Operation, body: bytes, doc: dict[str, Any], request_id: str) -> None:
        log = self.logs[operation.name]
        records = doc[operation.records_member]
        received_at = time.time()
        log.add(body, len(records), request_id, received_at)
        if operation.records_member == "eventList":
            self._count_events(records)
        if self.record_path is not None and operation.slug == "events":
            self._write_record(log, doc, request_id, received_at)

    def _count_events(self, events: list[dict[str, Any]]) -> None:
        stats, seen = self.stats, self.event_ids
        stats.calls += 1
        stats.events += len(events)
        stats.max_events_per_call = max(stats.max_events_per_call, len(events))
        self.events_per_call[len(events)] += 1
        for event in events:
            event_id = event.get("eventId")
            if event_id is None:
                stats.events_without_id += 1
            elif event_id in seen:
                stats.duplicate_events += 1
            else:
                seen.add(event_id)

    def _write_record(self, log: CallLog, doc: dict[str, Any], request_id: str, received_at: float) -> None:
        if self._record is None:
            assert self.record_path is not None
            self._record = self.record_path.open("ab")
        option = orjson.OPT_APPEND_NEWLINE
        self._record.write(b"".join(orjson.dumps(r, option=option) for r in log.expand(doc, request_id, received_at)))
        self._record.flush()

    def _reject(self, request_id: str, rejection: Rejection) -> web.Response:
        status, error_type, message = rejection
        self.rejected[error_type] += 1
        return web.Response(
            status=status,
            body=orjson.dumps({"message": message}),
            content_type="application/json",
            headers={"x-amzn-ErrorType": error_type, "x-amzn-RequestId": request_id},
        )

    async def handle(self, request: web.Request, operation: Operation) -> web.Response:
        """Auth, then faults in the documented order (outage, throttle, error, latency), then validation."""
        self.stats.requests += 1
        request_id = self._next_request_id()
        body = await request.read()
        refused = self.auth.check(request, body) or self._inject_fault()
        if refused is not None:
            return self._reject(request_id, refused)
        await self._delay()
        checked = self._check_body(operation, body)
        if isinstance(checked, tuple):
            return self._reject(request_id, checked)
        self._accept(operation, body, checked, request_id)
        return web.Response(status=200, headers={"x-amzn-RequestId": request_id})

    # ---- inspection endpoints

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json_response(self.snapshot())

    async def _get_config(self, request: web.Request) -> web.Response:
        return _json_response(asdict(self.config))

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if type(changes) is not dict:
                raise ValueError("expected a JSON object")
            return _json_response(self.configure(**changes))
        except (ValueError, orjson.JSONDecodeError) as error:
            return _json_response({"message": str(error)}, status=400)

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response(self.snapshot())

    async def _get_records(self, request: web.Request) -> web.StreamResponse:
        log = self.log_for(request.match_info["kind"])
        if log is None:
            raise web.HTTPNotFound()
        try:
            since = max(int(request.query.get("since", "0")), 0)
        except ValueError as error:
            raise web.HTTPBadRequest(text="since must be an integer") from error
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        chunk: list[bytes] = []
        for line in log.lines(since):
            chunk.append(line)
            if len(chunk) >= 2000:
                await response.write(b"".join(chunk))
                chunk.clear()
        if chunk:
            await response.write(b"".join(chunk))
        await response.write_eof()
        return response

    def make_app(self) -> web.Application:
        """Routes derived from the model: one POST route per operation plus ``/_emulator/*``."""
        app = web.Application(client_max_size=16 * 1024 * 1024)
        for operation in self.model.operations:
            app.router.add_post(operation.uri, self._route(operation))
        app.router.add_get("/_emulator/stats", self._get_stats)
        app.router.add_get("/_emulator/config", self._get_config)
        app.router.add_post("/_emulator/config", self._post_config)
        app.router.add_post("/_emulator/reset", self._post_reset)
        app.router.add_get("/_emulator/{kind}", self._get_records)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def _route(self, operation: Operation) -> Callable[[web.Request], Any]:
        async def route(request: web.Request) -> web.Response:
            return await self.handle(request, operation)

        return route

    async def _on_cleanup(self, app: web.Application) -> None:
        self.close()


def _json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


# --------------------------------------------------------------------------- running it


@dataclass(frozen=True)
class RunningEmulator:
    url: str
    host: str
    port: int
    emulator: Emulator


@contextlib.asynccontextmanager
async def run_emulator(
    host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None, **options: Any
) -> AsyncIterator[RunningEmulator]:
    """Serve an emulator in the current event loop (port 0 picks a free port) until the block exits;
    over TLS (https://) with `ssl_context`."""
    emulator = Emulator(**options)
    runner = web.AppRunner(emulator.make_app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = int(runner.addresses[0][1])
        reachable = "127.0.0.1" if host in ("", "0.0.0.0") else host
        scheme = "https" if ssl_context is not None else "http"
        yield RunningEmulator(f"{scheme}://{reachable}:{bound_port}", host, bound_port, emulator)
    finally:
        await runner.cleanup()
        emulator.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``personalize-worker emulator`` and ``python -m worker.emulator``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8787, help="port; 0 picks a free one (default %(default)s)")
    parser.add_argument("--tracking-ids", default=None, help="comma-separated trackingIds to accept (default any)")
    parser.add_argument("--access-key", default=None, help="only accept this access key id")
    parser.add_argument("--secret-key", default=None, help="verify SigV4 signatures with this secret")
    parser.add_argument("--max-tps", type=float, default=None, help="requests/s before ThrottlingException")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added latency per request")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +/- jitter on the latency")
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered 500")
    parser.add_argument("--outage", action="store_true", help="answer every request 503")
    parser.add_argument("--record", default=None, help="append accepted events as ndjson to this file")
    parser.add_argument("--seed", type=int, default=None, help="seed for error injection and jitter")
    parser.add_argument("--tls-cert", default=None, help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--tls-key", default=None, help="its PEM private key (default: in --tls-cert)")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    tracking = [t.strip() for t in args.tracking_ids.split(",") if t.strip()] if args.tracking_ids else None
    return {
        "tracking_ids": tracking,
        "access_key": args.access_key,
        "secret_key": args.secret_key,
        "max_tps": args.max_tps,
        "latency_ms": args.latency_ms,
        "jitter_ms": args.jitter_ms,
        "error_rate": args.error_rate,
        "outage": args.outage,
        "record": args.record,
        "seed": args.seed,
    }


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server side of --tls-cert/--tls-key, or None for plain HTTP."""
    if cert is None:
        if key is not None:
            raise ValueError("--tls-key needs --tls-cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def _serve_until_signalled(
    host: str, port: int, options: dict[str, Any], ssl_context: ssl.SSLContext | None = None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with run_emulator(host, port, ssl_context, **options) as running:
        # As in the worker: the loaded models and modules out of the cyclic GC's full collections, which
        # otherwise stall every answer for tens of milliseconds and show up as the worker's latency.
        gc.collect()
        gc.freeze()
        scheme = "https" if ssl_context is not None else "http"
        print(f"emulator listening on {scheme}://{host}:{running.port}", flush=True)
        await stop.wait()


def serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; the exit code for the CLI."""
    try:
        context = tls_context(args.tls_cert, args.tls_key)
        asyncio.run(_serve_until_signalled(args.host, args.port, options_from_args(args), context))
    except (OSError, ValueError) as error:
        print(f"emulator: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.emulator", description=(__doc__ or "").split("\n")[0])
    add_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
