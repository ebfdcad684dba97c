"""Dialing a TCP target with a deadline, and turning a failure into a protocol code and a readable reason
(:func:`describe_connect_error`, which the mapper and the tunnel ends share through :func:`dial`)."""

from __future__ import annotations

import errno
import os
import socket
from typing import Final

import trio
from trio_tunnel.proto import ErrorCode

from .console import format_hostport
from .tcp import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, TcpStream, connect_tcp, set_keepalive

__all__ = [
    "KEEPALIVE_COUNT",
    "KEEPALIVE_IDLE",
    "KEEPALIVE_INTERVAL",
    "DialError",
    "describe_connect_error",
    "dial",
    "enable_keepalive",
    "peer_address",
]


class DialError(Exception):
    """Connecting to a target failed; ``code`` goes into OPEN_ERR, ``reason`` into logs and the peer's message.

    ``detail`` is the reason without the "cannot connect to HOST:PORT: " in front, and ``timeout`` the deadline
    that passed when the dial timed out (None when the target answered with an error), for callers that name the
    target and the deadline their own way (the mapper: "timed out after 0.3s").
    """

    def __init__(self, code: ErrorCode, reason: str, *, detail: str = "", timeout: float | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.detail = detail or reason
        self.timeout = timeout


# The timeout is a parameter (not the caller's cancel scope) because a timeout is one of the reasons reported.
async def dial(host: str, port: int, *, timeout: float) -> TcpStream:  # noqa: ASYNC109
    """Open a TCP connection to ``host:port`` within ``timeout`` seconds.

    Raises:
        DialError: refused, unreachable, name not found, or timed out; the reason names the target.
    """
    target = format_hostport(host, port)
    if not timeout >= 0:  # (as move_on_after checks: NaN or negative)
        raise ValueError(f"timeout must be non-negative, not {timeout!r}")
    # A scope of our own rather than move_on_after's: the same deadline without its generator context manager (a
    # dial per tunnelled connection).
    with trio.CancelScope(deadline=trio.current_time() + timeout):
        try:
            stream = await connect_tcp(host, port)
            enable_keepalive(stream)
            return stream
        except OSError as exc:
            code, detail = describe_connect_error(exc)
            raise DialError(code, f"cannot connect to {target}: {detail}", detail=detail) from exc
    detail = f"no answer within {timeout:g} s"
    raise DialError(ErrorCode.CONNECT_TIMEOUT, f"cannot connect to {target}: {detail}", detail=detail, timeout=timeout)


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


_CONNECT_REASONS: Final = {
    errno.ECONNREFUSED: (ErrorCode.CONNECT_FAILED, "connection refused"),
    errno.ETIMEDOUT: (ErrorCode.CONNECT_TIMEOUT, "timed out"),
    errno.EHOSTUNREACH: (ErrorCode.CONNECT_FAILED, "no route to host"),
    errno.ENETUNREACH: (ErrorCode.CONNECT_FAILED, "network unreachable"),
    errno.ECONNRESET: (ErrorCode.CONNECT_FAILED, "connection reset"),
}


def describe_connect_error(exc: OSError) -> tuple[ErrorCode, str]:
    """Turn a failure of :func:`~trio_tunnel.tcp.connect_tcp` (or :func:`trio.open_tcp_stream`) into an error code
    and a short reason.

    ``socket.gaierror`` means the name did not resolve (``NAME_NOT_FOUND``, "name not found").
    Otherwise each attempt's errno is named, e.g. "connection refused" (trio chains the attempts
    as an ``ExceptionGroup`` under a generic ``OSError``). A timeout is the caller's to report:
    the caller wraps the dial in ``trio.move_on_after``.
    """
    if isinstance(exc, socket.gaierror):
        return ErrorCode.NAME_NOT_FOUND, f"name not found ({exc.strerror or exc})"
    attempts: list[OSError] = [exc]
    if isinstance(exc.__cause__, ExceptionGroup):
        nested = [e for e in exc.__cause__.exceptions if isinstance(e, OSError)]
        attempts = nested or attempts
    reasons: list[str] = []
    code = ErrorCode.CONNECT_FAILED
    for attempt in attempts:
        if attempt.errno in _CONNECT_REASONS:
            code, reason = _CONNECT_REASONS[attempt.errno]
        elif attempt.errno is not None:
            reason = os.strerror(attempt.errno).lower()
        else:
            reason = str(attempt)
        if reason not in reasons:
            reasons.append(reason)
    if len(reasons) > 1:
        code = ErrorCode.CONNECT_FAILED
    return code, "; ".join(reasons)
