"""PutEvents through a REAL proxy (Debian's tinyproxy), exactly as botocore would go through it.

Proven here, against the emulator in-process (SigV4 verified with the secret, so the signature is over
the endpoint's Host, not the proxy's): an http:// endpoint via the proxy in absolute form; an https://
endpoint via CONNECT with TLS inside the tunnel (SNI and certificate checked against the endpoint's
name, the tunnel kept alive across calls); NO_PROXY and the config's `proxies` (`{}` included) as
botocore reads them; BasicAuth with right, wrong and missing credentials (a ProxyError naming the proxy,
never the password, retried as a connection error with an alarm); `check` and `run` agreeing.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.proxy_support import Tinyproxy, TinyproxyFactory, make_certificates
from tests.test_http import serve
from tests.test_http_proxy import tunnelling
from worker.backoff import Backoff
from worker.commands.check import check_personalize
from worker.config import PersonalizeSettings, Settings
from worker.emulator import RunningEmulator, run_emulator
from worker.observe.metrics import Metrics
from worker.personalize.client import PutEventsClient
from worker.personalize.proxy import ProxyError
from worker.personalize.retry import Kind, classify
from worker.personalize.sink import Sink

KEY, SECRET = "AKIDPROXY", "secret-for-proxy-tests"
USER, PASSWORD = "bridge", "pw-Pr0xy-s3cret"
BODY = b'{"trackingId":"trk","sessionId":"s","eventList":[{"eventType":"x","sentAt":1}]}'


@pytest.fixture(autouse=True)
def environment(no_proxy_environment: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch = no_proxy_environment
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def proxy(tinyproxy_factory: TinyproxyFactory) -> Tinyproxy:
    return tinyproxy_factory()


@pytest.fixture(scope="module")
def auth_proxy(tinyproxy_factory: TinyproxyFactory) -> Tinyproxy:
    return tinyproxy_factory(USER, PASSWORD)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """For the name `localhost` only: a check against the proxy's address (127.0.0.1) would fail."""
    return make_certificates(tmp_path_factory.mktemp("proxy-tls"), dns=("localhost",))


@pytest_asyncio.fixture(loop_scope="session")
async def http_emulator() -> AsyncIterator[RunningEmulator]:
    async with run_emulator(access_key=KEY, secret_key=SECRET) as running:
        yield running


class TlsEmulator:
    def __init__(self, running: RunningEmulator, server_names: list[str | None]) -> None:
        self.running = running
        self.server_names = server_names
        """The SNI of every TLS handshake the emulator accepted."""
        self.url = f"https://localhost:{running.port}"
        self.authority = f"localhost:{running.port}"


@pytest_asyncio.fixture(loop_scope="session")
async def tls_emulator(certificates: tuple[Path, Path]) -> AsyncIterator[TlsEmulator]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates[1])
    names: list[str | None] = []
    context.sni_callback = lambda _socket, name, _context: names.append(name)
    async with run_emulator(ssl_context=context, access_key=KEY, secret_key=SECRET) as running:
        yield TlsEmulator(running, names)


@contextlib.asynccontextmanager
async def put_events_client(endpoint: str, **settings: Any) -> AsyncIterator[PutEventsClient]:
    client = PutEventsClient(PersonalizeSettings(tracking_id="trk", endpoint_url=endpoint, **settings))
    await client.start()
    try:
        yield client
    finally:
        await client.close()


def events_received(running: RunningEmulator) -> int:
    return int(running.emulator.snapshot()["events"])


def test_the_proxy_never_serves_as_root(proxy: Tinyproxy) -> None:
    assert proxy.running_user() == ("nobody" if os.geteuid() == 0 else getpass.getuser())


