"""Events: what :meth:`proto.Connection.receive_data` (and :meth:`~trio_tunnel.proto.Connection.expire`) report.

Past tense, one class per thing that happened, each immutable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

import attrs

from .errors import ProtocolError

__all__ = [
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "HandshakeComplete",
    "PongReceived",
    "ReplyReceived",
    "RequestReceived",
    "StreamAccepted",
    "StreamCreditGranted",
    "StreamEnded",
    "StreamOpened",
    "StreamRejected",
    "StreamReset",
    "WindowUpdated",
]


@attrs.frozen
class HandshakeComplete:
    """The session is open. ``peer_name`` is the client's name (as the server saw it authenticated)."""

    peer_name: str
    session_id: str
    peer_limits: Mapping[str, int]
    authenticated: bool
    """False when the server runs without tokens (``method "none"``)."""
    token_id: str = ""
    """Server side: a digest naming the token the client proved ("" without authentication), so the application
    can tell clients of one token from others without holding the token. Not to be logged (a short token's digest
    can be guessed offline)."""


@attrs.frozen
class ConnectionTerminated:
    """The connection is over; nothing more will be received. Bytes still queued (a GOAWAY, a REFUSE) should be
    flushed before the transport is closed.

    ``by_peer`` tells who ended it: the peer (REFUSE, GOAWAY with an error, transport EOF) or us (``error`` holds
    the :class:`~trio_tunnel.proto.errors.ProtocolError` that made us end it). ``silent`` is True when the peer is not a
    trio-tunnel at all (wrong magic): nothing was sent back.
    """

    code: int
    reason: str
    by_peer: bool
    error: ProtocolError | None = None
    silent: bool = False


@attrs.frozen
class GoAwayReceived:
    """The peer will accept no new streams; ours above ``last_stream_id`` were refused (see StreamRejected)."""

    last_stream_id: int
    code: int
    reason: str


@attrs.frozen
class StreamOpened:
    """The peer opened a stream. Answer it with :meth:`~trio_tunnel.proto.Connection.accept_stream` or
    :meth:`~trio_tunnel.proto.Connection.reject_stream` (in the meantime its data is buffered up to our window)."""

    stream_id: int
    route: str
    meta: Mapping[str, Any]


@attrs.frozen
class StreamAccepted:
    """The peer accepted a stream we opened (OPEN_OK)."""

    stream_id: int


@attrs.frozen
class StreamRejected:
    """A stream we opened was refused: OPEN_ERR, our open timeout, or a GOAWAY that never processed it.

    The stream is closed; call :meth:`~trio_tunnel.proto.Connection.close_stream` to release it.
    """

    stream_id: int
    code: int
    reason: str


@attrs.frozen
class DataReceived:
    """Bytes for a stream. Call :meth:`~trio_tunnel.proto.Connection.acknowledge` as the application consumes them."""

    stream_id: int
    data: bytes


@attrs.frozen
class StreamEnded:
    """The peer half-closed the stream (FIN after all its data): end of file for this direction."""

    stream_id: int


@attrs.frozen
class StreamReset:
    """The stream was aborted: by the peer's RST, or by our open timeout on a stream the peer opened (``local``).

    Unread data is void unless the peer had already ended its direction (StreamEnded came first).
    """

    stream_id: int
    code: int
    reason: str
    local: bool = False


@attrs.frozen
class WindowUpdated:
    """The peer granted more send credit on a stream (a blocked writer may continue)."""

    stream_id: int


@attrs.frozen
class StreamCreditGranted:
    """The peer allowed more streams (MAX_STREAMS): ``available`` more may be opened now."""

    available: int


@attrs.frozen
class PongReceived:
    """The answer to our latest PING. ``rtt`` is the measured round trip when times were passed in."""

    opaque: int
    rtt: float | None


@attrs.frozen
class RequestReceived:
    """A CTRL request from the peer. Answer it with :meth:`~trio_tunnel.proto.Connection.send_reply` unless
    ``request_id`` is 0 (a notification)."""

    request_id: int
    kind: str
    body: Any


@attrs.frozen
class ReplyReceived:
    """The answer to one of our CTRL requests; ``code`` 0 means success."""

    request_id: int
    code: int
    body: Any


Event: TypeAlias = (
    HandshakeComplete
    | ConnectionTerminated
    | GoAwayReceived
    | StreamOpened
    | StreamAccepted
    | StreamRejected
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | StreamCreditGranted
    | PongReceived
    | RequestReceived
    | ReplyReceived
)
