"""A real schema registry for tests: Apicurio Registry run by ``deploy/local/schema-registry``.

The session fixture ``schema_registry`` is one in-memory registry on a free port; ``SchemaRegistry`` can
also run a persistent one (an H2 file in its dir) that a test stops and starts again with its schemas.
Producers in tests use confluent-kafka's own serializers against it, so the worker's decoders are checked
by an independent implementation of the wire format.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from confluent_kafka.schema_registry import SchemaRegistryClient

from tests.kafka_support import REPO_ROOT, free_port

__all__ = ["REGISTRY_SCRIPT", "SchemaRegistry", "schema_registry"]

REGISTRY_SCRIPT = REPO_ROOT / "deploy" / "local" / "schema-registry"


@dataclass
class SchemaRegistry:
    port: int
    dir: Path
    persistent: bool = False
    start_timeout: float = 120.0

    @property
    def url(self) -> str:
        """The Confluent-compatible API's base URL, as `schema_registry.url` takes it."""
        return f"http://127.0.0.1:{self.port}/apis/ccompat/v7"

    def _run(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        args = [str(REGISTRY_SCRIPT), command, "--port", str(self.port), "--dir", str(self.dir)]
        if command == "start" and self.persistent:
            args.append("--persistent")
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        """Start (fetching the app on first use) and return once it answers."""
        proc = self._run("start", timeout=self.start_timeout + 300)
        if proc.returncode != 0:
            raise RuntimeError(f"schema registry start failed: {proc.stderr[-3000:]}\n{self.log_tail()}")

    def stop(self) -> None:
        proc = self._run("stop", timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"schema registry stop failed: {proc.stderr}")

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.dir / "registry.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no registry log: {exc})"

    def client(self) -> SchemaRegistryClient:
        """confluent-kafka's registry client (for its serializers)."""
        return SchemaRegistryClient({"url": self.url})

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return orjson.loads(response.read())

    def register(
        self, subject: str, schema: str, schema_type: str = "AVRO", references: Sequence[dict[str, Any]] = ()
    ) -> int:
        """Register through the REST API as a non-Python producer would (Protobuf as .proto text)."""
        body: dict[str, Any] = {"schema": schema, "schemaType": schema_type, "references": list(references)}
        return int(self.request("POST", f"/subjects/{subject}/versions", body)["id"])

    def wait_until_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.request("GET", "/subjects")
                return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def schema_registry(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SchemaRegistry]:
    """One in-memory registry for the whole session, on a free port; stopped at the end."""
    registry = SchemaRegistry(port=free_port(), dir=tmp_path_factory.mktemp("schema-registry"))
    try:
        await registry.astart()
    except BaseException:
        await registry.astop()
        raise
    try:
        yield registry
    finally:
        await registry.astop()
