"""Reverse tunnels (-R) end to end, in process: run_server, run_client, a local service and external users, all on
real sockets on 127.0.0.1 (port 0 unless a test needs to know a port in advance).

Every public port is learned from the client's ``exposed NAME HOST:PORT`` line on stdout (the interface scripts use),
and every wait is on an event (a stdout line, a log record, a socket), bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import struct
import urllib.request
from typing import Any

import attrs
import pytest
import trio
from trio_tunnel.config import PortSet
from trio_tunnel.errors import HandshakeError
from trio_tunnel.testing import TunnelFactory
from tunnel_helpers import (
    FAST,
    LOCALHOST,
    LogWatch,
    Running,
    Stdout,
    client_config,
    free_port,
    hostport,
    http_get,
    http_handler,
    is_listening,
    logs,
    proxy_to,
    read_all,
    read_exactly,
    read_line,
    sha256,
    start_client,
    start_server,
    start_service,
    stdout,
)

__all__ = ["logs", "stdout"]  # fixtures, used by name

KiB = 1024


@attrs.define(eq=False)
class Tunnel:
    server: Running
    client: Running
    public: int
    """The public port the server bound for the service (from the ``exposed`` line)."""

    async def stop(self) -> None:
        await self.client.stop()
        await self.server.stop()


async def open_tunnel(
    nursery: trio.Nursery,
    out: Stdout,
    service_port: int,
    *,
    name: str = "web",
    public_port: int = 0,
    **server_kwargs: Any,
) -> Tunnel:
    """A server and a client exposing ``127.0.0.1:service_port`` as ``name``; ports taken from the stdout lines."""
    server = await start_server(nursery, **server_kwargs)
    listening = hostport(await out.expect(r"listening (\S+)"))
    assert listening == (LOCALHOST, server.value.port)
    client = await start_client(
        nursery, client_config(server.value, f"{name}={LOCALHOST}:{public_port}:{LOCALHOST}:{service_port}")
    )
    assert hostport(await out.expect(r"connected (\S+)")) == listening
    host, port = hostport(await out.expect(rf"exposed {name} (\S+)"))
    assert host == LOCALHOST and (port == public_port or not public_port)
    assert client.value[name].port == port  # run_client's started value agrees with the announced line
    return Tunnel(server, client, port)


# --------------------------------------------------------------------------------------------------------------
# Protocols through the tunnel


async def test_http_through_the_tunnel(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, http_handler)
            tunnel = await open_tunnel(nursery, stdout, service.port)

            status, body = await http_get(tunnel.public, "/index.html")
            assert (status, body) == ("HTTP/1.0 200 OK", b"hello from /index.html\n")

            # A real HTTP client (urllib, no proxy from the environment), in a thread.
            def fetch() -> tuple[int, str, bytes]:
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(f"http://{LOCALHOST}:{tunnel.public}/a/b?c=d", timeout=5) as response:
                    return response.status, response.headers["Content-Type"], response.read()

            assert await trio.to_thread.run_sync(fetch) == (200, "text/plain", b"hello from /a/b?c=d\n")

            # Each external connection is one stream whose metadata names the external peer: the client logs it.
            stream = await trio.open_tcp_stream(LOCALHOST, tunnel.public)
            peer = "{}:{}".format(*stream.socket.getsockname()[:2])
            async with stream:
                await stream.send_all(b"GET /peer HTTP/1.0\r\n\r\n")
                assert (await read_all(stream)).endswith(b"hello from /peer\n")
            await logs.wait_for(rf"^web: {peer} closed after .* in 22 bytes \(eof\)", logger="trio_tunnel.client")
            await logs.wait_for(rf"^home/web: {peer} closed after", logger="trio_tunnel.server")
            assert service.accepted == 3
            await tunnel.stop()
            # A graceful client exit reaches the server with its reason.
            assert logs.matching(
                r"^client 'home' from \S+ disconnected: the client is shutting down$", logger="trio_tunnel.server"
            )
            assert [m[1] for m in stdout.matching(r"disconnected (.+)")] == ["shutting down"]
            await service.stop()


GREETING = b"\x0a8.0.36-fake\x00" + bytes(range(256))  # a MySQL-like handshake payload (binary, with \n inside)


async def greeting_handler(stream: trio.SocketStream) -> None:
    """Server speaks first (like MySQL): a length-prefixed greeting packet before reading anything, then it answers
    each line."""
    async with stream:
        await stream.send_all(len(GREETING).to_bytes(3, "little") + b"\x00" + GREETING)
        buffer = bytearray()
        while True:
            try:
                line = await read_line(stream, buffer)
            except EOFError:
                return
            await stream.send_all(b"you said: " + line + b"\n")


async def test_server_speaks_first(stdout: Stdout) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, greeting_handler)
            tunnel = await open_tunnel(nursery, stdout, service.port, name="mysql")
            for _ in range(3):
                stream = await trio.open_tcp_stream(LOCALHOST, tunnel.public)
                async with stream:
                    # Nothing sent yet: the greeting must arrive anyway (the client dials at once, not on first data).
                    header = await read_exactly(stream, 4)
                    assert header[3] == 0  # sequence number
                    assert await read_exactly(stream, int.from_bytes(header[:3], "little")) == GREETING
                    await stream.send_all(b"SELECT 1\n")
                    assert await read_line(stream, bytearray()) == b"you said: SELECT 1"
                    await stream.send_eof()
                    assert await read_all(stream) == b""
            assert service.accepted == 3
            await tunnel.stop()
            await service.stop()


async def counter_handler(stream: trio.SocketStream) -> None:
    """An interactive session: answers every line with its number and the line reversed."""
    async with stream:
        buffer = bytearray()
        n = 0
        while True:
            try:
                line = await read_line(stream, buffer)
            except EOFError:
                return
            n += 1
            await stream.send_all(b"%d %s\n" % (n, line[::-1]))


async def test_long_lived_interactive_session(stdout: Stdout) -> None:
    rounds = 2000
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, counter_handler)
            tunnel = await open_tunnel(nursery, stdout, service.port, name="shell")
            rng = random.Random(4)
            stream = await trio.open_tcp_stream(LOCALHOST, tunnel.public)
            async with stream:
                buffer = bytearray()
                for n in range(1, rounds + 1):
                    word = rng.randbytes(rng.randint(1, 40)).hex().encode()
                    await stream.send_all(word + b"\n")  # one small request, then wait for its reply
                    assert await read_line(stream, buffer) == b"%d %s" % (n, word[::-1])
                assert not buffer
                await stream.send_eof()
                assert await read_all(stream) == b""
            assert service.accepted == 1  # one connection all along
            await tunnel.stop()
            await service.stop()


# --------------------------------------------------------------------------------------------------------------
# Volume and half-close

HEADER = struct.Struct("!III")  # bytes the user will send, bytes the service must answer, seed of the answer


def answer_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def sized_handler(stream: trio.SocketStream) -> None:
    """Reads HEADER, then sends its answer while it reads the request (both directions busy at once); after the
    user's EOF, ends with the SHA-256 of the request and closes."""
    async with stream:
        n_in, n_out, seed = HEADER.unpack(await read_exactly(stream, HEADER.size))
        digest = hashlib.sha256()

        async def receive() -> None:
            left = n_in
            while left:
                data = await stream.receive_some(min(left, 64 * KiB))
                assert data, f"EOF with {left} request bytes missing"
                digest.update(data)
                left -= len(data)
            assert await stream.receive_some(1) == b"", "the user sent more than announced"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await stream.send_all(answer_bytes(seed, n_out))
        await stream.send_all(digest.digest())