async def test_http_endpoint_goes_through_the_proxy_in_absolute_form(
    environment: pytest.MonkeyPatch, proxy: Tinyproxy, http_emulator: RunningEmulator
) -> None:
    environment.setenv("HTTP_PROXY", proxy.url())
    before, seen = events_received(http_emulator), len(proxy.requests())
    async with put_events_client(http_emulator.url) as client:
        assert client.proxy is not None and client.proxy.url == f"http://{proxy.address}"
        for _ in range(3):
            await client.put_events(BODY)  # signature verified by the emulator: over the endpoint's Host
    assert events_received(http_emulator) == before + 3
    assert proxy.requests()[seen:] == [f"POST {http_emulator.url}/events HTTP/1.1"] * 3


async def test_https_endpoint_goes_through_one_kept_alive_connect_tunnel(
    environment: pytest.MonkeyPatch, proxy: Tinyproxy, tls_emulator: TlsEmulator, certificates: tuple[Path, Path]
) -> None:
    environment.setenv("HTTPS_PROXY", proxy.url())
    environment.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # the wrong scheme's proxy is never used
    environment.setenv("AWS_CA_BUNDLE", str(certificates[0]))
    before, seen, handshakes = (
        events_received(tls_emulator.running),
        len(proxy.requests()),
        len(tls_emulator.server_names),
    )
    async with put_events_client(tls_emulator.url) as client:
        for _ in range(5):
            await client.put_events(BODY)
    assert events_received(tls_emulator.running) == before + 5
    assert proxy.requests()[seen:] == [f"CONNECT {tls_emulator.authority} HTTP/1.1"], "one tunnel, kept alive"
    assert tls_emulator.server_names[handshakes:] == ["localhost"], "SNI names the endpoint"


async def test_tunnel_checks_the_certificate_against_the_endpoint_name(
    environment: pytest.MonkeyPatch, proxy: Tinyproxy, tls_emulator: TlsEmulator, certificates: tuple[Path, Path]
) -> None:
    environment.setenv("HTTPS_PROXY", proxy.url())
    # Not the CA that signed it: refused, though the proxy itself is fine.
    async with put_events_client(tls_emulator.url) as client:
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            await client.put_events(BODY)
    environment.setenv("AWS_CA_BUNDLE", str(certificates[0]))
    # The right CA, but the endpoint named by an address the certificate does not carry.
    async with put_events_client(f"https://127.0.0.1:{tls_emulator.running.port}") as client:
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch") as caught:
            await client.put_events(BODY)
    assert classify(caught.value).outcome == "connection"


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*", ".example.com,127.0.0.1"])
async def test_no_proxy_bypasses_the_proxy(
    environment: pytest.MonkeyPatch, proxy: Tinyproxy, http_emulator: RunningEmulator, no_proxy: str
) -> None:
    environment.setenv("HTTP_PROXY", proxy.url())
    environment.setenv("NO_PROXY", no_proxy)
    seen = len(proxy.requests())
    async with put_events_client(http_emulator.url) as client:
        assert client.proxy is None
        await client.put_events(BODY)
    assert len(proxy.requests()) == seen


async def test_config_proxies_take_precedence_over_the_environment(
    environment: pytest.MonkeyPatch, proxy: Tinyproxy, http_emulator: RunningEmulator
) -> None:
    environment.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    seen = len(proxy.requests())
    async with put_events_client(http_emulator.url, proxies={"http": proxy.url()}) as client:
        await client.put_events(BODY)
    assert len(proxy.requests()) == seen + 1
    async with put_events_client(http_emulator.url, proxies={}) as client:  # {}: botocore's "no proxy at all"
        assert client.proxy is None
        await client.put_events(BODY)
    async with put_events_client(http_emulator.url) as client:
        with pytest.raises(ProxyError, match=r"cannot reach proxy http://127\.0\.0\.1:9"):
            await client.put_events(BODY)


