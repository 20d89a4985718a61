"""`worker.personalize.http.HttpClient` through scripted proxies on real sockets: the edge cases a real proxy will not
produce on demand (tests/test_proxy.py runs the same paths through tinyproxy).

Proven here: CONNECT and the absolute-form request on the wire, Proxy-Authorization only to the proxy
(never inside the tunnel); one tunnel kept alive across requests; refusals (407, 403, 502, non-standard
text), a proxy that hangs up, never answers, answers garbage or pushes bytes into the tunnel, and one
that is not there — each a ProxyError (or TimeoutError) naming the proxy, never its credentials or its
own reason text, classified as a connection error; a 2xx CONNECT's length headers ignored; the
endpoint's certificate checked inside the tunnel; TLS to an https:// proxy with TLS to the endpoint
inside it, on asyncio's loop and on uvloop; a forwarding proxy's own answers told from AWS's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.proxy_support import make_certificates
from tests.test_http import Peer, Script, Server, answering, serve
from worker.personalize.http import HttpClient, HttpProtocolError
from worker.personalize.proxy import Proxy, ProxyError
from worker.personalize.retry import classify

AUTH = "Basic YnJpZGdlOnMzY3JldA=="  # bridge:s3cret
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
E = "http://e:8787/events"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


def tunnelling(answer: bytes = ESTABLISHED) -> Script:
    """A CONNECT proxy: records the request head, answers `answer`, and on a 2xx relays to the target."""

    async def script(peer: Peer) -> None:
        head = await peer.request()
        if head is None:
            return
        await peer.send(answer)
        if not answer.split(b" ", 2)[1].startswith(b"2"):
            await peer.until_eof()  # the client must drop a refused connection itself
            return
        port = int(head.split(b" ", 2)[1].rsplit(b":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await asyncio.gather(_pipe(peer.reader, writer), _pipe(reader, peer.writer))
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    return script


def proxy_for(server: Server, *, authorization: str | None = AUTH, context: ssl.SSLContext | None = None) -> Proxy:
    scheme = "https" if context else "http"
    return Proxy(f"{scheme}://127.0.0.1:{server.port}", "127.0.0.1", server.port, authorization, context)


@contextlib.asynccontextmanager
async def client_via(proxy: Proxy, url: str, **options: Any) -> AsyncIterator[HttpClient]:
    client = HttpClient(url, timeout=options.pop("timeout", 5.0), proxy=proxy, **options)
    try:
        yield client
    finally:
        await client.close()


TlsPair = tuple[ssl.SSLContext, ssl.SSLContext]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsPair:
    """(server context, client context) for localhost and 127.0.0.1, from a throw-away CA."""
    ca, server_pem = make_certificates(tmp_path_factory.mktemp("tls"), dns=("localhost",), ips=("127.0.0.1",))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(server_pem)
    return server, ssl.create_default_context(cafile=ca)


async def test_connect_on_the_wire_and_one_tunnel_kept_alive(tls: TlsPair) -> None:
    server_context, client_context = tls
    async with (
        serve(tls=server_context) as endpoint,
        serve(tunnelling()) as proxy_server,
        client_via(
            proxy_for(proxy_server), f"https://localhost:{endpoint.port}/events", ssl_context=client_context
        ) as client,
    ):
        for n in range(3):
            assert (await client.post([("X-N", str(n))], b"body")).body == b"ok"
    authority = f"localhost:{endpoint.port}"
    assert proxy_server.requests == [
        f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {AUTH}\r\n\r\n".encode()
    ]
    assert len(endpoint.peers) == 1 and len(endpoint.requests) == 3
    for raw in endpoint.requests:
        assert raw.startswith(f"POST /events HTTP/1.1\r\nHost: {authority}\r\n".encode())
        assert b"proxy-authorization" not in raw.lower(), "the proxy's credentials never reach the endpoint"


async def test_forwarding_on_the_wire_and_kept_alive() -> None:
    async with serve() as proxy_server, client_via(proxy_for(proxy_server), "http://emulator.internal:8787/") as client:
        for _ in range(2):
            assert (await client.post([], b"x")).status == 200
    assert len(proxy_server.peers) == 1
    for raw in proxy_server.requests:
        assert raw.startswith(
            b"POST http://emulator.internal:8787/ HTTP/1.1\r\nHost: emulator.internal:8787\r\n"
            b"Proxy-Authorization: " + AUTH.encode() + b"\r\n"
        )


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=x\r\n"
            b"Content-Length: 6\r\n\r\ndenied",
            "407 Proxy Authentication Required (proxy credentials missing or rejected",
        ),
        (b"HTTP/1.1 403 internal-acl-name-77\r\nContent-Length: 0\r\n\r\n", "403 Forbidden"),
        (b"HTTP/1.0 502 Bad Gateway\r\nConnection: close\r\n\r\n<html>upstream</html>", "502 Bad Gateway"),
        (b"HTTP/1.1 599 Whatever\r\n\r\n", "599"),
    ],
)
async def test_refused_connect_is_a_proxy_error_naming_the_proxy(answer: bytes, expected: str) -> None:
    async with serve(tunnelling(answer)) as proxy_server:
        proxy = proxy_for(proxy_server)
        async with client_via(proxy, "https://localhost:1/events") as client:
            with pytest.raises(ProxyError) as caught:
                await client.post([], b"x")
        await asyncio.wait_for(proxy_server.peers[0].eof.wait(), 5)  # the refused connection is dropped
    message = str(caught.value)
    assert message.startswith(f"proxy http://127.0.0.1:{proxy_server.port} refused CONNECT to localhost:1: {expected}")
    assert AUTH.split()[1] not in message and "internal-acl" not in message and "upstream" not in message
    assert classify(caught.value).outcome == "connection"


async def hang_up(peer: Peer) -> None:
    await peer.request()


async def garbage(peer: Peer) -> None:
    await peer.request()
    await peer.send(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    await peer.until_eof()


async def early_bytes(peer: Peer) -> None:
    await peer.request()
    await peer.send(ESTABLISHED + b"\x16\x03\x01unexpected")
    await peer.until_eof()


@pytest.mark.parametrize(
    ("script", "match"),
    [
        (hang_up, "failed CONNECT to localhost:1: connection closed before the answer was complete"),
        (garbage, "failed CONNECT to localhost:1: not an HTTP/1.x status line"),
        (early_bytes, "sent data into the tunnel to localhost:1 before TLS"),
    ],
)
async def test_a_misbehaving_proxy_is_a_proxy_error(script: Callable[[Peer], Awaitable[None]], match: str) -> None:
    async with serve(script) as proxy_server, client_via(proxy_for(proxy_server), "https://localhost:1/") as client:
        with pytest.raises(ProxyError, match=match) as caught:
            await client.post([], b"x")
    assert isinstance(caught.value.__cause__, (ConnectionError, HttpProtocolError)) or "before TLS" in match


async def test_a_silent_proxy_times_out_within_the_request_timeout() -> None:
    async def silent(peer: Peer) -> None:
        await peer.request()
        await peer.until_eof()

    async with serve(silent) as proxy_server:
        async with client_via(proxy_for(proxy_server), "https://localhost:1/", timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(TimeoutError, match=f"proxy http://127.0.0.1:{proxy_server.port} did not answer"):
                await client.post([], b"x")
        assert time.monotonic() - started < 5.0  # generous: the box is shared
        await asyncio.wait_for(proxy_server.peers[0].eof.wait(), 5)


async def test_an_unreachable_proxy_is_a_proxy_error() -> None:
    with socket.socket() as placeholder:  # a port that is certainly closed: bound, never listening
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
        proxy = Proxy(f"http://127.0.0.1:{port}", "127.0.0.1", port, AUTH)
        for url in ("http://e:1/", "https://e:1/"):
            async with client_via(proxy, url) as client:
                with pytest.raises(ProxyError, match=f"cannot reach proxy http://127.0.0.1:{port}: ") as caught:
                    await client.post([], b"x")
            assert AUTH.split()[1] not in str(caught.value)


async def test_a_2xx_connect_has_no_body_whatever_its_headers_say(tls: TlsPair) -> None:
    server_context, client_context = tls
    odd = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    async with (
        serve(tls=server_context) as endpoint,
        serve(tunnelling(odd)) as proxy_server,
        client_via(
            proxy_for(proxy_server), f"https://localhost:{endpoint.port}/", ssl_context=client_context
        ) as client,
    ):
        assert (await client.post([], b"x")).body == b"ok"
        assert (await client.post([], b"x")).body == b"ok"
    assert len(proxy_server.peers) == 1


async def test_the_endpoint_certificate_is_checked_inside_the_tunnel(tls: TlsPair) -> None:
    server_context, _ = tls
    async with (
        serve(tls=server_context) as endpoint,
        serve(tunnelling()) as proxy_server,
        client_via(proxy_for(proxy_server), f"https://localhost:{endpoint.port}/") as client,  # default CAs
    ):
        with pytest.raises(ssl.SSLCertVerificationError):
            await client.post([], b"x")
    assert endpoint.requests == []


async def test_the_first_request_in_a_new_tunnel_is_not_retried(tls: TlsPair) -> None:
    """A CONNECT is not a request: a fresh tunnel whose first request dies is no stale keep-alive."""
    server_context, client_context = tls

    async def drop(peer: Peer) -> None:
        await peer.request()

    async with (
        serve(drop, tls=server_context) as endpoint,
        serve(tunnelling()) as proxy_server,
        client_via(
            proxy_for(proxy_server), f"https://localhost:{endpoint.port}/", ssl_context=client_context
        ) as client,
    ):
        with pytest.raises(ConnectionError):
            await client.post([], b"x")
    assert len(proxy_server.requests) == 1


async def _post_through_tls_proxy(proxy: Proxy, url: str, context: ssl.SSLContext) -> list[bytes]:
    async with client_via(proxy, url, ssl_context=context) as client:
        return [(await client.post([], b"x")).body for _ in range(2)]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_tls_to_an_https_proxy_with_tls_to_the_endpoint_inside(tls: TlsPair, loop: str) -> None:
    server_context, client_context = tls
    async with serve(tls=server_context) as endpoint, serve(tunnelling(), tls=server_context) as proxy_server:
        proxy = proxy_for(proxy_server, context=client_context)
        url = f"https://localhost:{endpoint.port}/"
        if loop == "asyncio":
            bodies = await _post_through_tls_proxy(proxy, url, client_context)
        else:
            uvloop = pytest.importorskip("uvloop")

            def run() -> list[bytes]:
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    return runner.run(_post_through_tls_proxy(proxy, url, client_context))

            bodies = await asyncio.to_thread(run)
    assert bodies == [b"ok", b"ok"]
    assert len(proxy_server.requests) == 1 and len(endpoint.requests) == 2


def forwarding(answer: bytes, reset: bool = False) -> Script:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)
        if reset:  # as tinyproxy does when it refuses a request whose body it never read
            await asyncio.sleep(0.05)
            sock = peer.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.writer.transport.abort()

    return script


@pytest.mark.parametrize(
    ("answer", "reset", "expected"),
    [
        (b"HTTP/1.0 407 Proxy Authentication Required\r\nConnection: close\r\n\r\nno", False, "407"),
        (b"HTTP/1.0 401 Unauthorized\r\nConnection: close\r\n\r\n<html>", True, "401 Unauthorized"),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", False, "502 Bad Gateway"),
        (b"", True, "failed the request to e:8787: connection closed before the answer was complete"),
    ],
)
async def test_a_forwarding_proxys_own_answers_are_proxy_errors(answer: bytes, reset: bool, expected: str) -> None:
    async with serve(forwarding(answer, reset)) as proxy_server, client_via(proxy_for(proxy_server), E) as client:
        with pytest.raises(ProxyError) as caught:
            await client.post([], b"x")
    assert f"proxy http://127.0.0.1:{proxy_server.port} " in str(caught.value)
    assert expected in str(caught.value)


async def test_the_services_answers_pass_through_a_forwarding_proxy() -> None:
    aws_error = b"HTTP/1.1 500 Internal Server Error\r\nx-amzn-RequestId: r-1\r\nContent-Length: 2\r\n\r\n{}"
    async with (
        serve(lambda peer: answering(peer, aws_error)) as proxy_server,
        client_via(proxy_for(proxy_server), E) as client,
    ):
        response = await client.post([], b"x")
    assert (response.status, response.headers["x-amzn-requestid"]) == (500, "r-1")


async def test_forwarding_over_tls_to_an_https_proxy(tls: TlsPair) -> None:
    server_context, client_context = tls
    async with (
        serve(tls=server_context) as proxy_server,
        client_via(proxy_for(proxy_server, context=client_context), E) as client,
    ):
        assert (await client.post([], b"x")).status == 200
        assert (await client.post([], b"x")).status == 200
    assert len(proxy_server.peers) == 1
    assert all(
        raw.startswith(b"POST http://e:8787/events HTTP/1.1\r\nHost: e:8787\r\n") for raw in proxy_server.requests
    )
