"""Dialing a TCP target with a deadline, and turning a failure into a protocol code and a readable reason."""

from __future__ import annotations

import trio
from trio_tunnel.proto import ErrorCode

from .console import format_hostport
from .relay import describe_connect_error
from .tcp import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, TcpStream, connect_tcp, set_keepalive

__all__ = [
    "KEEPALIVE_COUNT",
    "KEEPALIVE_IDLE",
    "KEEPALIVE_INTERVAL",
    "DialError",
    "dial",
    "enable_keepalive",
    "peer_address",
]


class DialError(Exception):
    """Connecting to a target failed; ``code`` goes into OPEN_ERR, ``reason`` into logs and the peer's message."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# The timeout is a parameter (not the caller's cancel scope) because a timeout is one of the reasons reported.
async def dial(host: str, port: int, *, timeout: float) -> TcpStream:  # noqa: ASYNC109
    """Open a TCP connection to ``host:port`` within ``timeout`` seconds.

    Raises:
        DialError: refused, unreachable, name not found, or timed out; the reason names the target.
    """
    target = format_hostport(host, port)
    with trio.move_on_after(timeout):
        try:
            stream = await connect_tcp(host, port)
            enable_keepalive(stream)
            return stream
        except OSError as exc:
            code, reason = describe_connect_error(exc)
            raise DialError(code, f"cannot connect to {target}: {reason}") from exc
    raise DialError(ErrorCode.CONNECT_TIMEOUT, f"cannot connect to {target}: no answer within {timeout:g} s")


def peer_address(stream: TcpStream | trio.SocketStream) -> str:
    """``HOST:PORT`` of the far end of a TCP stream, for logs (``?`` once the peer has already reset it)."""
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return format_hostport(str(host), int(port))


def enable_keepalive(stream: TcpStream | trio.SocketStream) -> None:
    """TCP keepalive on an end-user connection (a backstop, not the link's liveness check, which is PING): a peer
    that vanished without a FIN or RST is noticed after about two minutes of silence (60 s, then 6 probes 10 s
    apart), so its connection, task pair and slot under the connection cap are released instead of held forever.
    (Accepted connections get it from :func:`~trio_tunnel.tcp.serve_tcp`; this is for dialled ones.)"""
    set_keepalive(stream.socket)
