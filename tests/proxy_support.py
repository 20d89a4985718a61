"""A real HTTP proxy for tests: Debian's tinyproxy on a free loopback port, and throw-away TLS material.

`tinyproxy_factory` starts instances (optionally with `BasicAuth`) from a config written to a temp dir;
as root, tinyproxy drops to nobody/nogroup right after binding (its `User`/`Group`), and it logs to a
file this process opened, so nothing it runs as needs write access anywhere. `make test` installs the
package (target `proxy-tools`); without it these tests skip.
"""

from __future__ import annotations

import datetime
import grp
import ipaddress
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.kafka_support import free_port

__all__ = [
    "PROXY_VARIABLES",
    "TINYPROXY",
    "Tinyproxy",
    "TinyproxyFactory",
    "make_certificates",
    "no_proxy_environment",
    "tinyproxy_factory",
]

TINYPROXY = shutil.which("tinyproxy") or ("/usr/bin/tinyproxy" if os.access("/usr/bin/tinyproxy", os.X_OK) else None)
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
REQUEST_LINE = re.compile(r"Request \(file descriptor \d+\): (?P<line>\S+ \S+ HTTP/1\.\d)")


@dataclass
class Tinyproxy:
    directory: Path
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "tinyproxy.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, user: str | None = None, password: str | None = None) -> str:
        """The proxy URL, with credentials when given (defaults: none)."""
        credentials = f"{user}:{password}@" if user is not None and password is not None else ""
        return f"http://{credentials}{self.address}"

    def authorized_url(self) -> str:
        return self.url(self.user, self.password)

    def start(self) -> None:
        assert TINYPROXY is not None
        for _ in range(3):  # the free port may be taken before tinyproxy binds it
            self.port = free_port()
            config = self.directory / "tinyproxy.conf"
            config.write_text(self._config(), encoding="utf-8")
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [TINYPROXY, "-d", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
                )
            if self._wait_listening(10.0):
                return
            self.stop()
        raise RuntimeError(f"tinyproxy did not start; log:\n{self.log_text()[-2000:]}")

    def _config(self) -> str:
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 600",
            "LogLevel Info",
            "MaxClients 64",
            "Allow 127.0.0.1",
            # No ConnectPort line: CONNECT is allowed to any port (the emulator's is random).
        ]
        if os.geteuid() == 0:  # never serve as root: tinyproxy drops to these right after binding
            nobody = pwd.getpwnam("nobody")
            lines += ["User nobody", f"Group {grp.getgrgid(nobody.pw_gid).gr_name}"]
        if self.user is not None and self.password is not None:
            lines.append(f"BasicAuth {self.user} {self.password}")
        return "\n".join(lines) + "\n"

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            # Listening; "Accepting connections" follows the privilege drop, the last start-up step.
            if "Accepting connections" in self.log_text():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def requests(self) -> list[str]:
        """Every request line the proxy received, in order: `POST http://…/events HTTP/1.1`, `CONNECT h:p …`."""
        return [m["line"] for m in REQUEST_LINE.finditer(self.log_text())]

    def running_user(self) -> str:
        """The user the proxy process runs as now (from /proc)."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
        return pwd.getpwuid(uid).pw_name


class TinyproxyFactory:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Tinyproxy] = []

    def __call__(self, user: str | None = None, password: str | None = None) -> Tinyproxy:
        directory = self.root / f"tinyproxy-{len(self.started)}"
        directory.mkdir()
        proxy = Tinyproxy(directory, user, password)
        self.started.append(proxy)
        proxy.start()
        return proxy

    def stop_all(self) -> None:
        for proxy in self.started:
            proxy.stop()


@pytest.fixture(scope="module")
def tinyproxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyproxyFactory]:
    if TINYPROXY is None:
        pytest.skip("tinyproxy not installed (Debian package 'tinyproxy'; `make test` installs it as root)")
    factory = TinyproxyFactory(tmp_path_factory.mktemp("proxies"))
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variable from the machine leaks into a test; the test sets its own."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(
    directory: Path, dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """A one-day CA and a server certificate for exactly `dns` and `ips`: (ca.pem, server key + chain .pem)."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(subject_name=_name("personalize-worker proxy test CA"))
        .issuer_name(_name("personalize-worker proxy test CA"))
        .not_valid_before(start)
        .not_valid_after(end)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder(subject_name=_name(dns[0] if dns else ips[0]))
        .issuer_name(ca.subject)
        .not_valid_before(start)
        .not_valid_after(end)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_path = directory / "server.pem"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    server_path.write_bytes(key_pem + cert.public_bytes(serialization.Encoding.PEM))
    server_path.chmod(0o600)
    return ca_path, server_path
