"""Schema-registry framed records (Avro, Protobuf, JSON Schema): schema ids resolved before a poll is mapped.

The pipeline's intake is synchronous, so it must never meet a schema it does not have: `Schemas.resolve`
runs between a poll and `Pipeline.ingest`. It peeks each value's bytes 1-5 (Confluent framing: magic byte 0,
a 4-byte big-endian schema id), fetches the ids it has not seen with the async registry client, decodes and
caches them. While the registry cannot be reached (connection, timeout, 5xx, 429, auth) the poll is held by
the source and retried with full-jitter backoff; consumption pauses and the alarm is up (the
`schema_registry_unavailable` metric, a `/readyz` reason, one log line), and nothing is dead-lettered.
Only what is wrong with a record itself is: a value that is not framed, a schema id the registry says does
not exist, a schema that cannot be used, a payload that does not decode: `InvalidRecord("decode", ...)`
naming the schema id, through the usual dead-letter path.

Why not confluent-kafka's deserializers: `AvroDeserializer.__call__` is synchronous and fetches an unknown
schema over HTTP inside the call (httpx, blocking): in an asyncio worker that stalls the loop — heartbeats,
calls in flight, /metrics — for up to the registry's timeout per unknown id, and a registry outage surfaces as
an exception per record, indistinguishable from a bad record without guessing. It also costs ~4x the CPU per
record (its rule and migration machinery runs around the same fastavro read, and it builds datetimes):
31.8 µs against this module's 8.5 µs for the same 15-field record, measured side by side
(`python -m tests.bench --mode decode`, CPU time, best of 11).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import orjson

from worker.backoff import Backoff
from worker.config import Settings
from worker.mapping.avro import AvroDecoder, AvroSchemaError
from worker.mapping.mapper import InvalidRecord, Mapper, SessionKey
from worker.mapping.protobuf import FrameError, ProtobufDecoder, ProtobufSchemaError, build_pool
from worker.mapping.registry import RawSchema, RegistryClient, RegistryUnavailable, SchemaNotFound
from worker.observe.metrics import Metrics

log = logging.getLogger("worker.schemas")  # the pre-move name: log filters match it

MAGIC = 0
HEADER = 5
SCHEMA_TYPES = {"avro": "AVRO", "protobuf": "PROTOBUF", "json_schema": "JSON"}
FAILURE_TTL_SECONDS = 60.0
"""A schema id the registry did not know is asked again after this long (a replica may have caught up)."""
MAX_REFERENCE_DEPTH = 32

Mapped = tuple[SessionKey, dict[str, Any]] | None


class Framed(Protocol):
    @property
    def value(self) -> bytes | None: ...


class Decoder(Protocol):
    schema_id: int

    def decode(self, value: bytes, start: int) -> Any: ...


class JsonDecoder:
    """JSON Schema framing: the payload after the header is the JSON the mapping reads as usual."""

    __slots__ = ("schema_id",)

    def __init__(self, schema_id: int) -> None:
        self.schema_id = schema_id

    def decode(self, value: bytes, start: int) -> Any:
        raise NotImplementedError("json_schema payloads go straight to Mapper.map")


def schema_id_of(value: bytes | None) -> int | None:
    """The schema id of a framed value; None when it is not framed."""
    if value is None or len(value) < HEADER or value[0] != MAGIC:
        return None
    return int.from_bytes(value[1:HEADER], "big")


def not_framed(value: bytes | None) -> InvalidRecord:
    if not value:
        return InvalidRecord("decode", "not_framed", "the value is empty: no schema registry framing")
    if len(value) < HEADER:
        return InvalidRecord("decode", "not_framed", f"{len(value)} bytes: too short for the schema registry framing")
    return InvalidRecord(
        "decode", "not_framed", f"the value starts with byte {value[0]:#04x}, not the schema registry's magic byte 0"
    )


class Schemas:
    """Writer schemas by id: fetched ahead of intake, decoded once, and the per-record decode + map."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        client: RegistryClient | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        format: str | None = None,
    ) -> None:
        """`format`: a route's `mapping.format` (default: the single flow's)."""
        self.format = format or settings.mapping.format
        self._expected_type = SCHEMA_TYPES[self.format]
        r = settings.schema_registry
        self.client = client or RegistryClient(r)
        self._metrics = metrics
        self._backoff = backoff or Backoff(base=0.2, cap=r.retry_max_seconds)
        self._clock = clock
        self._max = r.max_cached_schemas
        self.decoders: dict[int, Decoder] = {}
        self._failures: dict[int, tuple[float, InvalidRecord]] = {}
        self._references: dict[tuple[str, int], RawSchema] = {}
        self._wanted: set[int] = set()
        self._pinned: set[int] = set()
        """The ids of the poll being resolved: never evicted before it is mapped."""
        self._task: asyncio.Task[None] | None = None
        self.blocked_reason: str | None = None
        """Set while the registry cannot be reached: the worker is not ready, and holds its poll."""

    # --- before intake -------------------------------------------------------------------------------

    @staticmethod
    def schema_ids(records: Iterable[Framed]) -> set[int]:
        """The schema ids the framed values among these records name."""
        ids = set()
        for record in records:
            value = record.value
            if value is not None and len(value) >= HEADER and value[0] == MAGIC:
                ids.add(int.from_bytes(value[1:HEADER], "big"))
        return ids

    def _known(self, schema_id: int, now: float) -> bool:
        if schema_id in self.decoders:
            return True
        failure = self._failures.get(schema_id)
        return failure is not None and failure[0] > now

    async def resolve(self, batches: Mapping[Any, Sequence[Framed]], wait: float) -> bool:
        """True once every schema id the poll names is decoded or known to be missing; False if that took
        longer than `wait` seconds (the registry is slow or out of reach: hold the poll, call again)."""
        ids: set[int] = set()
        for records in batches.values():
            ids |= self.schema_ids(records)
        self._pinned = ids
        now = self._clock()
        missing = {i for i in ids if not self._known(i, now)}
        if not missing:
            return True
        self._wanted |= missing
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._fetch_all(), name="schema-registry")
        await asyncio.wait([self._task], timeout=wait)
        now = self._clock()
        return all(self._known(i, now) for i in missing)

    async def _fetch_all(self) -> None:
        """Fetch every wanted id; retry without end (full-jitter backoff) while the registry is unavailable."""
        attempt = 0
        while self._wanted:
            schema_id = min(self._wanted)
            try:
                await self._fetch(schema_id)
            except RegistryUnavailable as error:
                self._metrics.registry_requests.labels("unavailable").inc()
                attempt += 1
                self._alarm(str(error))
                await asyncio.sleep(self._backoff.delay(attempt))
                continue
            self._wanted.discard(schema_id)
        if self.blocked_reason is not None:
            log.info("schema registry reachable again; consumption resumes", extra={"attempts": attempt})
            self.blocked_reason = None
            self._metrics.registry_unavailable.set(0)

    def _alarm(self, why: str) -> None:
        """One log line per outage; the /readyz reason follows the latest error."""
        if self.blocked_reason is None:
            log.error(
                "schema registry unavailable; holding the poll and retrying (nothing is dead-lettered)",
                extra={"error": why, "url": self.client.url},
            )
            self._metrics.registry_unavailable.set(1)
        self.blocked_reason = f"schema registry unavailable, consumption held: {why}"

    async def _fetch(self, schema_id: int) -> None:
        try:
            raw = await self.client.schema_by_id(schema_id)
            try:
                references = await self._references_of(raw, 0)
            except SchemaNotFound as error:
                self._fail(schema_id, "bad_schema", f"schema id {schema_id} cannot be used: {error}")
                return
        except SchemaNotFound as error:
            self._metrics.registry_requests.labels("not_found").inc()
            self._fail(schema_id, "unknown_schema", f"schema id {schema_id} is not in the schema registry ({error})")
            return
        except RegistryUnavailable:
            raise
        except Exception as error:  # a client bug must not end the retry loop silently: loud, and retried
            raise RegistryUnavailable(f"unexpected {type(error).__name__}: {error}"[:300]) from error
        self._metrics.registry_requests.labels("ok").inc()
        if raw.schema_type != self._expected_type:
            self._fail(
                schema_id,
                "wrong_schema_type",
                f"schema id {schema_id} is a {raw.schema_type} schema; mapping.format is {self.format!r}",
            )
            return
        try:
            decoder = await self._decoder(schema_id, raw, references)
        except (AvroSchemaError, ProtobufSchemaError) as error:
            self._fail(schema_id, "bad_schema", f"schema id {schema_id} cannot be used: {error}")
            return
        except Exception as error:  # the schema is at fault, whatever the library raised about it
            self._fail(schema_id, "bad_schema", f"schema id {schema_id} cannot be used: {type(error).__name__}")
            log.warning("a registered schema could not be decoded", exc_info=error, extra={"schema_id": schema_id})
            return
        self._store(schema_id, decoder)

    async def _references_of(self, raw: RawSchema, depth: int) -> list[tuple[str, str]]:
        """(name, text) of every schema `raw` references, transitively, dependencies first."""
        if depth > MAX_REFERENCE_DEPTH:
            raise SchemaNotFound("references nest deeper than 32 (a cycle?)")
        found: list[tuple[str, str]] = []
        for ref in raw.references:
            key = (ref.subject, ref.version)
            target = self._references.get(key)
            if target is None:
                try:
                    target = await self.client.schema_version(ref.subject, ref.version)
                except SchemaNotFound:
                    self._metrics.registry_requests.labels("not_found").inc()
                    where = f"subject {ref.subject!r} version {ref.version}"
                    raise SchemaNotFound(f"its reference {ref.name!r} ({where}) is not in the registry") from None
                if len(self._references) >= self._max:
                    self._references.pop(next(iter(self._references)))
                self._references[key] = target
            for item in (*await self._references_of(target, depth + 1), (ref.name, target.text)):
                if item not in found:
                    found.append(item)
        return found

    async def compile(self, raw: RawSchema) -> Decoder:
        """A decoder for a schema fetched by subject (for `check`); raises what the schema's fault is."""
        references = await self._references_of(raw, 0)
        return await self._decoder(raw.schema_id or 0, raw, references)

    schema_id_of = staticmethod(schema_id_of)

    def decoded(self, value: bytes) -> Any:
        """What a framed value decodes to, for `map` to show; None when it does not decode."""
        schema_id = schema_id_of(value)
        decoder = self.decoders.get(schema_id) if schema_id is not None else None
        try:
            if isinstance(decoder, JsonDecoder):
                return orjson.loads(value[HEADER:])
            return None if decoder is None else decoder.decode(value, HEADER)
        except Exception:  # the dead-letter entry beside it says why
            return None

    async def _decoder(self, schema_id: int, raw: RawSchema, references: list[tuple[str, str]]) -> Decoder:
        if self.format == "avro":
            return AvroDecoder(schema_id, raw.text, [text for _, text in references])
        if self.format == "protobuf":
            pool, main = await asyncio.to_thread(build_pool, schema_id, raw.text, references)
            return ProtobufDecoder(schema_id, pool, main)
        return JsonDecoder(schema_id)

    def _store(self, schema_id: int, decoder: Decoder) -> None:
        # First in, first out: an evicted schema that is still used costs one fetch. The ids of the poll being
        # resolved are kept, or a poll naming more ids than the bound could never be mapped.
        while len(self.decoders) >= self._max:
            victim = next((i for i in self.decoders if i not in self._pinned), None)
            if victim is None:
                break
            del self.decoders[victim]
        self.decoders[schema_id] = decoder
        self._failures.pop(schema_id, None)
        self._metrics.schemas_cached.set(len(self.decoders))

    def _fail(self, schema_id: int, reason: str, message: str) -> None:
        if len(self._failures) >= self._max:
            self._failures.pop(next(iter(self._failures)))
        self._failures[schema_id] = (self._clock() + FAILURE_TTL_SECONDS, InvalidRecord("decode", reason, message))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()

    # --- intake: one call per record -----------------------------------------------------------------

    def failure(self, schema_id: int) -> InvalidRecord:
        failure = self._failures.get(schema_id)
        if failure is None:
            raise LookupError(f"schema id {schema_id} was not resolved before intake (a bug)")
        return failure[1]

    def mapping(self, mapper: Mapper) -> Callable[[bytes | None], Mapped]:
        """`Mapper.map` for framed values: decode with the writer's schema, then map as JSON would be."""
        decoders = self.decoders
        failure = self.failure
        if self.format == "json_schema":
            map_json = mapper.map

            def map_json_schema(value: bytes | None) -> Mapped:
                if value is None or len(value) < HEADER or value[0] != MAGIC:
                    raise not_framed(value)
                schema_id = int.from_bytes(value[1:HEADER], "big")
                if schema_id not in decoders:
                    raise failure(schema_id)
                try:
                    return map_json(value[HEADER:])
                except InvalidRecord as error:
                    if error.stage == "decode":
                        raise InvalidRecord("decode", error.reason, f"schema id {schema_id}: {error.message}") from None
                    raise

            return map_json_schema

        map_object = mapper.map_object
        decode = self.objects()

        def map_framed(value: bytes | None) -> Mapped:
            return map_object(decode(value))

        return map_framed

    def objects(self) -> Callable[[bytes | None], dict[str, Any]]:
        """Framed value → the record as a dict, what `Mapper.map_object` reads (a route that looks at a field
        before mapping — `tracking_id_field` — decodes with this, then maps)."""
        decoders = self.decoders
        failure = self.failure
        fmt = self.format
        kind = {"avro": "Avro", "protobuf": "Protobuf"}.get(fmt, "JSON")

        def decode(value: bytes | None) -> dict[str, Any]:
            if value is None or len(value) < HEADER or value[0] != MAGIC:
                raise not_framed(value)
            schema_id = int.from_bytes(value[1:HEADER], "big")
            decoder = decoders.get(schema_id)
            if decoder is None:
                raise failure(schema_id)
            try:
                obj = orjson.loads(value[HEADER:]) if fmt == "json_schema" else decoder.decode(value, HEADER)
            except FrameError as error:
                raise InvalidRecord("decode", "bad_frame", f"schema id {schema_id}: {error}") from None
            except Exception as error:  # whatever the decoder raises, the payload is at fault
                message = f"schema id {schema_id}: the {kind} payload does not decode: {type(error).__name__}: {error}"
                raise InvalidRecord("decode", "bad_payload", message[:500]) from None
            if type(obj) is not dict:
                raise InvalidRecord("decode", "not_object", f"schema id {schema_id}: the {kind} value is not a record")
            return obj

        return decode


class TopicSchemas:
    """With routes: one `Schemas` per format in use, each resolving the records of its routes' topics (a
    JSON route's records are never peeked); the source and the readiness check see one face."""

    def __init__(self, by_topic: Mapping[str, Schemas]) -> None:
        self._by_topic = dict(by_topic)
        self.all = list({id(s): s for s in by_topic.values()}.values())

    @property
    def blocked_reason(self) -> str | None:
        return next((s.blocked_reason for s in self.all if s.blocked_reason), None)

    async def resolve(self, batches: Mapping[Any, Sequence[Framed]], wait: float) -> bool:
        groups: dict[int, tuple[Schemas, dict[Any, Sequence[Framed]]]] = {}
        for tp, records in batches.items():
            schemas = self._by_topic.get(tp.topic)
            if schemas is not None:
                groups.setdefault(id(schemas), (schemas, {}))[1][tp] = records
        results = await asyncio.gather(*(s.resolve(part, wait) for s, part in groups.values()))
        return all(results)

    async def close(self) -> None:
        for schemas in self.all:
            await schemas.close()