async def test_200_concurrent_connections_verified_by_sha256(
    trio_tunnel: TunnelFactory, nursery: trio.Nursery, logs: LogWatch
) -> None:
    count = 200
    rng = random.Random(200)
    sizes = [(rng.randint(0, 512 * KiB), rng.randint(0, 512 * KiB)) for _ in range(count)]
    sizes[0], sizes[1] = (0, 0), (512 * KiB, 512 * KiB)  # the extremes, always
    verified: list[int] = []
    with trio.fail_after(60):
        service = await start_service(nursery, sized_handler)
        tunnel = await trio_tunnel(service.port, name="bulk")
        all_connected = trio.Event()
        connected = 0

        async def user(i: int, n_in: int, n_out: int) -> None:
            nonlocal connected
            request = random.Random(-i).randbytes(n_in)
            stream = await trio.open_tcp_stream(*tunnel.public_address)
            connected += 1
            if connected == count:
                all_connected.set()
            await all_connected.wait()  # all 200 open at once before any byte moves
            async with stream, trio.open_nursery() as inner:

                async def send() -> None:
                    await stream.send_all(HEADER.pack(n_in, n_out, i) + request)
                    await stream.send_eof()

                inner.start_soon(send)
                reply = await read_all(stream)
            assert len(reply) == n_out + 32, (i, n_in, n_out, len(reply))
            assert sha256(reply[:n_out]) == sha256(answer_bytes(i, n_out)), f"connection {i}: answer corrupted"
            assert reply[n_out:] == sha256(request), f"connection {i}: request corrupted"
            verified.append(i)

        async with trio.open_nursery() as users:
            for i, (n_in, n_out) in enumerate(sizes):
                users.start_soon(user, i, n_in, n_out)
        assert sorted(verified) == list(range(count))
        assert service.accepted == count
        assert not logs.matching("refused|could not serve|cannot serve", logging.WARNING)