async def test_proxy_credentials_accepted_for_both_schemes(
    environment: pytest.MonkeyPatch,
    auth_proxy: Tinyproxy,
    http_emulator: RunningEmulator,
    tls_emulator: TlsEmulator,
    certificates: tuple[Path, Path],
) -> None:
    environment.setenv("HTTP_PROXY", auth_proxy.authorized_url())
    environment.setenv("HTTPS_PROXY", auth_proxy.authorized_url())
    environment.setenv("AWS_CA_BUNDLE", str(certificates[0]))
    seen = len(auth_proxy.requests())
    for url in (http_emulator.url, tls_emulator.url):
        async with put_events_client(url) as client:
            assert client.proxy is not None and PASSWORD not in repr(client.proxy)
            await client.put_events(BODY)
            await client.put_events(BODY)
    assert auth_proxy.requests()[seen:] == [
        f"POST {http_emulator.url}/events HTTP/1.1",
        f"POST {http_emulator.url}/events HTTP/1.1",
        f"CONNECT {tls_emulator.authority} HTTP/1.1",
    ]


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize(("password", "status"), [(None, "407"), ("wrong-one", "401")])
async def test_proxy_refusal_is_a_connection_error_naming_the_proxy(
    environment: pytest.MonkeyPatch,
    auth_proxy: Tinyproxy,
    http_emulator: RunningEmulator,
    tls_emulator: TlsEmulator,
    scheme: str,
    password: str | None,
    status: str,
) -> None:
    environment.setenv(f"{scheme.upper()}_PROXY", auth_proxy.url(USER, password))
    url = http_emulator.url if scheme == "http" else tls_emulator.url
    async with put_events_client(url) as client:
        with pytest.raises(ProxyError) as caught:
            await client.put_events(BODY)
    message = str(caught.value)
    assert f"proxy http://{auth_proxy.address} " in message and status in message, message
    assert "credentials" in message and USER not in message and (password or PASSWORD) not in message
    assert ("CONNECT" in message) == (scheme == "https")
    verdict = classify(caught.value)
    assert (verdict.kind, verdict.outcome) == (Kind.TRANSIENT, "connection")


async def test_sink_keeps_retrying_a_refusing_proxy_with_an_alarm(
    environment: pytest.MonkeyPatch, auth_proxy: Tinyproxy, tls_emulator: TlsEmulator, certificates: tuple[Path, Path]
) -> None:
    environment.setenv("HTTPS_PROXY", auth_proxy.url(USER, "wrong-one"))
    environment.setenv("AWS_CA_BUNDLE", str(certificates[0]))
    metrics = Metrics()
    sink = Sink(PersonalizeSettings(tracking_id="trk", endpoint_url=tls_emulator.url), metrics, Backoff(0.01, 0.05))
    await sink.start()
    delivery = asyncio.create_task(sink.deliver("s", None, ['{"eventType":"x","sentAt":1}'], 1.0))
    try:
        for _ in range(200):
            if metrics.calls.labels("connection")._value.get() >= 3:
                break
            await asyncio.sleep(0.05)
        assert not delivery.done(), "nothing is dropped: the delivery waits for the proxy"
        assert metrics.calls.labels("connection")._value.get() >= 3
        assert sink.last_error in ("ProxyError 401", "ProxyError 407"), (
            "/readyz gets the code; the log line names the proxy"
        )
    finally:
        delivery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivery
        await sink.close()


