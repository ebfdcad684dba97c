"""tunnel.relay: the splice over memory streams, over real loopback sockets, and with a mux-like stream.

Layout of every splice test: ``peer_a <-> a ==splice== b <-> peer_b``. ``a`` and ``b`` are the streams handed to
``splice``; ``peer_a`` and ``peer_b`` are the far ends the test drives (for TCP, real sockets on 127.0.0.1).
"""

from __future__ import annotations

import errno
import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing
from trio_tunnel.errors import StreamResetError
from trio_tunnel.proto.errors import ErrorCode
from trio_tunnel.relay import (
    DEFAULT_CHUNK,
    Splice,
    SpliceResult,
    SupportsReset,
    abort,
    splice,
)

TIMEOUT = 10


# ---------------------------------------------------------------------------------------------------------- helpers


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected loopback TCP pair: (the far peer, the accepted side handed to splice)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        port = listener.socket.getsockname()[1]
        peer = await trio.open_tcp_stream("127.0.0.1", port)
        ours = await listener.accept()
    return peer, ours


def send_rst(stream: trio.SocketStream) -> None:
    """Close a socket abortively (the far side sees a TCP RST). Written here, not via tunnel.relay.abort."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


def broken(cause: BaseException) -> trio.BrokenResourceError:
    """The error a stream raises when it broke because of ``cause`` (as trio's SocketStream and the mux do)."""
    exc = trio.BrokenResourceError(f"broken: {cause}")
    exc.__cause__ = cause
    return exc


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(1 << 16):
        data += chunk
    return bytes(data)


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


async def assert_closed(stream: trio.abc.SendStream) -> None:
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


@attrs.define
class Ends:
    peer_a: trio.abc.HalfCloseableStream
    a: trio.abc.HalfCloseableStream
    b: trio.abc.HalfCloseableStream
    peer_b: trio.abc.HalfCloseableStream


@asynccontextmanager
async def open_ends(kind: str) -> AsyncIterator[Ends]:
    if kind == "memory":
        peer_a, a = trio.testing.memory_stream_pair()
        b, peer_b = trio.testing.memory_stream_pair()
        ends = Ends(peer_a, a, b, peer_b)
    else:
        peer_a_tcp, a_tcp = await tcp_pair()
        peer_b_tcp, b_tcp = await tcp_pair()
        ends = Ends(peer_a_tcp, a_tcp, b_tcp, peer_b_tcp)
    try:
        yield ends
    finally:
        for stream in (ends.peer_a, ends.a, ends.b, ends.peer_b):
            await trio.aclose_forcefully(stream)


@pytest.fixture(params=["memory", "tcp"])
async def ends(request: pytest.FixtureRequest) -> AsyncIterator[Ends]:
    async with open_ends(request.param) as value:
        yield value


@asynccontextmanager
async def running_splice(
    a: trio.abc.Stream, b: trio.abc.Stream, **kwargs: int
) -> AsyncIterator[tuple[Splice, list[SpliceResult]]]:
    """Run a splice in the background; the list gets its result when it returns."""
    sp = Splice(a, b, **kwargs)
    results: list[SpliceResult] = []

    async def run() -> None:
        results.append(await sp.run())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield sp, results


class FakeMuxStream(trio.abc.HalfCloseableStream):
    """Stands in for the mux stream: what the test ``feed``s comes out of receive_some (bytes; b"" = the peer's FIN;
    an exception is raised), send_all goes to ``outbox``, and reset() calls are recorded."""

    def __init__(self) -> None:
        self._feed_send, self._feed_receive = trio.open_memory_channel[bytes | BaseException](16)
        self._out_send, self.outbox = trio.open_memory_channel[bytes](16)
        self.resets: list[tuple[ErrorCode, str]] = []
        self.eof_sent = False
        self.closed = False

    async def feed(self, item: bytes | BaseException) -> None:
        await self._feed_send.send(item)

    def reset(self, code: ErrorCode = ErrorCode.CANCEL, reason: str = "") -> None:
        self.resets.append((code, reason))
        self.closed = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError
        item = await self._feed_receive.receive()
        if isinstance(item, BaseException):
            raise item
        return item

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed or self.eof_sent:
            raise trio.ClosedResourceError
        await self._out_send.send(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self.eof_sent = True
        await self._out_send.aclose()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


class NoHalfClose(trio.abc.Stream):
    """A stream that cannot half-close (like TLS 1.2): only ``aclose``."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


# ------------------------------------------------------------------------------------------------- data and EOF


async def test_bytes_both_ways_exact_and_counted(ends: Ends) -> None:
    rng = random.Random(1)
    up, down = rng.randbytes(1_500_000), rng.randbytes(1_000_000)
    got: dict[str, bytes] = {}

    async def side(name: str, stream: trio.abc.HalfCloseableStream, payload: bytes) -> None:
        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got[name] = await read_all(stream)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, "a", ends.peer_a, up)
            nursery.start_soon(side, "b", ends.peer_b, down)
            result = await splice(ends.a, ends.b)
    assert got["b"] == up
    assert got["a"] == down
    assert result == SpliceResult(bytes_a_to_b=len(up), bytes_b_to_a=len(down), a_to_b="eof", b_to_a="eof")
    assert result.clean
    await assert_closed(ends.a)
    await assert_closed(ends.b)


@pytest.mark.parametrize("client_side", ["a", "b"])
async def test_half_close_then_full_reply(ends: Ends, client_side: str) -> None:
    """An HTTP/1.0-style exchange: the client sends its request and shuts down writing, then still reads a large
    reply; the server sees the request end (EOF), then replies and closes. Both orders."""
    client, server = (ends.peer_a, ends.peer_b) if client_side == "a" else (ends.peer_b, ends.peer_a)
    request = b"GET / HTTP/1.0\r\n\r\n"
    reply = random.Random(2).randbytes(3 * DEFAULT_CHUNK + 12345)
    seen: dict[str, bytes] = {}

    async def serve() -> None:
        seen["request"] = await read_all(server)  # returns only once the client's EOF came through
        await server.send_all(reply)
        await server.send_eof()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery, running_splice(ends.a, ends.b) as (_, results):
            nursery.start_soon(serve)
            await client.send_all(request)
            await client.send_eof()
            got = await read_all(client)
    assert seen["request"] == request
    assert got == reply
    (result,) = results
    assert result.clean
    sent_by_a, sent_by_b = (request, reply) if client_side == "a" else (reply, request)
    assert (result.bytes_a_to_b, result.bytes_b_to_a) == (len(sent_by_a), len(sent_by_b))


async def test_small_chunks_keep_order() -> None:
    payload = random.Random(3).randbytes(10_007)
    with trio.fail_after(TIMEOUT):
        async with open_ends("memory") as e, running_splice(e.a, e.b, chunk=7) as (_, results):
            for i in range(0, len(payload), 1000):
                await e.peer_a.send_all(payload[i : i + 1000])
            await e.peer_a.send_eof()
            assert await read_all(e.peer_b) == payload
            await e.peer_b.send_eof()
    assert results[0].bytes_a_to_b == len(payload)


async def test_destination_that_cannot_half_close_is_closed_at_eof() -> None:
    with trio.fail_after(TIMEOUT):
        peer_a, a = trio.testing.memory_stream_pair()
        b_inner, peer_b = trio.testing.memory_stream_pair()
        async with running_splice(a, NoHalfClose(b_inner)) as (_, results):
            await peer_a.send_all(b"last words")
            await peer_a.send_eof()
            assert await read_all(peer_b) == b"last words"
    (result,) = results
    assert (result.a_to_b, result.b_to_a) == ("eof", "closed")
    await assert_closed(b_inner)


# -------------------------------------------------------------------------------------------------- TCP resets


@pytest.mark.parametrize("reset_side", ["a", "b"])
async def test_tcp_rst_is_carried_as_rst(reset_side: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_ends("tcp") as e:
            assert isinstance(e.peer_a, trio.SocketStream) and isinstance(e.peer_b, trio.SocketStream)
            resetter, far = (e.peer_a, e.peer_b) if reset_side == "a" else (e.peer_b, e.peer_a)
            async with running_splice(e.a, e.b) as (_, results):
                await resetter.send_all(b"hello")  # the splice is running: the bytes arrive
                assert await receive_exactly(far, 5) == b"hello"
                send_rst(resetter)
                with pytest.raises(ConnectionResetError):
                    await far.socket.recv(1)
    (result,) = results
    ended = (result.a_to_b, result.b_to_a) if reset_side == "a" else (result.b_to_a, result.a_to_b)
    assert ended == ("reset", "cancelled")


async def test_send_to_reset_peer_aborts_the_source() -> None:
    """peer_a half-closes, then resets; peer_b's reply cannot be delivered, so peer_b's connection is reset too."""
    with trio.fail_after(TIMEOUT):
        async with open_ends("tcp") as e:
            assert isinstance(e.peer_a, trio.SocketStream) and isinstance(e.peer_b, trio.SocketStream)
            async with running_splice(e.a, e.b) as (_, results):
                await e.peer_a.send_all(b"request")
                await e.peer_a.send_eof()
                assert await read_all(e.peer_b) == b"request"
                send_rst(e.peer_a)
                await e.peer_b.send_all(b"reply nobody will read")
            # peer_b already read b's FIN, so its recv keeps returning b"" (SOCK_DONE); an RST in CLOSE_WAIT
            # shows as EPIPE on the next send. Had b been closed gracefully instead, that send would succeed.
            with pytest.raises(BrokenPipeError):
                await e.peer_b.socket.send(b"more")
    (result,) = results
    assert (result.a_to_b, result.b_to_a) == ("eof", "send_failed")
    assert result.bytes_b_to_a == 0


# ------------------------------------------------------------------------------------------ mux-like (SupportsReset)


def test_supports_reset_protocol() -> None:
    assert isinstance(FakeMuxStream(), SupportsReset)
    a, _ = trio.testing.memory_stream_pair()
    assert not isinstance(a, SupportsReset)


async def test_tcp_rst_resets_the_mux_stream_with_conn_reset() -> None:
    with trio.fail_after(TIMEOUT):
        mux = FakeMuxStream()
        peer_b, b = await tcp_pair()
        async with running_splice(mux, b) as (_, results):
            await peer_b.send_all(b"ping")
            assert await mux.outbox.receive() == b"ping"
            send_rst(peer_b)
    (result,) = results
    assert (result.b_to_a, result.a_to_b) == ("reset", "cancelled")
    assert [code for code, _ in mux.resets] == [ErrorCode.CONN_RESET]
    assert mux.closed


async def test_mux_reset_becomes_tcp_rst() -> None:
    with trio.fail_after(TIMEOUT):
        mux = FakeMuxStream()
        peer_b, b = await tcp_pair()
        async with running_splice(mux, b) as (_, results):
            await mux.feed(b"data first")
            assert await receive_exactly(peer_b, 10) == b"data first"
            await mux.feed(broken(StreamResetError(ErrorCode.CONN_RESET, "far TCP peer reset")))
            with pytest.raises(ConnectionResetError):
                await peer_b.socket.recv(1)
    (result,) = results
    assert (result.a_to_b, result.b_to_a) == ("reset", "cancelled")
    assert result.bytes_a_to_b == 10
    assert "far TCP peer reset" in result.a_to_b_detail
    assert mux.resets == []  # the side that was reset is not reset back


async def test_mux_reset_code_is_carried_to_a_mux_destination() -> None:
    with trio.fail_after(TIMEOUT):
        src, dst = FakeMuxStream(), FakeMuxStream()
        async with running_splice(src, dst):
            await src.feed(broken(StreamResetError(ErrorCode.SHUTTING_DOWN, "server going away")))
    assert [code for code, _ in dst.resets] == [ErrorCode.SHUTTING_DOWN]


async def test_lost_connection_aborts_the_destination() -> None:
    """A receive failure that is not a reset (a keepalive timeout, say) still must not look like a clean end."""
    with trio.fail_after(TIMEOUT):
        mux = FakeMuxStream()
        peer_b, b = await tcp_pair()
        async with running_splice(mux, b) as (_, results):
            await mux.feed(broken(TimeoutError(errno.ETIMEDOUT, "Connection timed out")))
            with pytest.raises(ConnectionResetError):
                await peer_b.socket.recv(1)
    (result,) = results
    assert (result.a_to_b, result.b_to_a) == ("error", "cancelled")
    assert "timed out" in result.a_to_b_detail


async def test_mux_eof_is_carried_as_tcp_half_close() -> None:
    with trio.fail_after(TIMEOUT):
        mux = FakeMuxStream()
        peer_b, b = await tcp_pair()
        async with running_splice(mux, b) as (_, results):
            await mux.feed(b"request")
            await mux.feed(b"")
            assert await read_all(peer_b) == b"request"
            await peer_b.send_all(b"reply")
            await peer_b.send_eof()
            assert await mux.outbox.receive() == b"reply"
            with pytest.raises(trio.EndOfChannel):
                await mux.outbox.receive()
    assert results[0].clean
    assert mux.eof_sent and mux.closed and mux.resets == []


# ------------------------------------------------------------------------------------------------- cancellation


async def test_cancel_closes_both_tcp_abortively() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_ends("tcp") as e:
            assert isinstance(e.peer_a, trio.SocketStream) and isinstance(e.peer_b, trio.SocketStream)
            sp = Splice(e.a, e.b)
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sp.run)
                    await e.peer_a.send_all(b"in flight")
                    assert await receive_exactly(e.peer_b, 9) == b"in flight"
                    scope.cancel()
            assert scope.cancelled_caught
            for far in (e.peer_a, e.peer_b):
                with pytest.raises(ConnectionResetError):
                    await far.socket.recv(1)
    snap = sp.snapshot()
    assert (snap.a_to_b, snap.b_to_a, snap.bytes_a_to_b) == ("cancelled", "cancelled", 9)


async def test_cancel_closes_both_memory_and_resets_a_mux_stream() -> None:
    with trio.fail_after(TIMEOUT):
        mux = FakeMuxStream()
        b, peer_b = trio.testing.memory_stream_pair()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(splice, mux, b)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        await assert_closed(b)
        assert [code for code, _ in mux.resets] == [ErrorCode.CANCEL]
        assert await peer_b.receive_some(10) == b""


async def test_snapshot_while_running_says_open() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_ends("memory") as e, running_splice(e.a, e.b) as (sp, _):
            await e.peer_a.send_all(b"12345")
            assert await receive_exactly(e.peer_b, 5) == b"12345"
            snap = sp.snapshot()
            await e.peer_a.send_eof()
            await e.peer_b.send_eof()
    assert (snap.a_to_b, snap.b_to_a, snap.bytes_a_to_b) == ("open", "open", 5)


# ---------------------------------------------------------------------------------------------- misuse, bugs


async def test_unexpected_error_propagates_and_closes_both() -> None:
    with trio.fail_after(TIMEOUT):
        mux = FakeMuxStream()
        b, _ = trio.testing.memory_stream_pair()
        # splice's own nursery groups the error; running_splice's nursery groups it again.
        with pytest.RaisesGroup(pytest.RaisesGroup(ValueError)):
            async with running_splice(mux, b):
                await mux.feed(ValueError("a bug, not a network condition"))
        await assert_closed(b)
        assert mux.closed


async def test_splice_runs_once_and_checks_chunk() -> None:
    with trio.fail_after(TIMEOUT):
        a, peer_a = trio.testing.memory_stream_pair()
        with pytest.raises(ValueError, match="chunk"):
            Splice(a, peer_a, chunk=0)
        async with open_ends("memory") as e:
            sp = Splice(e.a, e.b)
            await e.peer_a.send_eof()
            await e.peer_b.send_eof()
            assert (await sp.run()).clean
            with pytest.raises(RuntimeError):
                await sp.run()


# ------------------------------------------------------------------------------------------------------ abort()


async def test_abort_socket_sends_rst_and_is_idempotent() -> None:
    with trio.fail_after(TIMEOUT):
        peer, ours = await tcp_pair()
        await abort(ours)
        with pytest.raises(ConnectionResetError):
            await peer.socket.recv(1)
        await abort(ours)  # already closed: nothing more to do, no error
        await peer.aclose()


async def test_abort_resets_mux_then_closes_and_closes_anything_else() -> None:
    with trio.fail_after(TIMEOUT):
        mux = FakeMuxStream()
        await abort(mux, ErrorCode.CONN_RESET, "peer reset")
        assert mux.resets == [(ErrorCode.CONN_RESET, "peer reset")]
        assert mux.closed
        a, b = trio.testing.memory_stream_pair()
        await abort(a)
        await assert_closed(a)
        assert await b.receive_some(1) == b""


async def test_abort_is_done_even_when_cancelled() -> None:
    with trio.fail_after(TIMEOUT):
        peer, ours = await tcp_pair()
        with trio.CancelScope() as scope:
            scope.cancel()
            await abort(ours)
        with pytest.raises(ConnectionResetError):
            await peer.socket.recv(1)
