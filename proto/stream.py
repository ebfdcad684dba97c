"""The lifecycle of one stream as a transition table (h2 style): ``(state, input) -> state``.

A pair missing from the table is a protocol violation: for a received input it is the peer's
(:class:`~.errors.RemoteProtocolError`), for a sent one ours (:class:`~.errors.LocalProtocolError`).

The shape is RFC 9113 section 5.1 without "reserved", plus the open handshake of yamux: a stream we opened is
OPENING until OPEN_OK (we may send optimistic data meanwhile, the peer may not); a stream the peer opened is PENDING
until we answer (its optimistic data is buffered). Each of those may already be half-closed by its sender.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

__all__ = ["StreamInput", "StreamRecord", "StreamState", "TRANSITIONS", "is_local_input"]


class StreamState(enum.Enum):
    # Members are singletons compared by identity: hash them by identity too (Enum's own __hash__ is a Python
    # function, and the transition table is looked up for every frame).
    __hash__ = object.__hash__

    OPENING = "opening"
    OPENING_LOCAL_CLOSED = "opening, sent FIN"
    PENDING = "pending"
    PENDING_REMOTE_CLOSED = "pending, got FIN"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"


class StreamInput(enum.Enum):
    __hash__ = object.__hash__

    SEND_DATA = "send DATA"
    SEND_FIN = "send FIN"
    SEND_OPEN_OK = "send OPEN_OK"
    SEND_OPEN_ERR = "send OPEN_ERR"
    SEND_RST = "send RST"
    RECV_DATA = "receive DATA"
    RECV_FIN = "receive FIN"
    RECV_OPEN_OK = "receive OPEN_OK"
    RECV_OPEN_ERR = "receive OPEN_ERR"
    RECV_RST = "receive RST"


S = StreamState
I = StreamInput  # noqa: E741

TRANSITIONS: Final[dict[tuple[StreamState, StreamInput], StreamState]] = {
    # We opened it; waiting for OPEN_OK. Optimistic data (and FIN) may go out; the peer may not send yet.
    (S.OPENING, I.SEND_DATA): S.OPENING,
    (S.OPENING, I.SEND_FIN): S.OPENING_LOCAL_CLOSED,
    (S.OPENING, I.RECV_OPEN_OK): S.OPEN,
    (S.OPENING, I.RECV_OPEN_ERR): S.CLOSED,
    (S.OPENING, I.SEND_RST): S.CLOSED,
    (S.OPENING, I.RECV_RST): S.CLOSED,
    (S.OPENING_LOCAL_CLOSED, I.RECV_OPEN_OK): S.HALF_CLOSED_LOCAL,
    (S.OPENING_LOCAL_CLOSED, I.RECV_OPEN_ERR): S.CLOSED,
    (S.OPENING_LOCAL_CLOSED, I.SEND_RST): S.CLOSED,
    (S.OPENING_LOCAL_CLOSED, I.RECV_RST): S.CLOSED,
    # The peer opened it; we have not answered. Its optimistic data (and FIN) are buffered.
    (S.PENDING, I.RECV_DATA): S.PENDING,
    (S.PENDING, I.RECV_FIN): S.PENDING_REMOTE_CLOSED,
    (S.PENDING, I.SEND_OPEN_OK): S.OPEN,
    (S.PENDING, I.SEND_OPEN_ERR): S.CLOSED,
    (S.PENDING, I.SEND_RST): S.CLOSED,
    (S.PENDING, I.RECV_RST): S.CLOSED,
    (S.PENDING_REMOTE_CLOSED, I.SEND_OPEN_OK): S.HALF_CLOSED_REMOTE,
    (S.PENDING_REMOTE_CLOSED, I.SEND_OPEN_ERR): S.CLOSED,
    (S.PENDING_REMOTE_CLOSED, I.SEND_RST): S.CLOSED,
    (S.PENDING_REMOTE_CLOSED, I.RECV_RST): S.CLOSED,
    # Both directions flow.
    (S.OPEN, I.SEND_DATA): S.OPEN,
    (S.OPEN, I.RECV_DATA): S.OPEN,
    (S.OPEN, I.SEND_FIN): S.HALF_CLOSED_LOCAL,
    (S.OPEN, I.RECV_FIN): S.HALF_CLOSED_REMOTE,
    (S.OPEN, I.SEND_RST): S.CLOSED,
    (S.OPEN, I.RECV_RST): S.CLOSED,
    # We sent FIN: only the peer's direction remains.
    (S.HALF_CLOSED_LOCAL, I.RECV_DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_FIN): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.SEND_RST): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.RECV_RST): S.CLOSED,
    # The peer sent FIN: only our direction remains.
    (S.HALF_CLOSED_REMOTE, I.SEND_DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.SEND_FIN): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.SEND_RST): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.RECV_RST): S.CLOSED,
}
"""Every legal move. CLOSED has no entries: frames for a closed stream are handled before the table (DATA is
discarded and counted; WINDOW, FIN, RST, OPEN_OK and OPEN_ERR are ignored)."""

_LOCAL_CLOSED: Final = frozenset({S.OPENING_LOCAL_CLOSED, S.HALF_CLOSED_LOCAL, S.CLOSED})

del S, I


def is_local_input(event: StreamInput) -> bool:
    """True for inputs we cause (SEND_*), False for those the peer causes (RECV_*)."""
    return event.name.startswith("SEND_")


@attrs.define(eq=False, slots=True)
class StreamRecord:
    """One entry of a connection's stream table: its state in :data:`TRANSITIONS` and its two directions."""

    sid: int
    state: StreamState
    local: bool
    # send direction
    send_limit: int
    sent: int = 0
    send_buf: list[bytes] = attrs.field(factory=list)  # a list, not a deque: 56 bytes empty instead of 760
    send_buffered: int = 0
    head_offset: int = 0
    # What the send queue holds after its bytes (queue contents, not lifecycle: the state says whether we sent FIN).
    fin_pending: bool = False
    """SEND_FIN happened and the FIN is not written yet: it goes out on the last DATA frame."""
    rst_pending: bool = False
    """An RST(STREAM_CLOSED) is written right behind that FIN (``close_stream`` with the peer's direction open)."""
    # receive direction
    window: int = 0
    recv_limit: int = 0
    received: int = 0
    consumed: int = 0
    epoch_time: float | None = None
    epoch_consumed: int = 0
    pool_held: int = 0
    """This stream's part of the session's receive pool (:class:`~.budget.ReceivePool`)."""
    # the application's handle, and the scheduler's queues (neither is the stream's protocol state)
    app_closed: bool = False
    """The application let go of the stream: release the entry once it is CLOSED and its queue is written."""
    blocked: bool = False
    """A writer found no room; tell the caller when room appears."""
    in_ready: bool = False
    """The stream is in the scheduler's ready queue."""

    @property
    def local_closed(self) -> bool:
        """Our direction is over (we sent FIN, or the stream is closed): derived from the state alone."""
        return self.state in _LOCAL_CLOSED