@pytest.mark.parametrize(
    "case", ["via proxy", "no_proxy", "wrong credentials", "right credentials", "config proxies", "config {}"]
)
async def test_check_and_run_agree(
    environment: pytest.MonkeyPatch,
    proxy: Tinyproxy,
    auth_proxy: Tinyproxy,
    tls_emulator: TlsEmulator,
    certificates: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    environment.setenv("AWS_CA_BUNDLE", str(certificates[0]))
    used, settings = proxy, dict[str, Any]()
    if case in ("via proxy", "no_proxy", "config {}"):
        environment.setenv("HTTPS_PROXY", proxy.url())
    if case == "no_proxy":
        environment.setenv("NO_PROXY", "localhost")
    if case == "config {}":
        settings = {"proxies": {}}
    if case == "config proxies":
        settings = {"proxies": {"https": auth_proxy.authorized_url()}}
        used = auth_proxy
    if case in ("wrong credentials", "right credentials"):
        password = PASSWORD if case == "right credentials" else "wrong-one"
        environment.setenv("HTTPS_PROXY", auth_proxy.url(USER, password))
        used = auth_proxy
    personalize = PersonalizeSettings(tracking_id="trk", endpoint_url=tls_emulator.url, **settings)

    seen = len(used.requests())
    check_ok = await check_personalize(Settings(personalize=personalize))
    check_requests = len(used.requests()) - seen
    output = capsys.readouterr().out

    seen = len(used.requests())
    async with put_events_client(tls_emulator.url, **settings) as client:
        try:
            await client.put_events(BODY)
            run_ok = True
        except ProxyError:
            run_ok = False
    run_requests = len(used.requests()) - seen

    assert (check_ok, check_requests) == (run_ok, run_requests), output
    expected_ok = case != "wrong credentials"
    expected_via_proxy = case not in ("no_proxy", "config {}")
    assert (run_ok, bool(run_requests)) == (expected_ok, expected_via_proxy), output
    assert (f"via proxy http://{used.address}" in output) == expected_via_proxy, output
    assert PASSWORD not in output and "wrong-one" not in output, output


async def test_an_https_proxy_with_its_own_ca_for_check_and_run(
    environment: pytest.MonkeyPatch,
    tls_emulator: TlsEmulator,
    certificates: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """TLS to the proxy (verified with proxy_ca_bundle), then TLS to the endpoint inside the tunnel
    (verified with the AWS CA bundle): two CAs, neither trusted for the other's certificate."""
    proxy_ca, proxy_pem = make_certificates(tmp_path, dns=("localhost",))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(proxy_pem)
    environment.setenv("AWS_CA_BUNDLE", str(certificates[0]))
    async with serve(tunnelling(), tls=server_context) as tls_proxy:
        settings: dict[str, Any] = {
            "proxies": {"https": f"https://localhost:{tls_proxy.port}"},
            "proxy_ca_bundle": str(proxy_ca),
        }
        async with put_events_client(tls_emulator.url, **settings) as client:
            assert client.proxy is not None and client.proxy.url == f"https://localhost:{tls_proxy.port}"
            await client.put_events(BODY)
            await client.put_events(BODY)
        personalize = PersonalizeSettings(tracking_id="trk", endpoint_url=tls_emulator.url, **settings)
        assert await check_personalize(Settings(personalize=personalize)), capsys.readouterr().out
        async with put_events_client(tls_emulator.url, proxies=settings["proxies"]) as client:
            with pytest.raises(ProxyError, match="CERTIFICATE_VERIFY_FAILED"):  # the proxy's CA is needed
                await client.put_events(BODY)
    connects = [r for r in tls_proxy.requests if r.startswith(b"CONNECT ")]
    assert len(connects) == 2, "one kept-alive tunnel for run, one for check"
    assert f"via proxy https://localhost:{tls_proxy.port}" in capsys.readouterr().out


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_check_names_a_refusing_proxy_in_runs_words_and_no_credentials(
    environment: pytest.MonkeyPatch,
    auth_proxy: Tinyproxy,
    http_emulator: RunningEmulator,
    tls_emulator: TlsEmulator,
    capsys: pytest.CaptureFixture[str],
    scheme: str,
) -> None:
    # One-letter credentials: botocore's own masking replaces the first "h" or "t" of "http" instead.
    environment.setenv(f"{scheme.upper()}_PROXY", auth_proxy.url("h", "t"))
    url = http_emulator.url if scheme == "http" else tls_emulator.url
    assert not await check_personalize(Settings(personalize=PersonalizeSettings(tracking_id="trk", endpoint_url=url)))
    output = capsys.readouterr().out
    verb = "proxy answered" if scheme == "http" else "refused CONNECT:"
    assert f"via proxy http://{auth_proxy.address}: ProxyError: {verb} 401 Unauthorized" in output, output
    assert "h:t@" not in output and "<html" not in output and "Basic " not in output, output
