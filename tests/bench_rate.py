"""`make bench` modes for the rate limiter (issue 11): `--mode noise` and `--mode quota-find`.

``noise``
    One backlog drained twice by a worker at 1,000 calls/s against the emulator's 1,000 calls/s
    quota: once clean, once with ``--throttle-rate`` (0.3) of calls throttled at random whatever the
    rate. Accepted calls/s and events/s of the second as a share of the first (~0.7 is the most 30 %
    random throttling leaves; the old limiter fell to ~2 %), and the worker's noise estimate.
``quota-find``
    The emulator's quota set to ``--quota`` (100) calls/s while the worker is configured for
    ``--max-tps`` (1,000): how long until a second is throttled ≤ 10 % and the rest of the run ≤ 5 %
    in all, then that steady state's accepted calls/s as a share of the quota and its throttled share.

The emulator's counters are sampled while the worker runs; rates are over the span in which calls
were accepted, so start-up and the drain's partial-session tail do not dilute them.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.error
import uuid
from typing import Any

import orjson

from tests.bench import Stack, Worker, _http, load_topic, log, make_topics, worker_sections

TARGETS = {
    "noise": {"steady_calls_vs_clean": ">= 0.65", "steady_events_vs_clean": ">= 0.65"},
    "quota-find": {"settle_seconds": "<= 5", "steady_quota_utilization": ">= 0.9", "steady_throttled_share": "<= 0.05"},
}
SAMPLE_SECONDS = 0.1
STEADY_AFTER = 3.0
LIMITER_METRICS = re.compile(
    rb"^personalize_worker_rate_limit_(requests_per_second|throttled_share|noise_share) (\S+)$", re.MULTILINE
)

Sample = tuple[float, int, int, int]
"""(monotonic time, accepted calls, throttled calls, accepted events) as the emulator counts them."""


def configure(bench: Stack, **changes: Any) -> None:
    """The emulator's fault injection, changed at run time (``POST /_emulator/config``)."""
    _http(f"{bench.emulator.url}/_emulator/config", orjson.dumps(changes))


def sample(bench: Stack) -> Sample:
    stats = bench.emulator.stats()
    return time.monotonic(), int(stats["calls"]), int(stats["throttled"]), int(stats["events"])


def limiter_view(worker: Worker) -> dict[str, float]:
    """The worker's rate limiter as its /metrics shows it: rate, windowed throttled share, noise."""
    try:
        body = _http(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=2)
    except (OSError, urllib.error.URLError):
        return {}
    return {m.group(1).decode(): float(m.group(2)) for m in LIMITER_METRICS.finditer(body)}


def drain_sampled(
    bench: Stack, args: argparse.Namespace, topic: str, name: str, sections: dict[str, dict[str, Any]]
) -> tuple[list[Sample], list[dict[str, float]], int]:
    """Run `--until-drained` on `topic`, sampling the emulator every SAMPLE_SECONDS and the worker's
    limiter every second; returns both series and the worker's exit code."""
    bench.emulator.reset()
    worker = Worker(bench.tmp, name, sections, True)
    bench.workers.append(worker)
    worker.start()
    worker.wait_running()
    samples: list[Sample] = []
    views: list[dict[str, float]] = []
    next_view = time.monotonic()
    while worker.running and time.monotonic() - worker.started < args.timeout:
        samples.append(sample(bench))
        if time.monotonic() >= next_view:
            view = limiter_view(worker)
            if view:
                views.append({"t": round(time.monotonic() - worker.started, 1), **view})
            next_view += 1.0
        time.sleep(SAMPLE_SECONDS)
    worker.stop()
    samples.append(sample(bench))
    result = worker.result()
    if result.returncode != 0:
        log(f"{name} exited with {result.returncode}\n{worker.log_tail()}")
    return samples, views, result.returncode


def per_second(samples: list[Sample]) -> list[tuple[int, int]]:
    """(accepted calls, throttled calls) in each second from the first sample: the run's time series."""
    out: list[tuple[int, int]] = []
    if not samples:
        return out
    t0, index = samples[0][0], 0
    for second in range(1, int(samples[-1][0] - t0) + 2):
        start = samples[index]
        while index + 1 < len(samples) and samples[index + 1][0] <= t0 + second:
            index += 1
        end = samples[index]
        out.append((end[1] - start[1], end[2] - start[2]))
    return out


def busy(samples: list[Sample]) -> list[Sample]:
    """From the first accepted call to the last sample in which calls were still accepted."""
    first = next((i for i, s in enumerate(samples) if s[1] > 0), None)
    if first is None:
        return []
    last = max(i for i in range(first, len(samples)) if samples[i][1] > samples[i - 1][1] or i == first)
    return samples[max(0, first - 1) : last + 1]


def steady_part(window: list[Sample]) -> list[Sample]:
    """Without the first STEADY_AFTER seconds (start-up; finding out about noise) and the tail after
    95 % of the calls were accepted (a drain's last sessions, and calls in long retry backoff)."""
    if not window:
        return []
    start, total = window[0], window[-1][1] - window[0][1]
    return [s for s in window if s[0] >= start[0] + STEADY_AFTER and s[1] - start[1] <= 0.95 * total]


