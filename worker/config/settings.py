"""The one frozen settings object: every section, and the rules that span sections."""

from __future__ import annotations

from typing import Any

from pydantic import (
    Field,
    model_validator,
)

from worker.config.base import Section
from worker.config.kafka import KafkaSettings
from worker.config.mapping import MappingSettings, SchemaRegistrySettings
from worker.config.personalize import PersonalizeSettings
from worker.config.routes import RouteSettings
from worker.config.service import BatchingSettings, DeadLetterSettings, DedupSettings, MetricsSettings, WorkerSettings


class Settings(Section):
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
