"""The pure parts of start-up: the exact-name subscription and its watch, and how start-up failures and a
fresh cluster's first moments are logged; `check`'s verdict when the broker will not say."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, cast

import pytest
from aiokafka.errors import GroupCoordinatorNotAvailableError, KafkaConnectionError

from worker.commands.check import _check_dead_letter_topic, _Cluster
from worker.config import KafkaSettings, Settings
from worker.errors import KafkaConnectError
from worker.kafka.connection import CoordinatorNotReadyYet, explain_connection_errors
from worker.kafka.source import Source
from worker.kafka.topics import TopicWatch, exact_pattern
from worker.observe.metrics import Metrics

MISSING = "source topic missing; waiting for it to be created (the worker never creates source topics)"


def test_exact_pattern_matches_the_names_and_nothing_else() -> None:
    pattern = re.compile(exact_pattern(["clicks.v1", "views"]))
    assert pattern.match("clicks.v1") and pattern.match("views")
    for other in ("clicksXv1", "clicks.v1.dlq", "views2", "xviews", "clicks", ""):
        assert not pattern.match(other), other


def test_topic_watch_logs_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    watch = TopicWatch(["a", "b"], metrics)
    with caplog.at_level(logging.INFO, logger="worker.topics"):
        watch.update({"a"})
        for _ in range(50):  # every re-check while "b" is missing
            watch.update({"a", "other"})
        assert watch.reason is not None and "'b'" in watch.reason and "'a'" not in watch.reason
        assert metrics.source_topics_missing._value.get() == 1
        watch.update({"a", "b"})  # it appeared
        assert watch.reason is None and metrics.source_topics_missing._value.get() == 0
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", MISSING),
        ("INFO", "source topics present"),
    ]


def test_coordinator_not_ready_is_info_only_until_the_first_assignment() -> None:
    logger = logging.getLogger("aiokafka.consumer.group_coordinator")
    assigned = asyncio.Event()
    keep = CoordinatorNotReadyYet(assigned)

    def record(error: Exception) -> logging.LogRecord:
        return logger.makeRecord(
            logger.name, logging.ERROR, "f", 1, "Group Coordinator Request failed: %s", (error,), None
        )

    early = record(GroupCoordinatorNotAvailableError())
    logger.setLevel(logging.WARNING)
    try:
        assert not keep.filter(early) and early.levelno == logging.INFO
        other = record(KafkaConnectionError("refused"))
        assert keep.filter(other) and other.levelno == logging.ERROR  # only the not-ready ones
        assigned.set()
        late = record(GroupCoordinatorNotAvailableError())
        assert keep.filter(late) and late.levelno == logging.ERROR  # once running it is a real problem
    finally:
        logger.setLevel(logging.NOTSET)


def test_bootstrap_failures_are_told_once_by_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    """aiokafka's own "Unable connect to" line is dropped: the worker's one line carries it (or, when another
    server answered, one warning)."""
    client_log = logging.getLogger("aiokafka")
    settings = KafkaSettings(bootstrap_servers="a:1,b:2")
    with caplog.at_level(logging.INFO):
        with explain_connection_errors(settings):
            client_log.error('Unable connect to "%s:%s": %s', "a", 1, ConnectionRefusedError(111, "refused"))
        with pytest.raises(KafkaConnectError) as failed, explain_connection_errors(settings):
            client_log.error('Unable connect to "%s:%s": %s', "b", 2, TimeoutError())
            raise KafkaConnectionError("Unable to bootstrap from [...]")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("worker.connection", "WARNING", "some bootstrap servers failed")
    ]
    assert str(failed.value) == "cannot connect to Kafka at a:1,b:2 over PLAINTEXT: TimeoutError: no answer"


async def test_the_fetcher_cannot_narrow_the_pattern_subscription_to_one_named_topic() -> None:
    """What aiokafka's fetcher does for a partition its metadata lacks: with the topic added by name, every
    later refresh would ask for that topic alone (auto-creating it) and the pattern would lose the others."""
    settings = Settings.model_validate({"personalize": {"tracking_id": "t"}, "kafka": {"topics": ["a", "b"]}})
    source = Source(settings, cast(Any, None), Metrics())
    try:
        client = source.consumer._client
        refreshed = client.add_topic("a")
        assert client._topics == set()  # empty: every topic
        assert client._md_update_fut is not None  # ... and a refresh of all of them is on its way
        refreshed.cancel()
    finally:
        await source.consumer.stop()  # never started: closed only so it warns of nothing


def test_check_warns_when_the_broker_will_not_describe_its_config(capsys: pytest.CaptureFixture[str]) -> None:
    """An ACL may refuse DescribeConfigs: say what is unknown, without failing the check for it."""
    settings = Settings.model_validate(
        {"personalize": {"tracking_id": "t"}, "kafka": {"topics": ["a"]}, "dead_letter": {"topic": "a.dlq"}}
    )
    refused = "ClusterAuthorizationFailedError: not authorized"
    cluster = _Cluster(topics={"a"}, partitions={"a": 1}, max_message_bytes={}, broker=None, broker_error=refused)
    assert _check_dead_letter_topic(settings, cluster)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[WARN] dead-letter topic 'a.dlq': does not exist, and whether the broker would create it is unknown "
        f"({refused}); create it: kafka-topics.sh --bootstrap-server localhost:9092 --create --topic a.dlq",
        "[WARN] dead-letter sizes: the source topics' max.message.bytes could not be read (DescribeConfigs)",
    ]
