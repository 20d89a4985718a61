"""The emulator's pure parts with a fake clock: token buckets, quota buckets per destination, counters,
settings and option parsing, the signature-age rule, the event-size rule, and the package's import
boundary (the worker never loads the emulator's server)."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from tests.test_emulator import REPO_ROOT
from worker.emulator.faults import (
    DOCUMENTED_QUOTAS,
    OTHER,
    FaultConfig,
    QuotaBuckets,
    TokenBucket,
    parse_groups,
    parse_quotas,
    quota_group,
    unknown_destination,
)
from worker.emulator.model import compiled_model, oversized_events
from worker.emulator.records import Tallies
from worker.emulator.sigv4 import request_age_problem
from worker.mapping.limits import MAX_EVENT_BYTES


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def takes(bucket: TokenBucket, count: int, now: float) -> int:
    return sum(bucket.take(now) for _ in range(count))


def test_token_bucket_bursts_one_second_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(4.0, now=0.0)

    assert takes(bucket, 15, now=0.0) == 4
    assert takes(bucket, 5, now=0.625) == 2  # 2.5 tokens back, so two whole requests
    assert takes(bucket, 1, now=0.75) == 1  # the half token left plus 0.125 s at 4/s
    assert takes(bucket, 30, now=100.0) == 4, "never more than one second of burst"
    assert takes(bucket, 1, now=50.0) == 0, "a clock stepping back refills nothing"


def test_a_slow_bucket_still_lets_one_request_through() -> None:
    bucket = TokenBucket(0.5, now=0.0)

    assert takes(bucket, 3, now=0.0) == 1
    assert takes(bucket, 1, now=1.0) == 0
    assert takes(bucket, 1, now=2.0) == 1


def test_quota_buckets_are_per_operation_and_destination() -> None:
    clock = FakeClock()
    buckets = QuotaBuckets(clock)

    assert sum(buckets.take("items", "a", 3.0) for _ in range(5)) == 3
    assert sum(buckets.take("items", "b", 3.0) for _ in range(5)) == 3, "b has its own bucket"
    assert sum(buckets.take("users", "a", 3.0) for _ in range(5)) == 3, "so does another operation"
    assert all(buckets.take("events", "a", None) for _ in range(10_000)), "None is unlimited"
    clock.now += 1.0
    assert sum(buckets.take("items", "a", 3.0) for _ in range(5)) == 3


def test_forgetting_an_operation_refills_only_its_buckets() -> None:
    buckets = QuotaBuckets(FakeClock())
    for operation in ("items", "users"):
        while buckets.take(operation, "a", 2.0):
            pass

    buckets.forget({"items"})

    assert buckets.take("items", "a", 2.0)
    assert not buckets.take("users", "a", 2.0)
    buckets.forget()
    assert len(buckets) == 0


def test_quota_buckets_stay_bounded_dropping_the_oldest() -> None:
    buckets = QuotaBuckets(FakeClock(), limit=2)
    assert buckets.take("events", "a", 1.0)
    assert not buckets.take("events", "a", 1.0)

    buckets.take("events", "b", 1.0)
    buckets.take("events", "c", 1.0)

    assert len(buckets) == 2
    assert buckets.take("events", "a", 1.0), "a's bucket was dropped and comes back full"


def test_tallies_count_per_operation_and_destination_within_bounds() -> None:
    tallies = Tallies(limit=2)
    tallies.accepted("PutItems", "a", 10)
    tallies.throttled("PutItems", "a")
    tallies.accepted("PutItems", "b", 3)
    tallies.accepted("PutItems", "c", 1)
    tallies.accepted("PutItems", "d", 1)
    tallies.throttled("PutEvents", None)

    snapshot = tallies.snapshot()

    assert snapshot["operations"] == {
        "PutItems": {"calls": 4, "records": 15, "throttled": 1},
        "PutEvents": {"calls": 0, "records": 0, "throttled": 1},
    }
    assert snapshot["destinations"] == {
        "PutItems": {
            "a": {"calls": 1, "records": 10, "throttled": 1},
            "b": {"calls": 1, "records": 3, "throttled": 0},
            OTHER: {"calls": 2, "records": 2, "throttled": 0},
        }
    }


def test_documented_quotas_name_every_modeled_operation() -> None:
    """A new operation in botocore's model must get a quota here, not slip through unlimited by accident."""
    assert set(DOCUMENTED_QUOTAS) == {op.key for op in compiled_model().operations}
    assert (DOCUMENTED_QUOTAS["events"], DOCUMENTED_QUOTAS["items"], DOCUMENTED_QUOTAS["users"]) == (1000, 10, 10)


