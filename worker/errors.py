"""One root exception; callers branch on attributes, not on long lists of types."""


class WorkerError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(WorkerError):
    """The configuration cannot start a worker; the message names the key."""
