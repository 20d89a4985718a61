"""One root exception; callers branch on attributes, not on long lists of types."""


class WorkerError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(WorkerError):
    """The configuration cannot start a worker; the message names the key."""


class KafkaConnectError(WorkerError):
    """Kafka cannot be reached or refuses the connection at start-up; the message says why and which key to check."""
