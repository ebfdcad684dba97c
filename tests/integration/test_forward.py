"""Forward tunnels (``-L``), in process over 127.0.0.1: a real server and client, targets the test runs.

Each test starts ``run_server`` and ``run_client`` in one Trio run; the client's ``-L`` listeners use port 0 and the
test learns the bound port from the client's ``forwarding NAME HOST:PORT`` stdout line (capsys).
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import logging
import random
import re
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import pytest
import trio
from trio_tunnel.client import run_client
from trio_tunnel.config import ClientConfig, HostPort, LocalSpec, ServerConfig, TargetAllowlist, Timeouts
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.server import run_server
from tunnel_helpers import RecordWatch, exchange, tls_client, tls_server

LOCALHOST = "127.0.0.1"
TOKEN = b"forward-test-token-0123456789abcdef"
FORWARDING_RE = re.compile(r"^forwarding (\S+) (\S+):(\d+)$", re.MULTILINE)


# ---------------------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def logwatch() -> Iterator[RecordWatch]:
    watch = RecordWatch()
    log = logging.getLogger("trio_tunnel")
    level = log.level
    log.addHandler(watch)
    log.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        log.removeHandler(watch)
        log.setLevel(level)


@attrs.define
class Tunnel:
    link: HostPort
    forwards: dict[str, int]
    """-L name -> the port the client actually bound (from its ``forwarding`` line)."""


async def start_tunnel(
    nursery: trio.Nursery,
    capsys: pytest.CaptureFixture[str],
    *specs: str,
    allow: str | None = f"{LOCALHOST}:*",
    server_timeouts: Timeouts | None = None,
    client_timeouts: Timeouts | None = None,
) -> Tunnel:
    """A server (``allow`` = its --allow-target; None = the default, deny all) and a client with ``-L specs``."""
    capsys.readouterr()
    server_config = ServerConfig(
        **tls_server(),
        listen=HostPort(host=LOCALHOST, port=0),
        tokens=(TOKEN,),
        allow_targets=TargetAllowlist() if allow is None else TargetAllowlist.parse(allow),
        timeouts=server_timeouts or Timeouts(),
    )
    link = await nursery.start(run_server, server_config, Shutdown(drain_timeout=1))
    client_config = ClientConfig(
        **tls_client(),
        server=link,
        token=TOKEN,
        name="fwd",
        locals=tuple(LocalSpec.parse(spec) for spec in specs),
        timeouts=client_timeouts or Timeouts(),
    )
    await nursery.start(run_client, client_config, Shutdown(drain_timeout=1))
    out = capsys.readouterr().out
    forwards = {name: int(port) for name, host, port in FORWARDING_RE.findall(out) if host == LOCALHOST}
    assert sorted(forwards) == sorted(LocalSpec.parse(spec).name for spec in specs), out
    assert all(forwards.values()), out  # the bound port, not the 0 that was asked for
    return Tunnel(link, forwards)


async def serve_target(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def echo_handler(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close back."""
    async with stream:
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)
        await stream.send_eof()


async def hash_handler(stream: trio.SocketStream) -> None:
    """Read until EOF, then answer with the SHA-256 of what was read and close."""
    async with stream:
        digest = hashlib.sha256()
        while data := await stream.receive_some(1 << 16):
            digest.update(data)
        await stream.send_all(digest.digest())


