"""tunnel/dial.py: dialing with a readable reason, and TCP keepalive on end-user connections."""

from __future__ import annotations

import socket

import pytest
import trio
from trio_tunnel.dial import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, DialError, dial, enable_keepalive
from trio_tunnel.proto import ErrorCode


async def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_dial_refused_names_the_target_and_the_reason() -> None:
    port = await _closed_port()
    with trio.fail_after(10), pytest.raises(DialError) as info:
        await dial("127.0.0.1", port, timeout=5)
    assert info.value.code == ErrorCode.CONNECT_FAILED
    assert info.value.reason == f"cannot connect to 127.0.0.1:{port}: connection refused"


async def test_dialed_and_accepted_connections_get_keepalive() -> None:
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        outgoing = await dial("127.0.0.1", port, timeout=5)
        incoming = await listeners[0].accept()
        assert isinstance(incoming, trio.SocketStream)
        enable_keepalive(incoming)
        for stream in (outgoing, incoming):
            sock = stream.socket
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_COUNT
            await stream.aclose()
        await listeners[0].aclose()
