"""End to end with a real schema registry: Avro, Protobuf and JSON Schema topics through `run --until-drained`.

Producers use confluent-kafka's official serializers against Apicurio Registry; the worker decodes with
the writer's schema from the same registry and delivers to the emulator. Every record is accounted for:
delivered field for field, or dead-lettered with stage `decode`, its reason and its schema id.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.formats_support import (
    AVRO_V1,
    AVRO_V2,
    CLICK_PROTO,
    COMMON_PROTO,
    JSON_SCHEMA,
    avro_object,
    avro_serializer,
    check_event,
    click_message,
    click_pb2,
    context,
    frame,
    json_serializer,
    produced,
    protobuf_serializer,
)
from tests.kafka_support import TopicFactory, committed_offsets, consume_all, end_offsets, free_port, produce
from tests.registry_support import SchemaRegistry
from tests.stack import AWS_ENV, EmulatorProcess, WorkerFactory, wait_until, write_config
from worker.commands.sample import generate

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

UNKNOWN_ID = 987_654


def header(record: Any, name: str) -> str:
    value: bytes = dict(record.headers)[name]
    return value.decode()


def sources(count: int, seed: int) -> list[dict[str, Any]]:
    stream = generate(count, seed=seed, concurrent_sessions=60, duplicate_rate=0.0, malformed_rate=0.0)
    return [m.source for m in stream.messages if m.source is not None]


def registry_config(factory: WorkerFactory, topic: str, dlq: str, fmt: str, url: str) -> dict[str, dict[str, Any]]:
    return factory.config(
        topic, dlq, f"{topic}-group", mapping={"format": fmt}, schema_registry={"url": url, "retry_max_seconds": 1}
    )


async def drain(factory: WorkerFactory, sections: dict[str, dict[str, Any]], topic: str) -> None:
    worker = factory(sections, until_drained=True)
    assert await worker.await_exit(180) == 0, worker.log_tail()
    bootstrap = factory.broker.bootstrap
    assert await committed_offsets(bootstrap, f"{topic}-group", topic) == await end_offsets(bootstrap, topic)


async def dead_letters(bootstrap: str, dlq: str, expected: int) -> dict[tuple[int, int], Any]:
    records = await consume_all(bootstrap, dlq, timeout=30, min_records=expected)
    assert len(records) == expected
    for record in records:
        assert header(record, "dlq.error.stage") == "decode"
    return {(int(header(r, "dlq.source.partition")), int(header(r, "dlq.source.offset"))): r for r in records}


async def test_avro_with_schema_evolution_mid_stream_and_bad_frames(
    topic_factory: TopicFactory,
    worker_factory: WorkerFactory,
    emulator: EmulatorProcess,
    schema_registry: SchemaRegistry,
) -> None:
    """v1 records, then v2 (a field added with a default) on the same topic: each decodes with its writer's
    schema, so v1 events carry no eventValue and v2 purchases do. Corrupt frames, an unknown schema id, an
    unframed value and a schema of the wrong type are dead-lettered with stage decode and the schema id."""
    bootstrap = worker_factory.broker.bootstrap
    topic, dlq = await topic_factory(partitions=3), await topic_factory(partitions=1)
    objects = sources(1200, seed=21)
    first, second = objects[:600], objects[600:]
    with schema_registry.client() as client:
        v1, v2 = avro_serializer(client, AVRO_V1), avro_serializer(client, AVRO_V2)
        values = [produced(v1(avro_object(s, with_value=False), context(topic))) for s in first]
        values += [produced(v2(avro_object(s, with_value=True), context(topic))) for s in second]
        json_value = produced(json_serializer(client)(first[3], context(f"{topic}-other")))
    v1_id, v2_id = int.from_bytes(values[0][1:5], "big"), int.from_bytes(values[-1][1:5], "big")
    assert v1_id != v2_id
    good = [(s["session_id"].encode(), v) for s, v in zip(objects, values, strict=True)]
    bad = {
        "bad_payload": frame(v1_id, values[0][5:-3]),  # cut short
        "unknown_schema": frame(UNKNOWN_ID, values[1][5:]),
        "not_framed": orjson.dumps(first[2]),
        "wrong_schema_type": json_value,
    }
    placed = await produce(bootstrap, topic, [*good[:300], *((b"bad", v) for v in bad.values()), *good[300:]])
    bad_at = {reason: (md.partition, md.offset) for reason, md in zip(bad, placed[300:304], strict=True)}

    await drain(worker_factory, registry_config(worker_factory, topic, dlq, "avro", schema_registry.url), topic)

    events = await asyncio.to_thread(emulator.events)
    assert Counter(e["eventId"] for e in events) == Counter(s["event_id"] for s in objects)
    by_id = {e["eventId"]: e for e in events}
    for source in first:
        check_event(by_id[source["event_id"]], source, with_value=False)
    for source in second:
        check_event(by_id[source["event_id"]], source, with_value=True)
    assert any("eventValue" in by_id[s["event_id"]] for s in second), "the data must exercise the new field"

    letters = await dead_letters(bootstrap, dlq, len(bad))
    for reason, where in bad_at.items():
        letter = letters[where]
        assert header(letter, "dlq.error.reason") == reason
        assert letter.value == bad[reason]
    assert f"schema id {v1_id}" in header(letters[bad_at["bad_payload"]], "dlq.error.message")
    assert f"schema id {UNKNOWN_ID} is not in the schema registry" in header(
        letters[bad_at["unknown_schema"]], "dlq.error.message"
    )
    assert "is a JSON schema" in header(letters[bad_at["wrong_schema_type"]], "dlq.error.message")


async def test_protobuf_registered_by_the_serializer_and_as_proto_text(
    topic_factory: TopicFactory,
    worker_factory: WorkerFactory,
    emulator: EmulatorProcess,
    schema_registry: SchemaRegistry,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """One topic, two producers of the same message: confluent's ProtobufSerializer (base64 descriptors, its
    import registered as a reference) and a producer that registered .proto text through the REST API, as
    Java and Go tools do (Apicurio returns it as text). The message is the file's second, so every frame
    carries the message index [1]; a nested-message index and a bad index list are checked too."""
    bootstrap = worker_factory.broker.bootstrap
    topic, dlq = await topic_factory(partitions=3), await topic_factory(partitions=1)
    module = click_pb2(tmp_path_factory.mktemp("proto"))
    common_id = await asyncio.to_thread(schema_registry.register, f"{topic}-common", COMMON_PROTO, "PROTOBUF")
    assert common_id > 0
    reference = {"name": "shop/common.proto", "subject": f"{topic}-common", "version": 1}
    text_id = await asyncio.to_thread(
        schema_registry.register, f"{topic}-text-value", CLICK_PROTO, "PROTOBUF", [reference]
    )
    objects = sources(800, seed=22)
    values = []
    with schema_registry.client() as client:
        serializer = protobuf_serializer(client, module)
        for n, source in enumerate(objects):
            message = click_message(module, source)
            if n % 2:
                values.append(frame(text_id, message.SerializeToString(), indexes=b"\x02\x02"))
            else:
                value = serializer(message, context(topic))
                assert value is not None and value[5:7] == b"\x02\x02", "the serializer frames index [1]"
                values.append(value)
    serialized_id = int.from_bytes(values[0][1:5], "big")
    assert serialized_id != text_id
    debug = module.Click.Debug(note="n").SerializeToString()
    bad = {
        # [1, 0] is Click.Debug: it decodes, and has no sessionId to map.
        "missing_field": frame(text_id, debug, indexes=b"\x04\x02\x00"),
        "bad_frame": frame(serialized_id, b"", indexes=b"\x02\x0e"),  # index 7: no such message
    }
    good = [(s["session_id"].encode(), v) for s, v in zip(objects, values, strict=True)]
    placed = await produce(bootstrap, topic, [*good[:100], *((b"bad", v) for v in bad.values()), *good[100:]])
    bad_at = {reason: (md.partition, md.offset) for reason, md in zip(bad, placed[100:102], strict=True)}

    await drain(worker_factory, registry_config(worker_factory, topic, dlq, "protobuf", schema_registry.url), topic)

    events = await asyncio.to_thread(emulator.events)
    assert Counter(e["eventId"] for e in events) == Counter(s["event_id"] for s in objects)
    by_id = {e["eventId"]: e for e in events}
    for source in objects:
        check_event(by_id[source["event_id"]], source)
    records = await consume_all(bootstrap, dlq, timeout=30, min_records=len(bad))
    letters = {(int(header(r, "dlq.source.partition")), int(header(r, "dlq.source.offset"))): r for r in records}
    assert len(letters) == len(bad)
    assert header(letters[bad_at["missing_field"]], "dlq.error.stage") == "mapping"
    frame_letter = letters[bad_at["bad_frame"]]
    assert header(frame_letter, "dlq.error.stage") == "decode"
    assert header(frame_letter, "dlq.error.reason") == "bad_frame"
    assert f"schema id {serialized_id}" in header(frame_letter, "dlq.error.message")


async def test_json_schema_topic(
    topic_factory: TopicFactory,
    worker_factory: WorkerFactory,
    emulator: EmulatorProcess,
    schema_registry: SchemaRegistry,
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    topic, dlq = await topic_factory(partitions=2), await topic_factory(partitions=1)
    objects = sources(500, seed=23)
    with schema_registry.client() as client:
        serializer = json_serializer(client)
        values = [serializer(s, context(topic)) for s in objects]
    assert values[0] is not None
    schema_id = int.from_bytes(values[0][1:5], "big")
    bad = {"not_json": frame(schema_id, b'{"session_id": '), "unknown_schema": frame(UNKNOWN_ID, b"{}")}
    good = [(s["session_id"].encode(), v) for s, v in zip(objects, values, strict=True)]
    placed = await produce(bootstrap, topic, [*((b"bad", v) for v in bad.values()), *good])
    bad_at = {reason: (md.partition, md.offset) for reason, md in zip(bad, placed[:2], strict=True)}

    await drain(worker_factory, registry_config(worker_factory, topic, dlq, "json_schema", schema_registry.url), topic)

    events = await asyncio.to_thread(emulator.events)
    assert Counter(e["eventId"] for e in events) == Counter(s["event_id"] for s in objects)
    by_id = {e["eventId"]: e for e in events}
    for source in objects:
        check_event(by_id[source["event_id"]], source)
    letters = await dead_letters(bootstrap, dlq, len(bad))
    for reason, where in bad_at.items():
        assert header(letters[where], "dlq.error.reason") == reason
    assert f"schema id {schema_id}" in header(letters[bad_at["not_json"]], "dlq.error.message")
    assert JSON_SCHEMA["title"] == "Click"


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.chaos
async def test_registry_outage_holds_consumption_and_loses_nothing(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, emulator: EmulatorProcess, tmp_path: Path
) -> None:
    """The registry stops for 20 s while records with a schema id the worker has not seen arrive: the poll
    is held (nothing dead-lettered, nothing committed past it), /readyz says why with a 503 and the metric is
    up; once the registry is back, every record is delivered exactly once."""
    bootstrap = worker_factory.broker.bootstrap
    registry = SchemaRegistry(port=free_port(), dir=tmp_path / "registry", persistent=True)
    await registry.astart()
    try:
        topic, dlq = await topic_factory(partitions=3), await topic_factory(partitions=1)
        objects = sources(900, seed=24)
        first, second = objects[:400], objects[400:]
        with registry.client() as client:
            v1, v2 = avro_serializer(client, AVRO_V1), avro_serializer(client, AVRO_V2)
            before = [(s["session_id"].encode(), v1(avro_object(s, with_value=False), context(topic))) for s in first]
            after = [(s["session_id"].encode(), v2(avro_object(s, with_value=True), context(topic))) for s in second]
        await produce(bootstrap, topic, before)
        sections = registry_config(worker_factory, topic, dlq, "avro", registry.url)
        sections["schema_registry"]["request_timeout_seconds"] = 2
        worker = worker_factory(sections)
        group = f"{topic}-group"
        first_ends = await wait_committed(bootstrap, group, topic, timeout=120)

        await registry.astop()
        stopped = time.monotonic()
        await produce(bootstrap, topic, after)
        deadline = stopped + 30
        status, reason = await asyncio.to_thread(readyz, worker.metrics_port)
        while status != 503 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            status, reason = await asyncio.to_thread(readyz, worker.metrics_port)
        assert status == 503 and "schema registry unavailable" in reason, (status, reason)
        metrics = await asyncio.to_thread(worker.metrics)
        assert metrics["personalize_worker_schema_registry_unavailable"] == 1
        while metrics["personalize_worker_consumption_paused"] != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the partitions pause once the poll's wait for its schemas ends
            metrics = await asyncio.to_thread(worker.metrics)
        assert metrics["personalize_worker_consumption_paused"] == 1
        while time.monotonic() < stopped + 20:  # the outage: held, nothing lost, nothing dead-lettered
            await asyncio.sleep(2)
            assert await committed_offsets(bootstrap, group, topic) == first_ends
            assert (await asyncio.to_thread(readyz, worker.metrics_port))[0] == 503
        assert await consume_all(bootstrap, dlq, timeout=5) == []
        assert len(await asyncio.to_thread(emulator.events)) == len(first)

        await registry.astart()
        await wait_committed(bootstrap, group, topic, timeout=120)
        assert (await asyncio.to_thread(readyz, worker.metrics_port))[0] == 200
        metrics = await asyncio.to_thread(worker.metrics)
        assert metrics["personalize_worker_schema_registry_unavailable"] == 0
        worker.signal(signal.SIGTERM)
        assert await worker.await_exit(60) == 0
    finally:
        await registry.astop()

    events = await asyncio.to_thread(emulator.events)
    assert Counter(e["eventId"] for e in events) == Counter(s["event_id"] for s in objects)
    by_id = {e["eventId"]: e for e in events}
    for source in second:
        check_event(by_id[source["event_id"]], source)
    assert await consume_all(bootstrap, dlq, timeout=5) == []
    log = worker.log_text()
    assert log.count("schema registry unavailable; holding the poll") == 1, "one log line for the outage"
    assert log.count("schema registry reachable again") == 1


async def test_until_drained_never_counts_a_held_poll_as_drained(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, schema_registry: SchemaRegistry
) -> None:
    """`run --until-drained` with the registry out of reach: the consumer's position is at the end of the
    topic, but the poll is held, unmapped: the worker must neither commit past it nor exit as drained."""
    bootstrap = worker_factory.broker.bootstrap
    topic, dlq = await topic_factory(partitions=1), await topic_factory(partitions=1)
    with schema_registry.client() as client:
        serializer = avro_serializer(client, AVRO_V1)
        values = [produced(serializer(avro_object(s, with_value=False), context(topic))) for s in sources(20, 26)]
    await produce(bootstrap, topic, values)
    sections = registry_config(worker_factory, topic, dlq, "avro", f"http://127.0.0.1:{free_port()}")
    worker = worker_factory(sections, until_drained=True)
    alarmed = await asyncio.to_thread(wait_until, lambda: "schema registry unavailable" in worker.log_text(), 60)
    assert alarmed, worker.log_tail()
    await asyncio.sleep(5)  # several drain checks (every 0.1 s) while held
    assert worker.running, worker.log_tail()
    assert await committed_offsets(bootstrap, f"{topic}-group", topic) in ({}, {0: 0})
    worker.signal(signal.SIGTERM)
    assert await worker.await_exit(60) == 0
    assert await committed_offsets(bootstrap, f"{topic}-group", topic) in ({}, {0: 0})
    assert await consume_all(bootstrap, dlq, timeout=5) == []


async def wait_committed(bootstrap: str, group: str, topic: str, timeout: float) -> dict[int, int]:
    ends = await end_offsets(bootstrap, topic)
    deadline = time.monotonic() + timeout
    committed: dict[int, int] = {}
    while time.monotonic() < deadline:
        committed = await committed_offsets(bootstrap, group, topic)
        if committed == ends:
            return committed
        await asyncio.sleep(0.5)
    raise AssertionError(f"committed {committed} never reached end offsets {ends}")


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        timeout=timeout,
        env={**AWS_ENV, "PATH": "/usr/bin:/bin"},
        check=False,
    )


async def test_map_shows_decoded_records_and_check_compares_the_mapping(
    topic_factory: TopicFactory, worker_factory: WorkerFactory, schema_registry: SchemaRegistry, tmp_path: Path
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    topic = await topic_factory(partitions=1)
    objects = sources(4, seed=25)
    with schema_registry.client() as client:
        serializer = avro_serializer(client, AVRO_V1)
        values = [produced(serializer(avro_object(s, with_value=False), context(topic))) for s in objects]
    schema_id = int.from_bytes(values[0][1:5], "big")
    await produce(bootstrap, topic, values)
    sections = registry_config(worker_factory, topic, f"{topic}.dlq", "avro", schema_registry.url)
    config = str(write_config(tmp_path / "w.toml", sections))

    lines = [b"# one record value per line", *(base64.b64encode(v) for v in values[:2])]
    lines.append(base64.b64encode(frame(UNKNOWN_ID, values[2][5:])))
    (tmp_path / "records.b64").write_bytes(b"\n".join(lines) + b"\n")
    result = await asyncio.to_thread(run_cli, "map", "--config", config, "--input", str(tmp_path / "records.b64"))
    assert result.returncode == 0, result.stderr
    out = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert out[0]["schema_id"] == schema_id
    assert out[0]["decoded"] == avro_object(objects[0], with_value=False)
    assert out[0]["event"]["eventId"] == objects[0]["event_id"]
    assert out[2]["dead_letter"]["reason"] == "unknown_schema" and out[2]["schema_id"] == UNKNOWN_ID
    assert out[-1]["summary"]["events"] == 2 and out[-1]["summary"]["dead_lettered"] == 1

    (tmp_path / "records.hex").write_bytes(values[3].hex().encode() + b"\n")
    hexed = await asyncio.to_thread(
        run_cli, "map", "--config", config, "--input", str(tmp_path / "records.hex"), "--encoding", "hex"
    )
    assert orjson.loads(hexed.stdout.splitlines()[0])["event"]["eventId"] == objects[3]["event_id"]

    result = await asyncio.to_thread(
        run_cli, "map", "--config", config, "--topic", topic, "--offset", "1", "--count", "9"
    )
    assert result.returncode == 0, result.stderr
    out = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [entry["offset"] for entry in out[:-1]] == [1, 2, 3]
    assert [entry["event"]["eventId"] for entry in out[:-1]] == [s["event_id"] for s in objects[1:]]
    result = await asyncio.to_thread(run_cli, "map", "--config", config, "--topic", topic, "--partition", "3")
    assert result.returncode == 1 and f"{topic}-3 does not exist".encode() in result.stderr

    result = await asyncio.to_thread(run_cli, "check", "--config", config)
    text = result.stdout.decode()
    assert f"[ok  ] subject '{topic}-value': latest schema id {schema_id}, version 1, AVRO" in text, text
    assert "[ok  ] mapping vs" in text and "not in it (unmapped): event_value, impression, recommendation_id" in text
    assert result.returncode == 0, text

    missing = registry_config(worker_factory, f"{topic}-none", "x.dlq", "avro", schema_registry.url)
    result = await asyncio.to_thread(run_cli, "check", "--config", str(write_config(tmp_path / "m.toml", missing)))
    assert result.returncode == 1
    assert f"[FAIL] subject '{topic}-none-value': not registered" in result.stdout.decode()

    down = registry_config(worker_factory, topic, "x.dlq", "avro", f"http://127.0.0.1:{free_port()}")
    down["schema_registry"]["request_timeout_seconds"] = 1
    result = await asyncio.to_thread(
        run_cli,
        "map",
        "--config",
        str(write_config(tmp_path / "d.toml", down)),
        "--input",
        str(tmp_path / "records.b64"),
    )
    assert result.returncode == 1
    assert b"schema registry unavailable" in result.stderr
