"""Operation specs read from botocore's model, and the request bodies built from them, checked against
both validators the project trusts: botocore's ParamValidator and the emulator's compiled model."""

from __future__ import annotations

from typing import Any

import botocore.session
import orjson
import pytest
from botocore.validate import ParamValidator

from worker.emulator.model import compiled_model, format_problems
from worker.personalize.client import request_body
from worker.personalize.operations.bodies import BODIES, action_interactions_body, events_body, items_body
from worker.personalize.operations.spec import (
    ACTION_INTERACTIONS,
    ACTIONS,
    DEFAULT_REQUESTS_PER_SECOND,
    EVENTS,
    ITEMS,
    SPECS,
    USERS,
    allowed_values,
    route_key,
)

ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/ITEMS"
_SERVICE = botocore.session.get_session().get_service_model("personalize-events")


def validate(operation: str, body: bytes) -> None:
    """The body as the service would parse it, through both validators."""
    params = orjson.loads(body)
    shape = _SERVICE.operation_model(operation).input_shape
    assert shape is not None
    report = ParamValidator().validate(params, shape)
    assert not report.has_errors(), report.generate_report()
    emulated = next(op for op in compiled_model().operations if op.name == operation)
    problems = emulated.validate(params)
    assert not problems, format_problems(problems)


def test_every_operation_of_the_model_has_a_spec() -> None:
    assert set(SPECS) == {"events", "items", "users", "actions", "action_interactions"}
    assert {spec.name for spec in SPECS.values()} == set(_SERVICE.operation_names)


@pytest.mark.parametrize(
    ("key", "name", "path", "destination", "list_member", "id_member", "deduplicated"),
    [
        ("events", "PutEvents", "/events", "trackingId", "eventList", "eventId", True),
        ("items", "PutItems", "/items", "datasetArn", "items", "itemId", False),
        ("users", "PutUsers", "/users", "datasetArn", "users", "userId", False),
        ("actions", "PutActions", "/actions", "datasetArn", "actions", "actionId", False),
        (
            "action_interactions",
            "PutActionInteractions",
            "/action-interactions",
            "trackingId",
            "actionInteractions",
            "eventId",
            True,
        ),
    ],
)
def test_spec_is_what_the_model_says(
    key: str, name: str, path: str, destination: str, list_member: str, id_member: str, deduplicated: bool
) -> None:
    spec = SPECS[key]
    assert (spec.name, spec.http_path, spec.destination, spec.list_member) == (name, path, destination, list_member)
    assert (spec.id_member, spec.deduplicated, spec.coalesced) == (id_member, deduplicated, not deduplicated)
    assert spec.records_per_call == (1, 10)
    assert spec.http_path == _SERVICE.operation_model(name).http["requestUri"]
    assert "InvalidInputException" in spec.errors
    assert spec.default_requests_per_second == DEFAULT_REQUESTS_PER_SECOND[name]


def test_only_put_events_batches_by_session() -> None:
    assert set(EVENTS.session_members) == {"sessionId", "userId"}
    for spec in (ITEMS, USERS, ACTIONS, ACTION_INTERACTIONS):
        assert spec.session_members == ()


def test_member_limits_come_from_the_model() -> None:
    assert ITEMS.properties.limit is not None and ITEMS.properties.limit.max == 32_000
    assert USERS.properties.limit is not None and USERS.properties.limit.max == 24_000
    assert ACTIONS.properties.limit is not None and ACTIONS.properties.limit.max == 32_000
    assert ACTION_INTERACTIONS.properties.limit is not None and ACTION_INTERACTIONS.properties.limit.max == 1024
    for spec in (ITEMS, USERS, ACTIONS):
        id_limit = spec.members[spec.id_member].limit
        assert id_limit is not None and (id_limit.min, id_limit.max) == (1, 256)
    interaction = ACTION_INTERACTIONS.members
    assert {name for name, m in interaction.items() if m.required} == {
        "actionId",
        "sessionId",
        "timestamp",
        "eventType",
    }
    assert interaction["recommendationId"].limit is not None and interaction["recommendationId"].limit.max == 40
    assert interaction["impression"].count == (1, 25)
    assert interaction["timestamp"].kind == "timestamp"


