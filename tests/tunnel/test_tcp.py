"""TcpStream and serve_tcp: trio's stream conformance suite over real loopback TCP, plus what the relay relies on
(resets recognisable in the cause chain, close waking waiters) and the accept loop's error handling."""

from __future__ import annotations

import errno
import random
import socket
import struct
from functools import partial

import pytest
import trio
import trio.testing
from trio_tunnel.proto import ErrorCode
from trio_tunnel.relay import abort, describe_connect_error, splice
from trio_tunnel.tcp import KEEPALIVE_IDLE, TcpStream, connect_tcp, serve_tcp

pytestmark = pytest.mark.trio


async def _tcp_pair() -> tuple[TcpStream, TcpStream]:
    listener = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listener[0].socket.getsockname()[1]
        left = TcpStream.adopt(await trio.open_tcp_stream("127.0.0.1", port))
        right = TcpStream.adopt(await listener[0].accept())
    finally:
        await listener[0].aclose()
    return left, right


async def _fill(stream: TcpStream) -> None:
    """Send until the kernel's buffers are full: the next send_all blocks."""

    async def sender() -> None:
        while True:
            await stream.send_all(b"x" * 10000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_conformance() -> None:
    async def clogged() -> tuple[TcpStream, TcpStream]:
        left, right = await _tcp_pair()
        await _fill(left)
        await _fill(right)
        return left, right

    with trio.fail_after(30):
        await trio.testing.check_half_closeable_stream(_tcp_pair, clogged)


async def test_adopt_keeps_the_socket_and_its_options() -> None:
    with trio.fail_after(5):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        trio_stream = await trio.open_tcp_stream("127.0.0.1", port)
        fd = trio_stream.socket.fileno()
        stream = TcpStream.adopt(trio_stream)
        assert stream.socket.fileno() == fd
        assert trio_stream.socket.fileno() == -1  # detached: closing it must not close ours
        await trio_stream.aclose()
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert stream.socket.getblocking() is False
        peer = await listener.accept()
        await stream.send_all(b"still mine")
        assert await peer.receive_some() == b"still mine"
        await stream.aclose()
        await stream.aclose()  # twice is fine
        assert await peer.receive_some() == b""
        await peer.aclose()
        await listener.aclose()


async def test_a_reset_is_broken_caused_by_connection_reset() -> None:
    with trio.fail_after(5):
        left, right = await _tcp_pair()
        await right.send_all(b"unread")  # so the close below is a reset even without SO_LINGER
        right.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await right.aclose()
        with pytest.raises(trio.BrokenResourceError) as info:
            for _ in range(3):  # the unread data first, then the reset
                await left.receive_some(1 << 20)
        assert isinstance(info.value.__cause__, ConnectionResetError)
        with pytest.raises(trio.BrokenResourceError) as sent:
            for _ in range(3):
                await left.send_all(b"x" * 65536)
        assert isinstance(sent.value.__cause__, OSError)
        await left.aclose()


async def test_close_wakes_a_waiting_receiver_with_closed() -> None:
    with trio.fail_after(5):
        left, right = await _tcp_pair()
        outcome: list[BaseException] = []

        async def receive() -> None:
            try:
                await left.receive_some()
            except trio.ClosedResourceError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await left.aclose()
        assert len(outcome) == 1
        with pytest.raises(trio.ClosedResourceError):
            await left.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await left.receive_some()
        await right.aclose()


async def test_abort_sends_an_rst() -> None:
    with trio.fail_after(5):
        left, right = await _tcp_pair()
        await abort(right)
        with pytest.raises(trio.BrokenResourceError) as info:
            await left.receive_some()
        assert isinstance(info.value.__cause__, ConnectionResetError)
        await left.aclose()


async def test_splice_of_tcp_streams_carries_half_close() -> None:
    with trio.fail_after(10):
        a_out, a_in = await _tcp_pair()
        b_in, b_out = await _tcp_pair()
        async with trio.open_nursery() as nursery:
            results = []

            async def run() -> None:
                results.append(await splice(a_in, b_in))

            payload = bytes(range(256)) * 4096

            async def send() -> None:
                await a_out.send_all(payload)
                await a_out.send_eof()

            nursery.start_soon(run)
            nursery.start_soon(send)
            got = bytearray()
            while chunk := await b_out.receive_some():
                got += chunk
            assert got == payload
            await b_out.send_all(b"reply after half-close")
            await b_out.send_eof()
            assert await a_out.receive_some() == b"reply after half-close"
            assert await a_out.receive_some() == b""
        assert results[0].clean
        assert results[0].bytes_a_to_b == len(payload)
        await a_out.aclose()
        await b_out.aclose()


async def test_serve_tcp_hands_each_connection_to_the_handler() -> None:
    seen: list[TcpStream] = []

    async def handler(stream: TcpStream) -> None:
        async with stream:
            seen.append(stream)
            await stream.send_all(await stream.receive_some())

    with trio.fail_after(5):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_tcp, handler, listeners)
            for i in range(3):
                client = await trio.open_tcp_stream("127.0.0.1", port)
                await client.send_all(b"echo %d" % i)
                assert await client.receive_some() == b"echo %d" % i
                assert await client.receive_some() == b""
                await client.aclose()
            nursery.cancel_scope.cancel()
        assert len(seen) == 3 and all(isinstance(s, TcpStream) for s in seen)
        assert listeners[0].socket.fileno() == -1  # serve_tcp closed its listeners


