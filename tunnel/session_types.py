"""The plain objects a :class:`~trio_tunnel.mux.Session` takes or hands out: its settings, its statistics snapshot
and the CTRL requests it receives (the session itself, its tasks and its streams are in :mod:`trio_tunnel.mux` and
:mod:`trio_tunnel.stream`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, final

import attrs
import trio
from trio_tunnel import proto
from trio_tunnel.proto import ErrorCode

__all__ = ["Request", "SessionConfig", "SessionStatistics"]

KiB: Final = 1024


@attrs.frozen(kw_only=True)
class SessionConfig:
    """Timeouts (seconds) and sizes of one session; every timeout here becomes a cancel scope."""

    limits: proto.Limits = attrs.field(factory=proto.Limits)
    handshake_timeout: float = 10.0
    """The whole handshake, from the first byte to WELCOME."""
    keepalive_idle: float = 15.0
    """Send a PING after this long without an inbound byte."""
    keepalive_timeout: float = 45.0
    """Declare the peer dead after this long without an inbound byte."""
    write_timeout: float = 30.0
    """A transport write that makes no progress for this long kills the session."""
    close_timeout: float = 1.0
    """How long closing may spend flushing the final GOAWAY before the transport is closed anyway."""
    read_size: int = 256 * KiB
    write_batch: int = 256 * KiB
    fit_send_buffer: bool = False
    """Size the link socket's send buffer from its smallest RTT sample (:func:`trio_tunnel.tcp.fit_send_buffer`), so a
    bulk stream's backlog stays in the multiplexer, where another stream's frame can go ahead of it."""


@attrs.frozen
class SessionStatistics:
    """A snapshot of a session (see :meth:`Session.statistics`)."""

    session_id: str
    peer_name: str
    streams: int
    """Streams the application holds open."""
    pending_accept: int
    rtt: float | None
    """Smoothed round-trip time from PING/PONG, seconds."""
    connection: proto.ConnectionStatistics
    send_stalls: int = 0
    """Times a stream's sender had to wait for the peer's credit (or buffer room): flow-control stalls."""


@attrs.frozen
class Ended:
    """How a session ended (internal to :class:`~trio_tunnel.mux.Session`)."""

    code: int
    reason: str


@attrs.define(eq=False)
class PendingReply:
    """A CTRL request of ours awaiting the peer's reply (internal to :class:`~trio_tunnel.mux.Session`)."""

    event: trio.Event = attrs.field(factory=trio.Event)
    code: int | None = None
    body: Any = None


@final
class Request:
    """A CTRL request received from the peer; answer it exactly once (not for notifications, id 0)."""

    def __init__(self, send_reply: Callable[[int, ErrorCode | int, Any], None], request_id: int, kind: str, body: Any):
        self._send_reply = send_reply  # the session's: it drops the reply once the session is over
        self.request_id = request_id
        self.kind = kind
        self.body = body

    def __repr__(self) -> str:
        return f"<Request {self.request_id} {self.kind!r}>"

    def reply(self, body: Any = None) -> None:
        self._answer(ErrorCode.NO_ERROR, body)

    def reply_error(self, code: ErrorCode | int, body: Any = None) -> None:
        self._answer(code, body)

    def _answer(self, code: ErrorCode | int, body: Any) -> None:
        if self.request_id:
            self._send_reply(self.request_id, code, body)
