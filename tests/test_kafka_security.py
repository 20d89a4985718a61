"""Secure connections against a real broker: TLS, SASL_SSL with SCRAM-SHA-512, and what leaks where.

A separate broker (its own throw-away CA and certificate, a SCRAM user created at format time)
listens on PLAINTEXT for the test's own producer and on SSL and SASL_SSL for the worker.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.kafka_support import KafkaBroker, create_topic, free_port, produce
from tests.stack import AWS_ENV, EmulatorProcess, WorkerFactory, WorkerProcess, wait_until, write_config

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

SCRAM_USER = "worker"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_certificates(directory: Path) -> tuple[Path, Path]:
    """A one-day CA and a localhost broker certificate signed by it: (ca.pem, broker key+chain .pem)."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (
        x509.CertificateBuilder(subject_name=_name("personalize-worker test CA"))
        .not_valid_before(start)
        .not_valid_after(end)
        .issuer_name(_name("personalize-worker test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder(subject_name=_name("localhost"))
        .not_valid_before(start)
        .not_valid_after(end)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_pem)
    # Kafka's PEM keystore: an unencrypted PKCS#8 key followed by the certificate chain.
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    broker_path = directory / "broker.pem"
    broker_path.write_bytes(key_pem + cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    broker_path.chmod(0o600)
    return ca_path, broker_path


@dataclass
class SecureBroker(KafkaBroker):
    """A broker with extra listeners and SCRAM users created when its storage is formatted."""

    listeners: tuple[str, ...] = ()
    scram: tuple[str, ...] = ()

    def _run(self, command: str, *extra: str, timeout: float) -> subprocess.CompletedProcess[str]:
        if command == "start":
            for listener in self.listeners:
                extra += ("--listener", listener)
            for spec in self.scram:
                extra += ("--add-scram", spec)
        return super()._run(command, *extra, timeout=timeout)


@dataclass
class Secure:
    broker: SecureBroker
    ca: Path
    ssl_bootstrap: str
    sasl_bootstrap: str
    password: str = field(repr=False)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secure]:
    root = tmp_path_factory.mktemp("secure-kafka")
    ca, keystore = write_certificates(root)
    ssl_port, sasl_port = free_port(), free_port()
    password = f"pw-{secrets.token_hex(12)}"
    broker = SecureBroker(
        port=free_port(),
        dir=root / "state",
        props={
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
        },
        listeners=(f"SSL://localhost:{ssl_port}", f"SASL_SSL://localhost:{sasl_port}"),
        scram=(f"SCRAM-SHA-512=[name={SCRAM_USER},password={password}]",),
    )
    try:
        await broker.astart()
    except BaseException:
        print(f"--- secure broker failed to start ---\n{broker.log_tail()}")
        await broker.astop()
        raise
    try:
        yield Secure(broker, ca, f"localhost:{ssl_port}", f"localhost:{sasl_port}", password)
    finally:
        await broker.astop()


@pytest.fixture
def factory(secure: Secure, emulator: EmulatorProcess, tmp_path: Path) -> Iterator[WorkerFactory]:
    made = WorkerFactory(secure.broker, emulator, tmp_path)
    try:
        yield made
    finally:
        made.stop_all()
        for worker in made.workers:
            print(f"--- {worker.log_path.name}\n{worker.log_tail()}")


def records(count: int, sessions: int = 4) -> list[tuple[str, bytes]]:
    """Keyed by session; every userId is unique and recognisable, so a leak is easy to spot."""
    now = time.time()
    out = []
    for i in range(count):
        session = f"s-{i % sessions}"
        value = {
            "user_id": f"uid-{uuid.uuid4().hex}",
            "session_id": session,
            "event_type": "click",
            "item_id": f"item-{i}",
            "timestamp": now - 60 + i * 0.01,
        }
        out.append((session, orjson.dumps(value)))
    return out


async def fresh_topics(secure: Secure, partitions: int = 3) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    topic = await create_topic(secure.broker.bootstrap, f"secure-{suffix}", partitions)
    dlq = await create_topic(secure.broker.bootstrap, f"secure-{suffix}.dlq", 1)
    return topic, dlq


def sasl_settings(secure: Secure, password: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": secure.sasl_bootstrap,
        "security_protocol": "SASL_SSL",
        "ssl_cafile": str(secure.ca),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": SCRAM_USER,
        "sasl_password": password,
    }


async def test_worker_delivers_over_tls(secure: Secure, factory: WorkerFactory, emulator: EmulatorProcess) -> None:
    topic, dlq = await fresh_topics(secure)
    await produce(secure.broker.bootstrap, topic, records(40))
    kafka = {"bootstrap_servers": secure.ssl_bootstrap, "security_protocol": "SSL", "ssl_cafile": str(secure.ca)}
    worker = factory(factory.config(topic, dlq, f"{topic}-group", kafka=kafka), until_drained=True)
    assert await worker.await_exit(60) == 0, worker.log_tail()
    assert emulator.stats()["events"] == 40


async def test_worker_over_sasl_ssl_scram_leaks_no_secret_or_user_id(
    secure: Secure, factory: WorkerFactory, emulator: EmulatorProcess
) -> None:
    topic, dlq = await fresh_topics(secure)
    produced = records(60)
    await produce(secure.broker.bootstrap, topic, produced)
    user_ids = [orjson.loads(value)["user_id"] for _, value in produced]
    sections = factory.config(
        topic, dlq, f"{topic}-group", kafka=sasl_settings(secure, secure.password), worker={"log_level": "DEBUG"}
    )
    worker = factory(sections)
    delivered = await asyncio.to_thread(wait_until, lambda: emulator.stats()["events"] >= 60, 45)
    assert delivered, worker.log_tail()
    received = {e.get("userId") for e in emulator.events()}
    assert received == set(user_ids)  # the identifiers do flow to Personalize, just nowhere else
    metrics_text = await asyncio.to_thread(_metrics_text, worker)
    worker.stop()
    assert worker.process is not None and worker.process.returncode == 0, worker.log_tail()

    logs = worker.log_text()
    lines = [line for line in logs.splitlines() if line.strip()]
    assert lines, "the worker logged nothing"
    for line in lines:
        entry = orjson.loads(line)  # structured: every line is one JSON object
        assert {"ts", "level", "logger", "msg"} <= entry.keys()
    for where, text in (("logs", logs), ("/metrics", metrics_text)):
        assert secure.password not in text, f"the SASL password appears in the worker's {where}"
        leaked = [u for u in user_ids if u in text]
        assert not leaked, f"{len(leaked)} userId values appear in the worker's {where}, e.g. {leaked[0]}"
        assert "uid-" not in text
    assert "**********" in logs  # the start-up settings dump shows the password masked


def _metrics_text(worker: WorkerProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


AUTH_FAILED = re.compile(r"authentication failed", re.IGNORECASE)


async def test_wrong_password_fails_fast_naming_the_problem(secure: Secure, factory: WorkerFactory) -> None:
    topic, dlq = await fresh_topics(secure, partitions=1)
    wrong = f"wrong-{secrets.token_hex(8)}"
    sections = factory.config(topic, dlq, f"{topic}-group", kafka=sasl_settings(secure, wrong))
    worker = factory(sections, until_drained=True)
    started = time.monotonic()
    code = await worker.await_exit(60)
    elapsed = time.monotonic() - started
    output = worker.log_text()
    assert code != 0, output
    assert elapsed < 60
    assert AUTH_FAILED.search(output), output
    assert "kafka.sasl_password" in output, output
    assert wrong not in output
    # The whole of stderr is the worker's JSON lines: no aiokafka copy of the cause, no "Unclosed ..." warning.
    lines = [orjson.loads(line) for line in output.splitlines()]
    assert [(line["level"], line["msg"]) for line in lines] == [
        ("info", "starting"),
        ("info", "Found credentials in environment variables."),
        ("error", "worker failed"),
        ("info", "stopped"),
    ], output


async def test_check_names_the_wrong_password(secure: Secure, emulator: EmulatorProcess, tmp_path: Path) -> None:
    topic, dlq = await fresh_topics(secure, partitions=1)
    wrong = f"wrong-{secrets.token_hex(8)}"
    config = write_config(
        tmp_path / "check.toml",
        {
            "kafka": {**sasl_settings(secure, wrong), "topics": [topic]},
            "personalize": {"tracking_id": "check-tracking", "endpoint_url": emulator.url},
            "dead_letter": {"topic": dlq},
        },
    )
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **AWS_ENV},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    fail_lines = [line for line in proc.stdout.splitlines() if line.startswith("[FAIL] Kafka")]
    assert fail_lines, output
    assert AUTH_FAILED.search(fail_lines[0]), output
    assert "kafka.sasl_password" in fail_lines[0]
    assert wrong not in output
