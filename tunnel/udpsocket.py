"""UDP sockets for :mod:`trio_tunnel.udp`: non-blocking, read in bursts, written without waiting.

Receiving awaits (Trio) but takes every datagram already queued, up to :data:`RECEIVE_BATCH`, in one scheduler
pass; sending never waits: a full socket buffer drops the datagram (UDP semantics) and the caller counts it. So a
busy socket costs one pass of the scheduler per burst, and no task ever blocks on a send.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable
from typing import Any, Final

import attrs
import trio
from trio_tunnel.proto import ErrorCode

from .dial import describe_connect_error

__all__ = ["RECEIVE_BATCH", "ConnectError", "UdpSocket", "bind_udp", "bind_udp_in", "connect_udp"]

RECEIVE_SIZE: Final = 65536
"""Enough for any UDP payload."""
RECEIVE_BATCH: Final = 64
"""Datagrams taken from a socket per scheduling pass: a burst costs one pass of the Trio scheduler, not one each."""
SOCKET_BUFFER: Final = 1024 * 1024
"""Receive buffer asked for each UDP socket (the kernel caps it at net.core.rmem_max): room for a burst while the
process is busy, instead of the default ~200 KiB (a few hundred small datagrams)."""


@attrs.define(eq=False)
class UdpSocket:
    """A non-blocking UDP socket: awaited receives (Trio), sends that never wait (a full buffer drops)."""

    raw: socket.socket
    sock: trio.socket.SocketType = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.raw.setblocking(False)
        with contextlib.suppress(OSError):
            self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        self.sock = trio.socket.from_stdlib_socket(self.raw)

    async def receive_batch(self) -> list[tuple[bytes, Any]]:
        """The datagrams waiting (at least one, at most :data:`RECEIVE_BATCH`), with their sources. ICMP errors
        reported on a connected socket (an earlier send found no listener) are skipped: UDP goes on."""
        raw = self.raw
        batch: list[tuple[bytes, Any]] = []
        while True:
            try:
                while len(batch) < RECEIVE_BATCH:
                    batch.append(raw.recvfrom(RECEIVE_SIZE))
            except (BlockingIOError, ConnectionRefusedError, ConnectionResetError):
                pass
            if batch:
                await trio.lowlevel.checkpoint()
                return batch
            await trio.lowlevel.wait_readable(raw)

    @property
    def local(self) -> tuple[str, int]:
        host, port = self.raw.getsockname()[:2]
        return str(host), int(port)

    def send_nowait(self, data: bytes, address: Any = None) -> bool:
        """Send one datagram (to ``address``, or the connected peer); False when it was dropped (the socket's buffer
        is full, or an earlier ICMP error is reported now)."""
        try:
            if address is None:
                self.raw.send(data)
            else:
                self.raw.sendto(data, address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


async def bind_udp(host: str, port: int) -> UdpSocket:
    """A UDP socket bound to ``host:port`` (port 0: any free port). Raises OSError (gaierror for a bad name)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    raw = socket.socket(family, kind, proto)
    try:
        # No SO_REUSEADDR: for UDP on Linux it would let a second socket bind the same port and split its traffic.
        raw.bind(address)
    except OSError:
        raw.close()
        raise
    return UdpSocket(raw)


async def bind_udp_in(host: str, port: int, ports: Iterable[int], any_port: bool, previous: int | None) -> UdpSocket:
    """Bind a UDP service port as the server binds TCP ones: ``previous`` (a reconnect keeps its port) if it is still
    free, else ``port``; port 0 inside a restricted set takes the first free port of the set."""
    allowed = list(ports) if not any_port else None
    if not port and previous is not None and (allowed is None or previous in allowed):
        try:
            return await bind_udp(host, previous)
        except OSError:
            pass
    if port or allowed is None:
        return await bind_udp(host, port)
    last: OSError | None = None
    for candidate in allowed:
        try:
            return await bind_udp(host, candidate)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            last = exc
    raise last or OSError(errno.EADDRINUSE, "no free UDP port in the allowed set")


class ConnectError(Exception):
    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


async def connect_udp(host: str, port: int) -> UdpSocket:
    """A UDP socket connected to ``host:port`` (so only its replies reach it). Raises ConnectError."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, kind, proto, _, address = infos[0]
        raw = socket.socket(family, kind, proto)
        try:
            raw.connect(address)  # UDP: no packet, only the kernel's choice of route and source port
        except OSError:
            raw.close()
            raise
    except OSError as exc:
        code, detail = describe_connect_error(exc)
        raise ConnectError(code, detail) from exc
    return UdpSocket(raw)