async def test_half_close_user_sends_eof_then_reads_the_full_reply(
    trio_tunnel: TunnelFactory, nursery: trio.Nursery
) -> None:
    """The user sends a request and shuts down writing; the service reads to EOF, then answers at length."""
    answers: dict[bytes, int] = {}

    async def until_eof_handler(stream: trio.SocketStream) -> None:
        async with stream:
            request = await read_all(stream)  # only returns at the user's EOF
            answers[request] = len(request)
            reply = hashlib.sha256(request).digest() * (32 * KiB)  # 1 MiB, all sent after the user's EOF
            await stream.send_all(reply)

    with trio.fail_after(15):
        service = await start_service(nursery, until_eof_handler)
        tunnel = await trio_tunnel(service.port, name="eof")
        for size in (0, 1, 100 * KiB):
            request = random.Random(size).randbytes(size)
            stream = await trio.open_tcp_stream(*tunnel.public_address)
            async with stream:
                await stream.send_all(request)
                await stream.send_eof()
                reply = await read_all(stream)
            assert reply == hashlib.sha256(request).digest() * (32 * KiB)
            assert answers.pop(request) == size


async def test_half_close_service_sends_eof_first_then_keeps_reading(
    trio_tunnel: TunnelFactory, nursery: trio.Nursery
) -> None:
    """The other direction: the service sends a banner and shuts down writing; the user reads to EOF and only then
    sends its data, which the service still receives in full."""
    received_send, received = trio.open_memory_channel[bytes](1)

    async def banner_then_listen(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"banner " * 1000)
            await stream.send_eof()
            await received_send.send(await read_all(stream))

    with trio.fail_after(10):
        service = await start_service(nursery, banner_then_listen)
        tunnel = await trio_tunnel(service.port, name="banner")
        stream = await trio.open_tcp_stream(*tunnel.public_address)
        async with stream:
            assert await read_all(stream) == b"banner " * 1000
            payload = random.Random(7).randbytes(300 * KiB)
            await stream.send_all(payload)  # after EOF from the far side: the connection must still carry it
            await stream.send_eof()
            assert await received.receive() == payload
            assert await stream.receive_some(1) == b""


# --------------------------------------------------------------------------------------------------------------
# Failures and recovery


