"""Reading the settings: a TOML file overridden by `PW_<SECTION>__<KEY>` environment variables.

The only place that reads the environment for settings; every problem is reported at once, naming its key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin

import orjson
from pydantic import (
    ValidationError,
)

from worker.config.base import key_path, problem
from worker.config.settings import Settings
from worker.errors import ConfigError
from worker.personalize.schema_source import fetch_schemas

ENV_PREFIX = "PW_"
ENV_NESTING = "__"


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


def _describe(error: ValidationError) -> str:
    lines = [f"  {key_path(item['loc'])}: {problem(item)}" for item in error.errors()]
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(path: Path | str | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, merge and validate; every problem is reported at once, each naming its key."""
    data: dict[str, Any] = {} if path is None else _read_toml(Path(path))
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
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