def test_user_ids_are_sensitive_even_where_the_model_forgets() -> None:
    assert USERS.members["userId"].sensitive  # the model does not mark User.userId
    assert ACTION_INTERACTIONS.members["userId"].sensitive
    assert not ACTION_INTERACTIONS.members["sessionId"].sensitive


def test_reserved_property_keys_are_the_documented_ones() -> None:
    expected = {"userid", "sessionid", "eventtype", "timestamp", "recommendationid", "impression"}
    assert ACTION_INTERACTIONS.properties.reserved_keys == expected
    assert EVENTS.properties.reserved_keys == expected
    assert ITEMS.properties.reserved_keys == frozenset()  # the model documents none for upserts


def test_action_interaction_event_types_are_read_from_the_documentation() -> None:
    assert set(ACTION_INTERACTIONS.members["eventType"].values) == {"Viewed", "Taken", "Not Taken"}
    assert EVENTS.members["eventType"].values == ()
    assert allowed_values("<p>You can specify <code>A</code> and <code>B c</code> event types.</p>") == ("A", "B c")
    assert allowed_values("<p>The type of event.</p>") == ()


def test_route_keys() -> None:
    assert route_key("PutActionInteractions") == "action_interactions"
    assert route_key("PutEvents") == "events"


def test_documented_quotas() -> None:
    assert DEFAULT_REQUESTS_PER_SECOND["PutEvents"] == 1000
    assert DEFAULT_REQUESTS_PER_SECOND["PutItems"] == DEFAULT_REQUESTS_PER_SECOND["PutUsers"] == 10
    # Not found in the documentation: conservative.
    assert DEFAULT_REQUESTS_PER_SECOND["PutActions"] == DEFAULT_REQUESTS_PER_SECOND["PutActionInteractions"] == 10


def test_destinations_are_checked_against_the_model() -> None:
    assert ITEMS.check_destination(ARN) is None
    assert ITEMS.check_destination("") is not None
    assert ITEMS.check_destination("my-dataset") is not None  # not an ARN
    assert ITEMS.check_destination(ARN + "x" * 256) is not None
    assert ACTION_INTERACTIONS.check_destination("tracker-1") is None
    assert ACTION_INTERACTIONS.check_destination("t" * 257) is not None


# --- request bodies ---------------------------------------------------------------------------------


def _records(spec_key: str, count: int) -> list[str]:
    member: dict[str, Any]
    if spec_key == "action_interactions":
        member = {"actionId": "a", "sessionId": "s", "eventType": "Taken", "timestamp": 1_700_000_000.5}
    else:
        id_member = SPECS[spec_key].id_member
        member = {id_member: "x", "properties": '{"genres":"a|b","price":3.5}'}
    return [orjson.dumps({**member, SPECS[spec_key].id_member: f"id-{i}"}).decode() for i in range(count)]


@pytest.mark.parametrize("key", sorted(BODIES))
@pytest.mark.parametrize("count", [1, 10])
def test_bodies_validate_against_the_model(key: str, count: int) -> None:
    spec = SPECS[key]
    destination = "tracker-1" if spec.destination == "trackingId" else ARN
    body = BODIES[key](destination, _records(key, count))
    validate(spec.name, body)
    parsed = orjson.loads(body)
    assert parsed[spec.destination] == destination
    assert [orjson.dumps(r).decode() for r in parsed[spec.list_member]] == _records(key, count)


def test_a_body_with_eleven_records_is_refused_by_the_model() -> None:
    with pytest.raises(AssertionError):
        validate("PutItems", items_body(ARN, _records("items", 11)))


def test_destination_with_quotes_is_escaped() -> None:
    body = action_interactions_body('tr"acker\\', _records("action_interactions", 1))
    assert orjson.loads(body)["trackingId"] == 'tr"acker\\'


@pytest.mark.parametrize("user_id", [None, "u-1"])
def test_events_body_is_the_sinks(user_id: str | None) -> None:
    events = [orjson.dumps({"eventType": "click", "sentAt": 1_700_000_000.25, "eventId": "e1"}).decode()]
    body = events_body("tracker-1", "s-1", user_id, events)
    assert body == request_body("tracker-1", "s-1", user_id, events)
    validate("PutEvents", body)