def test_settings_update_is_all_or_nothing_and_keeps_max_tps_as_the_events_quota() -> None:
    config = FaultConfig()

    with pytest.raises(ValueError, match="quotas: unknown operation"):
        config.update({"latency_ms": 5, "quotas": {"event": 1}})
    assert config.latency_ms == 0.0, "nothing applied"
    assert config.update({"quotas": {"items": 3, "users": 0}}) == {"items", "users"}
    assert (config.quotas["items"], config.quotas["users"], config.quotas["events"]) == (3.0, None, 1000.0)
    assert config.update({"max_tps": 5}) == {"events"}
    assert config.quotas["events"] == 5.0
    assert config.update({"quotas": {"events": None}}) == {"events"}
    assert config.max_tps is None
    assert config.update({"max_tps": None}) == set()
    for bad in ({"quotas": {"items": -1}}, {"quotas": 5}, {"tracker_groups": {"a": 1}}, {"clock_skew_seconds": "1"}):
        with pytest.raises(ValueError):
            config.update(bad)


def test_quota_option_parsing() -> None:
    assert parse_quotas("events=500, items=2") == {"events": 500.0, "items": 2.0}
    assert parse_quotas("actions=0,users=off") == {"actions": None, "users": None}
    assert parse_quotas("off") == dict.fromkeys(DOCUMENTED_QUOTAS)
    for bad, reason in (("items", "OPERATION=RATE"), ("items=fast", "number"), ("item=1", "unknown operation")):
        with pytest.raises(ValueError, match=reason):
            parse_quotas(bad)
    assert parse_groups("a=shop, b=shop") == {"a": "shop", "b": "shop"}
    with pytest.raises(ValueError, match="TRACKER=GROUP"):
        parse_groups("a=")


def test_registry_and_grouping_rules() -> None:
    config = FaultConfig(tracking_ids=["t"], dataset_arns=["arn:d"], tracker_groups={"t": "shop"})

    assert quota_group(True, "t", config) == "shop"
    assert quota_group(True, "u", config) == "u"
    assert quota_group(False, "t", config) == "t", "datasets are never regrouped"
    assert unknown_destination(True, "t", config) is None
    assert unknown_destination(False, "arn:d", config) is None
    assert unknown_destination(True, "u", config) == (
        404,
        "ResourceNotFoundException",
        "Event tracker u does not exist.",
    )
    assert unknown_destination(False, "arn:x", config) == (
        404,
        "ResourceNotFoundException",
        "Dataset arn:x does not exist.",
    )
    assert unknown_destination(True, "u", FaultConfig()) is None, "no registry: anything goes"


def test_signature_age_boundaries_and_wording() -> None:
    signed = "20240522T120000Z"
    at = 1716379200.0  # 2024-05-22T12:00:00Z

    assert request_age_problem(signed, at + 300) is None
    assert request_age_problem(signed, at - 300) is None
    assert request_age_problem(signed, at + 301) == (
        "Signature expired: 20240522T120000Z is now earlier than 20240522T120001Z (20240522T120501Z - 5 min.)"
    )
    assert request_age_problem(signed, at - 301) == (
        "Signature not yet current: 20240522T120000Z is still later than 20240522T115959Z (20240522T115459Z + 5 min.)"
    )
    assert request_age_problem("yesterday", at) == "Date must be in ISO-8601 'basic format'. Got 'yesterday'."


def test_event_size_is_measured_as_compact_utf8_json() -> None:
    fits = {"eventType": "x", "properties": "é" * (MAX_EVENT_BYTES // 2 - 100)}
    padding = MAX_EVENT_BYTES - len(orjson.dumps(fits))
    fits["eventId"] = "i" * (padding - len(b',"eventId":""'))
    over = {**fits, "eventId": fits["eventId"] + "i"}

    assert len(orjson.dumps(fits)) == MAX_EVENT_BYTES
    assert oversized_events([fits, over, fits]) == [
        ("eventList.2.member", f"Member must have size less than or equal to {MAX_EVENT_BYTES} bytes")
    ]


def test_the_worker_cli_does_not_load_the_emulator_server() -> None:
    """The emulator is a tool beside the product: building the CLI (which every command does) and importing
    the worker's composition root leave its server, model and aiohttp app unloaded."""
    probe = (
        "import sys; from worker.cli import build_parser; build_parser(); import worker.app; "
        "print(sorted(m for m in sys.modules if m.startswith('worker.emulator')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, check=True
    ).stdout

    assert loaded.strip() == "['worker.emulator', 'worker.emulator.cli', 'worker.emulator.faults']"
