"""A real Prometheus (Debian's `prometheus` binary) scrapes a running worker; its numbers match the emulator's.

Prometheus runs as a child of the test with a temp config and data dir on a free loopback port, and
loads deploy/prometheus/alerts.yml, so the rules are proven to load in the server itself.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.kafka_support import TopicFactory, free_port, produce
from tests.stack import EmulatorProcess, WorkerFactory, wait_until

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.e2e,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus binary not on PATH (Debian package 'prometheus'; `make test` installs it as root)",
    ),
]


class PrometheusServer:
    """`prometheus` on 127.0.0.1:<free port>, scraping one target every second."""

    def __init__(self, directory: Path, target: str) -> None:
        assert PROMETHEUS is not None
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {ALERTS}\n"
            "scrape_configs:\n  - job_name: personalize-worker\n"
            f"    static_configs:\n      - targets: ['{target}']\n",
            encoding="utf-8",
        )
        self.log_path = directory / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body: dict[str, Any] = orjson.loads(response.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single sample's value, or None while the series does not exist yet."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def rule_groups(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/rules", timeout=10) as response:
            body: dict[str, Any] = orjson.loads(response.read())
        groups: list[dict[str, Any]] = body["data"]["groups"]
        return groups

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[list[PrometheusServer]]:
    servers: list[PrometheusServer] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def clickstream(count: int) -> list[tuple[str, bytes]]:
    now = time.time()
    out = []
    for i in range(count):
        session = f"prom-s{i % 9}"
        value = {
            "user_id": f"prom-u{i % 13}",
            "session_id": session,
            "event_type": "view",
            "item_id": f"item-{i % 50}",
            "timestamp": now - 60 + i * 0.001,
        }
        out.append((session, orjson.dumps(value)))
    return out


async def test_prometheus_scrapes_the_worker_and_agrees_with_the_emulator(
    topic_factory: TopicFactory,
    worker_factory: WorkerFactory,
    emulator: EmulatorProcess,
    prometheus_factory: list[PrometheusServer],
    tmp_path: Path,
) -> None:
    topic = await topic_factory(partitions=3)
    dlq = await topic_factory(partitions=1)
    records = clickstream(500)
    await produce(worker_factory.broker.bootstrap, topic, records, linger_ms=20)
    worker = worker_factory(worker_factory.config(topic, dlq, f"{topic}-group"))
    prometheus = PrometheusServer(tmp_path, f"127.0.0.1:{worker.metrics_port}")
    prometheus_factory.append(prometheus)
    assert await asyncio.to_thread(wait_until, prometheus.ready, 30), prometheus.log_tail()

    delivered = await asyncio.to_thread(wait_until, lambda: emulator.stats()["events"] >= len(records), 45)
    assert delivered, worker.log_tail()
    received = int(emulator.stats()["events"])
    assert received == len(records)

    def scraped_total() -> bool:
        return prometheus.value("personalize_worker_events_sent_total") == received

    assert await asyncio.to_thread(wait_until, scraped_total, 20), (
        prometheus.query("personalize_worker_events_sent_total"),
        prometheus.log_tail(),
    )
    assert prometheus.value('up{job="personalize-worker"}') == 1.0
    calls = prometheus.value('personalize_worker_put_events_calls_total{outcome="ok"}')
    assert calls == emulator.stats()["calls"]
    assert prometheus.value("personalize_worker_records_consumed_total") == len(records)
    per_call = prometheus.value("personalize_worker_events_per_call_sum / personalize_worker_events_per_call_count")
    assert per_call is not None and per_call == pytest.approx(received / emulator.stats()["calls"])
    caught_up = await asyncio.to_thread(
        wait_until, lambda: prometheus.value("sum(personalize_worker_consumer_lag)") == 0.0, 20
    )
    assert caught_up, prometheus.query("personalize_worker_consumer_lag")

    groups = await asyncio.to_thread(prometheus.rule_groups)
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 9
    assert all(rule["health"] in ("ok", "unknown") for rule in rules), [
        (r["name"], r.get("lastError")) for r in rules if r["health"] == "err"
    ]
