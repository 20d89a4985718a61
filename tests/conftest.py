"""Shared pytest fixtures."""

from tests.kafka_support import *  # noqa: F403  (re-exports the Kafka broker fixtures)
