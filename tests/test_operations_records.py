"""Mapping records to PutItems / PutUsers / PutActions / PutActionInteractions members: every rule of the
model, one past each limit, the settings' refusals, and a property test against both validators."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.test_operations_spec import ARN, validate
from worker.mapping.mapper import EVENT_ID_PREFIX, InvalidRecord
from worker.personalize.operations.bodies import BODIES
from worker.personalize.operations.records import (
    MAX_REMEMBERED_FIELDS,
    ActionInteractionMapper,
    UpsertMapper,
    mapper_for,
)
from worker.personalize.operations.settings import (
    MAPPINGS,
    ActionInteractionsMapping,
    ActionsMapping,
    ItemsMapping,
    UsersMapping,
    canonical_event_type,
    property_key,
)
from worker.personalize.operations.spec import ACTION_INTERACTIONS, ACTIONS, ITEMS, USERS, OperationSpec

T0 = 1_700_000_000


def items(properties: Any = "*", **kwargs: Any) -> UpsertMapper:
    mapper = mapper_for(ITEMS, ItemsMapping(properties=properties, **kwargs))
    assert isinstance(mapper, UpsertMapper)
    return mapper


def interactions(**kwargs: Any) -> ActionInteractionMapper:
    mapper = mapper_for(ACTION_INTERACTIONS, ActionInteractionsMapping(**kwargs))
    assert isinstance(mapper, ActionInteractionMapper)
    return mapper


def rejected(mapper: UpsertMapper | ActionInteractionMapper, obj: Any) -> InvalidRecord:
    with pytest.raises(InvalidRecord) as caught:
        mapper.map(obj)
    return caught.value


def body_of(spec: OperationSpec, member: dict[str, Any]) -> bytes:
    destination = "tracker-1" if spec.destination == "trackingId" else ARN
    return BODIES[spec.key](destination, [orjson.dumps(member).decode()])


# --- items, users, actions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "settings_type", "id_field"),
    [(ITEMS, ItemsMapping, "item_id"), (USERS, UsersMapping, "user_id"), (ACTIONS, ActionsMapping, "action_id")],
)
def test_upsert_happy_path_is_valid_for_the_model(spec: OperationSpec, settings_type: Any, id_field: str) -> None:
    mapper = mapper_for(spec, settings_type(properties=("genres", "meta.price", "in_stock")))
    record = {id_field: "id-1", "genres": ["Horror", "Action"], "meta": {"price": 9.5}, "in_stock": True, "x": 1}
    key, member = mapper.map(record)
    assert key == "id-1"
    assert member == {spec.id_member: "id-1", "properties": '{"genres":"Horror|Action","price":9.5,"inStock":true}'}
    validate(spec.name, body_of(spec, member))


def test_every_field_but_the_id_with_star() -> None:
    key, member = items().map({"item_id": 7, "GENRES": ["a", "b"], "page_category": "x", "n": 2, "gone": None})
    assert key == "7"  # integer ids become their decimal text, as in PutEvents
    assert orjson.loads(member["properties"]) == {"genres": "a|b", "pageCategory": "x", "n": 2}


def test_star_reads_the_object_that_holds_a_nested_id() -> None:
    mapper = items(item_id="row.id")
    _, member = mapper.map({"row": {"id": "i", "title": "T"}, "op": "c"})
    assert member == {"itemId": "i", "properties": '{"title":"T"}'}


def test_no_properties_means_no_member() -> None:
    assert items().map({"item_id": "i", "empty": [], "none": None}) == ("i", {"itemId": "i"})
    assert items(properties=()).map({"item_id": "i", "genre": "g"}) == ("i", {"itemId": "i"})


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("page_category", "pageCategory"),
        ("NUMBER_OF_RATINGS", "numberOfRatings"),
        ("numberOfRatings", "numberOfRatings"),
        ("Genre", "genre"),
        ("URL_path", "urlPath"),
        ("price-usd", "priceUsd"),
    ],
)
def test_property_keys_are_camel_case(name: str, key: str) -> None:
    assert property_key(name) == key


@pytest.mark.parametrize(
    ("record", "stage", "reason"),
    [
        ({}, "mapping", "missing_field"),
        ({"item_id": None}, "mapping", "missing_field"),
        ({"item_id": True}, "mapping", "wrong_type"),
        ({"item_id": 1.5}, "mapping", "wrong_type"),
        ({"item_id": {"a": 1}}, "mapping", "wrong_type"),
        ({"item_id": ""}, "validation", "too_short"),
        ({"item_id": "x" * 257}, "validation", "too_long"),
        ({"item_id": "i", "g": {"nested": 1}}, "mapping", "wrong_type"),
        ({"item_id": "i", "g": [{"a": 1}]}, "mapping", "wrong_type"),
        ({"item_id": "i", "g": [None]}, "mapping", "wrong_type"),
        ({"item_id": "i", "g": ["a|b"]}, "validation", "bad_value"),
        ({"item_id": "i", "g": ["a", ""]}, "validation", "bad_value"),
        ({"item_id": "i", "g": math.nan}, "validation", "out_of_range"),  # from a decoder other than JSON
        ({"item_id": "i", "g": 2**70}, "validation", "out_of_range"),
        ({"item_id": "i", "itemId": "j"}, "validation", "reserved_key"),
        ({"item_id": "i", "a_b": 1, "aB": 2}, "validation", "duplicate_key"),
        ({"item_id": "i", "a_b": None, "aB": 2}, "validation", "duplicate_key"),
        ({"item_id": "i", "a_b": [], "aB": "x"}, "validation", "duplicate_key"),
        ({"item_id": "i", "": 1}, "validation", "bad_property_key"),
    ],
)
def test_upsert_errors(record: dict[str, Any], stage: str, reason: str) -> None:
    error = rejected(items(), record)
    assert (error.stage, error.reason) == (stage, reason)
    assert "itemId" in error.message or "properties" in error.message


def test_remembered_field_names_are_bounded() -> None:
    # Untrusted records may name fields without end: "*" remembers the keys of a bounded few.
    mapper = items()
    for i in range(MAX_REMEMBERED_FIELDS + 100):
        mapper.map({"item_id": "i", f"field_{i}": i})
    assert len(mapper._properties._keys) <= MAX_REMEMBERED_FIELDS
    assert mapper.map({"item_id": "i", f"field_{MAX_REMEMBERED_FIELDS + 99}": 1})[1]["properties"] == (
        f'{{"field{MAX_REMEMBERED_FIELDS + 99}":1}}'
    )


def test_not_an_object_is_refused() -> None:
    assert rejected(items(), ["item_id"]).reason == "not_object"
    assert rejected(interactions(), "x").reason == "not_object"


def test_errors_name_the_path_and_show_an_excerpt_unless_sensitive() -> None:
    error = rejected(items(item_id="row.sku"), {"row": {"sku": "s" * 300}})
    assert "'row.sku'" in error.message
    assert "sss" in error.message and len(error.message) < 200
    # A user id is sensitive: its size is shown, never its text.
    users = mapper_for(USERS, UsersMapping(properties="*"))
    error = rejected(users, {"user_id": "secret-" + "u" * 300})
    assert "secret" not in error.message
    assert "307 characters" in error.message


@pytest.mark.parametrize("spec", [ITEMS, USERS, ACTIONS])
def test_properties_length_is_the_models_limit(spec: OperationSpec) -> None:
    limit = spec.properties.limit
    assert limit is not None
    mapper = mapper_for(spec, MAPPINGS[spec.key](properties=("text",)))
    overhead = len('{"text":""}')
    _, member = mapper.map({spec.id_member.replace("Id", "_id"): "i", "text": "x" * (limit.max - overhead)})
    assert len(member["properties"]) == limit.max
    validate(spec.name, body_of(spec, member))
    error = rejected(mapper, {spec.id_member.replace("Id", "_id"): "i", "text": "x" * (limit.max - overhead + 1)})
    assert (error.stage, error.reason) == ("validation", "too_long")


# --- settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "Field required"),
        ({"properties": "all"}, "properties"),
        ({"properties": ("a..b",)}, "empty name"),
        ({"properties": ("meta.itemId",)}, "reserves"),
        ({"properties": ("ITEM_ID",)}, "reserves"),
        ({"properties": ("a.page_category", "b.pageCategory")}, "both become"),
        ({"properties": "*", "item_id": ""}, "required"),
        ({"properties": "*", "colour": "x"}, "Extra inputs"),
    ],
)
def test_items_settings_refuse(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ItemsMapping(**kwargs)


def test_settings_are_frozen() -> None:
    mapping = ItemsMapping(properties="*")
    with pytest.raises(ValidationError):
        mapping.item_id = "x"


def test_interaction_settings_refuse() -> None:
    with pytest.raises(ValidationError, match="not one of Viewed, Taken, Not Taken"):
        ActionInteractionsMapping(event_types={"click": "Clicked"})
    with pytest.raises(ValidationError, match="reserves"):
        ActionInteractionsMapping(properties=("ctx.user_id",))
    with pytest.raises(ValidationError, match="required"):
        ActionInteractionsMapping(session_id="")
    assert ActionInteractionsMapping(event_types={"yes": "taken"}).event_types == {"yes": "Taken"}


def test_a_mapper_needs_its_operations_settings() -> None:
    with pytest.raises(TypeError):
        mapper_for(USERS, ItemsMapping(properties="*"))
    with pytest.raises(TypeError):
        mapper_for(ITEMS, ActionInteractionsMapping())


# --- action interactions -----------------------------------------------------------------------------

BASE: dict[str, Any] = {"action_id": "a-1", "session_id": "s-1", "event_type": "Taken", "timestamp": T0}


def test_interaction_happy_path_is_valid_for_the_model() -> None:
    mapper = interactions(properties=("ctx.n_actions",))
    record = {
        **BASE,
        "user_id": "u-1",
        "event_id": "e-1",
        "recommendation_id": "r-1",
        "impression": ["a-1", "a-2"],
        "ctx": {"n_actions": 3},
    }
    key, member = mapper.map(record)
    assert key == "e-1"
    assert member == {
        "actionId": "a-1",
        "sessionId": "s-1",
        "eventType": "Taken",
        "timestamp": float(T0),
        "userId": "u-1",
        "recommendationId": "r-1",
        "impression": ["a-1", "a-2"],
        "properties": '{"nActions":3}',
        "eventId": "e-1",
    }
    validate(ACTION_INTERACTIONS.name, body_of(ACTION_INTERACTIONS, member))


def test_interaction_event_id_is_derived_deterministically() -> None:
    mapper = interactions()
    key, member = mapper.map(BASE)
    assert key == member["eventId"] and key.startswith(EVENT_ID_PREFIX)
    assert mapper.map(dict(BASE))[0] == key  # a replay: the same id
    assert mapper.map({**BASE, "event_type": "Viewed"})[0] != key
    assert mapper.map({**BASE, "timestamp": T0 + 1})[0] != key
    assert interactions(event_id="").map({**BASE, "event_id": "ignored"})[0] == key


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Taken", "Taken"),
        ("taken", "Taken"),
        ("NOT_TAKEN", "Not Taken"),
        ("not-taken", "Not Taken"),
        ("viewed", "Viewed"),
    ],
)
def test_event_types_are_matched_to_the_allowed_spelling(value: str, expected: str) -> None:
    assert interactions().map({**BASE, "event_type": value})[1]["eventType"] == expected
    assert canonical_event_type(value, ("Viewed", "Taken", "Not Taken")) == expected


def test_event_type_renames_and_refusals() -> None:
    mapper = interactions(event_types={"enrolled": "Taken", "shown": "Viewed"})
    assert mapper.map({**BASE, "event_type": "shown"})[1]["eventType"] == "Viewed"
    error = rejected(mapper, {**BASE, "event_type": "clicked"})
    assert (error.stage, error.reason) == ("validation", "bad_value")
    assert "clicked" in error.message and "Not Taken" in error.message


@pytest.mark.parametrize("missing", ["action_id", "session_id", "event_type", "timestamp"])
def test_interaction_required_members(missing: str) -> None:
    record = {k: v for k, v in BASE.items() if k != missing}
    error = rejected(interactions(), record)
    assert (error.stage, error.reason) == ("mapping", "missing_field")
    assert repr(missing) in error.message


@pytest.mark.parametrize(
    ("extra", "stage", "reason"),
    [
        ({"timestamp": "yesterday"}, "mapping", "bad_timestamp"),
        ({"timestamp": -5}, "validation", "bad_timestamp"),
        ({"session_id": "s" * 257}, "validation", "too_long"),
        ({"user_id": ""}, "validation", "too_short"),
        ({"user_id": ["u"]}, "mapping", "wrong_type"),
        ({"recommendation_id": "r" * 41}, "validation", "too_long"),
        ({"event_id": "e" * 257}, "validation", "too_long"),
        ({"impression": []}, "validation", "too_short"),
        ({"impression": [f"a{i}" for i in range(26)]}, "validation", "too_long"),
        ({"impression": ["a", "x" * 257]}, "validation", "too_long"),
        ({"impression": ["a", None]}, "mapping", "wrong_type"),
        ({"impression": 5}, "mapping", "wrong_type"),
    ],
)
def test_interaction_errors(extra: dict[str, Any], stage: str, reason: str) -> None:
    error = rejected(interactions(), {**BASE, **extra})
    assert (error.stage, error.reason) == (stage, reason)


def test_timestamp_formats_and_milliseconds() -> None:
    assert interactions().map({**BASE, "timestamp": T0 * 1000 + 250})[1]["timestamp"] == T0 + 0.25
    iso = interactions().map({**BASE, "timestamp": "2023-11-14T22:13:20Z"})[1]["timestamp"]
    assert iso == T0
    seconds = interactions(timestamp_format="epoch_s").map({**BASE, "timestamp": str(T0)})[1]["timestamp"]
    assert seconds == T0
    error = rejected(interactions(timestamp_format="epoch_ms"), {**BASE, "timestamp": "x"})
    assert "'timestamp'" in error.message


def test_impression_as_a_comma_separated_string() -> None:
    assert interactions().map({**BASE, "impression": "a-1, a-2"})[1]["impression"] == ["a-1", "a-2"]


def test_interaction_properties_star_skips_mapped_fields_and_refuses_reserved() -> None:
    _, member = interactions(properties="*").map({**BASE, "user_id": "u", "plan": "gold", "n": 2})
    assert member["properties"] == '{"plan":"gold","n":2}'
    # user_id not mapped: under "*" it would become the reserved key userId.
    error = rejected(interactions(properties="*", user_id=""), {**BASE, "user_id": "u"})
    assert (error.stage, error.reason) == ("validation", "reserved_key")


def test_interaction_properties_limit() -> None:
    mapper = interactions(properties=("note",))
    error = rejected(mapper, {**BASE, "note": "x" * 1024})
    assert (error.stage, error.reason) == ("validation", "too_long")


# --- property test: a valid member, or InvalidRecord ---------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.sampled_from(["Taken", "not taken", "VIEWED", "a|b", "", "a,b", "2023-11-14T22:13:20Z"]),
)
_values = st.one_of(
    st.text(min_size=1, max_size=20),
    _scalars,
    st.lists(st.one_of(st.text(min_size=1, max_size=8), _scalars), max_size=30),
    st.dictionaries(st.text(max_size=5), _scalars, max_size=3),
)
_keys = st.sampled_from(
    [
        "item_id",
        "user_id",
        "action_id",
        "session_id",
        "event_type",
        "timestamp",
        "event_id",
        "impression",
        "recommendation_id",
        "itemId",
        "userId",
        "genres",
        "PRICE",
        "a_b",
        "aB",
        "",
    ]
)
_records = st.dictionaries(_keys, _values, max_size=4)
VALID: dict[str, Any] = {**BASE, "item_id": "i", "user_id": "u", "genres": ["a", "b"], "PRICE": 2.5}
"""A record every mapper below maps: the drawn fields replace some of it."""
_timestamps = st.one_of(st.integers(min_value=-10, max_value=2**45), st.floats(), st.text(max_size=30))

MAPPERS: list[tuple[OperationSpec, UpsertMapper | ActionInteractionMapper]] = [
    (ITEMS, items()),
    (ITEMS, items(properties=("genres", "PRICE"))),
    (USERS, mapper_for(USERS, UsersMapping(properties="*"))),
    (ACTIONS, mapper_for(ACTIONS, ActionsMapping(properties=("genres",)))),
    (ACTION_INTERACTIONS, interactions()),
    (ACTION_INTERACTIONS, interactions(properties="*", user_id="")),
    (ACTION_INTERACTIONS, interactions(properties=("genres", "PRICE"), event_id="")),
]


@settings(max_examples=400, deadline=None)
@given(data=st.data(), record=_records, timestamp=_timestamps)
def test_any_record_maps_to_a_valid_member_or_raises_invalid_record(
    data: st.DataObject, record: dict[str, Any], timestamp: Any
) -> None:
    spec, mapper = data.draw(st.sampled_from(MAPPERS))
    if data.draw(st.booleans()):
        record = {**VALID, **record}
    if data.draw(st.booleans()):
        record["timestamp"] = timestamp
    try:
        key, member = mapper.map(record)
    except InvalidRecord as error:
        assert error.stage in {"mapping", "validation"}
        assert error.reason and error.message
        return
    assert key == member[spec.id_member]
    validate(spec.name, body_of(spec, member))
