"""`[kafka]`: the brokers, the group, security (SASL, TLS, MSK IAM) and the consumer's limits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from worker.config.base import Section, region_name, topic_name


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


class KafkaSettings(Section):
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
            topic_name(name)
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
        return region_name(value)

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        uses_sasl = self.security_protocol.startswith("SASL")
        if uses_sasl and self.sasl_mechanism is None:
            raise ValueError(f"sasl_mechanism is required with security_protocol={self.security_protocol}")
        needs_password = self.sasl_mechanism in {"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}
        if uses_sasl and needs_password and (not self.sasl_username or self.sasl_password is None):
            raise ValueError(f"sasl_username and sasl_password are required with {self.sasl_mechanism}")
        return self
