"""The lighter stream open (tunnel/mux.py, tunnel/stream.py, tunnel/tcp.py): an opener that does not wait for
OPEN_OK and sends a connection's first bytes with the OPEN, a refusal learnt synchronously, meta dropped once
read, and a socket read that never waits."""

from __future__ import annotations

import socket

import pytest
import trio
from mux_helpers import session_pair
from trio_tunnel.errors import StreamOpenError
from trio_tunnel.proto import ErrorCode
from trio_tunnel.stream import NO_META
from trio_tunnel.tcp import TcpStream


async def test_first_bytes_go_with_an_open_that_does_not_wait() -> None:
    with trio.fail_after(10):
        async with session_pair() as (server, client):
            assert server.open_room == 256 * 1024  # the client's declared initial window (protocol default)
            opened = await server.open_stream("web", {"peer": "203.0.113.9:4242"}, wait_accepted=False, first=b"hi")
            assert opened.meta is NO_META, "the opener keeps no copy of its meta"
            incoming = await client.accept_stream()  # (the opener returned before this was even accepted)
            assert incoming.meta == {"peer": "203.0.113.9:4242"}
            incoming.drop_meta()
            assert incoming.meta == {}
            incoming.accept()
            assert await incoming.receive_some() == b"hi"
            await incoming.send_all(b"back")
            assert await opened.receive_some() == b"back"
            await opened.aclose()
            await incoming.aclose()


async def test_first_bytes_beyond_the_window_wait_for_credit() -> None:
    with trio.fail_after(10):
        async with session_pair() as (server, client):
            big = bytes(range(256)) * 2048  # 512 KiB: twice the initial window
            async with trio.open_nursery() as nursery:

                async def answer() -> None:
                    incoming = await client.accept_stream()
                    incoming.accept()
                    got = b""
                    while len(got) < len(big):
                        got += await incoming.receive_some()
                    assert got == big
                    await incoming.aclose()

                nursery.start_soon(answer)
                opened = await server.open_stream("web", wait_accepted=False, first=big)
            await opened.aclose()


async def test_a_refusal_calls_back_before_any_waiter_wakes() -> None:
    with trio.fail_after(10):
        async with session_pair() as (server, client):
            opened = await server.open_stream("web", wait_accepted=False, first=b"x")
            seen: list[tuple[StreamOpenError, bool]] = []
            waiting = True

            def refused(exc: StreamOpenError) -> None:
                seen.append((exc, waiting))

            opened.when_refused(refused)
            async with trio.open_nursery() as nursery:

                async def receive() -> None:
                    nonlocal waiting
                    with pytest.raises(trio.BrokenResourceError):
                        await opened.receive_some()
                    waiting = False

                nursery.start_soon(receive)
                incoming = await client.accept_stream()
                incoming.reject(ErrorCode.CONNECT_FAILED, "web: local service: connection refused")
            ((exc, still_waiting),) = seen
            assert still_waiting, "called before the receiver woke"
            assert exc.code == ErrorCode.CONNECT_FAILED and "connection refused" in str(exc)
            assert opened.refusal is exc
            await opened.aclose()


async def test_receive_nowait_takes_what_arrived_and_never_waits() -> None:
    with trio.fail_after(10):
        left, right = socket.socketpair()
        stream = TcpStream(left)
        try:
            assert stream.receive_nowait(100) == b"", "nothing yet"
            right.sendall(b"hello")
            assert stream.receive_nowait(3) == b"hel"
            assert stream.receive_nowait(100) == b"lo"
            right.shutdown(socket.SHUT_WR)
            assert stream.receive_nowait(100) == b"", "EOF is left for receive_some"
            assert await stream.receive_some() == b""
        finally:
            right.close()
            await stream.aclose()
