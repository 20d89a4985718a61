"""`mapping.schema`: properties derived from the Interactions schema, held to its types, checked at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.test_mapping import T0, _check_event
from worker.config import MappingSettings, load_settings
from worker.errors import ConfigError
from worker.mapping.interactions import load_schema
from worker.mapping.mapper import InvalidRecord, Mapper

# As given to CreateSchema for an Interactions dataset with metadata fields.
INTERACTIONS = {
    "type": "record",
    "name": "Interactions",
    "namespace": "com.amazonaws.personalize.schema",
    "fields": [
        {"name": "USER_ID", "type": "string"},
        {"name": "ITEM_ID", "type": "string"},
        {"name": "TIMESTAMP", "type": "long"},
        {"name": "EVENT_TYPE", "type": "string"},
        {"name": "EVENT_VALUE", "type": "float"},
        {"name": "DEVICE", "type": ["null", "string"], "categorical": True},
        {"name": "NUM_RATINGS", "type": "int"},
        {"name": "PRICE", "type": "float"},
        {"name": "IS_PROMO", "type": ["null", "boolean"]},
    ],
    "version": "1.0",
}


@pytest.fixture
def schema(tmp_path: Path) -> str:
    path = tmp_path / "interactions.avsc"
    path.write_bytes(orjson.dumps(INTERACTIONS))
    return str(path)


def event(mapper: Mapper, **fields: Any) -> dict[str, Any]:
    result = mapper.map(orjson.dumps({"event_type": "click", "session_id": "s", "timestamp": T0, **fields}))
    assert result is not None
    _check_event(*result)
    return result[1]


def test_properties_are_derived_from_the_metadata_fields(schema: str) -> None:
    settings = MappingSettings(schema=schema)
    assert settings.properties == {
        "device": "device",
        "numRatings": "not_null(num_ratings, numRatings)",
        "price": "price",
        "isPromo": "not_null(is_promo, isPromo)",
    }
    mapper = Mapper(settings)
    got = event(mapper, device=["tv", "mobile"], num_ratings=3, price=9, isPromo=False)
    assert orjson.loads(got["properties"]) == {"device": "tv|mobile", "numRatings": 3, "price": 9, "isPromo": False}
    assert "properties" not in event(mapper)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"num_ratings": "3"}, "properties.numRatings: '3' at not_null(num_ratings, numRatings) is a string, not int"),
        ({"num_ratings": 2.5}, "is a number, not int (NUM_RATINGS in the schema)"),
        ({"is_promo": 1}, "is an integer, not boolean"),
        ({"price": True}, "is a boolean, not float"),
        ({"device": ["tv", "a|b"]}, "is not a list of categories"),
        ({"device": []}, "is not a list of categories"),
        ({"price": [1]}, "is a list, not float"),
    ],
)
def test_a_value_of_the_wrong_type_is_a_dead_letter_naming_the_field(
    schema: str, fields: dict[str, Any], words: str
) -> None:
    mapper = Mapper(MappingSettings(schema=schema))
    with pytest.raises(InvalidRecord) as info:
        mapper.map(orjson.dumps({"event_type": "click", "session_id": "s", "timestamp": T0, **fields}))
    assert (info.value.stage, info.value.reason) == ("mapping", "wrong_type")
    assert words in info.value.message


def test_a_property_the_schema_lacks_stops_start_up(schema: str, tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[personalize]\ntracking_id = "t"\n[mapping]\nschema = "{schema}"\n'
        '[mapping.properties]\nprice = "properties.price"\ncolour = "properties.colour"\n'
    )
    with pytest.raises(ConfigError, match=r"mapping: properties\.colour \(properties\.colour\): not a field of"):
        load_settings(config, {})
    config.write_text(
        f'[personalize]\ntracking_id = "t"\n[mapping]\nschema = "{schema}"\nproperties = ["properties.price"]\n'
    )
    assert load_settings(config, {}).mapping.properties == ("properties.price",)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "not found"),
        (b"{not json", "is not JSON"),
        (b'{"type": "enum"}', "not an Avro record schema"),
        (b'{"type": "record", "fields": [{"name": "X", "type": {"type": "array"}}]}', "not a scalar"),
    ],
)
def test_a_broken_schema_file_stops_start_up(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "broken.avsc"
    if content is not None:
        path.write_bytes(content)
    load_schema.cache_clear()
    with pytest.raises(ValueError, match=words):
        MappingSettings(schema=str(path))


def test_schema_and_a_preset_together(schema: str) -> None:
    mapper = Mapper(MappingSettings(preset="segment", schema=schema, properties={"price": "properties.price"}))
    message = {
        "type": "track",
        "event": "Product Viewed",
        "anonymousId": "a",
        "messageId": "m",
        "timestamp": "2024-05-31T16:08:37Z",
        "properties": {"product_id": "p", "price": 18.99},
    }
    result = mapper.map(orjson.dumps(message))
    assert result is not None and result[1]["properties"] == '{"price":18.99}'