async def test_local_service_down_closes_promptly_and_recovers(
    stdout: Stdout, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_tunnel")
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, http_handler)
            port = service.port
            tunnel = await open_tunnel(nursery, stdout, port)
            assert (await http_get(tunnel.public, "/up"))[1] == b"hello from /up\n"

            await service.stop()
            assert not await is_listening(port)
            for attempt in range(2):  # the tunnel stays usable after a failure
                stream = await trio.open_tcp_stream(LOCALHOST, tunnel.public)  # the public port still accepts
                started = trio.current_time()
                async with stream:
                    await stream.send_all(b"GET /down HTTP/1.0\r\n\r\n")
                    with trio.fail_after(3):
                        try:
                            reply = await read_all(stream)
                        except trio.BrokenResourceError:
                            reply = b""  # a reset is a prompt close as well
                assert reply == b"", "nothing may be answered when the service is down"
                assert trio.current_time() - started < 3, attempt

            # Both sides say why, naming the local service that could not be reached.
            target = rf"127\.0\.0\.1:{port}"
            client_side = [
                r.getMessage()
                for r in caplog.records
                if r.name == "trio_tunnel.client" and r.levelno == logging.WARNING
            ]
            server_side = [
                r.getMessage()
                for r in caplog.records
                if r.name == "trio_tunnel.server" and r.levelno == logging.WARNING
            ]
            assert len(client_side) == 2 and len(server_side) == 2, (client_side, server_side)
            for message in client_side:
                assert re.search(
                    rf"^web: cannot serve 127\.0\.0\.1:\d+: local service: cannot connect to "
                    rf"{target}: .*refused",
                    message,
                ), message
            for message in server_side:
                assert re.search(
                    rf"^home/web: closing 127\.0\.0\.1:\d+: the client could not serve it: "
                    rf"web: local service: cannot connect to {target}: .*refused",
                    message,
                ), message

            # The service comes back on the same port: new connections work, with no restart of anything.
            service = await start_service(nursery, http_handler, port=port)
            assert await http_get(tunnel.public, "/again") == ("HTTP/1.0 200 OK", b"hello from /again\n")
            await tunnel.stop()
            await service.stop()


@pytest.mark.parametrize("how", ["graceful", "killed"])
async def test_server_restart_client_reconnects(stdout: Stdout, logs: LogWatch, how: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, http_handler)
            public = await free_port()
            tunnel = await open_tunnel(nursery, stdout, service.port, public_port=public)
            server_port = tunnel.server.value.port
            assert (await http_get(public, "/before"))[1] == b"hello from /before\n"

            if how == "graceful":
                await tunnel.server.stop()
                reason = (await stdout.expect(r"disconnected (.+)"))[1]
                assert reason == "the server is shutting down", reason
            else:  # the server dies with a download in flight: both the user and the client must learn it at once
                held = await trio.open_tcp_stream(LOCALHOST, public)
                await held.send_all(b"GET /hang HTTP/1.0\r\n\r\n")
                head = bytearray()
                while b"partial" not in head:
                    head += await held.receive_some(1000)
                assert head.startswith(b"HTTP/1.0 200 OK\r\n")
                killed = trio.current_time()
                await tunnel.server.kill()
                reason = (await stdout.expect(r"disconnected (.+)"))[1]
                assert trio.current_time() - killed < 0.5, f"the client learnt of the dead link late: {reason}"
                # The server is gone: the download must neither go on nor end normally (a reset, not a FIN).
                with trio.fail_after(0.5), pytest.raises(trio.BrokenResourceError):
                    await read_all(held)
                await held.aclose()
            assert not await is_listening(public), "the old server's public listener must be gone"
            assert not await is_listening(server_port)
            await logs.wait_for(r"^reconnecting to 127\.0\.0\.1:\d+ in ", logger="trio_tunnel.client")

            # A new server on the same port: the client finds it by itself and registers its service again.
            server = await start_server(nursery, port=server_port)
            assert hostport(await stdout.expect(r"listening (\S+)")) == (LOCALHOST, server_port)
            assert hostport(await stdout.expect(r"connected (\S+)")) == (LOCALHOST, server_port)
            assert hostport(await stdout.expect(r"exposed web (\S+)")) == (LOCALHOST, public)
            assert await http_get(public, "/after") == ("HTTP/1.0 200 OK", b"hello from /after\n")
            await tunnel.client.stop()
            await server.stop()
            await service.stop()


