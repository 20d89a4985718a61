"""A small HTTP/1.1 keep-alive client for the one request the worker makes a thousand times a second.

A general client (aiohttp) spends ~400 µs of CPU per request on machinery this request does not use:
cookies, redirects, URL objects, multidicts, payload classes, streaming readers. Here a request is one
pre-rendered head plus the body in one write, and the answer is parsed straight from the protocol's
buffer; connections are reused, most recently used first. What it supports is what an AWS endpoint
answers with: Content-Length, chunked or read-until-close bodies, `Connection: close`, TLS.

Through an HTTP proxy (worker/personalize/proxy.py decides which, as botocore does), as urllib3 does it for botocore:
an http:// endpoint gets the absolute-form request target on a connection to the proxy; an https://
endpoint gets a CONNECT tunnel, then TLS to the endpoint inside it (SNI and certificate checked against
the endpoint's name), kept alive like a direct connection. The Host header, and so the signature, is
always the endpoint's.

Every failure is an `OSError` (a connection problem; `ProxyError` when the proxy is the cause) or
`TimeoutError`: the sink retries both.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Final, cast
from urllib.parse import urlsplit

from worker.personalize.proxy import Proxy, ProxyError, connect_via, status_text

MAX_HEAD_BYTES: Final = 64 * 1024
MAX_BODY_BYTES: Final = 16 * 1024 * 1024


def host_header(url: str) -> str:
    """The Host value for `url`: brackets around an IPv6 address, the port only when not the default.
    The signer signs exactly this value, so both take it from here."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    if parts.port is not None and parts.port != {"https": 443, "http": 80}.get(parts.scheme):
        host += f":{parts.port}"
    return host


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


class HttpProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.x as we understand it; the connection is dropped."""


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        """Lower-cased names; a repeated header keeps its last value."""
        self.body = body


_UNTIL_CLOSE = -1
_CHUNKED = -2


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.used = False
        """Whether a request has completed on it: a stale reused connection may fail harmlessly."""
        self.received = False
        """Whether any byte of the current answer has arrived."""
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._status = 0
        self._headers: dict[str, str] | None = None
        self._body_length = 0
        self._chunks: bytearray | None = None
        self._keep_alive = True
        self._tunnel_answer = False
        """The exchange is a CONNECT: its answer has no body, and a 2xx keeps the connection as a tunnel."""
        self.gone: asyncio.Future[None] | None = None
        """Done once the transport is gone (after a TLS close_notify exchange, for TLS)."""

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.gone = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            self.close()  # nothing was asked: a server talking out of turn cannot be trusted again
            return
        self.received = True
        self._buffer += data
        try:
            self._parse()
        except HttpProtocolError as error:
            self._fail(error)

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost settles the waiter

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if exc is None and self._headers is not None and self._body_length == _UNTIL_CLOSE:
            self._complete(bytes(self._buffer))
            return
        reason = f": {exc}" if exc else ""
        waiter.set_exception(ConnectionResetError(f"connection closed before the answer was complete{reason}"))

    # --- the exchange -------------------------------------------------------------------------

    def request(self, data: bytes, deadline: float, *, tunnel: bool = False) -> asyncio.Future[Response]:
        """Send; the future fails with TimeoutError at `deadline` (loop time), and the connection closes.
        One timer handle per request: `asyncio.timeout` costs several times more on this hot path."""
        assert self.transport is not None and self._waiter is None
        loop = asyncio.get_running_loop()
        self._tunnel_answer = tunnel
        self._waiter = loop.create_future()
        self._timer = loop.call_at(deadline, self._time_out)
        self.received = False
        self.transport.write(data)
        return self._waiter

    def _time_out(self) -> None:
        self._timer = None
        self._fail(TimeoutError("no complete answer within the request timeout"))

    @property
    def failed_status(self) -> int | None:
        """The status of an answer whose head came but whose body did not, when it is not AWS's (no request
        id): a proxy refusing a request often resets the connection right after its answer's head."""
        headers = self._headers
        return self._status if headers is not None and "x-amzn-requestid" not in headers else None

    @property
    def busy(self) -> bool:
        """An exchange is unfinished: the connection cannot take another request."""
        return self._waiter is not None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: Exception) -> None:
        self._cancel_timer()
        self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    def _parse(self) -> None:
        buffer = self._buffer
        if self._headers is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise HttpProtocolError("response head too large")
                return
            self._parse_head(bytes(buffer[:end]))
            del buffer[: end + 4]
            if self._headers is None:  # an interim 1xx answer: the real one follows
                self._parse()
                return
        length = self._body_length
        if length >= 0:
            if len(buffer) >= length:
                body = bytes(buffer[:length])
                del buffer[:length]
                self._complete(body)
        elif length == _CHUNKED:
            self._parse_chunks()
        elif len(buffer) > MAX_BODY_BYTES:
            raise HttpProtocolError("response body too large")

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not _is_number(parts[1]):
            raise HttpProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpProtocolError(f"malformed header line: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        self._status = status
        self._headers = headers
        self._keep_alive = parts[0] != "HTTP/1.0" and headers.get("connection", "").lower() != "close"
        if self._tunnel_answer:
            # RFC 9110 9.3.6: a 2xx to CONNECT has no body (length headers are ignored) and the bytes that
            # follow belong to the tunnel; any other answer ends the attempt, its body unread.
            self._body_length = 0
            self._keep_alive = 200 <= status < 300
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._body_length = _CHUNKED
            self._chunks = bytearray()
        elif "content-length" in headers:
            text = headers["content-length"]
            if not _is_number(text) or int(text) > MAX_BODY_BYTES:
                raise HttpProtocolError(f"bad Content-Length: {text[:40]!r}")
            self._body_length = int(text)
        elif status in (204, 304):
            self._body_length = 0
        else:
            self._body_length = _UNTIL_CLOSE
            self._keep_alive = False

    def _parse_chunks(self) -> None:
        buffer, chunks = self._buffer, self._chunks
        assert chunks is not None
        while True:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise HttpProtocolError("chunk size line too long")
                return
            size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpProtocolError(f"bad chunk size: {size_text[:40]!r}") from None
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", end)
                if trailer_end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise HttpProtocolError("chunked trailer too large")
                    return
                del buffer[: trailer_end + 4]
                self._complete(bytes(chunks))
                return
            if len(chunks) + size > MAX_BODY_BYTES:
                raise HttpProtocolError("response body too large")
            if len(buffer) < end + 2 + size + 2:
                return
            chunks += buffer[end + 2 : end + 2 + size]
            del buffer[: end + 2 + size + 2]

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _complete(self, body: bytes) -> None:
        self._cancel_timer()
        waiter, headers = self._waiter, self._headers
        assert waiter is not None and headers is not None
        response = Response(self._status, headers, body)
        self._waiter = None
        self._headers = None
        self._chunks = None
        self._tunnel_answer = False
        if not self._keep_alive or self._buffer:
            self.close()  # told to, or bytes beyond the answer: either way not reusable
        self.used = True
        if not waiter.done():
            waiter.set_result(response)


class HttpClient:
    """POSTs to one URL over a pool of keep-alive connections (no cap: the caller bounds concurrency)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        fixed_headers: list[tuple[str, str]] | None = None,
        idle_seconds: float = 30.0,
        proxy: Proxy | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.proxy = proxy
        self._ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        self._forwarding = proxy is not None and self._ssl is None
        """An http:// endpoint through a proxy: every request goes to the proxy, in absolute form."""
        self._authority = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        target = f"http://{host_header(url)}{path}" if self._forwarding else path
        lines = [f"POST {target} HTTP/1.1", f"Host: {host_header(url)}"]
        if self._forwarding and proxy is not None and proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        lines.extend(f"{name}: {value}" for name, value in fixed_headers or ())
        self._prefix = "\r\n".join(lines) + "\r\n"
        """The request line and the headers that never change, rendered once."""
        self._timeout = timeout
        self._idle_seconds = idle_seconds
        self._idle: deque[_Connection] = deque()
        self._all: set[_Connection] = set()

    async def post(self, headers: list[tuple[str, str]], body: bytes) -> Response:
        """One exchange within the timeout. A reused connection the server closed while idle is
        retried once on a fresh one, as every keep-alive client does: nothing of it was answered."""
        varying = "".join(f"{name}: {value}\r\n" for name, value in headers)
        data = f"{self._prefix}Content-Length: {len(body)}\r\n{varying}\r\n".encode("latin-1") + body
        deadline = asyncio.get_running_loop().time() + self._timeout
        while True:
            connection = self._idle_connection() or await self._new_connection(deadline)
            try:
                response = await connection.request(data, deadline)
            except asyncio.CancelledError:
                connection.close()  # the answer may still come: this connection is out of step
                raise
            except OSError as error:
                connection.close()
                if connection.used and not connection.received and not isinstance(error, TimeoutError):
                    continue
                if self._forwarding and not isinstance(error, TimeoutError):
                    raise self._forwarding_error(connection.failed_status, error) from error
                raise
            finally:
                self._release(connection)
            if self._forwarding and response.status != 200 and "x-amzn-requestid" not in response.headers:
                raise self._forwarding_error(response.status)  # not AWS's answer: the proxy's own
            return response

    def _forwarding_error(self, status: int | None, error: OSError | None = None) -> ProxyError:
        """Forwarding, the connection is the proxy's: its failures and its own answers name it."""
        assert self.proxy is not None
        if status is not None:
            return ProxyError(
                f"proxy {self.proxy.url} answered {status_text(status)} instead of {self._authority}", status
            )
        return ProxyError(f"proxy {self.proxy.url} failed the request to {self._authority}: {error}")

    def _idle_connection(self) -> _Connection | None:
        """The most recently used idle connection still open and not expired, if any."""
        now = time.monotonic()
        idle = self._idle
        while idle and (idle[0].closed or now - idle[0].idle_since >= self._idle_seconds):
            self._discard(idle.popleft())  # the least recently used: expired first
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._idle_seconds:
                return connection
            self._discard(connection)
        return None

    async def _new_connection(self, deadline: float) -> _Connection:
        if self.proxy is not None:
            connection = await connect_via(self.proxy, _Connection, self._authority, self._ssl, deadline)
        else:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout_at(deadline):
                _, connection = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self._ssl, server_hostname=self.host if self._ssl else None
                )
        self._all.add(connection)
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.closed or connection.busy:
            self._discard(connection)
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._all.discard(connection)

    async def close(self, grace: float = 1.0) -> None:
        """Close every connection; a TLS one says goodbye first (close_notify, twice inside a tunnel), which
        takes a round trip: wait up to `grace` seconds for that, then cut what is left."""
        connections = list(self._all)
        self._all.clear()
        self._idle.clear()
        for connection in connections:
            connection.close()
        pending = [c.gone for c in connections if c.gone is not None and not c.gone.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for connection in connections:
            if connection.transport is not None and connection.gone is not None and not connection.gone.done():
                connection.transport.abort()
        await asyncio.sleep(0)  # let the transports run their close callbacks
