"""Where each member of an item, user, action or action interaction comes from: one frozen model per operation.

Dotted paths into the decoded record, like `config.MappingSettings` for PutEvents. Everything that can be
refused before the first record is refused here, with the key's name: a path with an empty segment, two
properties that become one key, a property key Personalize reserves, an event type it does not accept.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.personalize.operations.spec import ACTION_INTERACTIONS, ACTIONS, ITEMS, USERS, OperationSpec

SentAtFormat = Literal["auto", "iso8601", "epoch_s", "epoch_ms"]
"""As `config.SentAtFormat` (not imported: this package must not depend on the worker's settings)."""

Properties = tuple[str, ...] | Literal["*"]
"""Paths of the properties to send, or "*": every field beside the id, in the object that holds it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def property_key(name: str) -> str:
    """A field name as Personalize's properties want it: `page_category` and `PAGE_CATEGORY` → `pageCategory`.

    Like `mapping.camel_case`, but an all-capitals word is lowered first: database columns and Personalize
    schema fields are often upper snake case, and the key must be the field's camelCase name.
    """
    words = [w.lower() if w.isupper() else w for w in name.replace("-", "_").split("_") if w]
    if not words:
        return name
    first = words[0][0].lower() + words[0][1:]
    return first + "".join(w[0].upper() + w[1:] for w in words[1:])


def reserved_keys(spec: OperationSpec) -> frozenset[str]:
    """Keys (lower case) properties must not use: those the model's documentation lists, and the record's
    own id, which Personalize takes from its member (a property of that name could only disagree with it)."""
    if spec.coalesced:
        return spec.properties.reserved_keys | {spec.id_member.lower()}
    return spec.properties.reserved_keys


def canonical_event_type(value: str, allowed: tuple[str, ...]) -> str | None:
    """The allowed spelling of an event type, matched ignoring case, `_` and `-` (`not_taken` → `Not Taken`)."""
    wanted = " ".join(value.replace("_", " ").replace("-", " ").split()).casefold()
    for candidate in allowed:
        if candidate.casefold() == wanted:
            return candidate
    return None


def _check_path(path: str) -> None:
    if not path or not all(path.split(".")):
        raise ValueError(f"{path!r} is not a dotted path to a member (an empty name in it)")


def _check_properties(value: Properties, spec: OperationSpec) -> Properties:
    if value == "*":
        return value
    reserved = reserved_keys(spec)
    seen: dict[str, str] = {}
    for path in value:
        _check_path(path)
        key = property_key(path.rsplit(".", 1)[-1])
        if key.lower() in reserved:
            raise ValueError(f"{path!r} would become property {key!r}, a name Personalize reserves")
        if key in seen:
            raise ValueError(f"{seen[key]!r} and {path!r} both become property {key!r}")
        seen[key] = path
    return value


def _required_path(value: str) -> str:
    if not value:
        raise ValueError("is a required member and cannot be empty")
    _check_path(value)
    return value


def _optional_path(value: str) -> str:
    if value:
        _check_path(value)
    return value


class ItemsMapping(_Section):
    """PutItems: the item's id and its properties (required: an item without properties is rarely meant)."""

    item_id: str = "item_id"
    properties: Properties

    @field_validator("item_id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _required_path(value)

    @property
    def id_path(self) -> str:
        return self.item_id

    @field_validator("properties")
    @classmethod
    def _properties(cls, value: Properties) -> Properties:
        return _check_properties(value, ITEMS)


class UsersMapping(_Section):
    """PutUsers: the user's id and their properties."""

    user_id: str = "user_id"
    properties: Properties

    @field_validator("user_id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _required_path(value)

    @property
    def id_path(self) -> str:
        return self.user_id

    @field_validator("properties")
    @classmethod
    def _properties(cls, value: Properties) -> Properties:
        return _check_properties(value, USERS)


class ActionsMapping(_Section):
    """PutActions: the action's id and its properties."""

    action_id: str = "action_id"
    properties: Properties

    @field_validator("action_id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _required_path(value)

    @property
    def id_path(self) -> str:
        return self.action_id

    @field_validator("properties")
    @classmethod
    def _properties(cls, value: Properties) -> Properties:
        return _check_properties(value, ACTIONS)


class ActionInteractionsMapping(_Section):
    """PutActionInteractions: an event like PutEvents' but about an action; "" = not mapped (optional members)."""

    action_id: str = "action_id"
    session_id: str = "session_id"
    event_type: str = "event_type"
    timestamp: str = "timestamp"
    timestamp_format: SentAtFormat = "auto"
    user_id: str = "user_id"
    event_id: str = "event_id"
    """Empty, or absent in a record: derived from the content, so a replay yields the same id."""
    impression: str = "impression"
    recommendation_id: str = "recommendation_id"
    properties: Properties = ()
    event_types: dict[str, str] = Field(default_factory=dict)
    """Source value → one of the event types the model allows (Viewed, Taken, Not Taken). Values not
    listed are matched to those ignoring case, `_` and `-`; anything else is dead-lettered."""

    @field_validator("action_id", "session_id", "event_type", "timestamp")
    @classmethod
    def _required(cls, value: str) -> str:
        return _required_path(value)

    @field_validator("user_id", "event_id", "impression", "recommendation_id")
    @classmethod
    def _optional(cls, value: str) -> str:
        return _optional_path(value)

    @field_validator("properties")
    @classmethod
    def _properties(cls, value: Properties) -> Properties:
        return _check_properties(value, ACTION_INTERACTIONS)

    @field_validator("event_types")
    @classmethod
    def _renames_allowed(cls, value: dict[str, str]) -> dict[str, str]:
        allowed = ACTION_INTERACTIONS.members["eventType"].values
        renames = {}
        for source, target in value.items():
            canonical = canonical_event_type(target, allowed) if allowed else target
            if canonical is None:
                raise ValueError(f"{source!r} renames to {target!r}, not one of {', '.join(allowed)}")
            renames[source] = canonical
        return renames


OperationMapping = ItemsMapping | UsersMapping | ActionsMapping | ActionInteractionsMapping

MAPPINGS: dict[str, type[OperationMapping]] = {
    ITEMS.key: ItemsMapping,
    USERS.key: UsersMapping,
    ACTIONS.key: ActionsMapping,
    ACTION_INTERACTIONS.key: ActionInteractionsMapping,
}
"""The settings model of each operation's mapping, by route key (PutEvents keeps `config.MappingSettings`)."""
