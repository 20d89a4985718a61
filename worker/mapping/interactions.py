"""The Interactions schema (the Avro JSON given to CreateSchema) → what `properties` may and must hold.

Personalize matches an event's `properties` keys to the schema's metadata fields camelCased
(`NUM_RATINGS` → `numRatings`) and expects each value of the field's type; categorical string
fields take several values joined with `|`. `mapping.schema` makes the worker hold events to that at
start-up (a property the schema lacks stops it) and per record (a value of the wrong type is a dead
letter naming the field, not a rejected call later). `mapping.schema_arn` is the same, the document read
from Personalize at start-up (worker.personalize.schema_source) and remembered here. Pure, apart from
reading the file once.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Final, NamedTuple

import orjson

from worker.mapping import limits

MEMBER_FIELDS: Final = frozenset(
    {
        "USER_ID",
        "ITEM_ID",
        "TIMESTAMP",
        "EVENT_TYPE",
        "EVENT_VALUE",
        "IMPRESSION",
        "RECOMMENDATION_ID",
        "EVENT_ATTRIBUTION_SOURCE",
        "EVENT_ID",
        "SESSION_ID",
    }
)
"""Interactions fields that PutEvents fills from the event's own members, never from `properties`."""
_KINDS: Final = {
    "string": (str,),
    "int": (int,),
    "long": (int,),
    "float": (int, float),
    "double": (int, float),
    "boolean": (bool,),
}
CATEGORY_SEPARATOR: Final = "|"
_REMEMBERED: dict[str, bytes] = {}
"""Schema documents read from Personalize, by ARN (a handful, read once at start-up)."""


def camel_case(segment: str) -> str:
    """`page_category` → `pageCategory`: Personalize wants camelCase keys matching the schema's fields.

    Here, with the schema's field names, and read by the settings' validation too (two paths, one key)."""
    words = [w for w in segment.replace("-", "_").split("_") if w]
    if not words:
        return segment
    first = words[0][0].lower() + words[0][1:]
    return first + "".join(w[0].upper() + w[1:] for w in words[1:])


class PropertyField(NamedTuple):
    """One metadata field: its schema name, the Python types its values may have, and whether categorical."""

    name: str
    kind: str
    types: tuple[type, ...]
    categorical: bool


def property_key(field: str) -> str:
    """`NUM_RATINGS` → `numRatings`, `pageCategory` stays: the key PutEvents properties use."""
    return camel_case(field.lower() if field.isupper() else field)


def remember_schema(arn: str, document: str) -> None:
    """The schema `arn` names, as DescribeSchema returned it: `load_schema(arn)` reads it from here."""
    _REMEMBERED[arn] = document.encode()
    load_schema.cache_clear()


@lru_cache(maxsize=16)
def load_schema(path: str) -> dict[str, PropertyField]:
    """The metadata fields by property key of the schema file `path` or the schema read by ARN; ValueError
    says what is wrong with it."""
    if path.startswith("arn:"):
        if path not in _REMEMBERED:
            raise ValueError(f"schema {path} was not read from Personalize (it is read when the settings load)")
        raw, what = _REMEMBERED[path], f"schema {path}"
    else:
        what = f"schema file {path!r}"
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            raise ValueError(f"{what} not found") from None
        except OSError as error:
            raise ValueError(f"{what} cannot be read ({type(error).__name__})") from None
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"{what} is not JSON ({error})") from None
    fields = document.get("fields") if isinstance(document, dict) else None
    if not isinstance(fields, list) or document.get("type") != "record":
        raise ValueError(f"{what} is not an Avro record schema with fields")
    found: dict[str, PropertyField] = {}
    for field in fields:
        name = field.get("name") if isinstance(field, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: a field without a name")
        if name.upper() in MEMBER_FIELDS or name.replace("_", "").lower() in limits.RESERVED_PROPERTY_KEYS:
            continue
        kind = _kind(field.get("type"))
        if kind not in _KINDS:
            raise ValueError(f"{what}: field {name} has type {field.get('type')!r}, not a scalar")
        found[property_key(name)] = PropertyField(name, kind, _KINDS[kind], field.get("categorical") is True)
    return found


def _kind(declared: Any) -> Any:
    """The non-null branch of `["null", "string"]`, or the type itself."""
    if isinstance(declared, list):
        kinds = [k for k in declared if k != "null"]
        return kinds[0] if len(kinds) == 1 else declared
    if isinstance(declared, dict):
        return declared.get("type")
    return declared


def check_value(field: PropertyField, value: Any) -> Any:
    """The value as Personalize wants it (categories joined); ValueError with the reason otherwise."""
    if field.categorical and type(value) is list:
        if value and all(type(item) is str and CATEGORY_SEPARATOR not in item for item in value):
            return CATEGORY_SEPARATOR.join(value)
        raise ValueError(f"is not a list of categories ({field.name} is categorical: strings without '|')")
    if type(value) in field.types:
        return value
    raise ValueError(f"is {_a(value)}, not {field.kind} ({field.name} in the schema)")


def _a(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list"}
    return names.get(type(value), "an object" if type(value) is dict else "null")


def derived_properties(path: str) -> dict[str, str]:
    """`properties` when only the schema is given: each metadata field, read by its snake_case name or its
    camelCase key (`not_null(num_ratings, numRatings)`: a false or 0 is a value), as a table key → source."""
    derived = {}
    for key, field in load_schema(path).items():
        snake = field.name.lower() if field.name.isupper() else field.name
        derived[key] = snake if snake == key else f"not_null({snake}, {key})"
    return derived
