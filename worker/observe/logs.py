"""Structured logs: one JSON object per line, extras as fields. Never pass user identifiers or secrets."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_"))
        line = f"{record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if extras:
            line += f" [{extras}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class RepeatFilter(logging.Filter):
    """Lets a library's repeated line through once per `every` seconds, then says how many were held back.

    Why: while the broker is down aiokafka logs the same coordinator error ~10 times a second, which buries
    the worker's own one-line alarms and fills log storage. Keyed by logger and message template (never the
    formatted text, which may carry addresses), with a bounded number of keys.
    """

    MAX_KEYS = 256

    def __init__(self, prefixes: tuple[str, ...], every: float = 30.0, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._prefixes = prefixes
        self._every = every
        self._clock = clock
        self._seen: dict[tuple[str, str], list[float | int]] = {}  # key -> [last shown, held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self._every:
            entry[1] += 1
            return False
        if entry is None and len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()
        if entry is not None and entry[1]:
            record.repeated = int(entry[1])  # shown as a field: lines like this one held back since the last
        self._seen[key] = [now, 0]
        return True


def configure(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RepeatFilter(("aiokafka",)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka is chatty at INFO about every coordinator step; its warnings still come through.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # botocore logs whole request bodies (userIds) at DEBUG: user identifiers must never reach the logs.
    for name in ("botocore", "aiobotocore", "boto3", "aioboto3", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))
