"""``trio-tunnel status``: the URL, the tables and their rates, and the errors for an endpoint that is absent or not
trio-tunnel's (each a small HTTP server on 127.0.0.1 written here)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from trio_tunnel.errors import ConfigError
from trio_tunnel.status import Endpoint, StatusError, fetch_status, parse_url, render

DOC: dict[str, Any] = {
    "trio_tunnel": "0.1.0",
    "role": "server",
    "name": "",
    "now": 1_000_100.0,
    "started": 1_000_000.0,
    "sessions": [
        {
            "client": "home",
            "address": "192.0.2.7:51000",
            "since": 1_000_040.0,
            "rtt": 0.0123,
            "streams": 2,
            "bytes_received": 3 * 1024 * 1024,
            "bytes_sent": 1024,
        }
    ],
    "services": [
        {
            "client": "home",
            "name": "web",
            "kind": "expose",
            "public": "0.0.0.0:9000",
            "target": "",
            "open": 2,
            "opened": {"ok": 5, "local-connect-failed": 1},
            "bytes_in": 1024,
            "bytes_out": 3 * 1024 * 1024,
            "last_error": "web: local service: connection refused",
            "last_error_at": 1_000_090.0,
        }
    ],
    "auth_failures": {"bad-token": 2},
    "reconnects": 0,
}


def test_parse_url() -> None:
    assert parse_url("http://127.0.0.1:9465") == Endpoint("127.0.0.1", 9465, "http://127.0.0.1:9465")
    assert parse_url("http://[::1]:9/status").host == "::1"
    assert parse_url("9466") == Endpoint("127.0.0.1", 9466, "http://127.0.0.1:9466")
    with pytest.raises(ConfigError, match="only http://"):
        parse_url("https://127.0.0.1:9465")
    with pytest.raises(ConfigError, match="status URL"):
        parse_url("http://127.0.0.1:notaport")


def test_render_shows_sessions_and_services() -> None:
    text = render(DOC)
    lines = text.splitlines()
    assert lines[0].startswith("trio-tunnel server 0.1.0, up 1m40s, 1 session, 1 service, 2 refused handshakes")
    row = next(line for line in lines if line.startswith("home"))
    assert "192.0.2.7:51000" in row and "12.3 ms" in row and "3.0 MiB" in row and "(1m00s)" in row
    service = next(line for line in lines if line.startswith("web"))
    for cell in ("home", "expose", "0.0.0.0:9000", "3.0 MiB", "1.0 KiB", "connection refused"):
        assert cell in service
    assert re.search(r"3\.0 MiB +- +web: local service", service)  # no rate without an earlier document


def test_render_computes_rates_from_two_documents() -> None:
    later = {
        **DOC,
        "now": DOC["now"] + 2,
        "sessions": [{**DOC["sessions"][0], "bytes_received": DOC["sessions"][0]["bytes_received"] + 2 * 1024 * 1024}],
        "services": [{**DOC["services"][0], "bytes_out": DOC["services"][0]["bytes_out"] + 4096}],
    }
    text = render(later, DOC)
    assert "1.0 MiB/s" in next(line for line in text.splitlines() if line.startswith("home"))
    assert "2.0 KiB/s" in next(line for line in text.splitlines() if line.startswith("web"))


def test_render_without_sessions() -> None:
    text = render({**DOC, "sessions": [], "services": [], "auth_failures": {}})
    assert "no sessions" in text and "no services" in text


async def _serving(answer: bytes, body: Callable[[Endpoint], Awaitable[None]]) -> None:
    """Run ``body`` against a one-shot server on 127.0.0.1 that answers every connection with ``answer``."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(answer)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)  # type: ignore[arg-type]
        port = listeners[0].socket.getsockname()[1]
        await body(Endpoint("127.0.0.1", port, f"http://127.0.0.1:{port}"))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "GET /status answered '404 Not Found'"),
        (b"HTTP/1.1 200 OK\r\n\r\n<html>hello</html>", "/status is not JSON"),
        (b'HTTP/1.1 200 OK\r\n\r\n{"status": "ok"}', "/status is JSON but not trio-tunnel's document"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "it did not answer in HTTP"),
    ],
)
async def test_an_endpoint_that_is_not_ours(answer: bytes, message: str) -> None:
    async def check(endpoint: Endpoint) -> None:
        with pytest.raises(StatusError) as caught:
            await fetch_status(endpoint)
        assert str(caught.value) == f"{endpoint.url} is not a trio-tunnel --metrics endpoint: {message}"

    with trio.fail_after(20):
        await _serving(answer, check)


async def test_nothing_listening() -> None:
    sock = trio.socket.socket()
    with sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with trio.fail_after(20), pytest.raises(StatusError, match=r"nothing answers at http://127\.0\.0\.1:\d+ "):
        await fetch_status(Endpoint("127.0.0.1", port, f"http://127.0.0.1:{port}"))
