"""Source topics: subscribed so that none is ever created by the worker, and watched while one is missing.

aiokafka 0.14 asks for a subscribed topic's metadata with `allow_auto_topic_creation=true` and has no
switch for it, so a misspelt topic became a new, empty topic wherever the broker auto-creates (and a
backfill then "drained" it and exited 0). Subscribing by a pattern that matches exactly the configured
names makes it ask for every topic's metadata instead, a request that never creates one; a topic that
appears later joins the subscription at the next metadata refresh, which the watch forces.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Sequence
from typing import Any

from worker.errors import WorkerError
from worker.observe.metrics import Metrics

log = logging.getLogger("worker.topics")  # the pre-move name: log filters match it

RECHECK_SECONDS = 5.0
"""How often the cluster is asked again while a source topic is missing (one small metadata request)."""
WATCH_SECONDS = 30.0
"""How often the consumer's own metadata (refreshed by aiokafka) is looked at while none is missing."""


async def cluster_topics(client: Any) -> set[str]:
    """Every topic the cluster has, from an aiokafka client: a request for all topics never creates one."""
    metadata = await client.fetch_all_metadata()
    return set(metadata.topics())


class MissingTopicsError(WorkerError):
    """`--until-drained` with a source topic the cluster does not have: nothing to drain, so a failure."""


def exact_pattern(topics: Sequence[str]) -> str:
    """A regex matching exactly these names (config validation keeps them to Kafka's legal characters)."""
    return "(?:" + "|".join(re.escape(topic) for topic in topics) + r")\Z"


def keep_watching_every_topic(client: Any) -> None:
    """Keep a pattern-subscribed consumer's metadata requests about every topic.

    aiokafka's fetcher, meeting a partition its metadata does not know yet (one just added to a topic, and
    assigned by a group leader that saw it first), adds its topic to the client's list; from then on the
    client asks about that topic alone, by name: auto-created if deleted meanwhile, and the only topic the
    pattern still sees, so the others would drop out of the subscription. A refresh of every topic answers
    the fetcher just as well.
    """
    client.add_topic = lambda topic: client.force_metadata_update()


def describe_missing(missing: Sequence[str]) -> str:
    names = ", ".join(repr(topic) for topic in missing)
    return f"source topic {names} does not exist" if len(missing) == 1 else f"source topics {names} do not exist"


class TopicWatch:
    """Which configured source topics the cluster lacks: a gauge, the /readyz reason, one log line per change."""

    def __init__(self, topics: Sequence[str], metrics: Metrics) -> None:
        self._topics = tuple(topics)
        self._metrics = metrics
        self.missing: tuple[str, ...] = ()
        self._checked = False

    @property
    def reason(self) -> str | None:
        if not self.missing:
            return None
        return f"{describe_missing(self.missing)}; waiting (the worker never creates source topics)"

    def missing_in(self, present: Collection[str]) -> tuple[str, ...]:
        return tuple(topic for topic in self._topics if topic not in present)

    def update(self, present: Collection[str]) -> None:
        """Record what the cluster has (the first time, and at each change, in the gauge and the log)."""
        missing = self.missing_in(present)
        if missing != self.missing or not self._checked:
            self._metrics.source_topics_missing.set(len(missing))
            if missing:
                # Once per change, not per metadata refresh: the gauge and /readyz carry it meanwhile.
                log.error(
                    "source topic missing; waiting for it to be created (the worker never creates source topics)",
                    extra={"topics": list(missing), "check": "kafka.topics"},
                )
            elif self.missing:
                log.info("source topics present", extra={"topics": list(self._topics)})
        self.missing = missing
        self._checked = True

    def fail_if_missing(self, present: Collection[str]) -> None:
        """For `--until-drained`: a missing topic is an error now (its one line), not something to wait for."""
        missing = self.missing_in(present)
        if missing:
            raise MissingTopicsError(
                f"{describe_missing(missing)} (the worker never creates source topics; check kafka.topics)"
            )
