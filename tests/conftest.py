"""Shared pytest fixtures: the real broker (kafka_support) and real processes (stack)."""

from tests.kafka_support import *  # noqa: F403  (re-exports the Kafka broker fixtures)
from tests.proxy_support import *  # noqa: F403  (re-exports the tinyproxy fixtures)
from tests.stack import *  # noqa: F403  (re-exports the emulator and worker fixtures)
