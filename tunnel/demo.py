"""``trio-tunnel demo``: a server, a client and a small web service in one process, on loopback only.

It shows the whole path a real deployment takes: the web service stands for a machine behind NAT, the client dials
the server, the server binds a public port for the service, and a page is fetched through that port.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import tempfile
from typing import Final

import trio

from .client import run_client
from .config import ClientConfig, HostPort, PortSet, RemoteSpec, ServerConfig
from .console import announce, format_hostport
from .lifecycle import Shutdown
from .link import ServerTls
from .server import run_server

__all__ = ["fetch", "run_demo", "serve_page"]

logger: Final = logging.getLogger(__name__)

PAGE: Final = (
    b"<!doctype html><title>trio-tunnel demo</title>"
    b"<h1>Hello from behind the NAT</h1><p>This page came through a trio-tunnel link.</p>\n"
)
MAX_REQUEST: Final = 16 * 1024


async def _serve_http(stream: trio.SocketStream) -> None:
    request = b""
    with trio.move_on_after(10):
        while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            request += chunk
    head = (
        b"HTTP/1.0 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(PAGE)
    )
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(head + PAGE)
    await stream.aclose()


async def serve_page(*, task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED) -> None:
    """A tiny HTTP/1.0 server on 127.0.0.1 (port chosen by the OS) that answers every request with :data:`PAGE`."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port = listeners[0].socket.getsockname()[:2]
    task_status.started(HostPort(host=host, port=port))
    await trio.serve_listeners(_serve_http, listeners)


async def fetch(host: str, port: int) -> tuple[int, bytes]:
    """GET / from ``host:port``: the status code and the body (the caller bounds the time)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.0\r\nHost: demo\r\n\r\n")
        response = bytearray()
        while chunk := await stream.receive_some(65536):
            response += chunk
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


async def run_demo(once: bool, shutdown: Shutdown) -> None:
    """Start a web service, a server and a client on loopback, fetch the page through the tunnel, report it.

    With ``once`` it returns after the check; otherwise it keeps everything running until ``shutdown``.

    Raises:
        RuntimeError: the page did not come through (the message says what came instead).
    """
    token = secrets.token_bytes(24).hex().encode()
    announce("trio-tunnel demo: a web service, a server and a client, all in this process on 127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="trio-tunnel-demo-") as state_dir:
        await _demo(once, shutdown, token, state_dir)
    announce("demo finished")


async def _demo(once: bool, shutdown: Shutdown, token: bytes, state_dir: str) -> None:
    # The demo's server makes a throwaway key in a temporary state directory, and its client pins that key: TLS with
    # a verified server, as a real first run does after copying the fingerprint.
    identity = ServerTls.from_state_dir(state_dir)
    async with trio.open_nursery() as nursery:
        web = await nursery.start(serve_page)
        announce(f"  web service (stands for a machine behind NAT): http://{format_hostport(web.host, web.port)}/")
        server_cfg = ServerConfig(
            listen=HostPort(host="127.0.0.1", port=0),
            tokens=(token,),
            allow_ports=PortSet.parse("1024-65535"),
            state_dir=state_dir,
        )
        server_shutdown = Shutdown(drain_timeout=shutdown.drain_timeout)
        client_shutdown = Shutdown(drain_timeout=shutdown.drain_timeout)
        link = await nursery.start(run_server, server_cfg, server_shutdown)
        spec = RemoteSpec.parse(f"web=127.0.0.1:0:{web.host}:{web.port}")
        client_cfg = ClientConfig(
            server=link, token=token, name="demo", remotes=(spec,), server_fingerprint=(identity.fingerprint,)
        )
        announce(f"  link: TLS 1.3, the client pins the server's key {identity.fingerprint}")
        exposed = await nursery.start(run_client, client_cfg, client_shutdown)
        public = exposed["web"]
        with trio.fail_after(10):
            status, body = await fetch(public.host, public.port)
        if status != 200 or body != PAGE:
            raise RuntimeError(f"the page did not come through the tunnel: HTTP {status}, {len(body)} bytes")
        url = f"http://{format_hostport(public.host, public.port)}/"
        announce(f"  fetched {url} through the tunnel: HTTP {status}, {len(body)} bytes, identical to the original")
        if not once:
            announce(f"  try it yourself: curl {url}   (Ctrl+C to stop)")
            await shutdown.requested.wait()
        client_shutdown.request()
        server_shutdown.request()
        nursery.cancel_scope.cancel(reason="demo finished")
