"""The one frozen settings object, read from TOML and `PW_` environment variables; a module per section.

Knows no running parts: validation only (it may read a schema file or, for `mapping.schema_arn`, Personalize).
"""

from worker.config.kafka import KafkaSettings
from worker.config.load import ENV_NESTING, ENV_PREFIX, load_settings, redacted
from worker.config.mapping import (
    Layout,
    MappingSettings,
    MessageFormat,
    SchemaRegistrySettings,
    SentAtFormat,
    property_sources,
)
from worker.config.personalize import SCHEMA_ARN, PersonalizeSettings
from worker.config.routes import ROUTE_NAME, TRACKED, RouteOperation, RouteSettings
from worker.config.service import BatchingSettings, DeadLetterSettings, DedupSettings, MetricsSettings, WorkerSettings
from worker.config.settings import Settings

__all__ = [
    "ENV_NESTING",
    "ENV_PREFIX",
    "ROUTE_NAME",
    "SCHEMA_ARN",
    "TRACKED",
    "BatchingSettings",
    "DeadLetterSettings",
    "DedupSettings",
    "KafkaSettings",
    "Layout",
    "MappingSettings",
    "MessageFormat",
    "MetricsSettings",
    "PersonalizeSettings",
    "RouteOperation",
    "RouteSettings",
    "SchemaRegistrySettings",
    "SentAtFormat",
    "Settings",
    "WorkerSettings",
    "load_settings",
    "property_sources",
    "redacted",
]
