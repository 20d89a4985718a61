"""One frozen settings object, from a TOML file overridden by `PW_<SECTION>__<KEY>` environment variables.

This is the only module that reads the environment for settings. Unknown keys are errors, not
warnings: a typo in a key must stop start-up instead of silently running with a default.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Final, Literal, get_args, get_origin
from urllib.parse import urlsplit

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worker.errors import ConfigError
from worker.mapping import limits
from worker.personalize.operations.settings import ActionInteractionsMapping, ActionsMapping, ItemsMapping, UsersMapping

ENV_PREFIX = "PW_"
ENV_NESTING = "__"
# Kafka's own rule for topic names (kafka.common.internals.Topic): a name outside it can never exist,
# so the worker would wait for it forever.
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
SCHEMA_ARN = re.compile(r"arn:aws[a-z-]*:personalize:[a-z0-9-]+:[0-9]{12}:schema/[a-zA-Z0-9_-]{1,63}")


def camel_case(segment: str) -> str:
    """`page_category` → `pageCategory`: Personalize wants camelCase keys matching the schema's fields.

    Here, not in `mapping`, because config validation needs it to refuse two paths with one key."""
    words = [w for w in segment.replace("-", "_").split("_") if w]
    if not words:
        return segment
    first = words[0][0].lower() + words[0][1:]
    return first + "".join(w[0].upper() + w[1:] for w in words[1:])


def property_sources(settings: MappingSettings) -> list[tuple[str, str]]:
    """(key, source) of each property, in order: a list's keys are its paths' last names, camelCased."""
    if isinstance(settings.properties, dict):
        return list(settings.properties.items())
    return [(camel_case(path.rsplit(".", 1)[-1]), path) for path in settings.properties]


def _topic_name(name: str) -> str:
    if not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{name!r} is not a valid Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)")
    return name


def _host_port(entry: str) -> None:
    """One bootstrap server as aiokafka reads it: host, host:port, [v6]:port or a bare IPv6 address."""
    host, port = entry, ""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{entry!r} is not host:port")
        port = rest[1:]
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{entry!r} is not host:port")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = "localhost:9092"
    topics: tuple[str, ...] = ("clickstream",)
    group_id: str = Field(default="personalize-worker", min_length=1)
    client_id: str = "personalize-worker"
    # Static membership: a stable id per replica (the pod name) keeps rolling restarts from rebalancing.
    group_instance_id: str | None = None
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    aws_region: str = "us-east-1"  # MSK IAM (sasl_mechanism = "OAUTHBEARER"): the cluster's region
    max_poll_records: int = Field(default=2000, ge=1)
    session_timeout_ms: int = Field(default=45000, ge=1000)
    # Commit metadata carries the records finished past the commit point (no re-sends after a hand-over);
    # it must stay below the broker's offset.metadata.max.bytes (4096 by default). 0 = none. When the
    # broker refuses it anyway, the worker halves it until accepted.
    commit_metadata_max_bytes: int = Field(default=3800, ge=0, le=1_000_000)

    @field_validator("topics")
    @classmethod
    def _topics_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not t.strip() for t in value):
            raise ValueError("must list at least one non-empty topic name")
        for name in value:
            _topic_name(name)
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers_valid(cls, value: str) -> str:
        entries = [entry.strip() for entry in value.split(",")]
        if not any(entries):
            raise ValueError("must name at least one host:port")
        for entry in entries:
            _host_port(entry)
        return value

    @field_validator("aws_region")
    @classmethod
    def _region(cls, value: str) -> str:
        return _region_name(value)

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        uses_sasl = self.security_protocol.startswith("SASL")
        if uses_sasl and self.sasl_mechanism is None:
            raise ValueError(f"sasl_mechanism is required with security_protocol={self.security_protocol}")
        needs_password = self.sasl_mechanism in {"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}
        if uses_sasl and needs_password and (not self.sasl_username or self.sasl_password is None):
            raise ValueError(f"sasl_username and sasl_password are required with {self.sasl_mechanism}")
        return self


class PersonalizeSettings(_Section):
    # Required without `[[routes]]` (the single flow's tracker); with routes each route names its destination.
    tracking_id: str | None = Field(default=None, min_length=limits.TRACKING_ID.min, max_length=limits.TRACKING_ID.max)
    region: str = "us-east-1"
    endpoint_url: str = ""  # empty: the real AWS endpoint of the region
    # The control plane (`personalize`, not `personalize-events`), used only to read mapping.schema_arn at
    # start-up; a separate key because the two services have different endpoints. Empty: the region's.
    control_endpoint_url: str = ""
    max_in_flight: int = Field(default=64, ge=1, le=1024)
    max_requests_per_second: float = Field(default=1000.0, gt=0)
    request_timeout_seconds: float = Field(default=10.0, gt=0)
    # botocore's Config(proxies=...): endpoint scheme -> proxy URL (user:password@ allowed). None: the
    # environment's HTTP(S)_PROXY / NO_PROXY, as botocore does; {} = always connect directly.
    proxies: dict[Literal["http", "https"], SecretStr] | None = None
    proxy_ca_bundle: Path | None = None  # verifies an https:// proxy's own certificate (default: the AWS CA bundle)
    proxy_client_cert: Path | None = None  # PEM client certificate for an https:// proxy that asks for one
    proxy_client_key: Path | None = None  # its key, when not in the certificate file

    @field_validator("proxies")
    @classmethod
    def _proxy_urls(
        cls, value: dict[Literal["http", "https"], SecretStr] | None
    ) -> dict[Literal["http", "https"], SecretStr] | None:
        for scheme, url in (value or {}).items():
            text = url.get_secret_value()
            # botocore reads a URL without a scheme as http://; the URL is not echoed: it may hold a password.
            if "://" in text and not text.startswith(("http://", "https://")):
                raise ValueError(f"the {scheme} proxy must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _key_needs_cert(self) -> PersonalizeSettings:
        if self.proxy_client_key is not None and self.proxy_client_cert is None:
            raise ValueError("proxy_client_key needs proxy_client_cert")
        return self

    # Attempts of an event failing alone (its call halved down to it) while other calls are accepted, before
    # it is dead-lettered as retries_exhausted. 10 with the backoff's 10 s cap: at most ~35 s of waiting, about
    # two minutes if every attempt also times out. Failures while the service fails for everyone never count.
    max_event_attempts: int = Field(default=10, ge=1, le=20)

    @field_validator("endpoint_url", "control_endpoint_url")
    @classmethod
    def _endpoint_valid(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{value!r} is not an http(s) URL with a host")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        return _region_name(value)


def _region_name(value: str) -> str:
    """botocore's own rule, which `run` and `check` would otherwise meet only when they build a client."""
    from botocore.exceptions import InvalidRegionError  # already loaded by worker.mapping.limits
    from botocore.utils import validate_region_name

    try:
        validate_region_name(value)
    except InvalidRegionError:
        raise ValueError(f"{value!r} is not a region name (like us-east-1)") from None
    return value


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


