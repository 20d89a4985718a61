"""`worker.personalize.http.HttpClient` against real sockets: scripted asyncio servers on 127.0.0.1 that write raw
bytes, no mocks.

Proven here: the request on the wire; Content-Length, chunked, read-until-close and interim 1xx answers,
whole, split across writes or one byte at a time; keep-alive reuse, sequential and concurrent; every
reason a connection must not be reused (read-until-close, `Connection: close`, bytes beyond the answer,
a timeout, a cancellation, idle expiry); the one transparent retry of a kept-alive connection the server
dropped, and no retry on a fresh one or once the answer began; malformed answers as `HttpProtocolError`;
TLS with a trusted and an untrusted certificate; `close()` closing every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import re
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from worker.personalize.http import MAX_BODY_BYTES, MAX_HEAD_BYTES, HttpClient, HttpProtocolError

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
HEADER_LINE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [^\r\n]*")


class Peer:
    """The server's end of one accepted connection."""

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server, self.reader, self.writer = server, reader, writer
        self.index = len(server.peers)
        self.requests: list[bytes] = []
        self.eof = asyncio.Event()
        """Set once the client closed (or reset) its end."""

    async def request(self) -> bytes | None:
        """The next whole request, head and Content-Length body, or None once the client is gone."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"\r\ncontent-length: *(\d+)\r\n", head, re.IGNORECASE)
            raw = head + await self.reader.readexactly(int(length.group(1)) if length else 0)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            return None
        self.requests.append(raw)
        self.server.requests.append(raw)
        return raw

    async def send(self, *pieces: bytes, pause: float = 0.0) -> None:
        for piece in pieces:
            self.writer.write(piece)
            await self.writer.drain()
            if pause:
                await asyncio.sleep(pause)

    async def until_eof(self) -> None:
        while await self.request() is not None:
            pass


Script = Callable[[Peer], Awaitable[None]]


async def answering(peer: Peer, answer: bytes = OK) -> None:
    """Answer every request on the connection, until the client closes it."""
    while await peer.request() is not None:
        await peer.send(answer)


class Server:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.port = 0
        self.peers: list[Peer] = []
        """One per accepted connection, in order."""
        self.requests: list[bytes] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(self, reader, writer)
        self.peers.append(peer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.script(peer)
        except (ConnectionError, asyncio.CancelledError):
            pass  # cancelled at teardown: swallowed, as Python 3.11's start_server logs a cancelled handler
        finally:
            writer.close()  # a script that returns closes the connection
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def serve(script: Script = answering, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(script)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()
        for task in server.tasks:
            task.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def connect(
    server: Server, *, timeout: float = 5.0, scheme: str = "http", path: str = "/", **options: Any
) -> AsyncIterator[HttpClient]:
    client = HttpClient(f"{scheme}://127.0.0.1:{server.port}{path}", timeout=timeout, **options)
    try:
        yield client
    finally:
        await client.close()


async def closed_by_client(*peers: Peer) -> None:
    async with asyncio.timeout(3):
        for peer in peers:
            await peer.eof.wait()


def after_first(first: Script) -> Script:
    """`first` on the first connection, then plain answers on every later one."""

    async def script(peer: Peer) -> None:
        await (first if peer.index == 0 else answering)(peer)

    return script


# --- answers and keep-alive -------------------------------------------------------------------------


async def test_content_length_answer_and_the_request_on_the_wire() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Amzn-RequestId: r-1\r\nContent-Length: 7\r\n\r\n"
        b'{"a":1}'
    )
    body = b'{"k":"v\xc3\xa9"}\r\n\r\n\x00\xff'
    fixed = [("User-Agent", "worker/1.0"), ("X-Fixed", "f")]
    varying = [("X-Amz-Date", "20250101T000000Z"), ("Authorization", "AWS4-HMAC-SHA256 Signature=abc")]
    async with (
        serve(lambda peer: answering(peer, answer)) as server,
        connect(server, path="/events?x=1", fixed_headers=fixed) as client,
    ):
        response = await client.post(varying, body)
    assert response.status == 200
    assert response.headers == {"content-type": "application/json", "x-amzn-requestid": "r-1", "content-length": "7"}
    assert response.body == b'{"a":1}'

    (raw,) = server.requests
    head, _, received = raw.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    assert request_line == "POST /events?x=1 HTTP/1.1"
    assert all(HEADER_LINE.fullmatch(line) for line in lines), lines
    headers = {name: value for name, _, value in (line.partition(": ") for line in lines)}
    assert len({name.lower() for name in headers}) == len(lines)  # no header twice
    assert headers == {
        "Host": f"127.0.0.1:{server.port}",
        "Content-Length": str(len(body)),
        **dict(fixed),
        **dict(varying),
    }
    assert received == body


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(OK, id="content-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", id="content-length-0"),
        pytest.param(CHUNKED, id="chunked"),
    ],
)
async def test_sequential_posts_share_one_connection(answer: bytes) -> None:
    async with serve(lambda peer: answering(peer, answer)) as server, connect(server) as client:
        for n in range(50):
            assert (await client.post([], b"body-%d" % n)).status == 200
    assert len(server.peers) == 1
    assert [raw.partition(b"\r\n\r\n")[2] for raw in server.requests] == [b"body-%d" % n for n in range(50)]


async def test_concurrent_posts_open_at_most_one_connection_each_then_reuse_them() -> None:
    async with serve() as server, connect(server) as client:
        await asyncio.gather(*(client.post([], b"first") for _ in range(8)))
        opened = len(server.peers)
        assert 1 <= opened <= 8
        await asyncio.gather(*(client.post([], b"second") for _ in range(8)))
        assert len(server.peers) == opened
    assert len(server.requests) == 16


async def test_chunked_answer_split_across_writes_is_reassembled() -> None:
    second = b" and\r\n0\r\n\r\nmore bytes, ok."  # a fake last chunk inside the data
    assert len(second) == 0x1A
    pieces = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5;name=value\r\nhello\r\n1",  # the next chunk-size line split after its first digit
        b"a; ext\r\n" + second[:9],
        second[9:] + b"\r",
        b"\n0\r\nX-Trailer: t\r\n\r",  # the final CRLF pair split
        b"\n",
    )

    async def chunked(peer: Peer) -> None:
        await peer.request()
        await peer.send(*pieces, pause=0.01)
        await answering(peer)

    async with serve(chunked) as server, connect(server) as client:
        response = await client.post([], b"x")
        assert (response.status, response.body) == (200, b"hello" + second)
        assert (await client.post([], b"y")).body == b"ok"  # the answer was consumed exactly
    assert len(server.peers) == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 201 Created\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 201 Created\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;e\r\nlo\r\n0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_answer_arriving_one_byte_at_a_time(answer: bytes) -> None:
    async def trickle(peer: Peer) -> None:
        await peer.request()
        await peer.send(*(answer[i : i + 1] for i in range(len(answer))), pause=0.001)
        await peer.until_eof()

    async with serve(trickle) as server, connect(server) as client:
        response = await client.post([], b"x")
    assert (response.status, response.headers["x-a"], response.body) == (201, "1", b"hello")


async def test_interim_1xx_answers_are_skipped() -> None:
    async def interim(peer: Peer) -> None:
        await peer.request()
        await peer.send(
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"4\r\nreal\r\n0\r\n\r\n",
            pause=0.01,
        )
        await answering(peer)

    async with serve(interim) as server, connect(server) as client:
        response = await client.post([], b"x")
        assert (response.status, response.headers, response.body) == (200, {"transfer-encoding": "chunked"}, b"real")
        assert (await client.post([], b"y")).body == b"ok"
    assert len(server.peers) == 1


async def test_204_without_content_length_has_no_body_and_keeps_the_connection() -> None:
    async with (
        serve(lambda peer: answering(peer, b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")) as server,
        connect(server) as client,
    ):
        for _ in range(3):
            response = await client.post([], b"x")
            assert (response.status, response.body) == (204, b"")
    assert len(server.peers) == 1


# --- when a connection must not be reused ---------------------------------------------------------------


async def test_answer_without_length_is_read_until_close_and_not_reused() -> None:
    async def until_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ", b"the end", pause=0.01)
        # returning closes the connection: the end of the body

    async with serve(after_first(until_close)) as server, connect(server) as client:
        response = await client.post([], b"x")
        assert (response.status, response.body) == (200, b"until the end")
        assert (await client.post([], b"y")).body == b"ok"
    assert len(server.peers) == 2


async def test_connection_close_answer_is_honoured() -> None:
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nbye\r\n0\r\n\r\n"
    async with serve(lambda peer: answering(peer, close)) as server, connect(server) as client:
        assert (await client.post([], b"x")).body == b"bye"
        assert (await client.post([], b"y")).body == b"bye"
        assert [len(peer.requests) for peer in server.peers] == [1, 1]
        await closed_by_client(*server.peers)  # the client closed both


async def test_bytes_beyond_the_answer_make_the_connection_unusable() -> None:
    async def two_answers(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
        await peer.until_eof()

    async with serve(after_first(two_answers)) as server, connect(server) as client:
        assert (await client.post([], b"x")).body == b"ok"
        assert (await client.post([], b"y")).body == b"ok"  # never the stray "two"
        assert len(server.peers) == 2
        await closed_by_client(server.peers[0])


async def test_timeout_raises_and_the_connection_is_not_reused() -> None:
    async def silent(peer: Peer) -> None:
        await peer.request()
        await peer.until_eof()

    async with serve(after_first(silent)) as server, connect(server, timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.post([], b"x")
        assert time.monotonic() - started < 5
        assert (await client.post([], b"y")).body == b"ok"
        assert len(server.peers) == 2
        await closed_by_client(server.peers[0])


async def test_cancelled_post_closes_its_connection() -> None:
    arrived, cancelled = asyncio.Event(), asyncio.Event()

    async def late(peer: Peer) -> None:
        await peer.request()
        arrived.set()
        await cancelled.wait()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")  # must reach no one
        await peer.until_eof()

    async with serve(after_first(late)) as server, connect(server) as client:
        task = asyncio.create_task(client.post([], b"x"))
        await arrived.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled.set()
        assert (await client.post([], b"y")).body == b"ok"
        assert len(server.peers) == 2
        await closed_by_client(server.peers[0])


async def test_idle_connection_expires() -> None:
    async with serve() as server, connect(server, idle_seconds=0.1) as client:
        await client.post([], b"x")
        await client.post([], b"y")
        assert len(server.peers) == 1
        await asyncio.sleep(0.3)
        await client.post([], b"z")
        assert len(server.peers) == 2
        await closed_by_client(server.peers[0])  # the expired one was closed, not leaked


# --- the server going away ----------------------------------------------------------------------------


async def test_kept_alive_connection_closed_while_idle_is_replaced() -> None:
    async def answer_once(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK)  # then close: the client holds an idle connection the server dropped

    async with serve(after_first(answer_once)) as server, connect(server) as client:
        await client.post([], b"x")
        await asyncio.sleep(0.05)
        assert (await client.post([], b"y")).body == b"ok"
    assert len(server.peers) == 2


async def test_request_lost_on_a_kept_alive_connection_is_retried_on_a_fresh_one() -> None:
    async def drop_second(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK)
        await peer.request()  # the server closes just as the next request arrives: not a byte answered

    async with serve(after_first(drop_second)) as server, connect(server) as client:
        await client.post([], b"first")
        assert (await client.post([], b"second")).body == b"ok"
    assert len(server.peers) == 2
    assert [raw.partition(b"\r\n\r\n")[2] for raw in server.requests] == [b"first", b"second", b"second"]


async def test_fresh_connection_closed_before_any_answer_raises_without_retrying() -> None:
    async def hang_up(peer: Peer) -> None:
        await peer.request()

    async with serve(hang_up) as server, connect(server) as client:
        with pytest.raises(ConnectionResetError):
            await client.post([], b"x")
        assert len(server.peers) == 1


async def test_answer_cut_short_raises_without_retrying() -> None:
    async def cut(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK)
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    async with serve(cut) as server, connect(server) as client:
        await client.post([], b"x")
        with pytest.raises(ConnectionResetError):
            await client.post([], b"y")  # a kept-alive connection, but the answer had begun
        assert len(server.peers) == 1


# --- malformed answers ----------------------------------------------------------------------------------


def test_protocol_error_is_a_connection_error() -> None:
    assert issubclass(HttpProtocolError, ConnectionError)
    assert issubclass(HttpProtocolError, OSError)


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES,  # no end of head, ever
    ],
    ids=[
        "not-http",
        "no-status-code",
        "header-without-colon",
        "content-length-not-a-number",
        "content-length-negative",
        "content-length-over-limit",
        "bad-chunk-size",
        "head-over-64-KiB",
    ],
)
async def test_malformed_answer_raises_protocol_error_and_drops_the_connection(answer: bytes) -> None:
    async def garbage(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)
        await peer.until_eof()  # the server stays: the error is the client's own verdict

    async with serve(garbage) as server, connect(server) as client:
        with pytest.raises(HttpProtocolError):
            await client.post([], b"x")
        assert len(server.peers) == 1
        await closed_by_client(server.peers[0])


@pytest.mark.parametrize(
    "answer",
    ["HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\nok", "HTTP/1.1 \u00b200 OK\r\nContent-Length: 2\r\n\r\nok"],
    ids=["content-length", "status"],
)
async def test_non_ascii_digits_raise_protocol_error(answer: str) -> None:
    async def garbage(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer.encode("latin-1"))
        await peer.until_eof()

    async with serve(garbage) as server, connect(server) as client:
        with pytest.raises(HttpProtocolError):
            await client.post([], b"x")


async def test_chunk_over_the_body_limit_is_refused() -> None:
    async def huge(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000\r\n")  # 1 TiB
        await peer.send(b"a" * (MAX_BODY_BYTES + 1024 * 1024))
        # returning closes: had the client refused the chunk, it would have said so before

    async with serve(huge) as server, connect(server) as client:
        with pytest.raises(HttpProtocolError, match="too large"):
            await client.post([], b"x")


async def test_read_until_close_body_cut_by_a_reset_raises() -> None:
    async def reset(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\npart of a lon")
        await asyncio.sleep(0.05)
        sock = peer.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.writer.transport.abort()  # RST, not FIN

    async with serve(reset) as server, connect(server) as client:
        with pytest.raises(ConnectionResetError):
            await client.post([], b"x")


# --- TLS and close() ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throw-away self-signed certificate for 127.0.0.1 and localhost: (server context, client context)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder(subject_name=name, issuer_name=name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    path: Path = tmp_path_factory.mktemp("tls") / "server.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert_pem
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(path)
    return server, ssl.create_default_context(cadata=cert_pem.decode())


async def test_tls_with_a_trusted_certificate(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls
    async with (
        serve(tls=server_context) as server,
        connect(server, scheme="https", ssl_context=client_context) as client,
    ):
        for n in range(3):
            assert (await client.post([], b"secret-%d" % n)).body == b"ok"
    assert len(server.peers) == 1
    assert server.requests[0].startswith(b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)


async def test_tls_with_an_untrusted_certificate_fails_verification(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, _ = tls
    async with serve(tls=server_context) as server, connect(server, scheme="https") as client:
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            await client.post([], b"x")
    assert isinstance(caught.value, OSError)
    assert server.peers == []  # the handshake never completed


async def test_close_closes_every_connection() -> None:
    async with serve() as server, connect(server) as client:
        await asyncio.gather(*(client.post([], b"x") for _ in range(3)))
        assert len(server.peers) == 3
        await client.close()
        await closed_by_client(*server.peers)
