"""`python -m tests.bench --mode map`: CPU per record of mapping, in this process, no stack.

The plain-path mapping (today's default config) against the presets: a Segment `track` through
`preset = "segment"` (JMESPath fallbacks, literals, a projection, a filter), a CloudEvents binary-mode
record (headers → attributes), a Snowplow enriched TSV line. The best of several repeats counts.
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable
from typing import Any

import orjson

from tests.test_presets import CE_DATA, CE_HEADERS, SEGMENT_PRODUCT_VIEWED, SNOWPLOW_PAGE_VIEW, Rec, enriched
from worker.config import MappingSettings
from worker.mapping.mapper import Mapper

TARGETS = {"segment_track_us": "<= 10"}


def cpu_us(call: Callable[[], object], number: int, repeat: int) -> float:
    """Best-of-`repeat` CPU microseconds per call."""
    return min(timeit.repeat(call, number=number, repeat=repeat, timer=time.process_time)) / number * 1e6


def mode_map(args: argparse.Namespace) -> dict[str, Any]:
    number, repeat = args.decode_calls, args.decode_repeats
    plain = Mapper(MappingSettings(properties=("ctx.page_category", "ctx.device_type")))
    plain_value = orjson.dumps(
        {
            "event_id": "evt-000001",
            "event_type": "click",
            "user_id": "user-42",
            "session_id": "sess-7f3a",
            "item_id": "sku-1234",
            "timestamp": 1_790_000_000.123,
            "ctx": {"page_category": "shoes", "device_type": "mobile"},
        }
    )
    segment = Mapper(MappingSettings(preset="segment"))
    track = orjson.dumps(SEGMENT_PRODUCT_VIEWED)
    identify = orjson.dumps({"type": "identify", "userId": "u", "traits": {"email": "a@example.com"}})
    cloudevents = Mapper(MappingSettings(preset="cloudevents"))
    ce_record = Rec(orjson.dumps(CE_DATA), CE_HEADERS)
    snowplow = Mapper(MappingSettings(preset="snowplow"))
    tsv = Rec(enriched(**SNOWPLOW_PAGE_VIEW))
    assert plain.map(plain_value) is not None
    assert segment.map(track) is not None
    assert segment.map(identify) is None
    assert cloudevents.map_record(ce_record, "t", 0) is not None
    assert snowplow.map_record(tsv, "t", 0) is not None
    return {
        "plain_paths_us": round(cpu_us(lambda: plain.map(plain_value), number, repeat), 2),
        "segment_track_us": round(cpu_us(lambda: segment.map(track), number, repeat), 2),
        "segment_identify_filtered_us": round(cpu_us(lambda: segment.map(identify), number, repeat), 2),
        "cloudevents_binary_us": round(cpu_us(lambda: cloudevents.map_record(ce_record, "t", 0), number, repeat), 2),
        "snowplow_tsv_us": round(cpu_us(lambda: snowplow.map_record(tsv, "t", 0), number, repeat), 2),
    }
