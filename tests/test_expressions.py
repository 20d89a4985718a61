"""Mapping expressions: plain paths stay plain, JMESPath compiles to jmespath's own answers, and any
expression on any record yields a valid member or a named error."""

from __future__ import annotations

from typing import Any

import jmespath
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_mapping import T0, _check_event
from worker.config import MappingSettings
from worker.errors import ConfigError
from worker.mapping.expressions import compile_source, is_plain, is_truthy, plain_path, references_kafka
from worker.mapping.layouts import LineRecord
from worker.mapping.mapper import InvalidRecord, Mapper, _walk


def mapper(**members: Any) -> Mapper:
    return Mapper(MappingSettings(**members))


def mapped(m: Mapper, obj: dict[str, Any]) -> tuple[tuple[str, str | None], dict[str, Any]]:
    result = m.map(orjson.dumps(obj))
    assert result is not None
    return result


def rejected(m: Mapper, obj: dict[str, Any]) -> InvalidRecord:
    with pytest.raises(InvalidRecord) as info:
        m.map(orjson.dumps(obj))
    return info.value


# --- what is plain, what is an expression ---------------------------------------------------------


@pytest.mark.parametrize("text", ["a", "a.b_c", "page-category", "ctx.$insert_id", "Product Name", "a.1st"])
def test_plain_paths_are_keys_walked_inline(text: str) -> None:
    assert is_plain(text)
    assert compile_source(text) == tuple(text.split("."))


@pytest.mark.parametrize("text", ["a || b", "'x'", "a[0]", "a[].b", "to_string(a)", "`1`", "@", 'a."0"'])
def test_anything_with_jmespath_syntax_is_an_expression(text: str) -> None:
    assert not is_plain(text)
    assert callable(compile_source(text))


def test_a_digit_segment_is_refused_with_the_indexing_it_meant() -> None:
    with pytest.raises(ValueError, match=r"properties\.products\[0\]\.product_id") as info:
        plain_path("properties.products.0.product_id")
    assert 'properties.products."0".product_id' in str(info.value)


def test_a_digit_segment_is_a_key_naming_config_error() -> None:
    with pytest.raises(ConfigError, match=r"mapping\.item_id: .*never a list index"):
        from worker.config import load_settings

        load_settings(
            None, {"PW_PERSONALIZE__TRACKING_ID": "t", "PW_MAPPING__ITEM_ID": "properties.products.0.product_id"}
        )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a ||", "not a valid expression"),
        ("nosuch(a)", "unknown function nosuch()"),
        ("join(a)", "join() takes 2 argument(s), given 1"),
        ("to_string(a, b)", "to_string() takes 1 argument(s), given 2"),
    ],
)
def test_broken_expressions_are_refused_at_start_up(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=r"item_id") as info:
        MappingSettings(item_id=text)
    assert words in str(info.value)


def test_expression_properties_need_a_named_key() -> None:
    with pytest.raises(ValueError, match="name its key"):
        MappingSettings(properties=("to_string(a)",))
    m = mapper(properties={"price": "to_string(p.price)", "sku": "p.sku"})
    _, event = mapped(m, base(p={"price": 2, "sku": "x"}))
    assert orjson.loads(event["properties"]) == {"price": "2", "sku": "x"}


def test_references_to_the_kafka_record_are_found() -> None:
    assert references_kafka("_kafka.key")
    assert references_kafka('_kafka.headers."ce_id" || id')
    assert not references_kafka("kafka.key")
    assert not references_kafka("a || b")


# --- what users asked for ---------------------------------------------------------------------------


def base(**fields: Any) -> dict[str, Any]:
    return {"event_type": "click", "session_id": "s-1", "timestamp": T0, **fields}


def test_session_id_falls_back_to_anonymous_id() -> None:
    m = mapper(session_id="context.session_id || anonymousId")
    assert mapped(m, base(context={"session_id": "ctx"}, anonymousId="anon"))[0][0] == "ctx"
    assert mapped(m, base(context={"session_id": ""}, anonymousId="anon"))[0][0] == "anon"
    assert mapped(m, base(anonymousId="anon"))[0][0] == "anon"
    error = rejected(m, base())
    assert (error.reason, "'context.session_id || anonymousId'" in error.message) == ("missing_field", True)


