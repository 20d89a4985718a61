"""Schema ids resolved before intake: caching, what is dead-lettered and what holds consumption; the registry
client's reading of HTTP answers (real sockets, and the real registry for its own "not found")."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import fastavro
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from tests.kafka_support import free_port
from tests.registry_support import SchemaRegistry
from worker.backoff import Backoff
from worker.config import SchemaRegistrySettings, Settings
from worker.mapping.mapper import InvalidRecord, Mapper
from worker.mapping.registry import RawSchema, Reference, RegistryClient, RegistryUnavailable, SchemaNotFound
from worker.mapping.schemas import Schemas
from worker.observe.metrics import Metrics

AVRO = {
    "type": "record",
    "name": "Click",
    "fields": [
        {"name": "session_id", "type": "string"},
        {"name": "event_type", "type": "string"},
        {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "event_id", "type": "string"},
    ],
}
RECORD = {"session_id": "s1", "event_type": "click", "timestamp": 1_790_000_000_123, "event_id": "e1"}


@dataclass
class Rec:
    value: bytes | None


def framed(schema_id: int, record: dict[str, Any] = RECORD, schema: dict[str, Any] = AVRO) -> bytes:
    out = io.BytesIO(b"\x00" + schema_id.to_bytes(4, "big"))
    out.seek(5)
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return out.getvalue()


class FakeRegistry:
    """`RegistryClient`'s calls, answered from a table; `down` makes every call fail as unreachable."""

    url = "http://registry.test"

    def __init__(self, schemas: dict[int, RawSchema]) -> None:
        self.schemas = schemas
        self.versions: dict[tuple[str, int], RawSchema] = {}
        self.calls: list[Any] = []
        self.down = False

    async def schema_by_id(self, schema_id: int) -> RawSchema:
        self.calls.append(schema_id)
        if self.down:
            raise RegistryUnavailable("cannot reach http://registry.test: refused")
        if schema_id not in self.schemas:
            raise SchemaNotFound("error code 40403")
        return self.schemas[schema_id]

    async def schema_version(self, subject: str, version: int | str) -> RawSchema:
        self.calls.append((subject, version))
        return self.versions[(subject, int(version))]

    async def close(self) -> None:
        pass


def settings(fmt: str = "avro", **registry: Any) -> Settings:
    return Settings.model_validate(
        {
            "personalize": {"tracking_id": "t"},
            "mapping": {"format": fmt},
            "schema_registry": {"url": "http://registry.test", **registry},
        }
    )


def make(
    fake: FakeRegistry, fmt: str = "avro", clock: Callable[[], float] | None = None, **registry: Any
) -> tuple[Schemas, Metrics]:
    metrics = Metrics()
    s = settings(fmt, **registry)
    no_wait = Backoff(base=0.001, cap=0.001, rng=lambda low, high: 0.0)
    schemas = Schemas(s, metrics, client=fake, backoff=no_wait, **({"clock": clock} if clock else {}))  # type: ignore[arg-type]
    return schemas, metrics


def avro_schema(schema: dict[str, Any] = AVRO) -> RawSchema:
    return RawSchema("AVRO", orjson.dumps(schema).decode())


async def test_ids_are_fetched_once_then_records_map_like_json() -> None:
    fake = FakeRegistry({3: avro_schema()})
    schemas, metrics = make(fake)
    values = [framed(3), framed(3, {**RECORD, "event_id": "e2"})]
    assert await schemas.resolve({"p": [Rec(v) for v in values]}, wait=5)
    assert await schemas.resolve({"p": [Rec(values[0])]}, wait=5)
    assert fake.calls == [3]
    mapped = schemas.mapping(Mapper(settings().mapping))
    result = mapped(values[1])
    assert result is not None
    key, event = result
    assert key == ("s1", None)
    assert event == {"eventType": "click", "sentAt": 1_790_000_000.123, "eventId": "e2"}
    assert metrics.registry.get_sample_value("personalize_worker_schemas_cached") == 1
    assert (
        metrics.registry.get_sample_value("personalize_worker_schema_registry_requests_total", {"outcome": "ok"}) == 1
    )


