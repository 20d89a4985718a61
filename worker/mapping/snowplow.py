"""Snowplow enriched events (the TSV enrich writes) → an object keyed by the canonical field names.

Enrich writes one event per line, 131 tab-separated fields in a fixed order (the canonical event
model, as Snowplow's analytics SDKs decode it). Empty fields are left out (absent, as JSON has them);
timestamps, written `YYYY-MM-DD hh:mm:ss[.sss]` in UTC, become ISO 8601 with `Z`; the self-describing
JSON fields (contexts, derived_contexts, unstruct_event) are parsed; everything else stays text.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from worker.mapping.values import InvalidRecord

# fmt: off
FIELDS: Final = (
    "app_id", "platform", "etl_tstamp", "collector_tstamp", "dvce_created_tstamp", "event", "event_id", "txn_id",
    "name_tracker", "v_tracker", "v_collector", "v_etl", "user_id", "user_ipaddress", "user_fingerprint",
    "domain_userid", "domain_sessionidx", "network_userid", "geo_country", "geo_region", "geo_city", "geo_zipcode",
    "geo_latitude", "geo_longitude", "geo_region_name", "ip_isp", "ip_organization", "ip_domain", "ip_netspeed",
    "page_url", "page_title", "page_referrer", "page_urlscheme", "page_urlhost", "page_urlport", "page_urlpath",
    "page_urlquery", "page_urlfragment", "refr_urlscheme", "refr_urlhost", "refr_urlport", "refr_urlpath",
    "refr_urlquery", "refr_urlfragment", "refr_medium", "refr_source", "refr_term", "mkt_medium", "mkt_source",
    "mkt_term", "mkt_content", "mkt_campaign", "contexts", "se_category", "se_action", "se_label", "se_property",
    "se_value", "unstruct_event", "tr_orderid", "tr_affiliation", "tr_total", "tr_tax", "tr_shipping", "tr_city",
    "tr_state", "tr_country", "ti_orderid", "ti_sku", "ti_name", "ti_category", "ti_price", "ti_quantity",
    "pp_xoffset_min", "pp_xoffset_max", "pp_yoffset_min", "pp_yoffset_max", "useragent", "br_name", "br_family",
    "br_version", "br_type", "br_renderengine", "br_lang", "br_features_pdf", "br_features_flash", "br_features_java",
    "br_features_director", "br_features_quicktime", "br_features_realplayer", "br_features_windowsmedia",
    "br_features_gears", "br_features_silverlight", "br_cookies", "br_colordepth", "br_viewwidth", "br_viewheight",
    "os_name", "os_family", "os_manufacturer", "os_timezone", "dvce_type", "dvce_ismobile", "dvce_screenwidth",
    "dvce_screenheight", "doc_charset", "doc_width", "doc_height", "tr_currency", "tr_total_base", "tr_tax_base",
    "tr_shipping_base", "ti_currency", "ti_price_base", "base_currency", "geo_timezone", "mkt_clickid", "mkt_network",
    "etl_tags", "dvce_sent_tstamp", "refr_domain_userid", "refr_dvce_tstamp", "derived_contexts", "domain_sessionid",
    "derived_tstamp", "event_vendor", "event_name", "event_format", "event_version", "event_fingerprint",
    "true_tstamp",
)
# fmt: on
"""The enriched event's fields in the order enrich writes them (131)."""
TIMESTAMPS: Final = frozenset(name for name in FIELDS if name.endswith("_tstamp"))
JSON_FIELDS: Final = frozenset({"contexts", "derived_contexts", "unstruct_event"})
_JSON_INDEXES: Final = tuple(i for i, name in enumerate(FIELDS) if name in JSON_FIELDS)
_TIMESTAMP_INDEXES: Final = tuple(i for i, name in enumerate(FIELDS) if name in TIMESTAMPS)


def decode_enriched(value: bytes | None) -> dict[str, Any]:
    """One enriched event; a record that is not one is a dead letter saying how it differs."""
    if not value:
        raise InvalidRecord("decode", "empty", "the message value is empty")
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise InvalidRecord("decode", "not_utf8", "Snowplow enriched event: not UTF-8 text") from None
    parts = text.rstrip("\r\n").split("\t")
    if len(parts) != len(FIELDS):
        message = f"Snowplow enriched event: expected {len(FIELDS)} tab-separated fields, got {len(parts)}"
        raise InvalidRecord("decode", "not_enriched_tsv", message)
    for index in _TIMESTAMP_INDEXES:
        stamp = parts[index]
        if stamp and " " in stamp:
            parts[index] = stamp.replace(" ", "T", 1) + "Z"
    event: dict[str, Any] = {name: part for name, part in zip(FIELDS, parts, strict=True) if part}
    for index in _JSON_INDEXES:
        if parts[index]:
            name = FIELDS[index]
            try:
                event[name] = orjson.loads(parts[index])
            except orjson.JSONDecodeError:
                raise InvalidRecord("decode", "not_json", f"Snowplow enriched event: {name} is not JSON") from None
    return event
