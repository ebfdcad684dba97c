"""The stream table of one connection: every stream's record, stream credit, open timeouts and flow control. Sans-I/O.

:class:`~.connection.Connection` owns the link (handshake, dispatch, GOAWAY, termination); a :class:`StreamTable`
owns what is per stream and what bounds the number and memory of streams: the table itself, stream ids, the
MAX_STREAMS credit both ways, the accept backlog, open deadlines and the window auto-tune budget. It handles the
stream frames (OPEN, OPEN_OK, OPEN_ERR, DATA, WINDOW, RST) and the stream commands the connection delegates to it.
Every change of a stream's state goes through :data:`~.stream.TRANSITIONS` (:meth:`StreamTable.apply`), so the
counts of unanswered opens follow the states and cannot drift.

It shares the connection's scheduler (frames go out through it) and its control queue (``queue_control``, which
ends the connection when the peer stops reading); peer errors are raised as :class:`~.errors.RemoteProtocolError`
for the connection to turn into a GOAWAY.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from . import frames as F
from .budget import ReceivePool
from .control import Keepalive
from .errors import ErrorCode, FlowControlError, FrameSizeError, LocalProtocolError, RemoteProtocolError
from .events import (
    DataReceived,
    Event,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    WindowUpdated,
)
from .flood import FloodWatch
from .flow import TokenBucket, next_window
from .handshake import Handshake
from .limits import Limits
from .scheduler import Scheduler
from .stream import TRANSITIONS, StreamInput, StreamRecord, StreamState

__all__ = ["StreamTable", "clip"]

SI = StreamInput
SS = StreamState
OPENING: Final = frozenset({SS.OPENING, SS.OPENING_LOCAL_CLOSED})
PENDING: Final = frozenset({SS.PENDING, SS.PENDING_REMOTE_CLOSED})
# States in which the peer may still send to us, so a WINDOW is worth sending.
_RECEIVING: Final = frozenset({SS.OPEN, SS.HALF_CLOSED_LOCAL, SS.PENDING, SS.OPENING, SS.OPENING_LOCAL_CLOSED})


def clip(text: str, limit: int = F.REASON_MAX) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes (with "..."), so a long reason never makes a frame invalid."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


def _stream_index(sid: int) -> int:
    """1 for the first stream of either side (1 or 2), 2 for the second (3 or 4), ..."""
    return (sid + 1) // 2


class StreamTable:
    """The streams of one connection and the stream frames and commands that act on them.

    Args:
        streams: the table (shared with the scheduler, which reads the records it sends from).
        client: which side we are (our stream ids are odd on the client, even on the server).
        limits: what this side enforces.
        hs: the handshake, for the peer's declared limits (read when a stream opens: they arrive mid-way).
        out: the connection's scheduler.
        keepalive: for the smoothed RTT that window auto-tuning uses.
        queue_control: queues a control frame, or ends the connection when too many are queued.
    """

    __slots__ = (
        "_client",
        "_hs",
        "_keepalive",
        "_out",
        "_queue_control",
        "budget_used",
        "data_received",
        "deadlines",
        "discarded",
        "empty_bucket",
        "granted",
        "granted_sent",
        "highest_peer_sid",
        "last_peer_sid_allowed",
        "limits",
        "local_credit",
        "local_opened",
        "local_opening",
        "max_streams_dirty",
        "next_sid",
        "now",
        "open_bucket",
        "open_flood",
        "pending",
        "pool",
        "reset_bucket",
        "send_blocked",
        "send_dropped",
        "send_queued",
        "streams",
        "time_given",
        "writable",
    )

    def __init__(
        self,
        streams: dict[int, StreamRecord],
        *,
        client: bool,
        limits: Limits,
        hs: Handshake,
        out: Scheduler,
        keepalive: Keepalive,
        queue_control: Callable[[F.Frame], None],
    ) -> None:
        self._hs = hs
        self._keepalive = keepalive
        self._out = out
        self._queue_control = queue_control
        self._client = client
        self.limits = limits
        self.streams = streams
        self.writable: set[int] = set()
        """Streams whose writers found no room before and have room now."""
        self.next_sid = 1 if client else 2
        self.local_opened = 0
        self.local_credit = 0  # the peer's MAX_STREAMS: its declared max_streams once the handshake is done
        self.local_opening = 0  # our streams not yet answered (OPENING)
        self.highest_peer_sid = 0
        self.last_peer_sid_allowed = F.SID_LIMIT  # after our GOAWAY, peer OPENs above this are refused
        self.granted = limits.max_streams  # cumulative MAX_STREAMS we allow the peer
        self.granted_sent = limits.max_streams
        self.max_streams_dirty = False
        self.pending = 0  # peer streams not yet answered (PENDING)
        self.deadlines: dict[int, float] = {}
        self.budget_used = 0
        self.open_bucket = TokenBucket(limits.open_rate)
        self.open_flood = FloodWatch(limits.open_flood_grace)
        self.reset_bucket = TokenBucket(limits.reset_rate)
        self.empty_bucket = TokenBucket(limits.empty_rate)
        self.data_received = 0
        self.discarded = 0
        """DATA bytes for streams that were already closed: counted, then dropped."""
        self.now = 0.0
        self.time_given = False
        # The session memory budget (.budget): None when the limits set no session_window / session_send_buffer.
        self.pool = None if limits.session_window is None else ReceivePool(limits.initial_window, limits.session_window)
        self.send_queued = 0  # stream bytes ever queued, and dropped unsent: minus the scheduler's data_sent,
        self.send_dropped = 0  # what is queued now
        self.send_blocked: set[int] = set()
        """Streams whose writers found the session's send buffer full."""

    # ------------------------------------------------------------------------------------------------ table

    def apply(self, stream: StreamRecord, event: StreamInput) -> None:
        """Move a stream through :data:`TRANSITIONS`; a missing pair is our error (SEND_*) or the peer's."""
        old = stream.state
        try:
            new = stream.state = TRANSITIONS[old, event]
        except KeyError:
            message = f"stream {stream.sid}: cannot {event.value} in state {stream.state.value}"
            if event.name.startswith("SEND_"):
                raise LocalProtocolError(message) from None
            raise RemoteProtocolError(message, ErrorCode.PROTOCOL) from None
        # Keep the counts of unanswered opens (ours: OPENING, the peer's: PENDING) in step with the states.
        if old in OPENING and new not in OPENING:
            self.local_opening -= 1
        elif old in PENDING and new not in PENDING:
            self.pending -= 1

    def _is_peer_sid(self, sid: int) -> bool:
        return (sid % 2 == 1) != self._client

    def _lookup(self, sid: int, what: str) -> StreamRecord | None:
        """The stream for a received frame, None if it is closed (ignore), or an error if it was never opened."""
        stream = self.streams.get(sid)
        if stream is not None:
            return stream
        idle = sid > self.highest_peer_sid if self._is_peer_sid(sid) else sid >= self.next_sid
        if idle:
            raise RemoteProtocolError(f"{what} for stream {sid}, which was never opened")
        return None

    def get(self, stream_id: int) -> StreamRecord:
        """The stream for a command, or :class:`LocalProtocolError` if it is not in the table."""
        stream = self.streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open (released or never opened)")
        return stream

    def available(self) -> int:
        """Streams we may open under both the peer's stream credit and its accept backlog: we never make it refuse
        an open for lack of room."""
        return max(0, min(self.local_credit - self.local_opened, self._hs.peer.accept_backlog - self.local_opening))

    @property
    def max_streams_urgent(self) -> bool:
        """A MAX_STREAMS is due now: the peer has used at least half the credit we sent it. Until then the raised
        credit waits for the next write (``data_to_send`` includes it whenever it is dirty), so a connection that
        ends does not cost a frame and a write of its own (as QUIC sends MAX_STREAMS once half the credit is
        used)."""
        return self.max_streams_dirty and (
            self.granted_sent - _stream_index(self.highest_peer_sid) <= self.limits.max_streams // 2
        )

    def take_max_streams(self) -> int | None:
        """The MAX_STREAMS value to send now, if the credit we grant changed since the last one."""
        self.max_streams_dirty = False
        if self.granted == self.granted_sent:
            return None
        self.granted_sent = self.granted
        return self.granted

    def _grant_stream(self) -> None:
        self.granted += 1
        self.max_streams_dirty = True

    def _new_record(self, sid: int, state: StreamState, local: bool) -> StreamRecord:
        limits = self.limits
        stream = self.streams[sid] = StreamRecord(
            sid,
            state,
            local=local,
            send_limit=self._hs.peer.initial_window,
            window=limits.stream_window or limits.initial_window,
            recv_limit=limits.initial_window,
            epoch_time=self.now if self.time_given else None,
        )
        if self.time_given:
            self.deadlines[sid] = self.now + limits.open_timeout
        return stream

    def _maybe_release(self, stream: StreamRecord) -> None:
        if (
            stream.state is not SS.CLOSED
            or not stream.app_closed
            or stream.send_buffered
            or stream.in_ready
            or self.streams.get(stream.sid) is not stream
        ):
            return  # (not in the table any more: the connection ended while a command was running)
        del self.streams[stream.sid]
        self.deadlines.pop(stream.sid, None)
        self._out.window_dirty.pop(stream.sid, None)
        self.budget_used -= stream.window - (self.limits.stream_window or self.limits.initial_window)
        if self.pool is not None:
            self.pool.release(stream)
        self.send_blocked.discard(stream.sid)
        if not stream.local:
            self._grant_stream()

    def _drop_send(self, stream: StreamRecord) -> None:
        """Nothing more goes out on this stream (it was reset or refused; its state says so): forget what is queued."""
        self.send_dropped += stream.send_buffered
        stream.send_buf.clear()
        stream.send_buffered = 0
        stream.head_offset = 0
        stream.fin_pending = stream.rst_pending = False
        if stream.blocked:
            stream.blocked = False
            self.writable.add(stream.sid)

    def _reset(self, stream: StreamRecord, code: ErrorCode | int, reason: str) -> None:
        self.apply(stream, SI.SEND_RST)
        self.deadlines.pop(stream.sid, None)
        self._drop_send(stream)
        self._out.window_dirty.pop(stream.sid, None)
        self._queue_control(F.Reset(stream.sid, int(code), clip(reason)))

    def count_empty(self, what: str) -> None:
        """A frame that changes nothing: fine now and then, an attack in bulk."""
        if not self.empty_bucket.take(self.now):
            raise RemoteProtocolError(f"too many {what} frames that change nothing", ErrorCode.ENHANCE_YOUR_CALM)

    def clear(self) -> None:
        """The connection ended: forget every stream."""
        self.streams.clear()
        self.deadlines.clear()
        self.pending = 0
        self.local_opening = 0
        self.budget_used = 0
        if self.pool is not None:
            self.pool.held = 0
        self.send_blocked.clear()
        self.writable.clear()
        self.max_streams_dirty = False

    # ------------------------------------------------------------------------------------------ stream frames

    def on_data(self, frame: F.Data, events: list[Event]) -> None:
        sid = frame.stream_id
        size = len(frame.payload)
        self.data_received += size
        if not size and not frame.fin:
            raise RemoteProtocolError(f"empty DATA frame without FIN on stream {sid}")
        if size > self.limits.max_frame_payload:  # the decoder admits up to max_ctrl_body, which may be larger
            raise FrameSizeError(f"DATA payload of {size} bytes (limit {self.limits.max_frame_payload})")
        stream = self._lookup(sid, "DATA")
        if stream is None or stream.state is SS.CLOSED:
            self.discarded += size
            return
        self.apply(stream, SI.RECV_DATA)
        if stream.received + size > stream.recv_limit:
            raise FlowControlError(
                f"stream {sid}: peer sent {stream.received + size} bytes, over the window of {stream.recv_limit}"
            )
        stream.received += size
        if size:
            events.append(DataReceived(sid, frame.payload))
        if frame.fin:
            self.apply(stream, SI.RECV_FIN)
            events.append(StreamEnded(sid))
            self._out.window_dirty.pop(sid, None)
            if self.pool is not None:
                self.pool.update(stream, receiving=False)  # the peer sends no more: only the unread bytes count
            self._maybe_release(stream)

    def on_window(self, sid: int, limit: int, events: list[Event]) -> None:
        stream = self._lookup(sid, "WINDOW")
        if stream is None or stream.state is SS.CLOSED:
            return  # a WINDOW racing our RST or FIN: legal, and meaningless now
        if limit <= stream.send_limit:
            self.count_empty("WINDOW")
            return
        stream.send_limit = limit
        events.append(WindowUpdated(sid))
        if stream.blocked:
            stream.blocked = False
            self.writable.add(sid)

    def on_open(self, frame: F.Open, events: list[Event]) -> None:
        sid = frame.stream_id
        if not self._is_peer_sid(sid):
            raise RemoteProtocolError(f"OPEN with stream id {sid} of the wrong parity")
        if sid <= self.highest_peer_sid:
            raise RemoteProtocolError(f"OPEN for stream {sid}, not above the highest so far ({self.highest_peer_sid})")
        if _stream_index(sid) > self.granted:
            raise RemoteProtocolError(
                f"OPEN for stream {sid} beyond the {self.granted} streams allowed so far", ErrorCode.STREAM_LIMIT
            )
        self.highest_peer_sid = sid
        if not self.open_bucket.take(self.now):
            if self.time_given and self.open_flood.refused(self.now):
                rate = self.limits.open_rate.rate
                raise RemoteProtocolError(
                    f"{self.open_flood.count:,} stream opens refused past the rate limit ({rate:g}/s) in "
                    f"{self.limits.open_flood_grace:g} s: disconnecting a flood",
                    ErrorCode.ENHANCE_YOUR_CALM,
                )
            # Refuse the open, keep the session: a burst of legitimate connections must not cut every other one.
            self._refuse_open(sid, ErrorCode.ENHANCE_YOUR_CALM, "too many OPENs: slow down")
            return
        if sid > self.last_peer_sid_allowed:
            self._refuse_open(sid, ErrorCode.REFUSED, "the session is going away")
            return
        if self.pending >= self.limits.accept_backlog:
            self._refuse_open(sid, ErrorCode.REFUSED, "too many streams waiting to be accepted")
            return
        self._new_record(sid, SS.PENDING, local=False)
        self.pending += 1
        events.append(StreamOpened(sid, frame.route, frame.meta))

    def _refuse_open(self, sid: int, code: ErrorCode, reason: str) -> None:
        self._queue_control(F.OpenErr(sid, code, reason))
        self._grant_stream()

    def on_open_answer(self, sid: int, err: F.OpenErr | None, events: list[Event]) -> None:
        stream = self._lookup(sid, "OPEN_ERR" if err else "OPEN_OK")
        if stream is None or stream.state is SS.CLOSED:
            return
        if not stream.local:
            raise RemoteProtocolError(f"{'OPEN_ERR' if err else 'OPEN_OK'} for stream {sid}, which the peer opened")
        self.deadlines.pop(sid, None)
        if err is None:
            self.apply(stream, SI.RECV_OPEN_OK)
            events.append(StreamAccepted(sid))
        else:
            self.apply(stream, SI.RECV_OPEN_ERR)
            self._drop_send(stream)
            events.append(StreamRejected(sid, err.code, err.reason))
            self._maybe_release(stream)

    def on_reset(self, sid: int, code: int, reason: str, events: list[Event]) -> None:
        stream = self._lookup(sid, "RST")
        if stream is None or stream.state is SS.CLOSED:
            return
        if stream.state in PENDING and not self.reset_bucket.take(self.now):
            # Rapid reset (CVE-2023-44487): the peer keeps cancelling opens we are still working on (dialing).
            # Other resets are ordinary closes (a TCP peer that reset, a stream closed with data unread) and
            # cost us nothing to process.
            raise RemoteProtocolError(
                "too many streams reset before they were answered (rapid reset)", ErrorCode.ENHANCE_YOUR_CALM
            )
        self.apply(stream, SI.RECV_RST)
        self.deadlines.pop(sid, None)
        self._drop_send(stream)  # (which also wakes a blocked writer: its next send raises)
        self._out.window_dirty.pop(sid, None)
        events.append(StreamReset(sid, code, reason))
        self._maybe_release(stream)

    def on_goaway(self, last: int, reason: str, events: list[Event]) -> None:
        """The peer's GOAWAY refuses our opens above ``last``."""
        for stream in list(self.streams.values()):
            if stream.local and stream.sid > last and stream.state in OPENING:
                # The GOAWAY answers these opens as an OPEN_ERR(REFUSED) would: the same move in the table.
                self.apply(stream, SI.RECV_OPEN_ERR)
                self.deadlines.pop(stream.sid, None)
                self._drop_send(stream)
                events.append(StreamRejected(stream.sid, ErrorCode.REFUSED, "the peer is going away: " + reason))
                self._maybe_release(stream)

    # ---------------------------------------------------------------------------------------------- commands

    def open(self, frame: F.Open) -> int:
        """Take the next stream id for ``frame`` (built with :attr:`next_sid` and checked) and queue it."""
        sid = self.next_sid
        self.next_sid += 2
        self.local_opened += 1
        self.local_opening += 1
        self._new_record(sid, SS.OPENING, local=True)
        self._queue_control(frame)
        return sid

    def accept(self, stream_id: int) -> None:
        stream = self.get(stream_id)
        self.apply(stream, SI.SEND_OPEN_OK)
        self.deadlines.pop(stream_id, None)
        self._queue_control(F.OpenOk(stream_id))

    def reject(self, stream_id: int, code: ErrorCode | int, reason: str) -> None:
        stream = self.get(stream_id)
        self.apply(stream, SI.SEND_OPEN_ERR)
        self.deadlines.pop(stream_id, None)
        self._queue_control(F.OpenErr(stream_id, int(code), clip(reason)))
        stream.app_closed = True
        self._maybe_release(stream)

    def send_buffered(self) -> int:
        """Stream bytes queued for sending now, summed over the session's streams."""
        return self.send_queued - self._out.data_sent - self.send_dropped

    def _room(self, stream: StreamRecord) -> int:
        """Bytes ``stream`` may queue now; when it is 0 the stream is marked blocked (its writer will be told)."""
        room = min(stream.send_limit - stream.sent, self.limits.max_send_buffer - stream.send_buffered)
        cap = self.limits.session_send_buffer
        if cap is not None and room > 0:
            session_room = cap - self.send_buffered()
            if session_room <= 0:
                self.send_blocked.add(stream.sid)
            # A fair share each, or the writers that come first in every round would always fill the queue.
            share = max(cap // len(self.streams), self.limits.send_quantum) - stream.send_buffered
            room = min(room, session_room, share)
        if room <= 0:
            stream.blocked = True
            return 0
        return room

    def send_credit(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        if stream is None or (stream.state, SI.SEND_DATA) not in TRANSITIONS:
            return 0
        return self._room(stream)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        stream = self.get(stream_id)
        if (stream.state, SI.SEND_DATA) not in TRANSITIONS:
            if stream.state is SS.CLOSED:
                raise LocalProtocolError(f"stream {stream_id} is closed")
            raise LocalProtocolError(
                f"stream {stream_id}: cannot send DATA in state {stream.state.value}"
                + (" after FIN" if stream.local_closed else "")
            )
        take = min(len(data), self._room(stream))
        if take:
            self.send_queued += take
            # bytes are immutable: keep the caller's object when it is taken whole (no copy); copy otherwise.
            stream.send_buf.append(data if type(data) is bytes and take == len(data) else bytes(data[:take]))
            stream.send_buffered += take
            stream.sent += take
            self._out.mark_ready(stream)
        if take < len(data):
            stream.blocked = True
            cap = self.limits.session_send_buffer
            if cap is not None and self.send_buffered() >= cap:
                self.send_blocked.add(stream_id)  # (the session's queue was what was full)
        return take

    def end(self, stream_id: int) -> None:
        stream = self.get(stream_id)
        if stream.local_closed:
            return
        self.apply(stream, SI.SEND_FIN)
        stream.fin_pending = True
        self._out.mark_ready(stream)
        self._maybe_release(stream)

    def acknowledge(self, stream_id: int, size: int, now: float | None) -> None:
        """Credit for consumed bytes; the window grows (auto-tuning) only when the caller passed the time."""
        stream = self.streams.get(stream_id)
        if stream is None or size <= 0:
            return
        if stream.consumed + size > stream.received:
            raise LocalProtocolError(f"stream {stream_id}: acknowledged more bytes than were received")
        stream.consumed += size
        pool = self.pool
        receiving = stream.state in _RECEIVING
        if pool is not None:
            pool.update(stream, receiving)
        grant = self._grant(stream)
        left = stream.recv_limit - stream.consumed
        if not receiving or left > grant // 2:
            return
        floor = self.limits.initial_window
        if stream.recv_limit == floor and left > floor // 2:
            # The first WINDOW of a stream whose target window is above the declared floor (stream_window) waits
            # until half the floor is read, as any WINDOW waits for half a window: a short connection that moves a
            # few bytes never needs one (one frame and one write fewer each way), and a bulk stream, which reads
            # its floor at once, gets it as early as before.
            return
        # An epoch ends only once more than half the window was consumed in it (as quic-go does): a WINDOW goes
        # out every half window, so ending the epoch at every WINDOW would never see more than half consumed.
        epoch_over = stream.epoch_time is None or stream.consumed - stream.epoch_consumed > stream.window // 2
        if now is not None and epoch_over:
            if stream.epoch_time is not None:
                new = next_window(
                    window=stream.window,
                    max_window=self.limits.max_window,
                    budget_left=self.limits.autotune_budget - self.budget_used,
                    consumed_in_epoch=stream.consumed - stream.epoch_consumed,
                    epoch_seconds=now - stream.epoch_time,
                    srtt=self._keepalive.srtt,
                    min_window=self.limits.stream_window or self.limits.initial_window,
                )
                self.budget_used += new - stream.window
                stream.window = new
            stream.epoch_time = now
            stream.epoch_consumed = stream.consumed
            grant = self._grant(stream)
        limit = stream.consumed + grant
        if limit <= stream.recv_limit:
            return  # (the pool is short: the stream keeps what it has, at least the floor, and asks again later)
        stream.recv_limit = limit
        if pool is not None:
            pool.update(stream, receiving)
        self._out.window_dirty[stream.sid] = None

    def _grant(self, stream: StreamRecord) -> int:
        """The receive window to grant ``stream`` now: its (auto-tuned) window, limited by the session's pool."""
        pool = self.pool
        return stream.window if pool is None else pool.grant(stream, stream.window, len(self.streams))

    def close(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.app_closed:
            return
        stream.app_closed = True
        state = stream.state
        if state in PENDING:
            self.apply(stream, SI.SEND_OPEN_ERR)
            self.deadlines.pop(stream_id, None)
            self._queue_control(F.OpenErr(stream_id, ErrorCode.REFUSED, "closed before it was accepted"))
        elif state is SS.OPENING and not stream.sent:
            self._reset(stream, ErrorCode.CANCEL, "closed before it was accepted")
        elif state is not SS.CLOSED:
            if (state, SI.SEND_FIN) in TRANSITIONS:
                self.apply(stream, SI.SEND_FIN)
                stream.fin_pending = True
                self._out.mark_ready(stream)
            if stream.state is not SS.CLOSED:
                # The peer's direction is still open: tell it to stop, after our FIN (like TCP close with unread
                # data). Later data from it is discarded and counted.
                self.apply(stream, SI.SEND_RST)
                self._out.window_dirty.pop(stream_id, None)
                if stream.fin_pending:
                    stream.rst_pending = True  # written right behind the FIN
                else:
                    self._queue_control(F.Reset(stream_id, ErrorCode.STREAM_CLOSED, "stream closed"))
        self._maybe_release(stream)

    def reset(self, stream_id: int, code: ErrorCode | int, reason: str) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.app_closed = True
        if stream.state is not SS.CLOSED:
            self._reset(stream, code, reason)
        self._drop_send(stream)
        self._maybe_release(stream)

    def turn_done(self, stream: StreamRecord) -> None:
        """The scheduler finished a turn of this stream: wake its writer if room appeared, release it if done."""
        if stream.blocked and self.send_credit(stream.sid) > 0:
            stream.blocked = False
            self.writable.add(stream.sid)
        blocked = self.send_blocked
        if blocked and self.send_buffered() <= (self.limits.session_send_buffer or 0) // 2:
            # Half drained: wake every writer the session cap held (together, so none is left behind).
            for sid in blocked:
                other = self.streams.get(sid)
                if other is not None and other.blocked:
                    other.blocked = False
                    self.writable.add(sid)
            blocked.clear()
        self._maybe_release(stream)

    def expire(self, now: float, events: list[Event]) -> None:
        for sid, deadline in list(self.deadlines.items()):
            if deadline > now:
                continue
            # (pop, not del: a control queue overflow may have ended the connection and cleared the table)
            self.deadlines.pop(sid, None)
            stream = self.streams.get(sid)
            if stream is None:
                continue
            reason = f"no answer within {self.limits.open_timeout:g} s"
            if stream.state in OPENING:
                self._reset(stream, ErrorCode.CONNECT_TIMEOUT, reason)
                events.append(StreamRejected(sid, ErrorCode.CONNECT_TIMEOUT, reason))
            elif stream.state in PENDING:
                self.apply(stream, SI.SEND_OPEN_ERR)
                self._queue_control(F.OpenErr(sid, ErrorCode.CONNECT_TIMEOUT, reason))
                events.append(StreamReset(sid, ErrorCode.CONNECT_TIMEOUT, reason, local=True))
            self._maybe_release(stream)
