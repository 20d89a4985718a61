"""`map --route` and `check` with routes: the dry run of one route (request member, batch/coalescing key, dead-letter
reasons, exit codes) through the CLI, and `check` per route against the real broker and an emulator that knows
some trackers and datasets."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError

from tests.kafka_support import TopicFactory
from tests.stack import AWS_ENV, EmulatorProcess
from tests.test_routes_e2e import routes_toml
from worker.commands.check import verdict
from worker.personalize.operations.spec import EVENTS, SPECS

ITEMS_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/ITEMS"
UNKNOWN_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/other/USERS"


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        input=stdin,
        capture_output=True,
        check=False,
        timeout=120,
        env=_env(),
    )


def _env() -> dict[str, str]:
    import os

    return {**os.environ, **AWS_ENV}


def config(tmp_path: Path, routes: list[dict[str, Any]], head: str = "") -> Path:
    path = tmp_path / "routes.toml"
    path.write_text(head + '[personalize]\nregion = "us-east-1"\n\n' + routes_toml(routes), encoding="utf-8")
    return path


ROUTES: list[dict[str, Any]] = [
    {
        "name": "clicks",
        "topics": ["clicks"],
        "tracking_id_field": "site",
        "trackers": {"a": "trk-a", "b": "trk-b"},
        "dead_letter_topic": "clicks.dlq",
    },
    {
        "name": "catalog",
        "topics": ["items"],
        "operation": "items",
        "dataset_arn": ITEMS_ARN,
        "envelope": "debezium",
        "mapping": {"properties": "*"},
        "dead_letter_topic": "items.dlq",
    },
]


def lines(stdout: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stdout.splitlines()]


def test_map_without_route_names_the_routes(tmp_path: Path) -> None:
    result = cli("map", "--config", str(config(tmp_path, ROUTES)))
    assert result.returncode == 2
    said = result.stderr.decode()
    assert "choose one with --route NAME" in said
    assert "clicks: events (PutEvents) from clicks" in said and "catalog: items (PutItems) from items" in said
    unknown = cli("map", "--config", str(config(tmp_path, ROUTES)), "--route", "nope")
    assert unknown.returncode == 2 and "no route named 'nope'" in unknown.stderr.decode()


def test_map_route_events_shows_tracker_batch_key_and_dead_letters(tmp_path: Path) -> None:
    event = {"event_id": "e1", "session_id": "s", "user_id": "u", "event_type": "click", "timestamp": 1.7e9}
    sample = b"\n".join(
        orjson.dumps(e)
        for e in (
            {**event, "site": "a"},
            {**event, "event_id": "e2", "site": "b"},
            {**event, "site": "a"},  # a duplicate of e1
            {**event, "event_id": "e3", "site": "zz"},
        )
    )
    result = cli("map", "--config", str(config(tmp_path, ROUTES)), "--route", "clicks", stdin=sample + b"\n{oops\n")
    assert result.returncode == 1, result.stderr
    *entries, last = lines(result.stdout)
    assert entries[0]["batch_key"] == ["trk-a", "s", "u"] and entries[0]["eventList"]["eventId"] == "e1"
    assert entries[0]["request"] == {"trackingId": "trk-a", "sessionId": "s", "userId": "u"}
    assert entries[1]["request"]["trackingId"] == "trk-b"
    assert entries[2]["duplicate_of"] == "e1"
    assert entries[3]["dead_letter"]["reason"] == "unknown_tracker"
    assert entries[4]["dead_letter"]["reason"] == "not_json"
    summary = last["summary"]
    assert (summary["records"], summary["duplicates"], summary["dead_lettered"], summary["calls"]) == (2, 1, 2, 2)
    assert summary["dead_letter_reasons"] == {"unknown_tracker": 1, "not_json": 1}


def test_map_route_items_shows_coalescing_key_superseded_and_deleted(tmp_path: Path) -> None:
    changes = [
        {"op": "c", "after": {"item_id": "a", "price": 1}},
        {"op": "u", "after": {"item_id": "a", "price": 2}},
        {"op": "c", "after": {"item_id": "b", "price": 5}},
        {"op": "d", "before": {"item_id": "c"}},
    ]
    sample = b"\n".join(orjson.dumps(c) for c in changes)
    result = cli("map", "--config", str(config(tmp_path, ROUTES)), "--route", "catalog", stdin=sample)
    assert result.returncode == 0, result.stderr
    *entries, last = lines(result.stdout)
    assert [e.get("coalescing_key") for e in entries] == ["a", "a", "b", None]
    assert entries[1]["supersedes_line"] == 1 and orjson.loads(entries[1]["items"]["properties"]) == {"price": 2}
    assert entries[0]["request"] == {"datasetArn": ITEMS_ARN}
    assert "deleted" in entries[3]
    summary = last["summary"]
    assert (summary["records"], summary["superseded"], summary["deleted"], summary["calls"]) == (2, 1, 1, 1)


def test_a_missing_dataset_fails_naming_its_arn() -> None:
    error = ClientError({"Error": {"Code": "ResourceNotFoundException", "Message": "x"}}, "PutUsers")
    ok, detail = verdict(SPECS["users"], UNKNOWN_ARN, error, None)
    assert not ok and UNKNOWN_ARN in detail and "dataset" in detail
    invalid = ClientError({"Error": {"Code": "InvalidInputException", "Message": "empty"}}, "PutEvents")
    assert verdict(EVENTS, "trk", invalid, None) == (True, "reachable, credentials accepted")


@pytest.mark.kafka
async def test_check_checks_every_route(topic_factory: TopicFactory, kafka_broker: Any, tmp_path: Path) -> None:
    clicks, items, clicks_dlq = [await topic_factory(partitions=1) for _ in range(3)]
    emulator = EmulatorProcess(args=["--tracking-ids", "trk-a,trk-b", "--dataset-arns", ITEMS_ARN])
    emulator.start()
    try:
        routes = [
            {**ROUTES[0], "topics": [clicks], "dead_letter_topic": clicks_dlq},
            {**ROUTES[1], "topics": [items, "missing-topic"]},
            {
                "name": "people",
                "topics": [items + "-users"],
                "operation": "users",
                "dataset_arn": UNKNOWN_ARN,
                "mapping": {"properties": ["tier"]},
                "dead_letter_topic": "people.dlq",
            },
        ]
        head = f'[kafka]\nbootstrap_servers = "{kafka_broker.bootstrap}"\n\n'
        path = config(tmp_path, routes, head)
        text = path.read_text(encoding="utf-8").replace(
            '[personalize]\nregion = "us-east-1"\n',
            f'[personalize]\nregion = "us-east-1"\nendpoint_url = "{emulator.url}"\n',
        )
        path.write_text(text, encoding="utf-8")
        result = await asyncio.to_thread(cli, "check", "--config", str(path))
    finally:
        emulator.stop()
    said = result.stdout.decode().splitlines()
    assert result.returncode == 1, said

    def line(what: str) -> str:
        found = [s for s in said if what in s]
        assert len(found) == 1, (what, said)
        return found[0]

    assert line(f"route 'clicks': source topic {clicks!r}").startswith("[ok  ]")
    assert line(f"route 'clicks': dead-letter topic {clicks_dlq!r}:").startswith("[ok  ]")
    assert line("route 'catalog': source topic 'missing-topic'").startswith("[FAIL]")
    assert "fix routes[].topics" in line("route 'catalog': source topic 'missing-topic'")
    assert line("route 'catalog': dead-letter topic 'items.dlq':")
    for tracker in ("trk-a", "trk-b"):  # each tracker of the route
        assert line(f"route 'clicks': Personalize PutEvents to {tracker!r}").startswith("[ok  ]")
    assert line(f"route 'catalog': Personalize PutItems to {ITEMS_ARN!r}").startswith("[ok  ]")
    people = line("route 'people': Personalize PutUsers")
    # The emulator validates an empty list before its registry, as AWS does: reachable, existence unproven.
    assert people.startswith("[ok  ]") and "reachable" in people