@pytest.mark.parametrize("who", ["server", "client"])
async def test_graceful_stop_lets_a_connection_in_flight_finish(stdout: Stdout, logs: LogWatch, who: str) -> None:
    """Stopping gracefully (what SIGINT does) sends GOAWAY and drains: an external connection in flight carries on
    to its natural end, new ones are not served, and then everything stops by itself."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, counter_handler)
            tunnel = await open_tunnel(nursery, stdout, service.port, name="shell")
            tunnel.server.shutdown.drain_timeout = tunnel.client.shutdown.drain_timeout = 8
            stream = await trio.open_tcp_stream(LOCALHOST, tunnel.public)
            buffer = bytearray()
            await stream.send_all(b"before\n")
            assert await read_line(stream, buffer) == b"1 erofeb"

            stopping = tunnel.server if who == "server" else tunnel.client
            stopping.shutdown.request()
            if who == "server":
                await logs.wait_for(r"^shutting down: draining 1 client", logger="trio_tunnel.server")
            await logs.wait_for(r"peer is going away \(SHUTTING_DOWN", logger="trio_tunnel.mux")
            if who == "server":
                # A draining server has closed its public listeners: a newcomer is refused outright.
                with pytest.raises(OSError):
                    await trio.open_tcp_stream(LOCALHOST, tunnel.public)
            else:
                late = await trio.open_tcp_stream(LOCALHOST, tunnel.public)  # accepted, but it must not be served
                with trio.fail_after(3):
                    try:
                        await late.send_all(b"late\n")
                        assert await read_all(late) == b""
                    except trio.BrokenResourceError:
                        pass
                await late.aclose()
            for n in range(2, 12):  # the connection in flight is still served, round trip after round trip
                await stream.send_all(b"during\n")
                assert await read_line(stream, buffer) == b"%d gnirud" % n
            assert not stopping.done.is_set()
            await stream.send_eof()
            assert await read_all(stream) == b""
            await stream.aclose()
            await stopping.done.wait()  # drained: it stops without waiting for the drain timeout
            assert service.accepted == 1
            reason = "the server is shutting down" if who == "server" else "shutting down"
            assert (await stdout.expect(r"disconnected (.+)"))[1] == reason
            await (tunnel.client if who == "server" else tunnel.server).stop()
            await service.stop()


@pytest.mark.parametrize("who", ["same client", "new client"])
async def test_stale_session_takeover_gets_the_same_port_at_once(stdout: Stdout, logs: LogWatch, who: str) -> None:
    """The client's link goes half-open (a NAT box forgot it: nothing arrives either way, no FIN, no RST). The
    server's session is stale: its keepalive would need 45 s to notice. A client with the same name reconnects
    and must get its public port back at once, not "address already in use"."""
    with trio.fail_after(10):  # far below the server's 45 s keepalive
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, http_handler)
            server = await start_server(nursery)  # default timeouts: keepalive 15 s idle, 45 s dead
            assert server.value.port == hostport(await stdout.expect(r"listening (\S+)"))[1]
            public = await free_port()
            spec = f"web={LOCALHOST}:{public}:{LOCALHOST}:{service.port}"
            async with proxy_to(server.value.port) as proxy:
                via_proxy = attrs.evolve(server.value, port=proxy.port)
                # "same client": it notices the silence itself (short keepalive) and reconnects through the proxy.
                timeouts = attrs.evolve(FAST, keepalive_idle=0.3, keepalive_dead=1.5) if who == "same client" else FAST
                first = await start_client(nursery, client_config(via_proxy, spec, timeouts=timeouts))
                await stdout.expect(r"connected (\S+)")
                assert hostport(await stdout.expect(r"exposed web (\S+)")) == (LOCALHOST, public)
                assert (await http_get(public, "/1"))[1] == b"hello from /1\n"

                assert proxy.freeze() == 1  # the link is now a black hole both ways
                if who == "same client":
                    reason = (await stdout.expect(r"disconnected (.+)"))[1]
                    assert re.search("keepalive|no answer|silent|dead|timed? ?out", reason, re.I), reason
                    second = first
                else:  # the client's machine rebooted: its old link is gone without a trace on the server
                    await first.kill()
                    second = await start_client(nursery, client_config(server.value, spec))
                assert hostport(await stdout.expect(r"connected (\S+)"))[1] in (proxy.port, server.value.port)
                assert hostport(await stdout.expect(r"exposed web (\S+)")) == (LOCALHOST, public)
                await logs.wait_for(
                    r"^client 'home' reconnected from .*: replacing its previous link", logger="trio_tunnel.server"
                )
                assert not logs.matching("refused to expose|already in use", logging.WARNING)
                assert await http_get(public, "/2") == ("HTTP/1.0 200 OK", b"hello from /2\n")
                await second.stop()
                await server.stop()
            await service.stop()


# --------------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("token", [b"not-the-right-token-0123456789", None], ids=["wrong token", "no token"])
async def test_bad_token_is_refused_readably_and_binds_nothing(
    stdout: Stdout, logs: LogWatch, token: bytes | None
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery)
            public = await free_port()
            config = client_config(server.value, f"web={LOCALHOST}:{public}:{LOCALHOST}:9", token=token)
            with pytest.raises(HandshakeError) as caught:  # run_client surfaces the one real error, not a group
                await start_client(nursery, config)
            message = str(_leaf(caught.value))
            assert "token" in message and ("--token" in message or "TRIO_TUNNEL_TOKEN" in message), message
            assert not await is_listening(public)
            assert not stdout.matching(r"(connected|exposed) .*")
            await logs.wait_for(r"^refused a client from 127\.0\.0\.1:\d+: ", logger="trio_tunnel.server")
            if token is not None:
                assert logs.matching(r"refused a client .*token", logger="trio_tunnel.server")
            await server.stop()


def _leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


async def test_port_not_allowed_or_taken_is_refused_readably_other_services_work(
    stdout: Stdout, logs: LogWatch
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, http_handler)
            allowed, taken, forbidden = await free_port(), await free_port(), await free_port()
            while forbidden in (allowed, taken):
                forbidden = await free_port()
            squatter = (await trio.open_tcp_listeners(taken, host=LOCALHOST))[0]
            async with squatter:
                server = await start_server(nursery, allow_ports=f"{allowed},{taken}")
                await stdout.expect(r"listening (\S+)")
                config = client_config(
                    server.value,
                    f"nope={LOCALHOST}:{forbidden}:{LOCALHOST}:{service.port}",
                    f"busy={LOCALHOST}:{taken}:{LOCALHOST}:{service.port}",
                    f"web={LOCALHOST}:{allowed}:{LOCALHOST}:{service.port}",
                )
                client = await start_client(nursery, config)
                assert set(client.value) == {"web"}
                await stdout.expect(r"connected (\S+)")
                assert [m[0] for m in stdout.matching(r"exposed .*")] == [f"exposed web {LOCALHOST}:{allowed}"]
                errors = logs.matching(r"refused to expose", logging.ERROR, logger="trio_tunnel.client")
                assert len(errors) == 2, errors
                assert re.search(
                    rf"nope: .*port {forbidden} is not allowed by the server \(--allow-ports "
                    rf"{PortSet.parse([allowed, taken])}\)",
                    errors[0],
                ), errors
                assert re.search(rf"busy: .*127\.0\.0\.1:{taken}: address already in use", errors[1]), errors
                assert not await is_listening(forbidden)
                assert await http_get(allowed, "/ok") == ("HTTP/1.0 200 OK", b"hello from /ok\n")
                await client.stop()
                await server.stop()
            await service.stop()


async def test_more_than_1024_connections_open_at_once_over_one_link(
    trio_tunnel: TunnelFactory, nursery: trio.Nursery, logs: LogWatch
) -> None:
    """The server's per-service limit is the only cap on concurrent connections: the client used to allow its server
    1024 streams, so visitor 1025 waited for stream credit until it timed out, whatever max_connections_per_service
    said. 1100 connections held open at once, each answering through the tunnel."""
    count = 1100

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data)

    with trio.fail_after(90):
        service = await start_service(nursery, hold)
        # (all from 127.0.0.1: the per-address cap, by default a quarter of the service's slots, is raised too)
        tunnel = await trio_tunnel(
            service.port, name="many", max_connections_per_service=2000, max_connections_per_ip=2000
        )
        streams: list[trio.SocketStream] = []
        try:
            for i in range(count):
                stream = await trio.open_tcp_stream(*tunnel.public_address)
                streams.append(stream)
                message = b"%d" % i
                await stream.send_all(message)
                assert await read_exactly(stream, len(message)) == message, f"connection {i}"
            assert service.accepted == count
        finally:
            for stream in streams:
                await stream.aclose()
        assert not logs.matching("refused|could not serve|cannot serve", logging.WARNING)
