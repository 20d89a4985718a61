"""The real CLI behind a real authenticating proxy (tinyproxy with BasicAuth): the emulator serves HTTPS
with a throw-away CA, the worker and `check` reach it only through HTTPS_PROXY.

Proven here: `check` and `run` both go through the proxy (its log shows their CONNECTs), every event
arrives with a verified signature, the tunnels are kept alive, and the proxy password appears nowhere;
with a wrong password nothing is lost or dead-lettered, and the alarm is loud: /readyz names the
proxy, the connection-error counter rises, the log says it once.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.kafka_support import KafkaBroker, create_topic, produce
from tests.proxy_support import Tinyproxy, TinyproxyFactory, make_certificates
from tests.stack import AWS_ENV, EmulatorProcess, WorkerFactory, wait_until, write_config

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

USER, PASSWORD = "bridge", "e2e-Pr0xy-pw-91"


@pytest.fixture(scope="module")
def ca_and_server(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificates(tmp_path_factory.mktemp("e2e-proxy-tls"), dns=("localhost",))


@pytest.fixture(scope="module")
def tls_emulator(ca_and_server: tuple[Path, Path]) -> Iterator[EmulatorProcess]:
    """Verifies every signature (the stack's AWS_ENV secret); named `localhost`, the certificate's only name."""
    ca, server = ca_and_server
    process = EmulatorProcess(args=["--tls-cert", str(server), "--access-key", "test", "--secret-key", "test"])
    process.start()
    port = process.url.rsplit(":", 1)[1]
    assert process.url.startswith("https://"), process.url
    process.url = f"https://localhost:{port}"
    process.context = ssl.create_default_context(cafile=ca)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def proxy(tinyproxy_factory: TinyproxyFactory) -> Tinyproxy:
    return tinyproxy_factory(USER, PASSWORD)


@pytest.fixture
def factory(kafka_broker: KafkaBroker, tls_emulator: EmulatorProcess, tmp_path: Path) -> Iterator[WorkerFactory]:
    made = WorkerFactory(kafka_broker, tls_emulator, tmp_path)
    try:
        yield made
    finally:
        made.stop_all()
        for worker in made.workers:
            print(f"--- {worker.log_path.name}\n{worker.log_tail()}")


def proxy_env(proxy_url: str, ca: Path) -> dict[str, str]:
    # NO_PROXY/no_proxy emptied: the machine's own must not send the worker around the proxy.
    return {
        "HTTPS_PROXY": proxy_url,
        "https_proxy": proxy_url,
        "NO_PROXY": "",
        "no_proxy": "",
        "AWS_CA_BUNDLE": str(ca),
    }


def records(count: int) -> list[tuple[str, bytes]]:
    now = time.time()
    return [
        (
            f"s-{i % 4}",
            orjson.dumps(
                {"session_id": f"s-{i % 4}", "event_type": "click", "item_id": f"i-{i}", "timestamp": now - 60 + i}
            ),
        )
        for i in range(count)
    ]


async def fresh_topics(broker: KafkaBroker) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return (
        await create_topic(broker.bootstrap, f"proxy-{suffix}", 3),
        await create_topic(broker.bootstrap, f"proxy-{suffix}.dlq", 1),
    )


async def test_check_and_run_deliver_through_the_proxy(
    factory: WorkerFactory, tls_emulator: EmulatorProcess, proxy: Tinyproxy, ca_and_server: tuple[Path, Path]
) -> None:
    topic, dlq = await fresh_topics(factory.broker)
    await produce(factory.broker.bootstrap, topic, records(80))
    # One call per session at a time: 8 calls over 4 sessions then reuse their 4 connections.
    sections = factory.config(topic, dlq, f"{topic}-group", batching={"max_calls_per_session": 1})
    env = proxy_env(proxy.authorized_url(), ca_and_server[0])
    tunnel = f"CONNECT localhost:{tls_emulator.url.rsplit(':', 1)[1]} HTTP/1.1"

    seen = len(proxy.requests())
    config = write_config(factory.tmp / "check.toml", sections)
    checked = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **AWS_ENV, **env},
    )
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    assert f"via proxy http://{proxy.address}: reachable, credentials accepted" in output, output
    assert proxy.requests()[seen:] == [tunnel], "check went through the proxy"

    seen = len(proxy.requests())
    before = tls_emulator.stats()["events"]
    worker = factory(sections, until_drained=True, env=env)
    assert await worker.await_exit(120) == 0, worker.log_tail()
    assert tls_emulator.stats()["events"] == before + 80
    tunnels = proxy.requests()[seen:]
    assert tunnels and set(tunnels) == {tunnel}, tunnels
    calls = sum(tls_emulator.stats()["events_per_call"].values())
    assert len(tunnels) < calls, "tunnels are kept alive across calls"
    log = worker.log_text()
    assert f'"proxy":"http://{proxy.address}"' in log, "the start-up line names the proxy"
    for text in (log, output, proxy.log_text()):
        assert PASSWORD not in text


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_a_refusing_proxy_is_a_loud_alarm_and_loses_nothing(
    factory: WorkerFactory, tls_emulator: EmulatorProcess, proxy: Tinyproxy, ca_and_server: tuple[Path, Path]
) -> None:
    topic, dlq = await fresh_topics(factory.broker)
    await produce(factory.broker.bootstrap, topic, records(20))
    before = tls_emulator.stats()["events"]
    wrong = "not-the-Pr0xy-pw"
    # A short stall timeout: /readyz turns red once no progress was made for that long.
    sections = factory.config(
        topic, dlq, f"{topic}-group", worker={"stall_timeout_seconds": 3, "drain_timeout_seconds": 3}
    )
    worker = factory(sections, env=proxy_env(proxy.url(USER, wrong), ca_and_server[0]))
    readyz = f"http://127.0.0.1:{worker.metrics_port}/readyz"

    def alarmed() -> bool:
        try:
            status, reason = _get(readyz)
        except OSError:
            return False
        return status == 503 and "PutEvents failing: ProxyError" in reason

    assert await asyncio.to_thread(wait_until, alarmed, 60), worker.log_tail()
    _, reason = await asyncio.to_thread(_get, readyz)
    assert "407" in reason or "401" in reason, reason
    samples = await asyncio.to_thread(worker.metrics)
    assert samples['personalize_worker_put_events_calls_total{outcome="connection"}'] >= 1
    assert samples.get('personalize_worker_dead_letters_total{reason="retries_exhausted"}', 0.0) == 0.0
    assert tls_emulator.stats()["events"] == before, "nothing got past the proxy"
    worker.stop()
    log = worker.log_text()
    assert wrong not in log and wrong not in reason
    warnings = [line for line in log.splitlines() if "PutEvents failed, retrying" in line]
    assert 1 <= len(warnings) <= 3, "said once (per distinct error), not per attempt"
