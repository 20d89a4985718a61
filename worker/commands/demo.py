"""`make demo`: the whole job on the local stack — broker, emulator, a clickstream, the worker — then a summary.

Everything runs as real processes: the Kafka broker from the project's script, the emulator and the
worker through the CLI. Everything started here is stopped here, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from worker.commands.sample import Clickstream, generate, optimal_calls

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = ROOT / "deploy" / "local" / "kafka"
TRACKING_ID = "demo-tracking-id"
GROUP = "demo-worker"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


async def _load_topic(bootstrap: str, topic: str, dlq: str, partitions: int, records: int) -> Clickstream:
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
    return stream


async def _inspect_kafka(bootstrap: str, topic: str, partitions: int, dlq: str, group: str) -> tuple[int, Counter[str]]:
    """Records not yet committed by the group, and the dead letters by stage/reason (from their headers)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    reasons: Counter[str] = Counter()
    try:
        source = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(source)
        uncommitted = sum(end - max(committed[tp].offset, 0) if tp in committed else end for tp, end in ends.items())
        letters = [TopicPartition(dlq, 0)]  # created with one partition
        consumer.assign(letters)
        await consumer.seek_to_beginning(*letters)
        remaining = sum((await consumer.end_offsets(letters)).values())
        while remaining > 0:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                remaining -= len(records)
                for record in records:
                    headers = {name: value.decode() for name, value in record.headers}
                    reasons[f"{headers.get('dlq.error.stage')}: {headers.get('dlq.error.reason')}"] += 1
    finally:
        await consumer.stop()
    return uncommitted, reasons


def _config(path: Path, bootstrap: str, topic: str, dlq: str, endpoint: str, metrics_port: int) -> None:
    path.write_text(
        f"""
[kafka]
bootstrap_servers = "{bootstrap}"
topics = ["{topic}"]
group_id = "{GROUP}"

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


def _emulator_events(url: str) -> Counter[str]:
    """Copies received per eventId."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/_emulator/events", timeout=120) as response:
        return Counter(orjson.loads(line)["eventId"] for line in response.read().splitlines() if line)


def _kafka(command: str, *args: str) -> None:
    """The project's broker script, its chatter kept out of the demo's output unless it fails."""
    result = subprocess.run([str(KAFKA_SCRIPT), command, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise RuntimeError(f"deploy/local/kafka {command} failed (exit {result.returncode})")


def run_demo(args: argparse.Namespace) -> int:
    state_dir = ROOT / ".cache" / "kafka" / "demo"
    kafka_port = free_port()
    env = {
        **os.environ,
        # The emulator accepts any keys, but the AWS SDK signs every request and needs some.
        "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    emulator: subprocess.Popen[str] | None = None
    started_kafka = False
    report: tuple[Any, ...] = ()
    failure = "VERDICT: FAILED: the demo stopped early (see above)"
    try:
        _step(f"starting a local Kafka broker on localhost:{kafka_port}")
        _kafka("start", "--port", str(kafka_port), "--dir", str(state_dir))
        started_kafka = True
        bootstrap = f"localhost:{kafka_port}"
        _step("starting the Personalize Events emulator (1,000 calls/s quota, 20±10 ms latency)")
        emulator, endpoint = _start_emulator(env)
        topic, dlq = f"clickstream-{int(time.time())}", f"clickstream-{int(time.time())}.dlq"
        _step(f"producing {args.records:,} clickstream records to topic {topic!r} ({args.partitions} partitions)")
        stream = asyncio.run(_load_topic(bootstrap, topic, dlq, args.partitions, args.records))
        print(
            f"    {stream.count('valid'):,} valid, {stream.count('duplicate'):,} re-delivered duplicates, "
            f"{stream.count('malformed'):,} malformed",
            flush=True,
        )
        metrics_port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "worker.toml"
            _config(config, bootstrap, topic, dlq, endpoint, metrics_port)
            _step(
                f"running the worker until the topic is drained (metrics while it runs: http://127.0.0.1:{metrics_port}/metrics)"
            )
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
            failure = f"VERDICT: FAILED: the worker exited with code {result.returncode}; its last log lines are above"
            return 1
        uncommitted, reasons = asyncio.run(_inspect_kafka(bootstrap, topic, args.partitions, dlq, GROUP))
        received = _emulator_events(endpoint)
        report = (stream, _final_totals(result.stderr.splitlines()), received, uncommitted, reasons, dlq, elapsed)
    finally:
        if emulator is not None:
            emulator.terminate()
            emulator.wait(10)
        if started_kafka:
            _step("stopping the broker and the emulator")
            with contextlib.suppress(RuntimeError):
                _kafka("stop", "--dir", str(state_dir), "--port", str(kafka_port))
        if not report:
            print(failure, flush=True)  # in `finally`: after the clean-up, even when an error propagates
    return _report(*report)  # last, so that the verdict ends the output


def _report(
    stream: Clickstream,
    totals: dict[str, Any],
    received: Counter[str],
    uncommitted: int,
    reasons: Counter[str],
    dlq: str,
    elapsed: float,
) -> int:
    """The summary a newcomer can check against the input, and one verdict line; 0 when all is as promised."""
    expected = {m.source["event_id"] for m in stream.valid if m.source}
    missing = expected - received.keys()
    copies = sum(received.values()) - len(received)
    calls, sent = int(totals.get("calls", 0)), int(totals.get("sent", 0))
    optimal = optimal_calls(stream)
    sessions = len({(m.source["session_id"], m.source.get("user_id")) for m in stream.valid if m.source})
    dead = sum(reasons.values())
    print("\nsummary")
    rows = [
        ("records consumed", f"{int(totals.get('consumed', 0)):,}"),
        ("events sent to Personalize", f"{sent:,} (the emulator received {len(received):,} unique eventIds)"),
        ("duplicates skipped", f"{int(totals.get('duplicates', 0)):,} (same eventId already delivered)"),
        ("dead-lettered", f"{dead:,} records, in topic {dlq!r} with dlq.error.* headers:"),
        *((f"  {reason}", f"{count:,}") for reason, count in reasons.most_common()),
        ("PutEvents calls", f"{calls:,}, {sent / calls if calls else 0:.2f} events per call"),
        ("throughput", f"{sent / elapsed:,.0f} events/s from worker start to exit" if elapsed else "-"),
    ]
    for name, value in rows:
        print(f"  {name:<32} {value}")
    print(
        "\n  Events per call: one call carries the events of one session, up to 10, and the quota counts calls.\n"
        f"  This sample's {sessions:,} sessions are mostly short (browsing traffic): at best {optimal:,} calls\n"
        f"  ({len(expected) / optimal:.2f} events each) could carry it, and the worker used {calls:,}. With longer\n"
        "  sessions calls fill up to 10 events (`make bench`: 9.2 per call).\n"
    )
    problems = []
    if missing:
        problems.append(f"{len(missing):,} valid events never reached Personalize")
    if copies:
        problems.append(f"{copies:,} events were sent more than once")
    if dead != stream.count("malformed"):
        problems.append(f"{dead:,} dead letters for {stream.count('malformed'):,} malformed records")
    if uncommitted:
        problems.append(f"{uncommitted:,} records not committed")
    print("Next: README.md, 'Run it against your own Kafka and Personalize'.\n")
    if problems:
        print("VERDICT: FAILED: " + "; ".join(problems), flush=True)
        return 1
    print(
        f"VERDICT: all {len(expected):,} valid events delivered exactly once, {stream.count('duplicate'):,} "
        f"duplicates skipped, {dead:,} malformed records dead-lettered, every offset committed.",
        flush=True,
    )
    return 0
