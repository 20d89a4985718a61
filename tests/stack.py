"""Real processes for end-to-end tests: the emulator and the worker CLI in subprocesses.

Fixtures `emulator` and `worker_factory` start them and always stop them; `write_config` renders a
TOML settings file. Everything talks over loopback only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from tests.kafka_support import KafkaBroker, free_port

__all__ = [
    "EmulatorProcess",
    "WorkerFactory",
    "WorkerProcess",
    "emulator",
    "worker_factory",
    "write_config",
]

AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
TRACKING_ID = "e2e-tracking"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{orjson.dumps(k).decode()} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _http(url: str, body: bytes | None = None, timeout: float = 30.0, context: ssl.SSLContext | None = None) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        data: bytes = response.read()
        return data


@dataclass
class EmulatorProcess:
    """`python -m worker.emulator` on a free port; inspection through its HTTP endpoints (trusting
    `context` when it serves TLS: `--tls-cert`)."""

    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None
    url: str = ""
    context: ssl.SSLContext | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.emulator", "--host", "127.0.0.1", "--port", "0", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.url = line.rsplit(" ", 1)[-1].strip()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(_http(f"{self.url}/_emulator/stats", context=self.context))
        return result

    def events(self) -> list[dict[str, Any]]:
        raw = _http(f"{self.url}/_emulator/events", timeout=120, context=self.context)
        return [orjson.loads(line) for line in raw.splitlines() if line]

    def config(self) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(_http(f"{self.url}/_emulator/config", context=self.context))
        return result

    def configure(self, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(
            _http(f"{self.url}/_emulator/config", orjson.dumps(changes), context=self.context)
        )
        return result

    def reset(self) -> None:
        _http(f"{self.url}/_emulator/reset", b"{}", context=self.context)


@dataclass
class WorkerProcess:
    """`personalize-worker run` in a subprocess, logs captured to a file for failure reports."""

    config: Path
    log_path: Path
    metrics_port: int
    until_drained: bool = False
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "worker.cli", "run", "--config", str(self.config)]
        if self.until_drained:
            command.append("--until-drained")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **AWS_ENV, **self.env}
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running after {timeout}s; log tail:\n{self.log_tail()}") from None

    async def await_exit(self, timeout: float) -> int:
        return await asyncio.to_thread(self.wait, timeout)

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(sig)

    def stop(self) -> None:
        if self.running:
            self.signal(signal.SIGTERM)
            try:
                self.wait(60)
            except AssertionError:
                self.signal(signal.SIGKILL)
                self.wait(10)

    def metrics(self) -> dict[str, float]:
        """Current samples of /metrics as {'name{labels}': value}."""
        text = _http(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class WorkerFactory:
    """Builds configs and worker processes for one test; stops every worker it started."""

    def __init__(self, broker: KafkaBroker, emulator: EmulatorProcess, tmp: Path) -> None:
        self.broker = broker
        self.emulator = emulator
        self.tmp = tmp
        self.workers: list[WorkerProcess] = []

    def config(self, topic: str, dlq: str, group: str, **overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        sections: dict[str, dict[str, Any]] = {
            "kafka": {"bootstrap_servers": self.broker.bootstrap, "topics": [topic], "group_id": group},
            "personalize": {"tracking_id": TRACKING_ID, "endpoint_url": self.emulator.url},
            "mapping": {"properties": ["ctx.page_category", "ctx.device_type"]},
            "batching": {"linger_ms": 100},
            "dead_letter": {"topic": dlq},
            "metrics": {"host": "127.0.0.1"},
            "worker": {"log_format": "json", "drain_timeout_seconds": 20, "commit_interval_seconds": 0.5},
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        return sections

    def __call__(
        self,
        sections: Mapping[str, Mapping[str, Any]],
        *,
        until_drained: bool = False,
        env: Mapping[str, str] | None = None,
        start: bool = True,
    ) -> WorkerProcess:
        index = len(self.workers)
        port = free_port()
        merged = {k: dict(v) for k, v in sections.items()}
        merged.setdefault("metrics", {})["port"] = port
        config = write_config(self.tmp / f"worker-{index}.toml", merged)
        worker = WorkerProcess(config, self.tmp / f"worker-{index}.log", port, until_drained, dict(env or {}))
        self.workers.append(worker)
        if start:
            worker.start()
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture
def emulator() -> Iterator[EmulatorProcess]:
    process = EmulatorProcess()
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def worker_factory(
    kafka_broker: KafkaBroker, emulator: EmulatorProcess, tmp_path: Path
) -> AsyncIterator[WorkerFactory]:
    factory = WorkerFactory(kafka_broker, emulator, tmp_path)
    try:
        yield factory
    finally:
        await asyncio.to_thread(factory.stop_all)
        # pytest shows captured output only for failing tests: the worker logs explain the failure.
        for worker in factory.workers:
            print(f"--- {worker.log_path.name}\n{worker.log_tail()}")


def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
