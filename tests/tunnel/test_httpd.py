"""The ``--metrics`` endpoint's request reader and router, over memory streams with a MockClock (no real time)."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from trio_tunnel.config import HostPort
from trio_tunnel.httpd import MAX_REQUEST, bind_metrics, handle_http, is_loopback
from trio_tunnel.metrics import Metrics, Response

LIMIT = 5.0


def respond(method: str, path: str) -> Response:
    if path == "/hello":
        return Response("200 OK", "text/plain", f"{method} hello".encode())
    return Response("404 Not Found", "text/plain", b"no")


async def exchange(request: bytes, *, then_wait: bool = False) -> tuple[bytes, float]:
    """Send ``request`` to :func:`handle_http`; the bytes answered before the close, and when the close came."""
    client, server = trio.testing.memory_stream_pair()
    answer = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http, server, respond, LIMIT)
        await client.send_all(request)
        if not then_wait:
            await client.send_eof()
        while data := await client.receive_some(65536):
            answer += data
    return bytes(answer), trio.current_time()


async def test_a_get_is_answered_with_length_and_close(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        answer, _ = await exchange(b"GET /hello?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", then_wait=True)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"GET hello"
    assert b"Content-Length: 9" in head and b"Connection: close" in head


async def test_head_gets_no_body_and_unknown_paths_404(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        answer, _ = await exchange(b"HEAD /hello HTTP/1.1\r\n\r\n")
        assert answer.endswith(b"\r\n\r\n") and b"Content-Length: 10" in answer
        answer, _ = await exchange(b"GET /other HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404 Not Found")
        answer, _ = await exchange(b"BREW coffee\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 Bad Request")


async def test_a_slow_request_is_dropped_at_the_time_limit(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        start = trio.current_time()
        answer, closed = await exchange(b"GET /hello HTTP/1.1\r\nHost: a\r\n", then_wait=True)
    assert answer == b""
    assert closed - start == pytest.approx(LIMIT)


async def test_a_request_head_over_the_size_limit_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        start = trio.current_time()
        answer, closed = await exchange(b"GET /hello HTTP/1.1\r\n" + b"X: " + b"a" * MAX_REQUEST, then_wait=True)
    assert answer == b""
    assert closed == start  # at once, not at the time limit
    with trio.fail_after(10):  # just under the limit is fine
        header = b"X: " + b"a" * (MAX_REQUEST - 100) + b"\r\n\r\n"
        answer, _ = await exchange(b"GET /hello HTTP/1.1\r\n" + header, then_wait=True)
    assert answer.startswith(b"HTTP/1.1 200 OK")


async def test_the_metrics_router() -> None:
    metrics = Metrics("server")
    assert metrics.respond("GET", "/nope").status.startswith("404")
    assert metrics.respond("POST", "/metrics").status.startswith("405")
    exposition = metrics.respond("GET", "/metrics")
    assert exposition.content_type.startswith("text/plain") and b"trio_tunnel_sessions_connected 0.0" in exposition.body
    assert metrics.respond("GET", "/").body.startswith(b"<!DOCTYPE html>")
    assert metrics.respond("GET", "/status").content_type == "application/json"


def test_only_loopback_addresses_count_as_local() -> None:
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "192.0.2.7", "fe80::1%eth0", "localhost"))


async def test_a_metrics_endpoint_beyond_loopback_is_not_opened_silently(caplog: pytest.LogCaptureFixture) -> None:
    """No authentication on the endpoint: binding it where others can reach it is said out loud (one WARNING)."""
    with trio.fail_after(10):
        for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
            caplog.clear()
            listeners = await bind_metrics(HostPort(host=host, port=0))
            for listener in listeners:
                await listener.aclose()
            warnings = [
                r for r in caplog.records if r.levelno == logging.WARNING and "without authentication" in r.message
            ]
            assert len(warnings) == (1 if warned else 0), host
