"""Presets: golden tests on realistic messages of each convention (Segment Spec and E-commerce v2,
RudderStack Event Spec, CloudEvents Kafka binding, Snowplow enriched TSV), written from their docs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.test_mapping import _check_event
from worker.config import MappingSettings, load_settings
from worker.errors import ConfigError
from worker.mapping.mapper import InvalidRecord, Mapper
from worker.mapping.presets import NAMES, preset_path
from worker.mapping.snowplow import FIELDS


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).astimezone(UTC).timestamp()


class Rec:
    """A consumed Kafka record, as aiokafka hands it over."""

    def __init__(self, value: bytes | None, headers: list[tuple[str, bytes]] = (), key: bytes | None = None) -> None:  # type: ignore[assignment]
        self.value, self.headers, self.key = value, list(headers), key
        self.topic, self.partition, self.offset, self.timestamp = "events", 0, 42, 1_717_171_717_171


def through(preset: str, value: bytes, headers: list[tuple[str, bytes]] = (), **overrides: Any) -> Any:  # type: ignore[assignment]
    mapper = Mapper(MappingSettings(preset=preset, **overrides))
    result = mapper.map_record(Rec(value, headers), "events", 0) if mapper.reads_record else mapper.map(value)
    if result is not None:
        _check_event(*result)
    return result


# --- Segment -----------------------------------------------------------------------------------------

SEGMENT_PRODUCT_VIEWED = {
    "anonymousId": "507f191e810c19729de860ea",
    "context": {
        "ip": "8.8.8.8",
        "library": {"name": "analytics.js", "version": "2.11.1"},
        "page": {"path": "/products/cat-tee", "url": "https://shop.example.com/products/cat-tee"},
        "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7)",
    },
    "event": "Product Viewed",
    "integrations": {},
    "messageId": "ajs-next-1717171717171-4b8d2f0e",
    "originalTimestamp": "2024-05-31T16:08:37.171Z",
    "properties": {
        "product_id": "507f1f77bcf86cd799439011",
        "sku": "G-32",
        "category": "Games",
        "name": "Monopoly: 3rd Edition",
        "brand": "Hasbro",
        "variant": "200 pieces",
        "price": 18.99,
        "quantity": 1,
        "currency": "USD",
        "position": 3,
        "value": 18.99,
    },
    "receivedAt": "2024-05-31T16:08:37.512Z",
    "sentAt": "2024-05-31T16:08:37.300Z",
    "timestamp": "2024-05-31T16:08:37.383Z",
    "type": "track",
    "userId": "97980cfea0067",
    "version": 2,
}


def test_segment_product_viewed() -> None:
    (session, user), event = through("segment", orjson.dumps(SEGMENT_PRODUCT_VIEWED))
    assert (session, user) == ("507f191e810c19729de860ea", "97980cfea0067")  # no context.sessionId: anonymousId
    assert event == {
        "eventType": "Product Viewed",
        "sentAt": at("2024-05-31T16:08:37.383+00:00"),
        "itemId": "507f1f77bcf86cd799439011",
        "eventValue": 18.99,
        "eventId": "ajs-next-1717171717171-4b8d2f0e",
    }


def test_segment_product_list_viewed_gives_impressions() -> None:
    message = {
        **SEGMENT_PRODUCT_VIEWED,
        "event": "Product List Viewed",
        "messageId": "ajs-next-2",
        "context": {"sessionId": "sess-1717171"},
        "properties": {
            "list_id": "hot_deals_1",
            "category": "Deals",
            "products": [
                {"product_id": "507f1f77bcf86cd799439011", "sku": "45790-32", "name": "Monopoly", "position": 1},
                {"product_id": "505bd76785ebb509fc183733", "sku": "46493-32", "name": "Uno", "position": 2},
            ],
        },
    }
    (session, _), event = through("segment", orjson.dumps(message))
    assert session == "sess-1717171"
    assert event["impression"] == ["507f1f77bcf86cd799439011", "505bd76785ebb509fc183733"]
    assert "itemId" not in event and "eventValue" not in event


@pytest.mark.parametrize(("kind", "event_type"), [("page", "Page Viewed"), ("screen", "Screen Viewed")])
def test_segment_page_and_screen(kind: str, event_type: str) -> None:
    message = {
        "anonymousId": "anon-1",
        "messageId": f"{kind}-1",
        "name": "Home",
        "properties": {"title": "Welcome", "url": "https://shop.example.com/"},
        "timestamp": "2024-05-31T16:08:37.383Z",
        "type": kind,
    }
    (session, user), event = through("segment", orjson.dumps(message))
    assert (session, user, event["eventType"], event["eventId"]) == ("anon-1", None, event_type, f"{kind}-1")


@pytest.mark.parametrize("kind", ["identify", "group", "alias"])
def test_segment_identify_group_alias_are_filtered(kind: str) -> None:
    message = {"type": kind, "userId": "u-1", "traits": {"email": "a@example.com"}, "messageId": "m"}
    assert through("segment", orjson.dumps(message)) is None


def test_segment_session_field_is_configurable() -> None:
    message = {**SEGMENT_PRODUCT_VIEWED, "context": {"session_id": "mine"}}
    (session, _), _ = through("segment", orjson.dumps(message), session_id="context.session_id || anonymousId")
    assert session == "mine"


# --- RudderStack -------------------------------------------------------------------------------------

RUDDERSTACK_ORDER_COMPLETED = {
    "anonymousId": "8d872292709c6fbe",
    "channel": "web",
    "context": {
        "app": {"build": "1.0.0", "name": "RudderLabs JavaScript SDK", "version": "3.0.0"},
        "library": {"name": "RudderLabs JavaScript SDK", "version": "3.0.0"},
        "sessionId": 1717171700000,
        "sessionStart": True,
    },
    "event": "Order Completed",
    "integrations": {"All": True},
    "messageId": "c6d4fbbf-7e0b-4e4e-8f3e-4ea0a5b1a8c2",
    "originalTimestamp": "2024-05-31T16:08:37.171Z",
    "properties": {
        "order_id": "50314b8e9bcf000000000000",
        "total": 27.5,
        "revenue": 25.0,
        "currency": "USD",
        "products": [{"product_id": "507f1f77bcf86cd799439011", "price": 19, "quantity": 1}],
    },
    "receivedAt": "2024-05-31T16:08:38.010Z",
    "request_ip": "[::1]",
    "rudderId": "e4b4ff9f-7f0b-4a5e-9d5e-1a2b3c4d5e6f",
    "sentAt": "2024-05-31T16:08:37.900Z",
    "timestamp": "2024-05-31T16:08:37.281Z",
    "type": "track",
    "userId": "1hKOmRA4el9Zt1WSfVJIVo4GRlm",
}


def test_rudderstack_order_completed() -> None:
    (session, user), event = through("rudderstack", orjson.dumps(RUDDERSTACK_ORDER_COMPLETED))
    assert (session, user) == ("1717171700000", "1hKOmRA4el9Zt1WSfVJIVo4GRlm")  # the SDK's numeric session id
    assert event == {
        "eventType": "Order Completed",
        "sentAt": at("2024-05-31T16:08:37.281+00:00"),
        "eventValue": 25.0,
        "impression": ["507f1f77bcf86cd799439011"],
        "eventId": "c6d4fbbf-7e0b-4e4e-8f3e-4ea0a5b1a8c2",
    }


def test_rudderstack_without_session_tracking_falls_back_to_anonymous_id() -> None:
    message = {**RUDDERSTACK_ORDER_COMPLETED, "context": {}, "type": "page", "event": None}
    (session, _), event = through("rudderstack", orjson.dumps(message))
    assert (session, event["eventType"]) == ("8d872292709c6fbe", "Page Viewed")


def test_rudderstack_identify_is_filtered() -> None:
    assert through("rudderstack", orjson.dumps({**RUDDERSTACK_ORDER_COMPLETED, "type": "identify"})) is None


# --- CloudEvents ------------------------------------------------------------------------------------

CE_DATA = {"sessionId": "s-77", "userId": "u-9", "itemId": "sku-3", "eventValue": 2}
CE_HEADERS = [
    ("ce_specversion", b"1.0"),
    ("ce_type", b"com.example.product.viewed"),
    ("ce_source", b"/shop/web"),
    ("ce_id", b"A234-1234-1234"),
    ("ce_time", b"2024-05-31T16:08:37.383Z"),
    ("content-type", b"application/json"),
]
CE_EXPECTED = {
    "eventType": "com.example.product.viewed",
    "sentAt": at("2024-05-31T16:08:37.383+00:00"),
    "itemId": "sku-3",
    "eventValue": 2.0,
    "eventId": "A234-1234-1234",
}


def test_cloudevents_binary_mode_from_headers() -> None:
    key, event = through("cloudevents", orjson.dumps(CE_DATA), CE_HEADERS)
    assert (key, event) == (("s-77", "u-9"), CE_EXPECTED)


def test_cloudevents_structured_mode_by_content_type() -> None:
    structured = {
        "specversion": "1.0",
        "type": "com.example.product.viewed",
        "source": "/shop/web",
        "id": "A234-1234-1234",
        "time": "2024-05-31T16:08:37.383Z",
        "datacontenttype": "application/json",
        "data": CE_DATA,
    }
    headers = [("content-type", b"application/cloudevents+json; charset=UTF-8")]
    assert through("cloudevents", orjson.dumps(structured), headers) == (("s-77", "u-9"), CE_EXPECTED)
    # Without `time`, the Kafka record's timestamp.
    del structured["time"]
    _, event = through("cloudevents", orjson.dumps(structured), headers)
    assert event["sentAt"] == 1_717_171_717.171


@pytest.mark.parametrize("missing", ["ce_id", "ce_source", "ce_specversion", "ce_type"])
def test_cloudevents_missing_required_attribute_is_a_dead_letter(missing: str) -> None:
    headers = [h for h in CE_HEADERS if h[0] != missing]
    with pytest.raises(InvalidRecord) as info:
        through("cloudevents", orjson.dumps(CE_DATA), headers)
    assert (info.value.stage, info.value.reason) == ("decode", "missing_attribute")
    assert f"header {missing}" in info.value.message


def test_cloudevents_structured_value_without_the_content_type_is_binary_mode() -> None:
    # The binding: without a cloudevents content-type the record is binary mode, whatever the value.
    structured = {"specversion": "1.0", "type": "t", "source": "/s", "id": "1", "data": CE_DATA}
    with pytest.raises(InvalidRecord, match=r"required attribute 'id'"):
        through("cloudevents", orjson.dumps(structured), [])


def test_cloudevents_non_json_structured_format_is_refused() -> None:
    with pytest.raises(InvalidRecord) as info:
        through("cloudevents", b"\x00avro", [("content-type", b"application/cloudevents+avro")])
    assert info.value.reason == "unsupported_format"


# --- Snowplow ---------------------------------------------------------------------------------------


def enriched(**values: str) -> bytes:
    assert set(values) <= set(FIELDS)
    return "\t".join(values.get(name, "") for name in FIELDS).encode()


SNOWPLOW_PAGE_VIEW = {
    "app_id": "shop",
    "platform": "web",
    "etl_tstamp": "2024-05-31 16:08:39.001",
    "collector_tstamp": "2024-05-31 16:08:38.000",
    "dvce_created_tstamp": "2024-05-31 16:08:37.300",
    "event": "page_view",
    "event_id": "c6ef3124-b53a-4b13-a233-0088f79dcbcb",
    "name_tracker": "sp",
    "v_tracker": "js-3.23.0",
    "v_collector": "ssc-3.2.0-kinesis",
    "v_etl": "snowplow-enrich-kafka-4.1.0",
    "user_id": "jon.doe@example.com",
    "domain_userid": "bc2e92ec6c204a14",
    "domain_sessionidx": "3",
    "network_userid": "ecdff4d0-9175-40ac-a8bb-325c49733607",
    "page_url": "https://shop.example.com/products/g-32",
    "page_title": "Monopoly",
    "contexts": orjson.dumps(
        {
            "schema": "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0",
            "data": [{"schema": "iglu:com.snowplowanalytics.snowplow/web_page/jsonschema/1-0-0", "data": {"id": "p"}}],
        }
    ).decode(),
    "useragent": "Mozilla/5.0",
    "dvce_sent_tstamp": "2024-05-31 16:08:37.350",
    "domain_sessionid": "2b15e5c8-d3b1-11e4-b9d6-1681e6b88ec1",
    "derived_tstamp": "2024-05-31 16:08:37.383",
    "event_vendor": "com.snowplowanalytics.snowplow",
    "event_name": "page_view",
    "event_format": "jsonschema",
    "event_version": "1-0-0",
    "event_fingerprint": "e3dbfa9cca0412c3d4052863cefb547f",
}


def test_snowplow_page_view() -> None:
    (session, user), event = through("snowplow", enriched(**SNOWPLOW_PAGE_VIEW))
    assert (session, user) == ("2b15e5c8-d3b1-11e4-b9d6-1681e6b88ec1", "jon.doe@example.com")
    assert event == {
        "eventType": "page_view",
        "sentAt": at("2024-05-31T16:08:37.383+00:00"),
        "eventId": "c6ef3124-b53a-4b13-a233-0088f79dcbcb",
    }


def test_snowplow_structured_event_uses_se_action() -> None:
    fields = {
        **SNOWPLOW_PAGE_VIEW,
        "event": "struct",
        "event_name": "event",
        "se_category": "shop",
        "se_action": "add-to-basket",
        "se_label": "G-32",
        "se_value": "18.99",
        "derived_tstamp": "",
    }
    _, event = through("snowplow", enriched(**fields))
    assert event["eventType"] == "add-to-basket"
    assert (event["itemId"], event["eventValue"]) == ("G-32", 18.99)
    assert event["sentAt"] == at("2024-05-31T16:08:38+00:00")  # no derived_tstamp: collector_tstamp


def test_snowplow_json_fields_are_parsed_and_addressable() -> None:
    link = {
        "schema": "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0",
        "data": {
            "schema": "iglu:com.snowplowanalytics.snowplow/link_click/jsonschema/1-0-1",
            "data": {"targetUrl": "https://shop.example.com/products/g-32", "elementId": "G-32"},
        },
    }
    fields = {**SNOWPLOW_PAGE_VIEW, "event": "unstruct", "event_name": "link_click"}
    fields["unstruct_event"] = orjson.dumps(link).decode()
    _, event = through("snowplow", enriched(**fields), item_id="unstruct_event.data.data.elementId")
    assert (event["eventType"], event["itemId"]) == ("link_click", "G-32")


@pytest.mark.parametrize(
    ("value", "reason"),
    [(b"a\tb\tc", "not_enriched_tsv"), (b"", "empty"), (b"\xff" + b"\t" * 130, "not_utf8")],
)
def test_snowplow_not_an_enriched_event_is_a_dead_letter(value: bytes, reason: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        through("snowplow", value)
    assert info.value.reason == reason


# --- presets as configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_preset_is_a_readable_valid_mapping(name: str) -> None:
    path = preset_path(name)
    assert path.parent.name == "presets" and path.parent.parent.name == "config"
    text = path.read_text()
    assert text.startswith("# ") and "[mapping]" in text  # documented at the top
    Mapper(MappingSettings(preset=name))


def test_keys_set_by_the_user_override_the_preset(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[personalize]\ntracking_id = "t"\n[mapping]\npreset = "segment"\nitem_id = "properties.sku"\n')
    mapping = load_settings(config, {}).mapping
    assert (mapping.item_id, mapping.event_id, mapping.preset) == ("properties.sku", "messageId", "segment")


def test_a_preset_may_be_a_file_of_the_same_shape(tmp_path: Path) -> None:
    own = tmp_path / "mine.toml"
    own.write_text('[mapping]\nsession_id = "sid"\nevent_type = "\'View\'"\n')
    assert MappingSettings(preset=str(own)).event_type == "'View'"
    own.write_text('[mapping]\npreset = "segment"\n')
    with pytest.raises(ValueError, match="cannot name another preset"):
        MappingSettings(preset=str(own))


@pytest.mark.parametrize("name", ["segmnet", "missing.toml"])
def test_an_unknown_preset_stops_start_up_naming_the_key(name: str, tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(f'[personalize]\ntracking_id = "t"\n[mapping]\npreset = "{tmp_path / name}"\n')
    with pytest.raises(ConfigError, match=r"mapping: .*(not a preset|not found)"):
        load_settings(config, {})


def test_the_map_command_runs_presets_and_layouts() -> None:
    import io

    from worker.commands.dry_run import dry_run
    from worker.config import Settings

    def run(mapping: dict[str, Any], lines: list[bytes]) -> list[dict[str, Any]]:
        settings = Settings.model_validate({"personalize": {"tracking_id": "t"}, "mapping": mapping})
        out = io.StringIO()
        dry_run(settings, lines, out)
        return [orjson.loads(line) for line in out.getvalue().splitlines()]

    identify = orjson.dumps({"type": "identify", "userId": "u"})
    out = run({"preset": "segment"}, [orjson.dumps(SEGMENT_PRODUCT_VIEWED), identify])
    assert out[0]["event"]["itemId"] == "507f1f77bcf86cd799439011" and out[1]["filtered"] is True
    structured = {"specversion": "1.0", "type": "t", "source": "/s", "id": "e-1", "time": "2024-05-31T16:08:37Z"}
    out = run({"preset": "cloudevents"}, [orjson.dumps({**structured, "data": CE_DATA})])
    assert (out[0]["request"]["sessionId"], out[0]["event"]["eventId"]) == ("s-77", "e-1")
    out = run({"preset": "snowplow"}, [enriched(**SNOWPLOW_PAGE_VIEW)])
    assert out[0]["event"]["eventType"] == "page_view"