class MappingSettings(_Section):
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


class SchemaRegistrySettings(_Section):
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
        from urllib.parse import urlsplit

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


class BatchingSettings(_Section):
    max_events: int = Field(default=limits.EVENTS_PER_CALL[1], ge=1, le=limits.EVENTS_PER_CALL[1])
    linger_ms: int = Field(default=500, ge=0, le=60_000)
    max_buffered_events: int = Field(default=50_000, ge=10)
    # A busy session runs up to this many full calls at once (they may land in any order; Personalize
    # orders a session by sentAt); 1 keeps every session's calls strictly one after the other.
    max_calls_per_session: int = Field(default=4, ge=1, le=64)
    # Events one session may hold waiting for its calls before its partitions are no longer fetched
    # (a hot session must not fill the buffer); they are again at half of it.
    max_session_events: int = Field(default=1_000, ge=10)


class DedupSettings(_Section):
    window_seconds: float = Field(default=3600.0, ge=0)
    max_ids: int = Field(default=1_000_000, ge=0)


class DeadLetterSettings(_Section):
    topic: str = Field(default="clickstream.dlq", min_length=1)
    # The producer's limit (max_request_size). A dead letter is a whole source record plus headers, as large
    # as the source topic allows, hence not aiokafka's 1 MB default. A letter over this limit or over the
    # dead-letter topic's max.message.bytes is not lost and blocks nothing: it is written reduced (the parts
    # too large dropped, dlq.value.* headers say so). Set both limits above the source topics' to keep
    # every letter whole (`personalize-worker check` compares both with the source topics' limits).
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024 * 1024)

    @field_validator("topic")
    @classmethod
    def _topic_valid(cls, value: str) -> str:
        return _topic_name(value)


class MetricsSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(default=9108, ge=0, le=65535)


class WorkerSettings(_Section):
    """How the process behaves around the pipeline: shutdown, rebalance, stall detection, logs."""

    drain_timeout_seconds: float = Field(default=30.0, gt=0)
    rebalance_timeout_seconds: float = Field(default=10.0, gt=0)
    commit_interval_seconds: float = Field(default=1.0, gt=0)
    stall_timeout_seconds: float = Field(default=300.0, gt=0)
    # A partition whose commit point lags its highest fetched offset by this many records is paused: one
    # record that never finishes must not let the finalizer's state grow without bound (~80 bytes each).
    max_commit_lag_records: int = Field(default=100_000, ge=100)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"


RouteOperation = Literal["events", "items", "users", "actions", "action_interactions"]
ROUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
"""A route's name is a metric label value and a log field: short, lower case, no surprises."""
TRACKED: Final = frozenset({"events", "action_interactions"})
"""Operations whose destination is an event tracker (trackingId); the others write a dataset (datasetArn)."""


def _check_tracker(value: str) -> str:
    from worker.personalize.operations.spec import EVENTS

    problem = EVENTS.check_destination(value)
    if problem:
        raise ValueError(problem)
    return value


class RouteSettings(_Section):
    """One `[[routes]]` table: source topics → decode → mapping → one Personalize operation → a destination."""

    name: str
    topics: tuple[str, ...]
    operation: RouteOperation = "events"
    tracking_id: str = Field(default="", validate_default=True)
    # events only: the record field naming the tracker, and `trackers` its value → tracking id; a value not
    # listed is dead-lettered (reason unknown_tracker).
    tracking_id_field: str = Field(default="", validate_default=True)
    trackers: dict[str, str] = Field(default_factory=dict)
    dataset_arn: str = Field(default="", validate_default=True)
    mapping: MappingSettings | ItemsMapping | UsersMapping | ActionsMapping | ActionInteractionsMapping = Field(
        default_factory=dict, validate_default=True
    )
    envelope: Literal["none", "debezium"] = "none"
    dead_letter_topic: str = Field(min_length=1)
    # Per destination (each tracker of a route has its own AIMD limiter); default: the operation's documented quota.
    max_requests_per_second: float | None = Field(default=None, gt=0)
    # Per destination too: each tracker its own share of calls at once, so a throttled one never holds the others'.
    max_in_flight: int | None = Field(default=None, ge=1, le=1024)
    max_records_per_call: int | None = Field(default=None, ge=1, le=10)
    linger_ms: int | None = Field(default=None, ge=0, le=60_000)
    dedup_window_seconds: float | None = Field(default=None, ge=0)  # events, action_interactions
    # items, users, actions: an id is sent at most once per window; newer updates meanwhile replace the waiting one.
    coalesce_window_seconds: float = Field(default=5.0, ge=0)

    @field_validator("name")
    @classmethod
    def _label_safe(cls, value: str) -> str:
        if not ROUTE_NAME.match(value):
            raise ValueError(f"{value[:70]!r} must be 1-63 of a-z, 0-9 and _, starting with a letter")
        return value

    @field_validator("topics")
    @classmethod
    def _topics_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not t.strip() for t in value):
            raise ValueError("must list at least one non-empty topic name")
        return value

    @field_validator("tracking_id")
    @classmethod
    def _tracking_id(cls, value: str, info: ValidationInfo) -> str:
        operation = info.data.get("operation")
        if operation not in TRACKED:
            if value:
                raise ValueError(f"operation {operation!r} writes a dataset: set dataset_arn, not tracking_id")
            return value
        if not value:
            if operation == "events":
                return value  # or tracking_id_field (checked there)
            raise ValueError(f"is required by operation {operation!r}")
        return _check_tracker(value)

    @field_validator("tracking_id_field")
    @classmethod
    def _tracker_field(cls, value: str, info: ValidationInfo) -> str:
        operation = info.data.get("operation")
        if value and operation != "events":
            raise ValueError("only events routes choose the tracker per record")
        if operation == "events" and "tracking_id" in info.data and bool(value) == bool(info.data["tracking_id"]):
            raise ValueError("an events route sets tracking_id, or tracking_id_field with a trackers table (one)")
        return value

    @field_validator("dataset_arn")
    @classmethod
    def _dataset_arn(cls, value: str, info: ValidationInfo) -> str:
        from worker.personalize.operations.spec import SPECS

        operation = info.data.get("operation")
        if operation is None:
            return value
        if operation in TRACKED:
            if value:
                raise ValueError(f"operation {operation!r} writes to a tracker: set tracking_id, not dataset_arn")
            return value
        if not value:
            raise ValueError(f"is required by operation {operation!r}")
        problem = SPECS[operation].check_destination(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("mapping", mode="before")
    @classmethod
    def _mapping_of_operation(cls, value: Any, info: ValidationInfo) -> Any:
        from worker.personalize.operations.settings import MAPPINGS

        operation = info.data.get("operation")
        if operation is None or not isinstance(value, dict):
            return value
        model: type[BaseModel] = MappingSettings if operation == "events" else MAPPINGS[operation]
        try:
            return model.model_validate(value)
        except ValidationError as error:
            problems = [f"{_where(item['loc'])}: {_message(item)}" for item in error.errors()]
            raise ValueError("; ".join(problems)) from None

    @model_validator(mode="after")
    def _consistent(self) -> RouteSettings:
        if self.tracking_id_field and not self.trackers:
            raise ValueError("tracking_id_field needs a [routes.trackers] table (field value → tracking id)")
        if self.trackers and not self.tracking_id_field:
            raise ValueError("trackers needs tracking_id_field (the record field naming the tracker)")
        for name, tracker in self.trackers.items():
            try:
                _check_tracker(tracker)
            except ValueError as error:
                raise ValueError(f"trackers.{name}: {error}") from None
        if self.envelope != "none" and self.operation == "events":
            raise ValueError("envelope applies to items, users, actions and action_interactions routes")
        return self


class Settings(_Section):
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    personalize: PersonalizeSettings
    routes: tuple[RouteSettings, ...] = ()
    """Empty: the single flow of `[kafka] topics`, `[personalize] tracking_id`, `[mapping]` and `[dead_letter]`,
    run as one route named `default` (see `worker.flow.routes.resolve`)."""
    mapping: MappingSettings = Field(default_factory=MappingSettings)
    schema_registry: SchemaRegistrySettings = Field(default_factory=SchemaRegistrySettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    dead_letter: DeadLetterSettings = Field(default_factory=DeadLetterSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)

    @model_validator(mode="before")
    @classmethod
    def _personalize_optional_with_routes(cls, data: Any) -> Any:
        """With routes, `[personalize]` only carries shared client settings: it may be left out."""
        if isinstance(data, dict) and data.get("routes") and "personalize" not in data:
            return {**data, "personalize": {}}
        return data

    @model_validator(mode="after")
    def _routes_consistent(self) -> Settings:
        """Across routes: unique names, a topic in one route only, no route reading another's dead letters."""
        names: set[str] = set()
        owner: dict[str, str] = {}
        for index, route in enumerate(self.routes):
            if route.name in names:
                raise ValueError(f"routes[{index}].name: {route.name!r} is the name of an earlier route")
            names.add(route.name)
            for topic in route.topics:
                if topic in owner:
                    raise ValueError(
                        f"routes[{index}].topics: {topic!r} is already read by route {owner[topic]!r} "
                        "(a partition belongs to exactly one route)"
                    )
                owner[topic] = route.name
        for index, route in enumerate(self.routes):
            if route.dead_letter_topic in owner:
                raise ValueError(
                    f"routes[{index}].dead_letter_topic: {route.dead_letter_topic!r} is a source topic "
                    "(records would loop)"
                )
            fmt = route.mapping.format if isinstance(route.mapping, MappingSettings) else "json"
            if fmt != "json" and not self.schema_registry.url:
                raise ValueError(f"routes[{index}].mapping.format = {fmt!r} needs schema_registry.url")
        return self

    @model_validator(mode="after")
    def _dead_letter_not_a_source(self) -> Settings:
        if self.routes:
            return self
        if self.dead_letter.topic in self.kafka.topics:
            raise ValueError("dead_letter.topic must not be one of kafka.topics (records would loop)")
        if self.mapping.format != "json" and not self.schema_registry.url:
            raise ValueError(f"mapping.format = {self.mapping.format!r} needs schema_registry.url")
        return self


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`PW_KAFKA__TOPICS=a,b` → {"kafka": {"topics": "a,b"}}; values are coerced later by the model."""
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split(ENV_NESTING)
        if len(path) != 2 or not all(path):
            raise ConfigError(f"{name}: environment overrides are named PW_<SECTION>__<KEY>")
        section, key = path
        overrides.setdefault(section, {})[key] = _env_value(section, key, raw, name)
    return overrides


def _env_value(section: str, key: str, raw: str, name: str) -> Any:
    """Lists and tables come as JSON (or, for lists, comma-separated text); scalars as text."""
    section_model = Settings.model_fields.get(section)
    annotation = None
    if section_model is not None and isinstance(section_model.annotation, type):
        field = section_model.annotation.model_fields.get(key)
        annotation = field.annotation if field else None
    # An optional table or list (`X | None`) is read as X.
    options = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) is UnionType else []
    if len(options) > 1 and raw.lstrip().startswith("{"):
        return _json(raw, name)  # a list-or-table key (mapping.properties) given as a table
    annotation = options[0] if options else annotation
    origin = getattr(annotation, "__origin__", None)
    if origin in (tuple, list):
        if raw.lstrip().startswith("["):
            return _json(raw, name)
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if origin is dict:
        return _json(raw, name)
    return raw


def _json(raw: str, name: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{name}: not valid JSON ({exc})") from None


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for section, values in overrides.items():
        current = merged.get(section)
        merged[section] = {**current, **values} if isinstance(current, dict) else values
    return merged


def _where(loc: tuple[int | str, ...]) -> str:
    """`("routes", 2, "dataset_arn")` → `routes[2].dataset_arn`; the model's own key names otherwise."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _message(item: Any) -> str:
    """One pydantic error in the words of the other key errors."""
    if item["type"] == "extra_forbidden":
        return "unknown key"
    if item["type"] == "missing":
        return "required key is missing"
    return str(item["msg"]).removeprefix("Value error, ")


def _describe(error: ValidationError) -> str:
    lines = [f"  {_where(item['loc'])}: {_message(item)}" for item in error.errors()]
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(path: Path | str | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, merge and validate; every problem is reported at once, each naming its key."""
    data: dict[str, Any] = {} if path is None else _read_toml(Path(path))
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    from worker.personalize.schema_source import fetch_schemas

    fetch_schemas(data)  # mapping.schema_arn: read before validation, so it acts as a schema file does
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    if not settings.routes and settings.personalize.tracking_id is None:
        raise ConfigError("invalid configuration:\n  personalize.tracking_id: required key is missing")
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's table, or one line saying why it cannot be read (a traceback would only hide that)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied (the worker cannot read it)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded); TOML is UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as plain data for logs and `check`: secrets stay masked."""
    dumped: dict[str, Any] = settings.model_dump(mode="json", by_alias=True)  # the TOML keys (mapping.schema)
    return dumped