def test_constant_event_type_from_a_literal() -> None:
    for text in ("'Purchase'", '`"Purchase"`'):
        assert mapped(mapper(event_type=text), base(event_type=None))[1]["eventType"] == "Purchase"


def test_item_from_a_list_and_impressions_from_a_projection() -> None:
    m = mapper(item_id="properties.products[0].product_id", impression="properties.products[].product_id")
    products = [{"product_id": "p1"}, {"product_id": 2}, {"name": "no id"}]
    _, event = mapped(m, base(properties={"products": products}))
    assert event["itemId"] == "p1"
    assert event["impression"] == ["p1", "2"]
    _, event = mapped(m, base(properties={"products": []}))
    assert "itemId" not in event and "impression" not in event  # nothing to project: absent, not an error


def test_functions_to_string_and_join() -> None:
    m = mapper(item_id="to_string(sku)", recommendation_id="join('-', [a, b])")
    _, event = mapped(m, base(sku=1234, a="x", b="y"))
    assert (event["itemId"], event["recommendationId"]) == ("1234", "x-y")


def test_an_expression_failing_on_a_record_is_a_named_dead_letter() -> None:
    error = rejected(mapper(item_id="join(',', ids)"), base(ids=[1, 2]))
    assert (error.stage, error.reason) == ("mapping", "expression_failed")
    assert error.message.startswith("itemId: join(',', ids) failed:")


def test_a_wrong_type_names_member_source_and_value() -> None:
    error = rejected(mapper(event_value="properties.price"), base(properties={"price": "abc"}))
    assert error.message == "eventValue: 'abc' at properties.price is not a number"
    error = rejected(mapper(item_id="p.items"), base(p={"items": ["a" * 100]}))
    assert error.message.startswith("itemId: ['aaaa") and "… at p.items is a list, not a string" in error.message
    assert len(error.message) < 120


def test_user_ids_are_never_quoted_in_errors() -> None:
    error = rejected(mapper(), base(user_id="secret-user" * 30))
    assert "secret" not in error.message and "userId" in error.message


def test_where_filters_records_for_which_it_is_false() -> None:
    m = mapper(where="type == 'track'")
    assert m.map(orjson.dumps(base(type="page"))) is None
    assert m.map(orjson.dumps({"type": "identify"})) is None  # filtered before any member is required
    assert mapped(m, base(type="track"))[1]["eventType"] == "click"
    # JMESPath truth: null, '', [] and false filter; 0 does not.
    m = mapper(where="keep")
    values: tuple[Any, ...] = (None, "", [], {}, False, 0, "x")
    filtered = [m.map(orjson.dumps(base(keep=v))) is None for v in values]
    assert filtered == [True, True, True, True, True, False, False]


def test_naive_timestamps_are_read_in_the_configured_zone() -> None:
    iso = "2024-07-01T12:00:00"
    utc = mapped(mapper(), base(timestamp=iso))[1]["sentAt"]
    paris = mapped(mapper(timezone="Europe/Paris"), base(timestamp=iso))[1]["sentAt"]
    assert utc - paris == 2 * 3600  # CEST is UTC+2
    # An explicit offset wins over the zone.
    assert mapped(mapper(timezone="Europe/Paris"), base(timestamp=iso + "Z"))[1]["sentAt"] == utc
    with pytest.raises(ValueError, match="not a time zone name"):
        MappingSettings(timezone="Mars/Olympus")


class Rec:
    def __init__(self, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        self.value, self.key, self.headers = value, key, headers
        self.offset, self.timestamp, self.topic, self.partition = 7, 1_700_000_000_123, "clicks", 3


def test_the_kafka_record_is_addressable_under_underscore_kafka() -> None:
    m = mapper(
        session_id="_kafka.key",
        event_id='_kafka.headers."message-id"',
        sent_at="_kafka.timestamp",
        item_id="join(':', [_kafka.topic, to_string(_kafka.partition), to_string(_kafka.offset)])",
    )
    assert m.reads_record
    record = Rec(orjson.dumps({"event_type": "view"}), b"sess-9", [("message-id", b"m-1"), ("x", b"\xff")])
    (session, _), event = m.map_record(record, "clicks", 3) or ((None, None), {})
    assert session == "sess-9"
    assert (event["eventId"], event["sentAt"], event["itemId"]) == ("m-1", 1_700_000_000.123, "clicks:3:7")
    assert not mapper().reads_record


# --- any expression: jmespath's answer; any record: a valid member or a named error ---------------

names = st.sampled_from(["a", "b", "c"])
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["", "x", "yz", "1"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(names, inner, max_size=3)),
    max_leaves=12,
)