async def test_what_is_wrong_with_a_record_is_a_decode_dead_letter_naming_the_schema_id() -> None:
    fake = FakeRegistry(
        {
            3: avro_schema(),
            4: RawSchema("PROTOBUF", 'syntax = "proto3"; message A {}'),
            5: RawSchema("AVRO", "{not json"),
        }
    )
    schemas, _ = make(fake)
    records = [framed(3), framed(4), framed(5), framed(77)]
    assert await schemas.resolve({"p": [Rec(v) for v in records]}, wait=5)
    mapped = schemas.mapping(Mapper(settings().mapping))
    cases = {
        framed(77): ("unknown_schema", "schema id 77 is not in the schema registry"),
        framed(4): ("wrong_schema_type", "schema id 4 is a PROTOBUF schema; mapping.format is 'avro'"),
        framed(5): ("bad_schema", "schema id 5 cannot be used"),
        framed(3)[:-4]: ("bad_payload", "schema id 3: the Avro payload does not decode"),
        framed(3) + b"\x00": ("bad_payload", "1 bytes left"),
        b'{"session_id": "s"}': ("not_framed", "not the schema registry's magic byte 0"),
        b"\x00\x00\x01": ("not_framed", "too short"),
        b"": ("not_framed", "empty"),
        framed(3, {"x": 1}, {"type": "record", "name": "X", "fields": [{"name": "x", "type": "int"}]}): (
            "bad_payload",
            "schema id 3",
        ),
    }
    for value, (reason, text) in cases.items():
        with pytest.raises(InvalidRecord) as info:
            mapped(value)
        assert (info.value.stage, info.value.reason) == ("decode", reason), value
        assert text in info.value.message


