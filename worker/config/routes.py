"""`[[routes]]`: one table per flow (source topics -> mapping -> one Personalize operation -> a destination)."""

from __future__ import annotations

import re
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worker.config.base import Section, key_path, problem
from worker.config.mapping import MappingSettings
from worker.personalize.operations.settings import ActionInteractionsMapping, ActionsMapping, ItemsMapping, UsersMapping

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


class RouteSettings(Section):
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
            problems = [f"{key_path(item['loc'])}: {problem(item)}" for item in error.errors()]
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
