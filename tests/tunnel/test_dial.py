"""tunnel/dial.py: dialing with a readable reason, and TCP keepalive on end-user connections."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import pytest
import trio
from trio_tunnel.dial import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    DialError,
    describe_connect_error,
    dial,
    enable_keepalive,
)
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


# ------------------------------------------------------------------------------------------ describe_connect_error


async def test_describe_refused_connection() -> None:
    with trio.fail_after(10):
        port = await _closed_port()
        with pytest.raises(OSError) as info:
            await trio.open_tcp_stream("127.0.0.1", port)
    assert describe_connect_error(info.value) == (ErrorCode.CONNECT_FAILED, "connection refused")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda: socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            (ErrorCode.NAME_NOT_FOUND, "name not found (Name or service not known)"),
        ),
        (lambda: OSError(errno.EHOSTUNREACH, "No route to host"), (ErrorCode.CONNECT_FAILED, "no route to host")),
        (lambda: TimeoutError(errno.ETIMEDOUT, "Connection timed out"), (ErrorCode.CONNECT_TIMEOUT, "timed out")),
        (lambda: OSError(errno.EACCES, "Permission denied"), (ErrorCode.CONNECT_FAILED, "permission denied")),
    ],
    ids=["name-not-found", "no-route", "timed-out", "other-errno"],
)
def test_describe_connect_errors(make: Callable[[], OSError], expected: tuple[ErrorCode, str]) -> None:
    assert describe_connect_error(make()) == expected


def test_describe_several_attempts_names_each_reason_once() -> None:
    attempts = [
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        OSError(errno.ENETUNREACH, "Network is unreachable"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    ]
    exc = OSError("all attempts to connect to example:80 failed")
    exc.__cause__ = ExceptionGroup("all attempts", attempts)
    assert describe_connect_error(exc) == (ErrorCode.CONNECT_FAILED, "connection refused; network unreachable")