async def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    sock = trio.socket.socket()
    await sock.bind((LOCALHOST, 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


async def assert_closed_promptly(port: int, seconds: float = 2.0) -> float:
    """Connect to a forward and check that it is closed (EOF) within ``seconds``; returns how long it took."""
    local = await trio.open_tcp_stream(LOCALHOST, port)
    start = trio.current_time()
    with trio.fail_after(seconds):
        assert await local.receive_some(100) == b""
    await local.aclose()
    return trio.current_time() - start


# ----------------------------------------------------------------------------------------------------------- HTTP


class _HTTPHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several requests on one forwarded connection
    BIG = random.Random(80).randbytes(3 * 1024 * 1024)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, body: bytes, content_type: str = "application/octet-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/":
            self._reply(b"<h1>hello through -L</h1>\n", "text/html")
        elif self.path == "/big":
            self._reply(self.BIG)
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(hashlib.sha256(body).hexdigest().encode(), "text/plain")


@pytest.fixture
def http_port() -> Iterator[int]:
    """A real HTTP/1.1 server (http.server, in a thread) on 127.0.0.1."""
    server = http.server.ThreadingHTTPServer((LOCALHOST, 0), _HTTPHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _http_session(port: int, upload: bytes) -> list[tuple[int, bytes]]:
    """Three requests on one keep-alive connection with the standard library's HTTP client."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=10)
    results = []
    try:
        for method, path, body in (("GET", "/", None), ("POST", "/sha256", upload), ("GET", "/big", None)):
            conn.request(method, path, body=body)
            response = conn.getresponse()
            results.append((response.status, response.read()))
    finally:
        conn.close()
    return results


async def test_http_through_forward(capsys: pytest.CaptureFixture[str], logwatch: RecordWatch, http_port: int) -> None:
    upload = random.Random(81).randbytes(1_500_000)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            t = await start_tunnel(nursery, capsys, f"web=127.0.0.1:0:127.0.0.1:{http_port}")
            results = await trio.to_thread.run_sync(_http_session, t.forwards["web"], upload, abandon_on_cancel=True)
            # the client closed its one connection: the server logs the forward's end with its byte counts
            (line,) = await logwatch.wait_for(" closed after ", logger="trio_tunnel.server")
            nursery.cancel_scope.cancel()
    assert results == [
        (200, b"<h1>hello through -L</h1>\n"),
        (200, hashlib.sha256(upload).hexdigest().encode()),
        (200, _HTTPHandler.BIG),
    ]
    # one forwarded connection carried all three requests (keep-alive), and the whole bodies went both ways
    message = line.getMessage()
    assert f"-> 127.0.0.1:{http_port} closed after" in message
    out, back = map(int, re.search(r"out (\d+) bytes, back (\d+) bytes", message).groups())  # type: ignore[union-attr]
    assert out > len(upload) and back > len(_HTTPHandler.BIG)
    assert not logwatch.matching("", level=logging.WARNING)


# ----------------------------------------------------------------------------------------------------------- bulk


async def test_bulk_transfer_both_ways_verified_by_sha256(
    capsys: pytest.CaptureFixture[str], logwatch: RecordWatch
) -> None:
    """32 MiB out and the same 32 MiB echoed back at once, through one -L connection."""
    payload = random.Random(16).randbytes(32 * 1024 * 1024)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(serve_target, echo_handler)
            t = await start_tunnel(nursery, capsys, f"bulk=0:127.0.0.1:{echo_port}")
            echoed = await exchange(t.forwards["bulk"], payload)
            (server_line,) = await logwatch.wait_for(" closed after ", logger="trio_tunnel.server")
            (client_line,) = await logwatch.wait_for(" closed after ", logger="trio_tunnel.client")
            nursery.cancel_scope.cancel()
    assert len(echoed) == len(payload)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert f"out {len(payload)} bytes, back {len(payload)} bytes" in server_line.getMessage()
    assert f"out {len(payload)} bytes (eof), back {len(payload)} bytes (eof)" in client_line.getMessage()


async def test_concurrent_connections_through_one_forward(capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(50)
    payloads = [rng.randbytes(rng.randint(1, 300_000)) for _ in range(50)]
    results: dict[int, bytes] = {}

    async def one(port: int, i: int) -> None:
        results[i] = hashlib.sha256(await exchange(port, payloads[i])).digest()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(serve_target, echo_handler)
            t = await start_tunnel(nursery, capsys, f"echo=0:127.0.0.1:{echo_port}")
            async with trio.open_nursery() as clients:
                for i in range(len(payloads)):
                    clients.start_soon(one, t.forwards["echo"], i)
            nursery.cancel_scope.cancel()
    assert results == {i: hashlib.sha256(p).digest() for i, p in enumerate(payloads)}


# ------------------------------------------------------------------------------------------------------ half-close


async def test_half_close_local_side_first(capsys: pytest.CaptureFixture[str]) -> None:
    """The local peer sends, shuts down its write side, and still reads the target's reply (a digest)."""
    payload = random.Random(3).randbytes(2_000_000)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await nursery.start(serve_target, hash_handler)
            t = await start_tunnel(nursery, capsys, f"hash=0:127.0.0.1:{target}")
            reply = await exchange(t.forwards["hash"], payload)
            nursery.cancel_scope.cancel()
    assert reply == hashlib.sha256(payload).digest()


async def test_half_close_target_side_first(capsys: pytest.CaptureFixture[str]) -> None:
    """The target sends a greeting and shuts down its write side; the local peer sees EOF, and what it sends after
    that still reaches the target."""
    received_after_eof = bytearray()
    target_done = trio.Event()

    async def greeter(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello, then EOF")
            await stream.send_eof()
            while data := await stream.receive_some(1 << 16):
                received_after_eof.extend(data)
        target_done.set()

    late = random.Random(4).randbytes(500_000)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await nursery.start(serve_target, greeter)
            t = await start_tunnel(nursery, capsys, f"greet=0:127.0.0.1:{target}")
            local = await trio.open_tcp_stream(LOCALHOST, t.forwards["greet"])
            assert await read_exactly(local, 15) == b"hello, then EOF"
            assert await local.receive_some(10) == b""  # the target's EOF came through
            await local.send_all(late)  # our direction is still open
            await local.send_eof()
            await target_done.wait()
            await local.aclose()
            nursery.cancel_scope.cancel()
    assert bytes(received_after_eof) == late


# ----------------------------------------------------------------------------------------------------------- reset


async def test_target_reset_reaches_the_local_peer_as_a_reset(capsys: pytest.CaptureFixture[str]) -> None:
    """A target that aborts (RST) must not look like a clean end (EOF) to the local peer."""

    async def aborter(stream: trio.SocketStream) -> None:
        await read_exactly(stream, 5)
        await stream.send_all(b"partial")
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await nursery.start(serve_target, aborter)
            t = await start_tunnel(nursery, capsys, f"rst=0:127.0.0.1:{target}")
            local = await trio.open_tcp_stream(LOCALHOST, t.forwards["rst"])
            await local.send_all(b"hello")
            got = bytearray()
            with pytest.raises(trio.BrokenResourceError) as info:
                while chunk := await local.receive_some(100):
                    got += chunk
            await local.aclose()
            nursery.cancel_scope.cancel()
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert bytes(got) in (b"", b"partial")


async def test_local_reset_reaches_the_target_as_a_reset(capsys: pytest.CaptureFixture[str]) -> None:
    """A local peer that aborts (RST) mid-stream: the target sees a reset, not a clean EOF."""
    seen: list[BaseException | None] = []
    done = trio.Event()
    got_first = trio.Event()

    async def reader(stream: trio.SocketStream) -> None:
        try:
            await read_exactly(stream, 5)
            got_first.set()
            while await stream.receive_some(1 << 16):
                pass
            seen.append(None)  # a clean EOF: wrong
        except trio.BrokenResourceError as exc:
            seen.append(exc.__cause__)
        finally:
            await stream.aclose()
            done.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await nursery.start(serve_target, reader)
            t = await start_tunnel(nursery, capsys, f"rst=0:127.0.0.1:{target}")
            local = await trio.open_tcp_stream(LOCALHOST, t.forwards["rst"])
            await local.send_all(b"hello")
            await got_first.wait()
            local.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await local.aclose()
            await done.wait()
            nursery.cancel_scope.cancel()
    (cause,) = seen
    assert isinstance(cause, ConnectionResetError), cause


# ------------------------------------------------------------------------------------------- refused and failing


@pytest.mark.parametrize(
    ("allow", "target_host"),
    [
        pytest.param(None, LOCALHOST, id="default-deny"),
        pytest.param("127.0.0.1:1-1023", LOCALHOST, id="other-ports-only"),
        pytest.param("127.0.0.2/32:*", LOCALHOST, id="other-address-only"),
        pytest.param("127.0.0.1:*", "localhost", id="name-not-listed"),  # names are matched by name, not resolved
    ],
)
async def test_target_outside_the_allowlist_is_refused(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, allow: str | None, target_host: str
) -> None:
    caplog.set_level(logging.INFO, logger="trio_tunnel")
    accepted: list[trio.SocketStream] = []

    async def record(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await nursery.start(serve_target, record)  # alive: a refusal cannot be a dial failure
            t = await start_tunnel(nursery, capsys, f"no=0:{target_host}:{target}", allow=allow)
            waited = await assert_closed_promptly(t.forwards["no"])
            nursery.cancel_scope.cancel()
    assert waited < 1.0
    assert accepted == []  # the server never dialled it
    (client_warning,) = [r for r in caplog.records if r.name == "trio_tunnel.client" and r.levelno >= logging.WARNING]
    message = client_warning.getMessage()
    assert "not allowed" in message and f"{target_host}:{target}" in message, message
    assert "PROHIBITED" in message
    (server_warning,) = [r for r in caplog.records if r.name == "trio_tunnel.server" and r.levelno >= logging.WARNING]
    message = server_warning.getMessage()
    assert f"refused forward to {target_host}:{target}" in message and "--allow-target" in message, message


async def test_only_the_allowed_target_is_reachable(capsys: pytest.CaptureFixture[str]) -> None:
    """An exact rule lets that one target through and nothing next to it, on the same link."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            allowed = await nursery.start(serve_target, echo_handler)
            other = await nursery.start(serve_target, echo_handler)
            t = await start_tunnel(
                nursery,
                capsys,
                f"yes=0:127.0.0.1:{allowed}",
                f"no=0:127.0.0.1:{other}",
                allow=f"127.0.0.1:{allowed}",
            )
            assert await exchange(t.forwards["yes"], b"allowed") == b"allowed"
            await assert_closed_promptly(t.forwards["no"])
            assert await exchange(t.forwards["yes"], b"the link is still fine") == b"the link is still fine"
            nursery.cancel_scope.cancel()


async def test_target_down_gives_connection_refused_and_a_prompt_close(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_tunnel")
    dead = await closed_port()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            t = await start_tunnel(nursery, capsys, f"down=0:127.0.0.1:{dead}")
            waited = await assert_closed_promptly(t.forwards["down"])
            nursery.cancel_scope.cancel()
    assert waited < 1.0
    (client_warning,) = [r for r in caplog.records if r.name == "trio_tunnel.client" and r.levelno >= logging.WARNING]
    message = client_warning.getMessage()
    assert f"cannot connect to 127.0.0.1:{dead}: connection refused" in message, message
    (server_warning,) = [r for r in caplog.records if r.name == "trio_tunnel.server" and r.levelno >= logging.WARNING]
    assert "connection refused" in server_warning.getMessage()


@pytest.mark.parametrize(
    ("server_timeouts", "client_timeouts", "expected"),
    [
        # the server gives up dialling first: its reason names the target
        pytest.param(
            Timeouts(connect=0.3),
            Timeouts(),
            "cannot connect to 127.0.0.1:{port}: no answer within 0.3 s",
            id="server-dial-timeout",
        ),
        # the defaults have connect == open: the client's own open timeout may fire first; still a timeout
        pytest.param(
            Timeouts(connect=0.3, open=0.3),
            Timeouts(connect=0.3, open=0.3),
            "no answer within 0.3 s",
            id="equal-timeouts",
        ),
    ],
)
async def test_target_timeout_is_reported_and_bounded(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    server_timeouts: Timeouts,
    client_timeouts: Timeouts,
    expected: str,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_tunnel")
    # A listener whose accept queue is full drops further SYNs (Linux), so dialling it hangs until the timeout.
    blackhole = trio.socket.socket()
    await blackhole.bind((LOCALHOST, 0))
    blackhole.listen(0)
    filler = trio.socket.socket()
    port = blackhole.getsockname()[1]
    try:
        await filler.connect(blackhole.getsockname())
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                t = await start_tunnel(
                    nursery,
                    capsys,
                    f"slow=0:127.0.0.1:{port}",
                    server_timeouts=server_timeouts,
                    client_timeouts=client_timeouts,
                )
                waited = await assert_closed_promptly(t.forwards["slow"], seconds=3)
                nursery.cancel_scope.cancel()
    finally:
        filler.close()
        blackhole.close()
    assert 0.25 <= waited < 3
    (client_warning,) = [r for r in caplog.records if r.name == "trio_tunnel.client" and r.levelno >= logging.WARNING]
    message = client_warning.getMessage()
    assert expected.format(port=port) in message, message
    assert "CONNECT_TIMEOUT" in message


class _FakeResolver(trio.abc.HostnameResolver):
    """``db.test`` is 127.0.0.1, ``nowhere.test`` does not exist; anything else is an error (no real DNS)."""

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name in ("db.test", LOCALHOST):
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (LOCALHOST, int(port or 0)))]
        if name == "nowhere.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        raise AssertionError(f"unexpected lookup of {name!r}")

    async def getnameinfo(self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int) -> Any:
        raise NotImplementedError


async def test_named_targets(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """A name rule allows that name (resolved by the server), and an unknown name gives "name not found"."""
    caplog.set_level(logging.INFO, logger="trio_tunnel")
    trio.socket.set_custom_hostname_resolver(_FakeResolver())
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                target = await nursery.start(serve_target, echo_handler)
                t = await start_tunnel(
                    nursery,
                    capsys,
                    f"db=0:db.test:{target}",
                    "ghost=0:nowhere.test:5432",
                    allow=f"db.test:{target},nowhere.test:5432",
                )
                assert await exchange(t.forwards["db"], b"by name") == b"by name"
                waited = await assert_closed_promptly(t.forwards["ghost"])
                nursery.cancel_scope.cancel()
    finally:
        trio.socket.set_custom_hostname_resolver(None)
    assert waited < 1.0
    (client_warning,) = [r for r in caplog.records if r.name == "trio_tunnel.client" and r.levelno >= logging.WARNING]
    message = client_warning.getMessage()
    assert "cannot connect to nowhere.test:5432: name not found" in message, message
    assert "NAME_NOT_FOUND" in message


# ------------------------------------------------------------------------------------------------- stdout lines


async def test_forwarding_lines_name_the_bound_ports(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await nursery.start(serve_target, echo_handler)
            capsys.readouterr()
            link = await nursery.start(
                run_server,
                ServerConfig(
                    **tls_server(),
                    listen=HostPort(host=LOCALHOST, port=0),
                    tokens=(TOKEN,),
                    allow_targets=TargetAllowlist.parse("127.0.0.1:*"),
                ),
                Shutdown(drain_timeout=1),
            )
            specs = (LocalSpec.parse(f"one=127.0.0.1:0:127.0.0.1:{target}"), LocalSpec.parse(f"0:127.0.0.1:{target}"))
            await nursery.start(
                run_client,
                ClientConfig(**tls_client(), server=link, token=TOKEN, name="lines", locals=specs),
                Shutdown(drain_timeout=1),
            )
            lines = capsys.readouterr().out.splitlines()
            forwarding = [line for line in lines if line.startswith("forwarding ")]
            assert len(forwarding) == 2, lines
            assert forwarding[0].startswith("forwarding one 127.0.0.1:")
            # an unnamed forward is named after its target
            assert forwarding[1].startswith(f"forwarding 127.0.0.1:{target} 127.0.0.1:")
            assert f"connected 127.0.0.1:{link.port}" in lines
            for line in forwarding:
                port = int(line.rsplit(":", 1)[1])
                assert port != 0
                assert await exchange(port, line.encode()) == line.encode()
            nursery.cancel_scope.cancel()


async def test_ipv6_listener_and_target(capsys: pytest.CaptureFixture[str]) -> None:
    """``-L [::1]:0:[::1]:PORT`` with ``--allow-target [::1]:PORT``: bracketed addresses all the way."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="::1")
            target = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, echo_handler, listeners)
            capsys.readouterr()
            link = await nursery.start(
                run_server,
                ServerConfig(
                    **tls_server(),
                    listen=HostPort(host=LOCALHOST, port=0),
                    tokens=(TOKEN,),
                    allow_targets=TargetAllowlist.parse(f"[::1]:{target}"),
                ),
                Shutdown(drain_timeout=1),
            )
            spec = LocalSpec.parse(f"v6=[::1]:0:[::1]:{target}")
            await nursery.start(
                run_client,
                ClientConfig(**tls_client(), server=link, token=TOKEN, name="v6", locals=(spec,)),
                Shutdown(),
            )
            (port,) = re.findall(r"^forwarding v6 \[::1\]:(\d+)$", capsys.readouterr().out, re.MULTILINE)
            stream = await trio.open_tcp_stream("::1", int(port))
            async with stream:
                await stream.send_all(b"over IPv6")
                await stream.send_eof()
                assert await read_exactly(stream, 9) == b"over IPv6"
                assert await stream.receive_some(10) == b""
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------------ link not up yet


async def test_local_connection_waits_for_the_link(capsys: pytest.CaptureFixture[str], logwatch: RecordWatch) -> None:
    """The -L listener is up before the link: a connection accepted while the server is still down is forwarded
    once the link comes up (within the client's connect timeout)."""
    server_port = await closed_port()
    timeouts = Timeouts(connect=10, reconnect_initial=0.05, reconnect_max=0.2)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo = await nursery.start(serve_target, echo_handler)
            capsys.readouterr()
            spec = LocalSpec.parse(f"early=0:127.0.0.1:{echo}")
            config = ClientConfig(
                **tls_client(),
                server=HostPort(host=LOCALHOST, port=server_port),
                token=TOKEN,
                name="early",
                locals=(spec,),
                timeouts=timeouts,
            )
            nursery.start_soon(run_client, config, Shutdown(drain_timeout=1))
            await logwatch.wait_for("cannot reach the server", logger="trio_tunnel.client")  # no server yet
            (port,) = FORWARDING_RE.findall(capsys.readouterr().out)
            local = await trio.open_tcp_stream(LOCALHOST, int(port[2]))
            await local.send_all(b"sent before the link was up")
            await logwatch.wait_for("cannot reach the server", logger="trio_tunnel.client", count=2)  # still none
            await nursery.start(
                run_server,
                ServerConfig(
                    **tls_server(),
                    listen=HostPort(host=LOCALHOST, port=server_port),
                    tokens=(TOKEN,),
                    allow_targets=TargetAllowlist.parse(f"127.0.0.1:{echo}"),
                ),
                Shutdown(drain_timeout=1),
            )
            await local.send_eof()
            assert await read_exactly(local, 27) == b"sent before the link was up"
            assert await local.receive_some(10) == b""
            await local.aclose()
            nursery.cancel_scope.cancel()


async def test_no_link_closes_the_local_connection_after_the_connect_timeout(
    capsys: pytest.CaptureFixture[str], logwatch: RecordWatch
) -> None:
    dead = await closed_port()
    timeouts = Timeouts(connect=0.3, reconnect_initial=0.05, reconnect_max=0.2)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            capsys.readouterr()
            spec = LocalSpec.parse("lonely=0:127.0.0.1:9")
            config = ClientConfig(
                **tls_client(),
                server=HostPort(host=LOCALHOST, port=dead),
                token=TOKEN,
                name="lonely",
                locals=(spec,),
                timeouts=timeouts,
            )
            nursery.start_soon(run_client, config, Shutdown(drain_timeout=1))
            await logwatch.wait_for("cannot reach the server", logger="trio_tunnel.client")
            (port,) = FORWARDING_RE.findall(capsys.readouterr().out)
            waited = await assert_closed_promptly(int(port[2]), seconds=3)
            (warning,) = await logwatch.wait_for("no link to the server", logger="trio_tunnel.client")
            nursery.cancel_scope.cancel()
    assert 0.25 <= waited < 3
    assert warning.levelno == logging.WARNING and warning.getMessage().startswith("lonely: closing 127.0.0.1:")
