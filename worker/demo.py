"""`make demo`: the whole job on the local stack — broker, emulator, a clickstream, the worker — then a summary.

Everything runs as real processes: the Kafka broker from the project's script, the emulator and the
worker through the CLI. Everything started here is stopped here, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from worker.sample import generate, optimal_calls

ROOT = Path(__file__).resolve().parents[1]
KAFKA_SCRIPT = ROOT / "deploy" / "local" / "kafka"
TRACKING_ID = "demo-tracking-id"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


async def _load_topic(bootstrap: str, topic: str, dlq: str, partitions: int, records: int) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1), NewTopic(dlq, 1, 1)])
    finally:
        await admin.close()
    stream = generate(records, seed=int(time.time()) % 1000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all")
    await producer.start()
    try:
        batch = [await producer.send(topic, m.value, key=m.key) for m in stream.messages]
        await asyncio.gather(*batch)
    finally:
        await producer.stop()
    return {
        "produced": len(stream.messages),
        "valid": stream.count("valid"),
        "duplicates": stream.count("duplicate"),
        "malformed": stream.count("malformed"),
        "optimal_calls": optimal_calls(stream),
    }


def _config(path: Path, bootstrap: str, topic: str, dlq: str, endpoint: str, metrics_port: int) -> None:
    path.write_text(
        f"""
[kafka]
bootstrap_servers = "{bootstrap}"
topics = ["{topic}"]
group_id = "demo-worker"

[personalize]
tracking_id = "{TRACKING_ID}"
endpoint_url = "{endpoint}"

[mapping]
properties = ["ctx.page_category", "ctx.device_type"]

[dead_letter]
topic = "{dlq}"

[metrics]
host = "127.0.0.1"
port = {metrics_port}

[worker]
log_format = "json"
""",
        encoding="utf-8",
    )


def _start_emulator(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.emulator",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-tps",
            "1000",
            "--latency-ms",
            "20",
            "--jitter-ms",
            "10",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"emulator did not start: {line!r}")
    return process, line.rsplit(" ", 1)[-1].strip()


def _emulator_stats(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=10) as response:
        stats: dict[str, Any] = orjson.loads(response.read())
        return stats


def _final_totals(log_lines: list[str]) -> dict[str, Any]:
    for line in reversed(log_lines):
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if entry.get("msg") == "stopped":
            totals: dict[str, Any] = entry.get("totals", {})
            return totals
    return {}


def run_demo(args: argparse.Namespace) -> int:
    state_dir = ROOT / ".cache" / "kafka" / "demo"
    kafka_port = free_port()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    emulator: subprocess.Popen[str] | None = None
    started_kafka = False
    try:
        _step(f"starting the Kafka broker on localhost:{kafka_port}")
        subprocess.run([str(KAFKA_SCRIPT), "start", "--port", str(kafka_port), "--dir", str(state_dir)], check=True)
        started_kafka = True
        bootstrap = f"localhost:{kafka_port}"
        _step("starting the Personalize Events emulator (1,000 calls/s quota, 20±10 ms latency)")
        emulator, endpoint = _start_emulator(env)
        topic, dlq = f"clickstream-{int(time.time())}", f"clickstream-{int(time.time())}.dlq"
        _step(f"producing {args.records} clickstream records to {topic!r} ({args.partitions} partitions)")
        produced = asyncio.run(_load_topic(bootstrap, topic, dlq, args.partitions, args.records))
        print(
            f"    {produced['valid']} valid, {produced['duplicates']} re-delivered duplicates, "
            f"{produced['malformed']} malformed",
            flush=True,
        )
        metrics_port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "worker.toml"
            _config(config, bootstrap, topic, dlq, endpoint, metrics_port)
            _step(f"running the worker until the topic is drained; metrics at http://127.0.0.1:{metrics_port}/metrics")
            started = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", "worker.cli", "run", "--config", str(config), "--until-drained"],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
                check=False,
            )
            elapsed = time.monotonic() - started
        if result.returncode != 0:
            print(result.stderr[-4000:], file=sys.stderr)
            print(f"worker exited with {result.returncode}", file=sys.stderr)
            return 1
        totals = _final_totals(result.stderr.splitlines())
        stats = _emulator_stats(endpoint)
        _print_summary(produced, totals, stats, elapsed)
        return 0
    finally:
        if emulator is not None:
            emulator.terminate()
            emulator.wait(10)
        if started_kafka:
            _step("stopping the broker and the emulator")
            subprocess.run([str(KAFKA_SCRIPT), "stop", "--dir", str(state_dir), "--port", str(kafka_port)], check=False)


def _print_summary(produced: dict[str, int], totals: dict[str, Any], stats: dict[str, Any], elapsed: float) -> None:
    calls = int(totals.get("calls", 0))
    sent = int(totals.get("sent", 0))
    rows = [
        ("records consumed", totals.get("consumed", 0)),
        ("events sent", sent),
        ("duplicates skipped", totals.get("duplicates", 0)),
        ("dead-lettered", totals.get("dead_lettered", 0)),
        ("PutEvents calls", calls),
        ("events per call", f"{sent / calls:.2f}" if calls else "-"),
        ("optimal calls for this data", produced["optimal_calls"]),
        ("events/s", f"{sent / elapsed:.0f}" if elapsed else "-"),
        ("emulator: events received", stats.get("events")),
        ("emulator: unique eventIds", stats.get("unique_event_ids")),
        ("emulator: throttled calls", stats.get("throttled")),
    ]
    print("\nsummary")
    for name, value in rows:
        print(f"  {name:<30} {value}")
    print()