def _expressions() -> st.SearchStrategy[str]:
    leaf = st.one_of(
        names,
        st.integers(-2, 2).map(lambda i: f"[{i}]"),
        st.sampled_from(["@", "'Purchase'", "`1`", '`"x"`', "`[]`", "`null`"]),
    )

    def grow(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        pair = st.tuples(inner, inner)
        return st.one_of(
            st.tuples(inner, names).map(lambda t: f"{t[0]}.{t[1]}"),
            st.tuples(inner, st.integers(-2, 2)).map(lambda t: f"{t[0]}[{t[1]}]"),
            st.tuples(inner, names).map(lambda t: f"{t[0]}[].{t[1]}"),
            st.tuples(inner, names).map(lambda t: f"{t[0]}[*].{t[1]}"),
            pair.map(lambda t: f"({t[0]} || {t[1]})"),
            pair.map(lambda t: f"({t[0]} && {t[1]})"),
            pair.map(lambda t: f"({t[0]} | {t[1]})"),
            pair.map(lambda t: f"({t[0]} == {t[1]})"),
            pair.map(lambda t: f"({t[0]} != {t[1]})"),
            pair.map(lambda t: f"[{t[0]}, {t[1]}]"),
            pair.map(lambda t: f"contains({t[0]}, {t[1]})"),
            pair.map(lambda t: f"not_null({t[0]}, {t[1]})"),
            inner.map(lambda e: f"!{e}"),
            inner.map(lambda e: f"to_string({e})"),
            inner.map(lambda e: f"length({e})"),
            inner.map(lambda e: f"join(',', {e})"),
            inner.map(lambda e: f"{e}[?a]"),
            inner.map(lambda e: f"{e}[1:]"),
        )

    return st.recursive(leaf, grow, max_leaves=6)


def _run(call: Any, value: Any) -> Any:
    try:
        return ("ok", call(value))
    except (jmespath.exceptions.JMESPathError, TypeError) as error:  # TypeError: contains('a', null)
        return ("error", type(error).__name__)


@settings(max_examples=400, deadline=None)
@given(text=_expressions(), data=json_values)
def test_compiled_expressions_answer_as_jmespath_does(text: str, data: Any) -> None:
    try:
        reference = jmespath.compile(text)
    except jmespath.exceptions.JMESPathError:
        return  # the grammar above can build a few things jmespath refuses; so does compile_source
    compiled = compile_source(text)
    if type(compiled) is tuple:  # a plain path: the mapper walks it
        path = compiled
        compiled = lambda value: _walk(value, path)  # noqa: E731
    assert _run(compiled, data) == _run(reference.search, data)


@settings(max_examples=300, deadline=None)
@given(
    text=_expressions(),
    data=st.dictionaries(names, json_values, max_size=3),
    member=st.sampled_from(["item_id", "user_id", "event_value", "impression", "recommendation_id", "event_id"]),
)
def test_any_expression_yields_a_valid_member_or_a_named_error(text: str, data: dict[str, Any], member: str) -> None:
    for key in member, "where":
        try:
            m = mapper(**{key: text}, session_id="'s'", event_type="'view'", sent_at=f"`{T0}`")
        except ValueError:
            return
        try:
            result = m.map(orjson.dumps(data))
        except InvalidRecord as error:
            assert error.stage in {"mapping", "validation"} and error.reason
            assert error.message.split(":", 1)[0] in {
                "itemId",
                "userId",
                "eventValue",
                "impression",
                "recommendationId",
                "eventId",
                "where",  # a filter that fails on a record: a dead letter saying so, not a silent drop
            }, error.message
            continue
        if result is not None:
            _check_event(*result)
        else:
            assert key == "where" and not is_truthy(jmespath.search(text, data))


def test_line_records_for_the_map_command_are_structured_cloud_events() -> None:
    assert LineRecord(b"{}", 0, "cloudevents").headers == (("content-type", b"application/cloudevents+json"),)
    assert LineRecord(b"{}", 0, "json").headers == ()
