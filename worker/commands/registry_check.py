"""`check` for the schema-registry formats: the registry answers, each source topic has its subject, and the
mapping's paths exist in the subject's latest schema.

The subject checked is `<topic>-value`, the TopicNameStrategy every Confluent serializer uses by default.
Records name their schema by id, so the worker itself never needs the subject; it is checked because a
missing one usually means a wrong registry or topic. Paths are compared with the latest version only:
older versions still in the topic may lack a path a newer one added (it is then left unmapped).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from worker.config import MappingSettings, Settings
from worker.mapping.avro import top_level_fields
from worker.mapping.protobuf import ProtobufDecoder, field_paths
from worker.mapping.registry import RawSchema, RegistryError
from worker.mapping.schemas import SCHEMA_TYPES, Schemas
from worker.observe.metrics import Metrics

Say = Callable[..., bool]
REQUIRED = ("session_id", "event_type", "sent_at")
OPTIONAL = ("user_id", "event_id", "event_value", "item_id", "impression", "recommendation_id")


def mapped_paths(mapping: MappingSettings) -> tuple[list[str], list[str]]:
    """(required, optional) dotted paths the mapping reads."""
    required = [getattr(mapping, name) for name in REQUIRED]
    optional = [getattr(mapping, name) for name in OPTIONAL if getattr(mapping, name)]
    if mapping.metric_attribution_source:
        optional.append(mapping.metric_attribution_source)
    return required, [*optional, *mapping.properties]


def json_schema_paths(text: str) -> set[str] | None:
    try:
        schema = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    paths: set[str] = set()

    def walk(node: Any, prefix: str, depth: int) -> None:
        if not isinstance(node, dict) or depth > 8:
            return
        for name, child in (node.get("properties") or {}).items():
            paths.add(prefix + name)
            walk(child, f"{prefix}{name}.", depth + 1)

    walk(schema, "", 0)
    return paths


async def schema_paths(schemas: Schemas, raw: RawSchema, mapping: MappingSettings) -> tuple[set[str] | None, str]:
    """The dotted paths a record of this schema can have, and which message they are of: of a Protobuf file's
    top-level messages, the one holding most of the mapping's paths (frames may name any of them)."""
    if raw.schema_type == "AVRO":
        return top_level_fields(raw.text), ""
    if raw.schema_type == "JSON":
        return json_schema_paths(raw.text), ""
    decoder = await schemas.compile(raw)
    assert isinstance(decoder, ProtobufDecoder)
    required, optional = mapped_paths(mapping)
    best: tuple[int, set[str], str] = (-1, set(), "")
    for index in range(decoder.message_count):
        desc = decoder.descriptor((index,))
        paths = field_paths(desc)
        score = sum(path in paths for path in (*required, *optional))
        if score > best[0]:
            best = (score, paths, desc.full_name)
    return best[1], f" (message {best[2]})" if best[2] else ""


def registry_flows(settings: Settings) -> list[tuple[tuple[str, ...], MappingSettings]]:
    """(topics, mapping) of each flow reading a registry format: the single flow, or each such route."""
    if not settings.routes:
        return [(settings.kafka.topics, settings.mapping)] if settings.mapping.format != "json" else []
    return [
        (r.topics, r.mapping)
        for r in settings.routes
        if isinstance(r.mapping, MappingSettings) and r.mapping.format != "json"
    ]


async def check_schema_registry(settings: Settings, say: Say) -> bool:
    flows = registry_flows(settings)
    by_format = {m.format: Schemas(settings, Metrics(), format=m.format) for _, m in flows}
    client = next(iter(by_format.values())).client
    where = f"schema registry at {client.url}"
    try:
        try:
            subjects = set(await client.subjects())
        except RegistryError as error:
            return say(False, where, str(error))
        ok = say(True, where, f"{len(subjects)} subjects")
        for topics, mapping in flows:
            for topic in topics:
                ok &= await _check_subject(mapping, by_format[mapping.format], f"{topic}-value", subjects, say)
        return ok
    finally:
        for schemas in by_format.values():
            await schemas.close()


async def _check_subject(
    mapping: MappingSettings, schemas: Schemas, subject: str, subjects: set[str], say: Say
) -> bool:
    if subject not in subjects:
        return say(False, f"subject {subject!r}", "not registered (the default subject of the topic's values)")
    try:
        raw = await schemas.client.schema_version(subject, "latest")
    except RegistryError as error:
        return say(False, f"subject {subject!r}", str(error))
    expected = SCHEMA_TYPES[mapping.format]
    detail = f"latest schema id {raw.schema_id}, version {raw.version}, {raw.schema_type}"
    if raw.schema_type != expected:
        return say(False, f"subject {subject!r}", f"{detail}; mapping.format {mapping.format!r} needs {expected}")
    say(True, f"subject {subject!r}", detail)
    try:
        paths, of = await schema_paths(schemas, raw, mapping)
    except (RegistryError, ValueError) as error:
        return say(False, f"schema id {raw.schema_id}", f"cannot be used: {error}")
    if paths is None:
        return say(False, f"schema id {raw.schema_id}", "is not a record/object schema")
    required, optional = mapped_paths(mapping)
    missing = [p for p in required if p not in paths]
    absent = [p for p in optional if p not in paths]
    what = f"mapping vs {subject!r} version {raw.version}{of}"
    if missing:
        return say(False, what, "required path(s) not in the schema: " + ", ".join(missing))
    if absent:
        found = len(required) + len(optional) - len(absent)
        return say(
            True,
            what,
            f"{found} of {len(required) + len(optional)} paths exist; not in it (unmapped): {', '.join(absent)}",
        )
    return say(True, what, f"all {len(required) + len(optional)} mapped paths exist")
