"""The sections of the flow and the process around it: `[batching]`, `[dedup]`, `[dead_letter]`, `[metrics]`,
`[worker]`."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    field_validator,
)

from worker.config.base import Section, topic_name
from worker.mapping import limits


class BatchingSettings(Section):
    max_events: int = Field(default=limits.EVENTS_PER_CALL[1], ge=1, le=limits.EVENTS_PER_CALL[1])
    linger_ms: int = Field(default=500, ge=0, le=60_000)
    max_buffered_events: int = Field(default=50_000, ge=10)
    # A busy session runs up to this many full calls at once (they may land in any order; Personalize
    # orders a session by sentAt); 1 keeps every session's calls strictly one after the other.
    max_calls_per_session: int = Field(default=4, ge=1, le=64)
    # Events one session may hold waiting for its calls before its partitions are no longer fetched
    # (a hot session must not fill the buffer); they are again at half of it.
    max_session_events: int = Field(default=1_000, ge=10)


class DedupSettings(Section):
    window_seconds: float = Field(default=3600.0, ge=0)
    max_ids: int = Field(default=1_000_000, ge=0)


class DeadLetterSettings(Section):
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
        return topic_name(value)


class MetricsSettings(Section):
    host: str = "0.0.0.0"
    port: int = Field(default=9108, ge=0, le=65535)


class WorkerSettings(Section):
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
