"""`LoopHistogram` exposes exactly what prometheus_client's `Histogram` would for the same observations."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from worker.observe.metrics import Metrics
from worker.observe.percall import LoopHistogram

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@pytest.mark.parametrize("buckets", [BUCKETS, (1, 2, 3, 4, 5, 6, 7, 8, 9, 10), (0.5, math.inf)])
def test_same_series_as_prometheus_client_for_the_same_values(buckets: tuple[float, ...]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopHistogram("h", "help", buckets, ours)
    reference = Histogram("h", "help", registry=theirs, buckets=buckets)
    rng = random.Random(7)
    # Every bound itself (`le` is inclusive), just around it, zero, negatives, beyond the last bound.
    values = [*buckets, *(b * 1.000001 for b in buckets if b != math.inf), 0.0, -1.0, 1e9, math.inf]
    values += [rng.expovariate(1.0) * rng.choice([0.01, 1, 100]) for _ in range(2000)]
    for value in values:
        mine.observe(value)
        reference.observe(value)
    assert samples(ours) == samples(theirs)
    assert samples(ours)[("h_count", ())] == len(values)


def test_exposition_text_and_duplicate_names() -> None:
    registry = CollectorRegistry()
    histogram = LoopHistogram("calls", "Calls.", (1, 2), registry)
    histogram.observe(1)
    histogram.observe(1.5)
    text = generate_latest(registry).decode()
    assert "# TYPE calls histogram" in text
    assert 'calls_bucket{le="1.0"} 1.0' in text
    assert 'calls_bucket{le="2.0"} 2.0' in text
    assert 'calls_bucket{le="+Inf"} 2.0' in text
    assert "calls_count 2.0" in text
    assert "calls_sum 2.5" in text
    with pytest.raises(ValueError, match="Duplicated"):
        Histogram("calls", "again", registry=registry)


def test_nan_is_counted_beyond_every_bound() -> None:
    registry = CollectorRegistry()
    histogram = LoopHistogram("h", "help", (1,), registry)
    histogram.observe(math.nan)
    assert registry.get_sample_value("h_bucket", {"le": "1.0"}) == 0
    assert registry.get_sample_value("h_count") == 1


def test_accepted_calls_reach_every_counter_at_each_collection() -> None:
    """Summed in plain integers per call, exact whenever the registry is read: by a scrape, by
    `get_sample_value` (the final log line's totals), twice in a row without double counting."""
    metrics = Metrics()
    clicks, orders = metrics.route("clicks"), metrics.route("orders")
    clicks.accepted(9)
    clicks.accepted(10)
    orders.accepted(3)
    value = metrics.registry.get_sample_value
    assert value("personalize_worker_events_sent_total") == 22
    assert value("personalize_worker_put_events_calls_total", {"outcome": "ok"}) == 3
    assert value("personalize_worker_route_records_total", {"route": "clicks", "state": "sent"}) == 19
    assert value("personalize_worker_route_calls_total", {"route": "orders", "outcome": "ok"}) == 1
    assert metrics.totals()["sent"] == 22 and metrics.totals()["calls"] == 3  # read again: not added twice
    orders.accepted(1)
    text = metrics.render().decode()
    assert "personalize_worker_events_sent_total 23.0" in text
    assert 'personalize_worker_put_events_calls_total{outcome="ok"} 4.0' in text
