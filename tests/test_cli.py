"""The first hour with the command line: help, version, `produce` on the real broker, the demo's verdict."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.kafka_support import KafkaBroker, TopicFactory, consume_all
from worker import __version__
from worker.cli import build_parser
from worker.commands.demo import _report
from worker.commands.sample import generate

ROOT = Path(__file__).resolve().parent.parent


def parsers(
    parser: argparse.ArgumentParser, path: str = "personalize-worker"
) -> list[tuple[str, argparse.ArgumentParser]]:
    """The parser and every subcommand's parser, depth first."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += parsers(sub, f"{path} {name}")
    return found


def test_every_option_of_every_command_has_help() -> None:
    walked = parsers(build_parser())
    assert {path.split(" ", 1)[-1] for path, _ in walked} >= {"run", "map", "check", "produce", "emulator", "demo"}
    missing = [
        f"{path} {'/'.join(action.option_strings) or action.dest}"
        for path, parser in walked
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert not missing, f"options without help text: {missing}"
    for path, parser in walked[1:]:
        assert parser.description, f"{path} --help has no description"


def test_top_level_help_describes_the_tool_and_where_to_start() -> None:
    text = build_parser().format_help()
    assert "Kafka" in text and "Personalize" in text and "PutEvents" in text
    assert "argument parsing" not in text  # the module docstring is for maintainers, not users
    for start in ("personalize-worker demo", "check --config", "exit codes"):
        assert start in text


def test_version_is_pyprojects() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "--version"], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == f"personalize-worker {version}" == f"personalize-worker {__version__}"


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.kafka
async def test_produce_puts_json_lines_and_samples_on_the_broker_keyed_by_session(
    topic_factory: TopicFactory, kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = await topic_factory(partitions=3)
    example = (ROOT / "config" / "example-message.json").read_bytes()
    lines = tmp_path / "in.jsonl"
    lines.write_bytes(orjson.dumps(orjson.loads(example)) + b"\n\nnot json\n")
    command = [sys.executable, "-m", "worker.cli", "produce", "--bootstrap-servers", bootstrap, "--topic", topic]
    first = await asyncio.to_thread(run, [*command, "--input", str(lines)])
    assert first.returncode == 0, first.stderr
    assert f"produced 2 messages to {topic!r}" in first.stderr
    second = await asyncio.to_thread(run, [*command, "--sample", "50"])
    assert second.returncode == 0, second.stderr
    records = await consume_all(bootstrap, topic, timeout=60)
    assert len(records) == 52
    keys = Counter(record.key for record in records)
    assert keys[b"sess-7f3a"] == 1  # the example's session_id
    assert keys[None] == 1  # "not json": produced as is, for the worker to dead-letter
    sample = generate(50, seed=7)
    assert sorted(r.value for r in records if r.key not in (b"sess-7f3a", None)) == sorted(
        m.value for m in sample.messages
    )
    # A topic the broker creates on first use: aiokafka's "not found in cluster metadata" stays off the terminal.
    fresh = await asyncio.to_thread(run, [*command[:-1], f"{topic}-new", "--input", str(lines)])
    assert fresh.returncode == 0
    assert fresh.stderr.splitlines() == [f"produced 2 messages to '{topic}-new' at {bootstrap}"]


def test_produce_says_why_it_cannot_connect() -> None:
    result = run([sys.executable, "-m", "worker.cli", "produce", "--bootstrap-servers", "127.0.0.1:1", "--sample", "1"])
    assert result.returncode == 1
    assert "cannot connect to Kafka at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_that_cannot_reach_kafka_exits_1_with_one_line_saying_why(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "dummy", "AWS_SECRET_ACCESS_KEY": "dummy", "PW_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    env |= {"PW_METRICS__PORT": "0", "PW_WORKER__LOG_FORMAT": "text", "PATH": os.environ["PATH"]}
    config = str(ROOT / "config" / "worker.example.toml")
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--config", config],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 1
    assert "KafkaConnectError: cannot connect to Kafka at 127.0.0.1:1 over PLAINTEXT" in result.stderr
    assert "Unclosed" not in result.stderr, "clients left open by the failed start bury the reason"
    assert "Traceback" not in result.stderr


def demo_report(capsys: pytest.CaptureFixture[str], lose: int = 0, extra_copy: bool = False) -> tuple[int, str]:
    stream = generate(300, seed=3)
    ids = [m.source["event_id"] for m in stream.valid if m.source]
    received = Counter(ids[lose:])
    if extra_copy:
        received[ids[-1]] += 1
    reasons = Counter({"decode: not_json": stream.count("malformed")})
    totals = {"consumed": 300.0, "sent": float(len(received)), "duplicates": 6.0, "calls": 120.0}
    code = _report(stream, totals, received, 0, reasons, "topic.dlq", 2.0)
    return code, capsys.readouterr().out


def test_demo_ends_with_a_verdict_and_prints_integers_as_integers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = demo_report(capsys)
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert last.startswith("VERDICT: all ") and "delivered exactly once" in last
    assert ".0 " not in out and not out.rstrip().endswith(".0")
    assert "'topic.dlq'" in out and "events per call" in out.lower()
    code, out = demo_report(capsys, lose=3, extra_copy=True)
    assert code == 1
    assert out.strip().splitlines()[-1] == (
        "VERDICT: FAILED: 3 valid events never reached Personalize; 1 events were sent more than once"
    )


@pytest.mark.slow
def test_kafka_fetch_prints_two_plain_lines(tmp_path: Path) -> None:
    """A fresh fetch of the broker jars says what it does and what it did: no colour codes, no Maven noise."""
    local = tmp_path / "deploy" / "local"
    local.mkdir(parents=True)
    for name in ("kafka", "kafka-pom.xml"):
        (local / name).write_bytes((ROOT / "deploy" / "local" / name).read_bytes())
    (local / "kafka").chmod(0o755)
    result = run([str(local / "kafka"), "fetch"])
    assert result.returncode == 0, result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    assert "\x1b" not in result.stdout + result.stderr
    assert len(lines) == 2 and lines[0].startswith("kafka: fetching") and lines[1].startswith("kafka: fetched")
