"""What every settings section shares: unknown keys are errors, values frozen; Kafka's topic-name rule."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

# Kafka's own rule for topic names (kafka.common.internals.Topic): a name outside it can never exist,
# so the worker would wait for it forever.
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def topic_name(name: str) -> str:
    if not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{name!r} is not a valid Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)")
    return name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def region_name(value: str) -> str:
    """botocore's own rule, which `run` and `check` would otherwise meet only when they build a client."""
    from botocore.exceptions import InvalidRegionError  # already loaded by worker.mapping.limits
    from botocore.utils import validate_region_name

    try:
        validate_region_name(value)
    except InvalidRegionError:
        raise ValueError(f"{value!r} is not a region name (like us-east-1)") from None
    return value


def key_path(loc: tuple[int | str, ...]) -> str:
    """`("routes", 2, "dataset_arn")` → `routes[2].dataset_arn`; the model's own key names otherwise."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def problem(item: Any) -> str:
    """One pydantic error in the words of the other key errors."""
    if item["type"] == "extra_forbidden":
        return "unknown key"
    if item["type"] == "missing":
        return "required key is missing"
    return str(item["msg"]).removeprefix("Value error, ")
