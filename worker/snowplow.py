"""Snowplow enriched events (TSV from enrich) → an object keyed by the canonical field names."""

from __future__ import annotations

from typing import Any

from worker.values import InvalidRecord


def decode_enriched(value: bytes | None) -> dict[str, Any]:
    raise InvalidRecord("decode", "unsupported_format", "snowplow_tsv is not implemented yet")