def rates(samples: list[Sample]) -> dict[str, float]:
    if len(samples) < 2:
        return {}
    (t0, c0, h0, e0), (t1, c1, h1, e1) = samples[0], samples[-1]
    seconds, calls, throttled, events = t1 - t0, c1 - c0, h1 - h0, e1 - e0
    return {
        "seconds": round(seconds, 1),
        "calls_per_second": round(calls / seconds, 1) if seconds else 0.0,
        "events_per_second": round(events / seconds, 1) if seconds else 0.0,
        "throttled_share": round(throttled / (calls + throttled), 4) if calls + throttled else 0.0,
    }


async def _load(bench: Stack, args: argparse.Namespace, name: str) -> str:
    topic = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    await make_topics(bench.broker.bootstrap, topic, args.partitions)
    loaded = await load_topic(bench.broker.bootstrap, topic, args, args.records)
    log(f"loaded {loaded.records:,} records into {topic!r} in {loaded.seconds:.0f}s")
    return topic


def mode_noise(bench: Stack, args: argparse.Namespace) -> dict[str, Any]:
    topic = asyncio.run(_load(bench, args, "noise"))
    results: dict[str, Any] = {"records": args.records, "throttle_rate": args.throttle_rate}
    for label, throttle in (("clean", 0.0), ("noise", args.throttle_rate)):
        log(f"drain {label}: emulator quota {args.max_tps:g} calls/s, {throttle:.0%} of calls throttled at random")
        configure(bench, throttle_rate=throttle)
        group = f"bench-{label}-{uuid.uuid4().hex[:6]}"
        sections = worker_sections(bench.broker.bootstrap, topic, group, bench.emulator.url, args)
        samples, views, code = drain_sampled(bench, args, topic, f"worker-{label}", sections)
        window = busy(samples)
        results.update({f"{label}_{key}": value for key, value in rates(window).items()})
        steady = steady_part(window)
        results.update({f"{label}_steady_{key}": value for key, value in rates(steady).items()})
        results[f"{label}_worker_exit"] = code
        results[f"{label}_worker_noise_estimate"] = views[-1].get("noise_share") if views else None
        results[f"{label}_per_second"] = per_second(busy(samples))
        results[f"{label}_limiter"] = views
    configure(bench, throttle_rate=0.0)
    for prefix in ("", "steady_"):
        clean_calls = results.get(f"clean_{prefix}calls_per_second")
        clean_events = results.get(f"clean_{prefix}events_per_second")
        if clean_calls and clean_events:
            noise_calls = results.get(f"noise_{prefix}calls_per_second", 0.0)
            results[f"{prefix}calls_vs_clean"] = round(noise_calls / clean_calls, 3)
            results[f"{prefix}events_vs_clean"] = round(
                results.get(f"noise_{prefix}events_per_second", 0.0) / clean_events, 3
            )
    return results


def settle_time(samples: list[Sample], limit: float = 0.10, rest: float = 0.05) -> float | None:
    """Seconds from the first call to the first second throttled ≤ `limit` after which the rest of
    the run is throttled ≤ `rest` in all: the quota found, and kept to."""
    if len(samples) < 2:
        return None
    end = samples[-1]
    for i, (t, calls, throttled, _) in enumerate(samples):
        later = next((s for s in samples[i:] if s[0] >= t + 1.0), None)
        if later is None:
            break
        now_calls, now_throttled = later[1] - calls, later[2] - throttled
        all_calls, all_throttled = end[1] - calls, end[2] - throttled
        if now_calls + now_throttled == 0 or now_throttled / (now_calls + now_throttled) > limit:
            continue
        if all_throttled <= rest * (all_calls + all_throttled):
            return round(t - samples[0][0], 2)
    return None


def mode_quota_find(bench: Stack, args: argparse.Namespace) -> dict[str, Any]:
    topic = asyncio.run(_load(bench, args, "quota"))
    log(f"emulator quota {args.quota:g} calls/s, the worker configured for {args.max_tps:g}")
    configure(bench, max_tps=args.quota)
    group = f"bench-quota-{uuid.uuid4().hex[:6]}"
    sections = worker_sections(bench.broker.bootstrap, topic, group, bench.emulator.url, args)
    sections["personalize"]["max_requests_per_second"] = args.max_tps
    samples, views, code = drain_sampled(bench, args, topic, "worker-quota-find", sections)
    configure(bench, max_tps=args.max_tps)
    window = busy(samples)
    settle = settle_time(window)
    results: dict[str, Any] = {"records": args.records, "quota": args.quota, "worker_exit": code}
    results["settle_seconds"] = settle
    results["per_second"] = per_second(window)
    results["limiter"] = views
    results.update({f"all_{key}": value for key, value in rates(window).items()})
    if settle is not None and window:
        steady = [s for s in window if s[0] >= window[0][0] + settle + 2.0]
        steady_rates = rates(steady)
        results.update({f"steady_{key}": value for key, value in steady_rates.items()})
        if steady_rates:
            results["steady_quota_utilization"] = round(steady_rates["calls_per_second"] / args.quota, 3)
    return results


def run(mode: str, bench: Stack, args: argparse.Namespace) -> dict[str, Any]:
    return mode_noise(bench, args) if mode == "noise" else mode_quota_find(bench, args)