class _FlakyListener(trio.abc.Listener[trio.SocketStream]):
    """A listener whose first accept fails with EMFILE, as when the process is out of descriptors."""

    def __init__(self, real: trio.SocketListener) -> None:
        self.real = real
        self.failures = 1

    async def accept(self) -> trio.SocketStream:
        if self.failures:
            self.failures -= 1
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.real.accept()

    async def aclose(self) -> None:
        await self.real.aclose()


async def test_serve_tcp_survives_running_out_of_descriptors(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    accepted = trio.Event()

    async def handler(stream: TcpStream) -> None:
        async with stream:
            accepted.set()

    with trio.fail_after(5):
        real = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = real.socket.getsockname()[1]
        flaky = _FlakyListener(real)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_tcp, handler, [flaky])
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await accepted.wait()
            nursery.cancel_scope.cancel()
        await client.aclose()
        assert flaky.failures == 0
        assert "Too many open files (EMFILE); retrying in 0.1 s" in caplog.text


async def test_send_all_parts_delivers_every_byte_in_order_through_partial_sends() -> None:
    """Many parts of odd sizes (bytes and views, some empty) against a slow reader: sendmsg sends some of them
    and part of one, the rest waits for room, and the receiver gets exactly the join, in order."""
    rng = random.Random(7)
    parts: list[bytes | memoryview] = []
    for i in range(2000):
        block = rng.randbytes(rng.choice((0, 1, 10, 1000, 16384)))
        parts.append(memoryview(block)[1:] if i % 3 == 0 and block else block)
    expected = b"".join(parts)
    with trio.fail_after(30):
        left, right = await _tcp_pair()
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        got = bytearray()

        async def slow_reader() -> None:
            while len(got) < len(expected):
                got.extend(await right.receive_some(20000))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            await left.send_all_parts(parts)
        assert bytes(got) == expected
        with pytest.raises(BaseExceptionGroup) as busy:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(left.send_all_parts, [b"x" * (1 << 24)])
                nursery.start_soon(left.send_all_parts, [b"y"])
        assert busy.value.subgroup(trio.BusyResourceError) is not None
        await left.aclose()
        await right.aclose()


@pytest.mark.parametrize("keepalive", [True, False])
async def test_serve_tcp_connections_have_nodelay_and_keepalive(keepalive: bool) -> None:
    """Accepted connections get TCP_NODELAY and, unless asked not to, TCP keepalive (on Linux inherited from the
    listening socket, set once)."""
    seen: list[tuple[int, int, int]] = []

    async def handler(stream: TcpStream) -> None:
        try:
            sock = stream.socket
            seen.append(
                (
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                )
            )
        finally:
            await stream.aclose()

    with trio.fail_after(5):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_tcp, handler, listeners, keepalive=keepalive))
            client = await trio.open_tcp_stream("127.0.0.1", port)
            assert await client.receive_some() == b""
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert len(seen) == 1
    nodelay, keep, idle = seen[0]
    assert nodelay
    assert bool(keep) is keepalive
    if keepalive:
        assert idle == KEEPALIVE_IDLE


async def test_send_all_of_a_multibyte_memoryview_sends_every_byte() -> None:
    """A memoryview of 4-byte items: its len() counts items, sendmsg counts bytes; all bytes arrive."""
    import array

    data = array.array("i", range(300_000))
    with trio.fail_after(10):
        left, right = await _tcp_pair()
        got = bytearray()

        async def reader() -> None:
            while len(got) < len(data) * data.itemsize:
                got.extend(await right.receive_some())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await left.send_all(memoryview(data))
        assert bytes(got) == data.tobytes()
        await left.aclose()
        await right.aclose()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_connect_tcp_numeric_and_named(host: str) -> None:
    """Numeric addresses are dialled directly, names through trio.open_tcp_stream; both give a TcpStream with
    TCP_NODELAY that carries bytes both ways."""
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with trio.fail_after(5):
        try:
            listeners = await trio.open_tcp_listeners(0, host="::1" if family == socket.AF_INET6 else "127.0.0.1")
        except OSError:
            pytest.skip("no IPv6 loopback")
        port = listeners[0].socket.getsockname()[1]
        stream = await connect_tcp(host, port)
        peer = await listeners[0].accept()
        assert isinstance(stream, TcpStream)
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await stream.send_all(b"ping")
        assert await peer.receive_some() == b"ping"
        await peer.send_all(b"pong")
        assert await stream.receive_some() == b"pong"
        await stream.aclose()
        await peer.aclose()
        await listeners[0].aclose()


async def test_connect_tcp_refused_is_an_oserror_with_its_errno() -> None:
    with trio.fail_after(5):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        await listener.aclose()  # nothing listens there now
        with pytest.raises(OSError) as info:
            await connect_tcp("127.0.0.1", port)
        assert info.value.errno == errno.ECONNREFUSED
        assert describe_connect_error(info.value) == (ErrorCode.CONNECT_FAILED, "connection refused")