async def test_an_unreachable_registry_holds_the_poll_with_one_alarm_then_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeRegistry({3: avro_schema()})
    fake.down = True
    schemas, metrics = make(fake)
    poll = {"p": [Rec(framed(3))]}
    with caplog.at_level(logging.INFO, logger="worker.schemas"):
        assert not await schemas.resolve(poll, wait=0.2)
        assert not await schemas.resolve(poll, wait=0.2)
        assert schemas.blocked_reason is not None and "refused" in schemas.blocked_reason
        assert metrics.registry.get_sample_value("personalize_worker_schema_registry_unavailable") == 1
        assert len(fake.calls) > 2, "retried while held"
        fake.down = False
        assert await schemas.resolve(poll, wait=5)
    assert schemas.blocked_reason is None
    assert metrics.registry.get_sample_value("personalize_worker_schema_registry_unavailable") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("schema registry unavailable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1
    assert schemas.mapping(Mapper(settings().mapping))(framed(3)) is not None
    await schemas.close()


async def test_a_missing_id_is_asked_again_after_a_while() -> None:
    now = [0.0]
    fake = FakeRegistry({})
    schemas, _ = make(fake, clock=lambda: now[0])
    poll = {"p": [Rec(framed(9))]}
    assert await schemas.resolve(poll, wait=5)
    assert await schemas.resolve(poll, wait=5)
    assert fake.calls == [9]
    fake.schemas[9] = avro_schema()
    now[0] = 61.0
    assert await schemas.resolve(poll, wait=5)
    assert fake.calls == [9, 9]
    assert schemas.mapping(Mapper(settings().mapping))(framed(9)) is not None


async def test_a_poll_naming_more_ids_than_the_cache_holds_is_still_mapped() -> None:
    fake = FakeRegistry({i: avro_schema() for i in range(1, 6)})
    schemas, _ = make(fake, max_cached_schemas=2)
    assert await schemas.resolve({"p": [Rec(framed(i)) for i in (1, 2)]}, wait=5)
    values = [framed(i) for i in (3, 4, 5, 1)]
    assert await schemas.resolve({"p": [Rec(v) for v in values]}, wait=5)
    mapped = schemas.mapping(Mapper(settings().mapping))
    assert all(mapped(v) is not None for v in values)
    assert await schemas.resolve({"p": [Rec(framed(1))]}, wait=5)
    assert len(schemas.decoders) <= 4


async def test_references_are_fetched_once_for_every_schema_that_imports_them() -> None:
    money = {"type": "record", "name": "Money", "fields": [{"name": "cents", "type": "long"}]}
    click = {**AVRO, "fields": [*AVRO["fields"], {"name": "price", "type": "Money"}]}
    ref = (Reference("Money", "money", 1),)
    fake = FakeRegistry(
        {
            3: RawSchema("AVRO", orjson.dumps(click).decode(), ref),
            4: RawSchema("AVRO", orjson.dumps(click).decode(), ref),
        }
    )
    fake.versions[("money", 1)] = avro_schema(money)
    schemas, _ = make(fake)
    named: dict[str, Any] = {}
    fastavro.parse_schema(money, named)
    out = io.BytesIO(b"\x00\x00\x00\x00\x04")
    out.seek(5)
    fastavro.schemaless_writer(out, fastavro.parse_schema(click, named), {**RECORD, "price": {"cents": 5}})
    assert await schemas.resolve({"p": [Rec(framed(3, schema=AVRO)[:5]), Rec(out.getvalue())]}, wait=5)
    assert fake.calls.count(("money", 1)) == 1
    assert schemas.mapping(Mapper(settings().mapping))(out.getvalue()) is not None


async def test_a_schema_whose_reference_is_missing_cannot_be_used() -> None:
    click = {**AVRO, "fields": [*AVRO["fields"], {"name": "price", "type": "Money"}]}
    fake = FakeRegistry({3: RawSchema("AVRO", orjson.dumps(click).decode(), (Reference("Money", "money", 4),))})
    fake.versions = {}
    schemas, _ = make(fake)

    async def missing(subject: str, version: int | str) -> RawSchema:
        raise SchemaNotFound("error code 40402")

    fake.schema_version = missing  # type: ignore[method-assign]
    assert await schemas.resolve({"p": [Rec(framed(3))]}, wait=5)
    with pytest.raises(InvalidRecord) as info:
        schemas.mapping(Mapper(settings().mapping))(framed(3))
    assert info.value.reason == "bad_schema"
    assert "schema id 3 cannot be used: its reference 'Money' (subject 'money' version 4)" in info.value.message


async def test_json_schema_payloads_map_as_json_and_errors_name_the_schema_id() -> None:
    fake = FakeRegistry({8: RawSchema("JSON", '{"type": "object"}')})
    schemas, _ = make(fake, fmt="json_schema")
    good = b"\x00\x00\x00\x00\x08" + orjson.dumps({"session_id": "s", "event_type": "v", "timestamp": 1790000000})
    assert await schemas.resolve({"p": [Rec(good)]}, wait=5)
    mapped = schemas.mapping(Mapper(settings().mapping))
    assert mapped(good) is not None
    with pytest.raises(InvalidRecord, match="schema id 8: not valid JSON"):
        mapped(b"\x00\x00\x00\x00\x08{")


# --- the HTTP client -------------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def fake_server() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A registry stand-in on a real socket: answers with `state["status"]` and `state["body"]`."""
    state: dict[str, Any] = {"status": 200, "body": {"schema": '"string"'}, "delay": 0.0, "auth": None}

    async def answer(request: web.Request) -> web.Response:
        state["auth"] = request.headers.get("Authorization")
        await asyncio.sleep(state["delay"])
        return web.Response(status=state["status"], body=orjson.dumps(state["body"]), content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/api", state
    finally:
        await runner.cleanup()


async def test_client_tells_not_found_from_unavailable(fake_server: tuple[str, dict[str, Any]]) -> None:
    url, state = fake_server
    client = RegistryClient(
        SchemaRegistrySettings(url=url, username="svc", password="s3cret", request_timeout_seconds=0.5)  # type: ignore[arg-type]
    )
    try:
        raw = await client.schema_by_id(1)
        assert (raw.schema_type, raw.text, raw.schema_id) == ("AVRO", '"string"', 1)
        assert state["auth"] == "Basic " + base64.b64encode(b"svc:s3cret").decode()
        state.update(status=404, body={"error_code": 40403, "message": "secret detail"})
        with pytest.raises(SchemaNotFound):
            await client.schema_by_id(1)
        cases = [
            (404, {"error_code": 0, "message": "no such path"}, "without a registry error code"),
            (500, {"message": "boom"}, "HTTP 500"),
            (401, {}, "check schema_registry.username and password"),
            (429, {}, "HTTP 429"),
            (200, ["not a schema"], "without a schema"),
        ]
        for status, body, text in cases:
            state.update(status=status, body=body)
            with pytest.raises(RegistryUnavailable, match=text) as info:
                await client.schema_by_id(1)
            assert "detail" not in str(info.value) and "boom" not in str(info.value), "never the body"
        state.update(status=200, body={"schema": "x"}, delay=2.0)
        with pytest.raises(RegistryUnavailable, match=r"no answer within 0\.5s"):
            await client.schema_by_id(1)
    finally:
        await client.close()
    refused = RegistryClient(SchemaRegistrySettings(url=f"http://127.0.0.1:{free_port()}"))
    try:
        with pytest.raises(RegistryUnavailable, match="cannot reach"):
            await refused.subjects()
    finally:
        await refused.close()


async def test_client_against_the_real_registry(schema_registry: SchemaRegistry) -> None:
    schema_id = await asyncio.to_thread(schema_registry.register, "client-test-value", orjson.dumps(AVRO).decode())
    client = RegistryClient(SchemaRegistrySettings(url=schema_registry.url))
    root = RegistryClient(SchemaRegistrySettings(url=schema_registry.url.removesuffix("/apis/ccompat/v7")))
    try:
        raw = await client.schema_by_id(schema_id)
        assert raw.schema_type == "AVRO" and orjson.loads(raw.text) == AVRO
        latest = await client.schema_version("client-test-value", "latest")
        assert (latest.schema_id, latest.version) == (schema_id, 1)
        assert "client-test-value" in await client.subjects()
        with pytest.raises(SchemaNotFound):
            await client.schema_by_id(999_999)
        with pytest.raises(SchemaNotFound):
            await client.schema_version("no-such-subject", 1)
        with pytest.raises(RegistryUnavailable, match=r"is schema_registry\.url the API's base URL"):
            await root.schema_by_id(schema_id)
    finally:
        await client.close()
        await root.close()
