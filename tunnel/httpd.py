"""The ``--metrics HOST:PORT`` endpoint: a minimal HTTP/1.1 server, run as Trio tasks of the server or client.

Why hand-written: it answers three GETs with bodies computed at once (:meth:`Metrics.respond`), one request per
connection. A general HTTP server (or prometheus_client's own, which runs in a thread) would bring a second
concurrency model into the process for that. What it needs to be is defensive, since the port may be reachable
by anyone the operator lets in:

* a request head (request line and headers) larger than :data:`MAX_REQUEST` is dropped: the connection is closed
  without an answer, having held at most that much memory;
* the whole exchange, from accept to the last byte of the answer, must fit in ``time_limit`` seconds (the config's
  handshake timeout), or the connection is closed: a slow client holds nothing for long;
* at most :data:`MAX_CONNECTIONS` connections are served at once; more are closed at accept.

Each response says ``Connection: close``; the body (at most a few hundred KiB even for many clients) is built in
full before it is sent.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import trio

from .config import HostPort
from .console import announce, format_hostport
from .errors import TunnelError
from .metrics import Response
from .tcp import TcpStream, serve_tcp

__all__ = ["MAX_CONNECTIONS", "MAX_REQUEST", "MetricsBindError", "bind_metrics", "handle_http", "serve_http"]

logger: Final = logging.getLogger(__name__)

MAX_REQUEST: Final = 4096
"""Bytes a request head may take (a Prometheus scrape or a browser's GET sends well under 1 KiB)."""
MAX_CONNECTIONS: Final = 16
"""Connections served at once; the endpoint is for a scraper, a status command and a dashboard or two."""

Respond = Callable[[str, str], Response | Awaitable[Response]]
"""``respond(method, path)``: the answer to a request (awaited if it is a coroutine: ``server --workers`` asks its
workers)."""


class MetricsBindError(TunnelError):
    """The ``--metrics`` address cannot be bound (the message names it and why)."""


async def bind_metrics(address: HostPort) -> list[trio.SocketListener]:
    """Listen on ``address`` and print ``metrics HOST:PORT`` (the port actually bound).

    Raises:
        MetricsBindError: one readable line naming the address and the flag.
    """
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as exc:
        raise MetricsBindError(f"cannot listen on {address} for --metrics: {exc.strerror or exc}") from None
    host, port = listeners[0].socket.getsockname()[:2]
    where = format_hostport(str(host), int(port))
    if not all(is_loopback(listener.socket.getsockname()[0]) for listener in listeners):
        logger.warning(
            "the --metrics endpoint %s answers beyond this machine, without authentication: anyone who reaches it "
            "can read client names, addresses and traffic figures. Bind it to 127.0.0.1 (the default for a bare "
            "port), or keep it behind a firewall",
            where,
        )
    announce(f"metrics {where}")
    return listeners


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bound address) only answers this machine: 127.0.0.0/8, ::1 (or its v4-mapped form)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


async def serve_http(
    respond: Respond,
    listeners: list[trio.SocketListener],
    time_limit: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on ``listeners`` until cancelled (see the module docstring for the limits)."""
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    await serve_tcp(partial(_connection, respond, time_limit, limiter), listeners, task_status=task_status)


async def _connection(respond: Respond, time_limit: float, limiter: trio.CapacityLimiter, stream: TcpStream) -> None:
    try:
        limiter.acquire_nowait()
    except trio.WouldBlock:
        logger.debug("metrics endpoint: %d connections already open; closed a new one", MAX_CONNECTIONS)
        await trio.aclose_forcefully(stream)
        return
    try:
        await handle_http(stream, respond, time_limit)
    finally:
        limiter.release()


async def handle_http(stream: trio.abc.Stream, respond: Respond, time_limit: float) -> None:
    """Read one request from ``stream``, answer it, close ``stream`` (on every path, within ``time_limit``)."""
    try:
        with trio.move_on_after(time_limit) as scope:
            head = await _read_head(stream)
            if head is None:
                return
            answer = await _answer(head, respond)
            await stream.send_all(answer)
        if scope.cancelled_caught:
            logger.debug("metrics endpoint: dropped a request not done within %g s", time_limit)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _read_head(stream: trio.abc.Stream) -> bytes | None:
    """The request head up to the blank line, or None (the peer went away, or sent more than MAX_REQUEST)."""
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            end = buffer.find(b"\n\n")  # (lenient: a hand-typed request with bare newlines)
        if end >= 0:
            return bytes(buffer[:end])
        if len(buffer) >= MAX_REQUEST:
            logger.debug("metrics endpoint: dropped a request head over %d bytes", MAX_REQUEST)
            return None
        block = await stream.receive_some(MAX_REQUEST + 4 - len(buffer))
        if not block:
            return None
        buffer += block


async def _answer(head: bytes, respond: Respond) -> bytes:
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        response = Response("400 Bad Request", "text/plain; charset=utf-8", b"bad request\n")
        method = "GET"
    else:
        method = parts[0].decode("ascii", "replace")
        path = parts[1].decode("ascii", "replace").split("?", 1)[0]
        answered = respond(method, path)
        response = await answered if inspect.isawaitable(answered) else answered
    head_out = (
        f"HTTP/1.1 {response.status}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head_out if method == "HEAD" else head_out + response.body
