"""`[mapping]` and `[schema_registry]`: where each request member comes from and how records decode.

The key-naming checks run here, at start-up, so a typo stops the worker instead of dead-lettering every record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from worker.config.base import Section
from worker.config.personalize import SCHEMA_ARN
from worker.mapping import limits
from worker.mapping.interactions import camel_case


def property_sources(settings: MappingSettings) -> list[tuple[str, str]]:
    """(key, source) of each property, in order: a list's keys are its paths' last names, camelCased."""
    if isinstance(settings.properties, dict):
        return list(settings.properties.items())
    return [(camel_case(path.rsplit(".", 1)[-1]), path) for path in settings.properties]


SentAtFormat = Literal["auto", "iso8601", "epoch_s", "epoch_ms"]
MessageFormat = Literal["json", "avro", "protobuf", "json_schema"]
Layout = Literal["json", "cloudevents", "snowplow_tsv"]
_MEMBER_KEYS = (
    "user_id",
    "session_id",
    "event_id",
    "event_type",
    "event_value",
    "item_id",
    "sent_at",
    "impression",
    "recommendation_id",
    "metric_attribution_source",
    "where",
)


class MappingSettings(Section):
    """Where each Event member comes from: a dotted path or a JMESPath expression (see worker.mapping.expressions);
    "" = not mapped. `preset` fills the keys left out from a shipped mapping (config/presets/)."""

    # A shipped preset's name (segment, rudderstack, snowplow, cloudevents) or a preset file's path; the keys
    # set here override it. Resolved when the settings are read (see worker.mapping.presets).
    preset: str = ""
    # How a record's value becomes that object: plain JSON, or Confluent-framed (magic byte 0, 4-byte schema
    # id) Avro, Protobuf or JSON Schema decoded with the writer's schema from `[schema_registry]`.
    format: MessageFormat = "json"
    # How the record's parts form that object: json (the value), cloudevents (Kafka protocol binding: binary
    # mode from ce_* headers or structured mode, told apart by content-type), snowplow_tsv (enriched TSV).
    layout: Layout = "json"
    user_id: str = "user_id"
    session_id: str = "session_id"
    event_id: str = "event_id"
    event_type: str = "event_type"
    event_value: str = "event_value"
    item_id: str = "item_id"
    sent_at: str = "timestamp"
    sent_at_format: SentAtFormat = "auto"
    # The zone of timestamps written without an offset (ISO 8601 naive): an IANA name.
    timezone: str = "UTC"
    impression: str = "impression"
    recommendation_id: str = "recommendation_id"
    metric_attribution_source: str = ""
    metric_attribution_source_value: str = ""
    # A list of sources (the key: the last field name, camelCased) or a table key → source.
    properties: tuple[str, ...] | dict[str, str] = ()
    event_types: dict[str, str] = Field(default_factory=dict)
    event_types_only: bool = False
    # Records for which this expression is false (false, null, '', [], {}) finish as `filtered`.
    where: str = ""
    # The Interactions schema (Avro JSON, as given to CreateSchema): properties must be its fields, values of
    # their types; without `properties`, one per metadata field (read from its snake_case or camelCase name).
    schema_file: str = Field(default="", alias="schema")
    # The same schema read from Personalize at start-up (DescribeSchema; personalize.control_endpoint_url), by
    # its ARN, instead of a file: one or the other.
    schema_arn: str = ""

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):  # a model already (a route's mapping of another operation)
            return data
        if data.get("preset"):
            from worker.mapping.presets import apply_preset

            data = apply_preset(data)
        if data.get("schema") and data.get("schema_arn"):
            raise ValueError("set mapping.schema (a file) or mapping.schema_arn (read from Personalize), not both")
        arn = data.get("schema_arn")
        # A malformed ARN is left for its field's validator to name.
        source = data.get("schema") or (arn if isinstance(arn, str) and SCHEMA_ARN.fullmatch(arn) else None)
        if source and not data.get("properties"):
            from worker.mapping.interactions import derived_properties

            data = {**data, "properties": derived_properties(str(source))}
        return data

    @field_validator("schema_arn")
    @classmethod
    def _schema_arn_shape(cls, value: str) -> str:
        if value and not SCHEMA_ARN.fullmatch(value):
            raise ValueError(f"{value!r} is not a schema ARN (arn:aws:personalize:REGION:ACCOUNT:schema/NAME)")
        return value

    @property
    def schema_source(self) -> str:
        """The schema file's path or the schema's ARN (see worker.mapping.interactions.load_schema); "" = none."""
        return self.schema_file or self.schema_arn

    @field_validator("session_id", "event_type", "sent_at")
    @classmethod
    def _required_path(cls, value: str) -> str:
        if not value:
            raise ValueError("is required by PutEvents and cannot be empty")
        return value

    @field_validator(*_MEMBER_KEYS)
    @classmethod
    def _source_valid(cls, value: str) -> str:
        from worker.mapping.expressions import compile_source

        if value:
            compile_source(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone_known(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone name (like UTC or Europe/Paris)") from None
        return value

    @field_validator("properties")
    @classmethod
    def _properties_valid(cls, value: tuple[str, ...] | dict[str, str]) -> tuple[str, ...] | dict[str, str]:
        from worker.mapping.expressions import compile_source, is_plain

        seen: dict[str, str] = {}
        named = value.items() if isinstance(value, dict) else [(None, path) for path in value]
        for given, source in named:
            if given is None and not is_plain(source):
                raise ValueError(f"{source!r} is an expression: name its key ([mapping.properties] key = source)")
            compile_source(source)
            key = given if given is not None else camel_case(source.rsplit(".", 1)[-1])
            if not key:
                raise ValueError(f"{source!r}: a property needs a non-empty key")
            if key.lower() in limits.RESERVED_PROPERTY_KEYS:
                raise ValueError(f"{source!r} would become property {key!r}, a name Personalize reserves")
            if key in seen:
                raise ValueError(f"{seen[key]!r} and {source!r} both become property {key!r}")
            seen[key] = source
        return value

    @field_validator("event_types")
    @classmethod
    def _renames_valid(cls, value: dict[str, str]) -> dict[str, str]:
        for source, target in value.items():
            if not limits.EVENT_TYPE.min <= len(target) <= limits.EVENT_TYPE.max:
                raise ValueError(f"{source!r} renames to {target!r}, which breaks eventType's length limit")
        return value

    @model_validator(mode="after")
    def _attribution_one_way(self) -> MappingSettings:
        if self.metric_attribution_source and self.metric_attribution_source_value:
            raise ValueError("set metric_attribution_source (a path) or metric_attribution_source_value, not both")
        value = self.metric_attribution_source_value
        pattern = limits.ATTRIBUTION_SOURCE.pattern
        if value and (len(value) > limits.ATTRIBUTION_SOURCE.max or (pattern and not pattern.match(value))):
            raise ValueError("metric_attribution_source_value must be 1-1024 printable ASCII characters")
        if self.event_types_only and not self.event_types:
            raise ValueError("event_types_only = true needs an event_types table")
        if self.schema_source:
            from worker.mapping.interactions import load_schema

            fields = load_schema(self.schema_source)
            for key, source in property_sources(self):
                if key not in fields:
                    known = ", ".join(sorted(fields)) or "none"
                    where = self.schema_source
                    raise ValueError(f"properties.{key} ({source}): not a field of {where} (it has {known})")
        if self.format != "json":
            from worker.mapping.expressions import references_kafka

            if self.layout != "json":
                raise ValueError(f"layout = {self.layout!r} reads plain record values: it needs format = 'json'")
            texts = [getattr(self, key) for key in _MEMBER_KEYS]
            if any(text and references_kafka(text) for text in texts):
                raise ValueError(f"_kafka.* is not available with format = {self.format!r} yet")
        return self


class SchemaRegistrySettings(Section):
    """A Confluent-compatible schema registry (Confluent, Apicurio's /apis/ccompat/v7, Karapace)."""

    url: str = ""
    username: str | None = None
    password: SecretStr | None = None
    ssl_cafile: Path | None = None
    request_timeout_seconds: float = Field(default=10.0, gt=0)
    # While the registry cannot be reached, consumption is held and the fetch retried with full-jitter
    # exponential backoff up to this many seconds between attempts.
    retry_max_seconds: float = Field(default=10.0, gt=0)
    max_cached_schemas: int = Field(default=1000, ge=1)

    @field_validator("url")
    @classmethod
    def _url_valid(cls, value: str) -> str:
        if not value:
            return value

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL")
        if parts.username or parts.password:
            # A URL is printed in logs and by `check`; credentials belong in username and password.
            raise ValueError("must not carry credentials: set schema_registry.username and password")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _auth_complete(self) -> SchemaRegistrySettings:
        if bool(self.username) != (self.password is not None):
            raise ValueError("username and password go together (HTTP basic auth)")
        return self
