"""How every Kafka client connects: the options they share (TLS, SASL, MSK IAM), and start-up failures told
in one line of the worker's own instead of aiokafka's retries and copies at ERROR."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator
from typing import Any

from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    CoordinatorNotAvailableError,
    KafkaConnectionError,
    NotCoordinatorError,
)
from aiokafka.helpers import create_ssl_context

from worker.config import KafkaSettings
from worker.errors import KafkaConnectError

log = logging.getLogger("worker.connection")  # the pre-move name: log filters match it


def kafka_security(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by the consumer, the dead-letter producer and `check`."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        cafile = str(settings.ssl_cafile) if settings.ssl_cafile else None
        try:
            options["ssl_context"] = create_ssl_context(cafile=cafile)
        except (OSError, ssl.SSLError) as error:  # the bare "[Errno 2] No such file" names no file
            raise KafkaConnectError(f"kafka.ssl_cafile {cafile!r} cannot be used: {error}") from None
    if settings.sasl_mechanism is not None:
        options["sasl_mechanism"] = settings.sasl_mechanism
        if settings.sasl_mechanism == "OAUTHBEARER":
            from worker.kafka.msk import MskIamTokenProvider  # only for users of MSK IAM auth

            options["sasl_oauth_token_provider"] = MskIamTokenProvider(settings.aws_region)
        else:
            options["sasl_plain_username"] = settings.sasl_username
            password = settings.sasl_password
            options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


class _BootstrapFailures(logging.Filter):
    """aiokafka logs why each bootstrap server failed, then raises a bare "Unable to bootstrap": keep the why
    for the one error line that names it, and drop aiokafka's copy of it."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        msg, args = record.msg, record.args
        if isinstance(msg, str) and msg.startswith("Unable connect to") and isinstance(args, tuple) and len(args) == 3:
            error = args[2]
            # A connection that timed out says nothing by itself ("").
            self.reasons.append(str(error) or f"{type(error).__name__}: no answer")
            return False
        return True


@contextlib.contextmanager
def explain_connection_errors(settings: KafkaSettings) -> Iterator[None]:
    """Turn a failed bootstrap into one start-up error naming the cause and the settings to check."""
    failures = _BootstrapFailures()
    client_log = logging.getLogger("aiokafka")
    client_log.addFilter(failures)
    try:
        yield
    except KafkaConnectionError as error:
        reasons = "; ".join(dict.fromkeys(failures.reasons)) or str(error)
        hint = ""
        if "SaslAuthenticationFailed" in reasons or "authentication" in reasons.lower():
            hint = " (authentication failed: check kafka.sasl_username, kafka.sasl_password, kafka.sasl_mechanism)"
        elif "CERTIFICATE_VERIFY_FAILED" in reasons:
            hint = " (the broker's certificate is not trusted: check kafka.ssl_cafile)"
        where = f"{settings.bootstrap_servers} over {settings.security_protocol}"
        raise KafkaConnectError(f"cannot connect to Kafka at {where}{hint}: {reasons}") from None
    finally:
        client_log.removeFilter(failures)
    if failures.reasons:  # another server answered: worth one line, the list may hold a dead host
        log.warning("some bootstrap servers failed", extra={"reasons": list(dict.fromkeys(failures.reasons))})


_COORDINATOR_NOT_READY = (CoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError)


class CoordinatorNotReadyYet(logging.Filter):
    """aiokafka logs "Group Coordinator Request failed" at ERROR while a fresh cluster is still creating
    __consumer_offsets, and retries: part of a normal first start, so INFO until the first assignment.
    Any other error, and these ones later, keep their level."""

    def __init__(self, assigned: asyncio.Event) -> None:
        super().__init__()
        self._assigned = assigned

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            not self._assigned.is_set()
            and record.msg == "Group Coordinator Request failed: %s"
            and isinstance(args, tuple)
            and args
            and isinstance(args[0], _COORDINATOR_NOT_READY)
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True
