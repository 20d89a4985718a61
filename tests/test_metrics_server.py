"""The /metrics, /healthz and /readyz server (plain asyncio since issue 13), over real sockets."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CONTENT_TYPE_LATEST

from worker.observe.metrics import HEAD_LIMIT, Metrics, MetricsServer


async def ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # the server closes after one answer
    writer.close()
    return answer


async def test_pages_statuses_and_heads() -> None:
    ready = [False, "waiting for a partition assignment"]
    server = MetricsServer(Metrics(), lambda: (bool(ready[0]), str(ready[1])))
    await server.start("127.0.0.1", 0)
    assert server.port
    try:
        metrics = await ask(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
        head, body = metrics.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert f"Content-Type: {CONTENT_TYPE_LATEST}".encode() in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert b"personalize_worker_build_info" in body

        assert (await ask(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")).endswith(b"\r\n\r\nok\n")
        not_ready = await ask(server.port, b"GET /readyz?verbose=1 HTTP/1.0\r\n\r\n")
        assert not_ready.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert not_ready.endswith(b"\r\n\r\nwaiting for a partition assignment\n")
        ready[:] = [True, "ready"]
        assert (await ask(server.port, b"GET /readyz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 OK\r\n")

        headed = await ask(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert headed.startswith(b"HTTP/1.1 200 OK\r\n") and headed.endswith(b"\r\n\r\n"), "a head, no body"
        assert (await ask(server.port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 Not Found\r\n")
        posted = await ask(server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert posted.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    finally:
        await server.stop()


async def test_an_oversized_head_is_closed_unanswered_and_the_server_goes_on() -> None:
    server = MetricsServer(Metrics(), lambda: (True, "ready"))
    await server.start("127.0.0.1", 0)
    assert server.port
    try:
        junk = b"GET /metrics HTTP/1.1\r\nX-Junk: " + b"a" * (2 * HEAD_LIMIT) + b"\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(junk)
        try:
            answer = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            answer = b""
        writer.close()
        assert answer == b""
        assert (await ask(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")).endswith(b"ok\n")
    finally:
        await server.stop()


async def test_a_silent_client_does_not_hold_the_stop() -> None:
    """A scraper that connects and sends nothing (or hangs mid-request) must not delay the worker's exit."""
    server = MetricsServer(Metrics(), lambda: (True, "ready"))
    await server.start("127.0.0.1", 0)
    assert server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metr")
    await writer.drain()
    await asyncio.sleep(0.2)  # the server is now waiting for the rest of the head
    started = time.monotonic()
    await asyncio.wait_for(server.stop(), 5)
    assert time.monotonic() - started < 5
    assert await asyncio.wait_for(reader.read(), 5) == b"", "the connection is closed"
    writer.close()
