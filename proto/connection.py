"""The connection state machine: handshake, streams, flow control, scheduling and defences. Sans-I/O.

General theory of operation
---------------------------
A :class:`Connection` is one end of the single TCP link between a trio-tunnel client and server. It never does
I/O and never reads a clock. The caller (``tunnel/mux.py``) does three things with it:

* feeds it every byte read from the transport with :meth:`Connection.receive_data` and acts on the returned
  events (an empty ``bytes`` means the transport reached EOF);
* calls command methods as the application acts: :meth:`open_stream`, :meth:`send_data`, :meth:`end_stream`,
  :meth:`acknowledge` (the application consumed bytes: return credit), :meth:`close_stream`,
  :meth:`reset_stream`, :meth:`ping`, :meth:`go_away`, :meth:`send_request`...; these only change state and queue
  frames, synchronously;
* asks :meth:`data_to_send` for the next bytes to write whenever the transport can take them. This is where
  scheduling happens, at the last moment: control frames first (PONG, WINDOW, GOAWAY, then OPEN/OPEN_OK/RST/
  CTRL/PING/MAX_STREAMS in order), then stream data by deficit round robin, a small quantum per stream per turn,
  so a bulk stream cannot starve an interactive one. FIN rides on a stream's last DATA frame, so it can never
  overtake queued data.

Memory is bounded everywhere. Each stream's receive buffer (held by the caller) is bounded by the window we
granted, and a peer that overruns a window ends the connection with FLOW_CONTROL. Each stream's send buffer is
bounded by the peer's credit and by ``Limits.max_send_buffer``. Window auto-tuning grows a stream's window only
from a per-connection budget that returns when the stream is released. Control queues are coalesced (one PONG
slot, one pending WINDOW per stream, one MAX_STREAMS) and capped.

Time is passed in: methods that need it take ``now`` (seconds, any monotonic origin). Without it, rate limits do
not refill, RTT is not measured and open timeouts are not armed, which is what synchronous tests usually want.

Errors by the peer never raise out of :meth:`receive_data`: the connection queues a GOAWAY (or REFUSE during the
handshake) with a code and a readable reason, moves to CLOSED and reports :class:`ConnectionTerminated`. Misuse
by the caller raises :class:`LocalProtocolError` at once.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs

from . import frames as F
from .control import Keepalive, Requests
from .errors import (
    ErrorCode,
    FlowControlError,
    FrameSizeError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from .events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    PongReceived,
    ReplyReceived,
    RequestReceived,
    StreamAccepted,
    StreamCreditGranted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    WindowUpdated,
)
from .flow import TokenBucket, next_window
from .handshake import PROTOCOL_VERSION, Handshake, Step
from .limits import Limits
from .scheduler import Scheduler
from .stream import TRANSITIONS, StreamInput, StreamRecord, StreamState

__all__ = ["PROTOCOL_VERSION", "Connection", "ConnectionState", "ConnectionStatistics", "Role"]

SI = StreamInput
SS = StreamState
_OPENING: Final = frozenset({SS.OPENING, SS.OPENING_LOCAL_CLOSED})
_PENDING: Final = frozenset({SS.PENDING, SS.PENDING_REMOTE_CLOSED})


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class ConnectionState(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


@attrs.frozen
class ConnectionStatistics:
    """A snapshot of one connection's counters (all since the connection began)."""

    state: ConnectionState
    streams: int
    """Entries in the stream table (open, half-closed, or closed but not yet released)."""
    pending_streams: int
    """Peer-opened streams not yet answered (the accept backlog, dials in progress included)."""
    local_streams_available: int
    """Streams we may still open under the peer's MAX_STREAMS credit."""
    frames_sent: int
    frames_received: int
    bytes_sent: int
    bytes_received: int
    data_bytes_sent: int
    data_bytes_received: int
    discarded_data_bytes: int
    """DATA for streams that were already closed: counted, then dropped."""
    buffered_send_bytes: int
    """Stream bytes accepted by :meth:`Connection.send_data` and not yet framed."""
    receive_window_total: int
    """Sum over streams of credit we granted and the application has not consumed (bounds receive memory)."""
    autotune_budget_used: int
    srtt: float | None


def _stream_index(sid: int) -> int:
    """1 for the first stream of either side (1 or 2), 2 for the second (3 or 4), ..."""
    return (sid + 1) // 2


class Connection:
    """One end of a trio-tunnel link (see the module docstring for the theory of operation).

    Args:
        role: CLIENT dials and sends the preamble; SERVER listens.
        limits: what this side enforces and declares; defaults suit the internet.
        name: the client's identity, sent in HELLO (client only).
        token: the client's shared secret; required when the server asks for HMAC auth (client only).
        tokens: the secrets the server accepts, any of them (rotation). Empty means no authentication
            (server only; the caller must have asked for that explicitly).
        random_bytes: source of nonces and session ids (injectable for deterministic tests).
        channel_binding: what both HMAC transcripts bind the session to (docs/PROTOCOL.md 5.1): the SHA-256 of
            the server's TLS certificate as this side knows it, or empty for a plaintext link. At most 255 bytes.
    """

    def __init__(
        self,
        role: Role,
        *,
        limits: Limits | None = None,
        name: str = "",
        token: bytes | None = None,
        tokens: Sequence[bytes] = (),
        random_bytes: Callable[[int], bytes] = os.urandom,
        channel_binding: bytes = b"",
    ) -> None:
        self.role = role
        self.limits = limits if limits is not None else Limits()
        self.name = name
        self._hs = Handshake(
            client=role is Role.CLIENT,
            limits=self.limits,
            name=name,
            token=token,
            tokens=tokens,
            random_bytes=random_bytes,
            binding=channel_binding,
        )
        self.state = ConnectionState.HANDSHAKE
        self.terminated: ConnectionTerminated | None = None
        # A ConnectionTerminated raised where no event list is at hand (a command overflowed the control queue):
        # reported by the next receive_data or expire.
        self._deferred: list[Event] = []
        lim = self.limits
        self._decoder = F.FrameDecoder(lim.max_header, max(lim.max_frame_payload, lim.max_ctrl_body))
        self._now = 0.0
        self._time_given = False
        # streams and output
        self._streams: dict[int, StreamRecord] = {}
        self._out = Scheduler(lim, self._streams)
        self._max_streams_dirty = False
        self._writable: set[int] = set()
        self._next_sid = 1 if role is Role.CLIENT else 2
        self._local_opened = 0
        self._local_credit = 0  # the peer's MAX_STREAMS: its declared max_streams once the handshake is done
        self._highest_peer_sid = 0
        self._granted = lim.max_streams  # cumulative MAX_STREAMS we allow the peer
        self._granted_sent = lim.max_streams
        self._pending = 0  # peer streams not yet answered (PENDING)
        self._local_opening = 0  # our streams not yet answered (OPENING)
        self._deadlines: dict[int, float] = {}
        self._budget_used = 0
        self._goaway_sent = False
        self._goaway_received = False
        self._peer_goaway: tuple[int, str] = (ErrorCode.NO_ERROR, "")  # code and reason of its latest GOAWAY
        self._last_peer_sid_allowed = F.SID_LIMIT  # after our GOAWAY, peer OPENs above this are refused
        # keepalive / rtt
        self._keepalive = Keepalive()
        # control plane
        self._requests = Requests(lim.max_pending_requests)
        # defences
        self._open_bucket = TokenBucket(lim.open_rate)
        self._reset_bucket = TokenBucket(lim.reset_rate)
        self._ping_bucket = TokenBucket(lim.ping_rate)
        self._empty_bucket = TokenBucket(lim.empty_rate)
        # statistics
        self._frames_received = 0
        self._bytes_received = 0
        self._data_received = 0
        self._discarded = 0

        if role is Role.CLIENT:
            preamble, hello = self._hs.start()
            self._out.raw_out.append(preamble)
            self._out.control.append(hello)

    # ------------------------------------------------------------------------------------------------ properties

    @property
    def session_id(self) -> str:
        """The session's id, chosen by the server in WELCOME ("" until then)."""
        return self._hs.session_id

    @property
    def peer_name(self) -> str:
        """The client's name from its HELLO (server side; "" otherwise)."""
        return self._hs.peer_name

    @property
    def peer_limits(self) -> dict[str, int]:
        """The limits map the peer declared, as it sent it ({} until the handshake has it)."""
        return self._hs.peer_limits

    @property
    def srtt(self) -> float | None:
        """Smoothed round-trip time from PING/PONG (seconds), None before the first sample."""
        return self._keepalive.srtt

    @property
    def is_open(self) -> bool:
        return self.state is ConnectionState.OPEN

    @property
    def closed(self) -> bool:
        return self.state is ConnectionState.CLOSED

    @property
    def wants_write(self) -> bool:
        """True when :meth:`data_to_send` has something (cheap; lets the caller skip waking its writer)."""
        return self._max_streams_dirty or self._out.wants_write

    @property
    def streams_available(self) -> int:
        """How many more streams we may open now (the peer's MAX_STREAMS credit minus streams opened)."""
        if self.state is not ConnectionState.OPEN or self._goaway_sent or self._goaway_received:
            return 0
        # Both the peer's stream credit and its accept backlog: we never make it refuse an open for lack of room.
        return max(0, min(self._local_credit - self._local_opened, self._hs.peer.accept_backlog - self._local_opening))

    @property
    def can_open_streams(self) -> bool:
        """False once either side sent GOAWAY or the connection is not open: no new stream will ever fit."""
        return self.state is ConnectionState.OPEN and not (self._goaway_sent or self._goaway_received)

    @property
    def peer_max_frame_payload(self) -> int:
        return self._hs.peer.max_frame_payload

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The state of a stream in the table, or None once it is released (or never existed)."""
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else None

    def send_credit(self, stream_id: int) -> int:
        """Bytes :meth:`send_data` would accept on this stream right now (0 for an unknown or closed stream)."""
        stream = self._streams.get(stream_id)
        if stream is None or not self._can_send_data(stream):
            return 0
        return max(0, min(stream.send_limit - stream.sent, self.limits.max_send_buffer - stream.send_buffered))

    def pop_writable(self) -> set[int]:
        """Streams whose writers found no room before and have room now (more credit or a drained buffer)."""
        out, self._writable = self._writable, set()
        return out

    def statistics(self) -> ConnectionStatistics:
        streams = self._streams.values()
        return ConnectionStatistics(
            state=self.state,
            streams=len(self._streams),
            pending_streams=self._pending,
            local_streams_available=self.streams_available,
            frames_sent=self._out.frames_sent,
            frames_received=self._frames_received,
            bytes_sent=self._out.bytes_sent,
            bytes_received=self._bytes_received,
            data_bytes_sent=self._out.data_sent,
            data_bytes_received=self._data_received,
            discarded_data_bytes=self._discarded,
            buffered_send_bytes=sum(s.send_buffered for s in streams),
            receive_window_total=sum(s.recv_limit - s.consumed for s in streams),
            autotune_budget_used=self._budget_used,
            srtt=self.srtt,
        )

    # ---------------------------------------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview, *, now: float | None = None) -> list[Event]:
        """Feed bytes read from the transport; ``b""`` means the transport reached EOF.

        Returns the events they complete, in order. Never raises for anything the peer sends: a violation ends
        the connection with a queued GOAWAY/REFUSE and a final :class:`ConnectionTerminated` event.
        """
        self._set_now(now)
        events: list[Event] = self._take_deferred()
        if self.state is ConnectionState.CLOSED:
            return events
        self._bytes_received += len(data)
        if not data:
            # After a GOAWAY the peer's end is expected, and its code and reason say why.
            code, reason = self._peer_goaway if self._goaway_received else (ErrorCode.INTERNAL, "")
            reason = self._hs.closed_early_reason() or reason
            self._terminate_by_peer(events, code, reason or "the peer closed the connection")
            return events
        self._decoder.feed(data)
        try:
            if self._hs.step is Step.AWAIT_PREAMBLE and not self._receive_preamble(events):
                return events
            while not self.closed:
                frame = self._decoder.next_frame()
                if frame is None:
                    break
                self._frames_received += 1
                self._dispatch(frame, events)
        except ProtocolError as exc:
            self._fail(exc, events)
        events += self._take_deferred()
        return events

    def _take_deferred(self) -> list[Event]:
        out, self._deferred = self._deferred, []
        return out

    def _receive_preamble(self, events: list[Event]) -> bool:
        raw = self._decoder.take(F.PREAMBLE_SIZE)
        if raw is None:
            return False
        if not self._hs.receive_preamble(raw):
            self._close(
                events,
                ConnectionTerminated(
                    ErrorCode.PROTOCOL, "not a trio-tunnel client (wrong magic bytes)", by_peer=True, silent=True
                ),
            )
            return False
        return True

    def _dispatch(self, frame: F.Frame, events: list[Event]) -> None:
        if not self._hs.done:
            self._handshake_frame(frame, events)
            return
        match frame:
            case F.Data():
                self._on_data(frame, events)
            case F.Window(sid, limit):
                self._on_window(sid, limit, events)
            case F.Open():
                self._on_open(frame, events)
            case F.OpenOk(sid):
                self._on_open_answer(sid, None, events)
            case F.OpenErr():
                self._on_open_answer(frame.stream_id, frame, events)
            case F.Reset(sid, code, reason):
                self._on_reset(sid, code, reason, events)
            case F.Ping(opaque):
                if not self._ping_bucket.take(self._now):
                    raise RemoteProtocolError("too many PINGs", ErrorCode.ENHANCE_YOUR_CALM)
                self._out.pong = opaque  # one slot: a newer PING overwrites an unanswered one
            case F.Pong(opaque):
                self._on_pong(opaque, events)
            case F.GoAway(last, code, reason):
                self._on_goaway(last, code, reason, events)
            case F.MaxStreams(count):
                if count <= self._local_credit:
                    self._count_empty("MAX_STREAMS")
                else:
                    self._local_credit = count
                    events.append(StreamCreditGranted(self.streams_available))
            case F.Ctrl(req, kind, body):
                if req:
                    self._requests.received(req)
                events.append(RequestReceived(req, kind, body))
            case F.CtrlReply(req, code, body):
                self._requests.replied(req)
                events.append(ReplyReceived(req, code, body))
            case _:
                raise RemoteProtocolError(f"unexpected {type(frame).__name__.upper()} frame after the handshake")

    # --------------------------------------------------------------------------------------------- handshake

    def _handshake_frame(self, frame: F.Frame, events: list[Event]) -> None:
        if isinstance(frame, F.Refuse) and self.role is Role.CLIENT:
            self._close(events, ConnectionTerminated(frame.code, frame.message, by_peer=True))
            return
        hs = self._hs
        reply = hs.receive(frame)
        if reply is not None:
            self._out.control.append(reply)
        if hs.done:
            self._local_credit = hs.peer.max_streams
            self.state = ConnectionState.OPEN
            peer = hs.peer_name if self.role is Role.SERVER else ""
            events.append(HandshakeComplete(peer, hs.session_id, dict(hs.peer_limits), hs.authenticated))

    # ----------------------------------------------------------------------------------------- stream frames

    def _apply(self, stream: StreamRecord, event: StreamInput) -> None:
        old = stream.state
        try:
            new = stream.state = TRANSITIONS[old, event]
        except KeyError:
            message = f"stream {stream.sid}: cannot {event.value} in state {stream.state.value}"
            if event.name.startswith("SEND_"):
                raise LocalProtocolError(message) from None
            raise RemoteProtocolError(message, ErrorCode.PROTOCOL) from None
        self._left_open_handshake(old, new)

    def _left_open_handshake(self, old: StreamState, new: StreamState) -> None:
        """Keep the counts of unanswered opens (ours: OPENING, the peer's: PENDING) in step with the states."""
        if old in _OPENING and new not in _OPENING:
            self._local_opening -= 1
        elif old in _PENDING and new not in _PENDING:
            self._pending -= 1

    def _is_peer_sid(self, sid: int) -> bool:
        return (sid % 2 == 1) == (self.role is Role.SERVER)

    def _lookup(self, sid: int, what: str) -> StreamRecord | None:
        """The stream for a received frame, None if it is closed (ignore), or an error if it was never opened."""
        stream = self._streams.get(sid)
        if stream is not None:
            return stream
        idle = sid > self._highest_peer_sid if self._is_peer_sid(sid) else sid >= self._next_sid
        if idle:
            raise RemoteProtocolError(f"{what} for stream {sid}, which was never opened")
        return None

    def _on_data(self, frame: F.Data, events: list[Event]) -> None:
        sid = frame.stream_id
        size = len(frame.payload)
        self._data_received += size
        if not size and not frame.fin:
            raise RemoteProtocolError(f"empty DATA frame without FIN on stream {sid}")
        if size > self.limits.max_frame_payload:  # the decoder admits up to max_ctrl_body, which may be larger
            raise FrameSizeError(f"DATA payload of {size} bytes (limit {self.limits.max_frame_payload})")
        stream = self._lookup(sid, "DATA")
        if stream is None or stream.state is SS.CLOSED:
            self._discarded += size
            return
        self._apply(stream, SI.RECV_DATA)
        if stream.received + size > stream.recv_limit:
            raise FlowControlError(
                f"stream {sid}: peer sent {stream.received + size} bytes, over the window of {stream.recv_limit}"
            )
        stream.received += size
        if size:
            events.append(DataReceived(sid, frame.payload))
        if frame.fin:
            self._apply(stream, SI.RECV_FIN)
            events.append(StreamEnded(sid))
            self._out.window_dirty.pop(sid, None)
            self._maybe_release(stream)

    def _on_window(self, sid: int, limit: int, events: list[Event]) -> None:
        stream = self._lookup(sid, "WINDOW")
        if stream is None or stream.state is SS.CLOSED:
            return  # a WINDOW racing our RST or FIN: legal, and meaningless now
        if limit <= stream.send_limit:
            self._count_empty("WINDOW")
            return
        stream.send_limit = limit
        events.append(WindowUpdated(sid))
        if stream.blocked:
            stream.blocked = False
            self._writable.add(sid)

    def _on_open(self, frame: F.Open, events: list[Event]) -> None:
        sid = frame.stream_id
        if not self._is_peer_sid(sid):
            raise RemoteProtocolError(f"OPEN with stream id {sid} of the wrong parity")
        if sid <= self._highest_peer_sid:
            raise RemoteProtocolError(f"OPEN for stream {sid}, not above the highest so far ({self._highest_peer_sid})")
        if _stream_index(sid) > self._granted:
            raise RemoteProtocolError(
                f"OPEN for stream {sid} beyond the {self._granted} streams allowed so far", ErrorCode.STREAM_LIMIT
            )
        self._highest_peer_sid = sid
        if not self._open_bucket.take(self._now):
            # Refuse the open, keep the session: a burst of legitimate connections must not cut every other one.
            self._refuse_open(sid, ErrorCode.ENHANCE_YOUR_CALM, "too many OPENs: slow down")
            return
        if sid > self._last_peer_sid_allowed:
            self._refuse_open(sid, ErrorCode.REFUSED, "the session is going away")
            return
        if self._pending >= self.limits.accept_backlog:
            self._refuse_open(sid, ErrorCode.REFUSED, "too many streams waiting to be accepted")
            return
        window = self.limits.initial_window
        stream = StreamRecord(
            sid,
            SS.PENDING,
            local=False,
            send_limit=self._hs.peer.initial_window,
            window=window,
            recv_limit=window,
            epoch_time=self._time(),
        )
        self._streams[sid] = stream
        self._pending += 1
        self._arm_deadline(sid)
        events.append(StreamOpened(sid, frame.route, frame.meta))

    def _refuse_open(self, sid: int, code: ErrorCode, reason: str) -> None:
        self._queue_control(F.OpenErr(sid, code, reason))
        self._grant_stream()

    def _on_open_answer(self, sid: int, err: F.OpenErr | None, events: list[Event]) -> None:
        stream = self._lookup(sid, "OPEN_ERR" if err else "OPEN_OK")
        if stream is None or stream.state is SS.CLOSED:
            return
        if not stream.local:
            raise RemoteProtocolError(f"{'OPEN_ERR' if err else 'OPEN_OK'} for stream {sid}, which the peer opened")
        self._deadlines.pop(sid, None)
        if err is None:
            self._apply(stream, SI.RECV_OPEN_OK)
            events.append(StreamAccepted(sid))
        else:
            self._apply(stream, SI.RECV_OPEN_ERR)
            self._drop_send(stream)
            events.append(StreamRejected(sid, err.code, err.reason))
            self._maybe_release(stream)

    def _on_reset(self, sid: int, code: int, reason: str, events: list[Event]) -> None:
        stream = self._lookup(sid, "RST")
        if stream is None or stream.state is SS.CLOSED:
            return
        if stream.state in _PENDING and not self._reset_bucket.take(self._now):
            # Rapid reset (CVE-2023-44487): the peer keeps cancelling opens we are still working on (dialing).
            # Other resets are ordinary closes (a TCP peer that reset, a stream closed with data unread) and
            # cost us nothing to process.
            raise RemoteProtocolError(
                "too many streams reset before they were answered (rapid reset)", ErrorCode.ENHANCE_YOUR_CALM
            )
        self._apply(stream, SI.RECV_RST)
        self._deadlines.pop(sid, None)
        self._drop_send(stream)
        self._out.window_dirty.pop(sid, None)
        if stream.blocked:
            stream.blocked = False
            self._writable.add(sid)
        events.append(StreamReset(sid, code, reason))
        self._maybe_release(stream)

    def _on_pong(self, opaque: int, events: list[Event]) -> None:
        events.append(PongReceived(opaque, self._keepalive.pong(opaque, self._now)))

    def _on_goaway(self, last: int, code: int, reason: str, events: list[Event]) -> None:
        # A later GOAWAY (e.g. an error after a graceful one) is reported too: its code and reason are the news.
        self._goaway_received = True
        self._peer_goaway = (code, reason)
        events.append(GoAwayReceived(last, code, reason))
        for stream in list(self._streams.values()):
            if stream.local and stream.sid > last and stream.state in _OPENING:
                # The GOAWAY answers these opens as an OPEN_ERR(REFUSED) would: the same move in the table.
                self._apply(stream, SI.RECV_OPEN_ERR)
                self._deadlines.pop(stream.sid, None)
                self._drop_send(stream)
                events.append(StreamRejected(stream.sid, ErrorCode.REFUSED, "the peer is going away: " + reason))
                self._maybe_release(stream)

    def _goaway_last(self) -> int:
        """The last stream id for a GOAWAY: never above one we already sent (it may only decrease)."""
        return min(self._highest_peer_sid, self._last_peer_sid_allowed)

    def _count_empty(self, what: str) -> None:
        if not self._empty_bucket.take(self._now):
            raise RemoteProtocolError(f"too many {what} frames that change nothing", ErrorCode.ENHANCE_YOUR_CALM)

    # ---------------------------------------------------------------------------------------------- commands

    def _require_open(self) -> None:
        if self.state is not ConnectionState.OPEN:
            raise LocalProtocolError(f"the connection is {self.state.value}")

    def _get(self, stream_id: int) -> StreamRecord:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open (released or never opened)")
        return stream

    def open_stream(self, route: str, meta: Mapping[str, Any] | None = None, *, now: float | None = None) -> int:
        """Open a stream towards ``route``; returns its id. Data may be sent at once (optimistically).

        Raises:
            LocalProtocolError: the connection is not open, a GOAWAY was sent or received, or no stream credit is
                left (check :attr:`streams_available` first).
        """
        self._require_open()
        if not self.can_open_streams:
            raise LocalProtocolError("the session is going away: no new streams", ErrorCode.REFUSED)
        if self.streams_available <= 0:
            raise LocalProtocolError("no stream credit left (wait for MAX_STREAMS)", ErrorCode.STREAM_LIMIT)
        frame = F.Open(self._next_sid, route, dict(meta or {}))
        try:
            F.check(frame)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"cannot open stream: {exc.reason}") from None
        # Route and meta may legally add up to ~5 KiB; the peer cuts the connection (FRAME_SIZE) for a header above
        # its max_header, which is not declared: assume it is ours (1 KiB by default).
        header = F.PREFIX.unpack_from(F.encode(frame))[0]
        if header > self.limits.max_header:
            raise LocalProtocolError(
                f"cannot open stream: OPEN header of {header} bytes (limit {self.limits.max_header}); shorten the meta"
            )
        self._set_now(now)
        sid = self._next_sid
        self._next_sid += 2
        self._local_opened += 1
        self._local_opening += 1
        window = self.limits.initial_window
        self._streams[sid] = StreamRecord(
            sid,
            SS.OPENING,
            local=True,
            send_limit=self._hs.peer.initial_window,
            window=window,
            recv_limit=window,
            epoch_time=self._time(),
        )
        self._queue_control(frame)
        self._arm_deadline(sid)
        return sid

    def accept_stream(self, stream_id: int) -> None:
        """Answer a peer's OPEN with OPEN_OK; our data may follow."""
        stream = self._get(stream_id)
        self._apply(stream, SI.SEND_OPEN_OK)
        self._deadlines.pop(stream_id, None)
        self._queue_control(F.OpenOk(stream_id))

    def reject_stream(self, stream_id: int, code: ErrorCode | int, reason: str = "") -> None:
        """Answer a peer's OPEN with OPEN_ERR (the stream is released at once)."""
        stream = self._get(stream_id)
        self._apply(stream, SI.SEND_OPEN_ERR)
        self._deadlines.pop(stream_id, None)
        self._queue_control(F.OpenErr(stream_id, int(code), _clip(reason)))
        stream.app_closed = True
        self._maybe_release(stream)

    def _can_send_data(self, stream: StreamRecord) -> bool:
        return (stream.state, SI.SEND_DATA) in TRANSITIONS

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue stream bytes; returns how many were taken (0 when there is no credit or buffer room).

        The bytes taken are copied. When fewer than ``len(data)`` are taken, the stream is marked blocked and
        appears in :meth:`pop_writable` once room appears (or it is reset).
        """
        stream = self._get(stream_id)
        if not self._can_send_data(stream):
            if stream.state is SS.CLOSED:
                raise LocalProtocolError(f"stream {stream_id} is closed")
            raise LocalProtocolError(
                f"stream {stream_id}: cannot send DATA in state {stream.state.value}"
                + (" after FIN" if stream.local_closed else "")
            )
        room = min(stream.send_limit - stream.sent, self.limits.max_send_buffer - stream.send_buffered)
        take = min(len(data), max(room, 0))
        if take < len(data):
            stream.blocked = True
        if take:
            # bytes are immutable: keep the caller's object when it is taken whole (no copy); copy otherwise.
            stream.send_buf.append(data if type(data) is bytes and take == len(data) else bytes(data[:take]))
            stream.send_buffered += take
            stream.sent += take
            self._out.mark_ready(stream)
        return take

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction: FIN goes out on the last DATA frame, after every byte queued before it."""
        stream = self._get(stream_id)
        if stream.local_closed:
            return
        self._apply(stream, SI.SEND_FIN)
        stream.fin_pending = True
        self._out.mark_ready(stream)
        self._maybe_release(stream)

    def acknowledge(self, stream_id: int, size: int, *, now: float | None = None) -> None:
        """The application consumed ``size`` bytes of a stream: return that much credit to the peer.

        A WINDOW goes out once half the window is consumed; the window may grow (auto-tuning) when the reader
        keeps up. Acknowledging a released stream does nothing.
        """
        self._set_now(now)
        stream = self._streams.get(stream_id)
        if stream is None or size <= 0:
            return
        if stream.consumed + size > stream.received:
            raise LocalProtocolError(f"stream {stream_id}: acknowledged more bytes than were received")
        stream.consumed += size
        self._maybe_window(stream, now)

    def _maybe_window(self, stream: StreamRecord, now: float | None) -> None:
        if stream.state not in (SS.OPEN, SS.HALF_CLOSED_LOCAL, SS.PENDING, SS.OPENING, SS.OPENING_LOCAL_CLOSED):
            return
        if stream.recv_limit - stream.consumed > stream.window // 2:
            return
        # An epoch ends only once more than half the window was consumed in it (as quic-go does): a WINDOW goes
        # out every half window, so ending the epoch at every WINDOW would never see more than half consumed.
        epoch_over = stream.epoch_time is None or stream.consumed - stream.epoch_consumed > stream.window // 2
        if now is not None and epoch_over:
            if stream.epoch_time is not None:
                new = next_window(
                    window=stream.window,
                    max_window=self.limits.max_window,
                    budget_left=self.limits.autotune_budget - self._budget_used,
                    consumed_in_epoch=stream.consumed - stream.epoch_consumed,
                    epoch_seconds=now - stream.epoch_time,
                    srtt=self.srtt,
                )
                self._budget_used += new - stream.window
                stream.window = new
            stream.epoch_time = now
            stream.epoch_consumed = stream.consumed
        stream.recv_limit = stream.consumed + stream.window
        self._out.window_dirty[stream.sid] = None

    def close_stream(self, stream_id: int) -> None:
        """The application is done with the stream (``aclose``): FIN if our direction is open, and a single
        RST(STREAM_CLOSED) after it if the peer's direction is still open (its later data is discarded). The entry
        is released once everything queued for it has been written. Idempotent."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.app_closed:
            return
        stream.app_closed = True
        state = stream.state
        if state in (SS.PENDING, SS.PENDING_REMOTE_CLOSED):
            self._apply(stream, SI.SEND_OPEN_ERR)
            self._deadlines.pop(stream_id, None)
            self._queue_control(F.OpenErr(stream_id, ErrorCode.REFUSED, "closed before it was accepted"))
        elif state is SS.OPENING and not stream.sent:
            self._reset(stream, ErrorCode.CANCEL, "closed before it was accepted")
        elif state is not SS.CLOSED:
            if (state, SI.SEND_FIN) in TRANSITIONS:
                self._apply(stream, SI.SEND_FIN)
                stream.fin_pending = True
                self._out.mark_ready(stream)
            if stream.state is not SS.CLOSED:
                # The peer's direction is still open: tell it to stop, after our FIN (like TCP close with unread
                # data). Later data from it is discarded and counted.
                self._apply(stream, SI.SEND_RST)
                self._out.window_dirty.pop(stream_id, None)
                if stream.fin_pending:
                    stream.rst_pending = True  # written right behind the FIN
                else:
                    self._queue_control(F.Reset(stream_id, ErrorCode.STREAM_CLOSED, "stream closed"))
        self._maybe_release(stream)

    def reset_stream(self, stream_id: int, code: ErrorCode | int = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abort the stream in both directions (RST); unsent data is dropped and the stream released. Idempotent
        on a closed stream."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.app_closed = True
        if stream.state is not SS.CLOSED:
            self._reset(stream, code, reason)
        self._drop_send(stream)
        self._maybe_release(stream)

    def _reset(self, stream: StreamRecord, code: ErrorCode | int, reason: str) -> None:
        self._apply(stream, SI.SEND_RST)
        self._deadlines.pop(stream.sid, None)
        self._drop_send(stream)
        self._out.window_dirty.pop(stream.sid, None)
        self._queue_control(F.Reset(stream.sid, int(code), _clip(reason)))

    def _drop_send(self, stream: StreamRecord) -> None:
        """Nothing more goes out on this stream (it was reset or refused; its state says so): forget what is queued."""
        stream.send_buf.clear()
        stream.send_buffered = 0
        stream.head_offset = 0
        stream.fin_pending = stream.rst_pending = False
        if stream.blocked:
            stream.blocked = False
            self._writable.add(stream.sid)

    def _maybe_release(self, stream: StreamRecord) -> None:
        if (
            stream.state is not SS.CLOSED
            or not stream.app_closed
            or stream.send_buffered
            or stream.in_ready
            or self._streams.get(stream.sid) is not stream
        ):
            return  # (not in the table any more: the connection ended while a command was running)
        del self._streams[stream.sid]
        self._deadlines.pop(stream.sid, None)
        self._out.window_dirty.pop(stream.sid, None)
        self._budget_used -= stream.window - self.limits.initial_window
        if not stream.local:
            self._grant_stream()

    def _grant_stream(self) -> None:
        self._granted += 1
        self._max_streams_dirty = True

    def _set_now(self, now: float | None) -> None:
        if now is not None:
            self._now = now
            self._time_given = True

    def _time(self) -> float | None:
        return self._now if self._time_given else None

    def _arm_deadline(self, sid: int) -> None:
        if self._time_given:
            self._deadlines[sid] = self._now + self.limits.open_timeout

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has work: the earliest open timeout, or None."""
        return min(self._deadlines.values()) if self._deadlines else None

    def expire(self, now: float) -> list[Event]:
        """Time out streams whose open was not answered in ``Limits.open_timeout``.

        Ours get RST(CONNECT_TIMEOUT) and a :class:`StreamRejected`; the peer's that we never answered get
        OPEN_ERR(CONNECT_TIMEOUT) and a local :class:`StreamReset`.
        """
        self._set_now(now)
        events: list[Event] = self._take_deferred()
        for sid, deadline in list(self._deadlines.items()):
            if self.closed:
                break
            if deadline > now:
                continue
            del self._deadlines[sid]
            stream = self._streams.get(sid)
            if stream is None:
                continue
            reason = f"no answer within {self.limits.open_timeout:g} s"
            if stream.state in (SS.OPENING, SS.OPENING_LOCAL_CLOSED):
                self._reset(stream, ErrorCode.CONNECT_TIMEOUT, reason)
                events.append(StreamRejected(sid, ErrorCode.CONNECT_TIMEOUT, reason))
            elif stream.state in (SS.PENDING, SS.PENDING_REMOTE_CLOSED):
                self._apply(stream, SI.SEND_OPEN_ERR)
                self._queue_control(F.OpenErr(sid, ErrorCode.CONNECT_TIMEOUT, reason))
                events.append(StreamReset(sid, ErrorCode.CONNECT_TIMEOUT, reason, local=True))
            self._maybe_release(stream)
        events += self._take_deferred()
        return events

    def ping(self, *, now: float | None = None) -> int:
        """Queue a PING (it replaces an unanswered one for RTT purposes); returns its opaque value."""
        self._require_open()
        self._set_now(now)
        opaque = self._keepalive.ping(now)
        self._queue_control(F.Ping(opaque))
        return opaque

    def go_away(self, code: ErrorCode | int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Tell the peer to open no more streams. Streams already open carry on (drain them, then close)."""
        if self.state is not ConnectionState.OPEN or self._goaway_sent:
            return
        self._goaway_sent = True
        self._last_peer_sid_allowed = self._highest_peer_sid
        self._out.urgent.append(F.GoAway(self._goaway_last(), int(code), _clip(reason)))

    def send_request(self, kind: str, body: Any = None, *, expect_reply: bool = True) -> int:
        """Queue a CTRL request; returns its id (0 for a notification, which gets no reply)."""
        self._require_open()
        if len(kind.encode()) > F.CTRL_KIND_MAX:
            raise LocalProtocolError(f"CTRL kind longer than {F.CTRL_KIND_MAX} bytes")
        req = 0
        if expect_reply:
            req = self._requests.next_id()
        frame = F.Ctrl(req, kind, body)
        self._check_body(frame)  # before the id is taken: a refused body must not use up a request slot
        if req:
            self._requests.sent(req)
        self._queue_control(frame)
        return req

    def send_reply(self, request_id: int, body: Any = None, code: ErrorCode | int = ErrorCode.NO_ERROR) -> None:
        """Answer the peer's CTRL request."""
        self._require_open()
        self._requests.check_answerable(request_id)
        frame = F.CtrlReply(request_id, int(code), body)
        self._check_body(frame)
        self._requests.answered(request_id)
        self._queue_control(frame)

    def _check_body(self, frame: F.Ctrl | F.CtrlReply) -> None:
        size = len(F.encode(frame))
        if size > min(self.limits.max_ctrl_body, self._hs.peer.max_frame_payload) + self.limits.max_header:
            raise LocalProtocolError(f"CTRL body of {size} bytes is too large")
        try:
            F.check(frame)  # e.g. a map with integer keys: the peer's decoder would end the connection
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"cannot send CTRL: {exc.reason}") from None

    def close(self, code: ErrorCode | int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """End the connection now: queue GOAWAY (REFUSE during the handshake, on the server) and stop."""
        if self.state is ConnectionState.CLOSED:
            return
        if self.state is ConnectionState.OPEN:
            self._out.urgent.append(F.GoAway(self._goaway_last(), int(code), _clip(reason)))
        elif self._hs.can_refuse:
            self._out.urgent.append(F.Refuse(int(code), _clip(reason)))
        self._close([], ConnectionTerminated(int(code), reason, by_peer=False))

    # ----------------------------------------------------------------------------------------------- sending

    def _queue_control(self, frame: F.Frame) -> None:
        if len(self._out.control) >= self.limits.max_queued_control:
            self._fail(
                RemoteProtocolError(
                    "the peer is not reading: too many control frames queued", ErrorCode.ENHANCE_YOUR_CALM
                ),
                self._deferred,
            )
            return
        self._out.control.append(frame)

    def data_to_send(self, max_bytes: int = 256 * 1024) -> bytes:
        """The bytes to write next (``b""`` when nothing is pending), at most about ``max_bytes``.

        Control frames come first and are never split; stream data fills the rest by round robin.
        """
        return b"".join(self.data_to_send_parts(max_bytes))

    def data_to_send_parts(self, max_bytes: int = 256 * 1024) -> list[bytes | memoryview]:
        """:meth:`data_to_send` as the list of buffers it would join (empty when nothing is pending), for a writer
        with scatter/gather I/O (``sendmsg``): stream data is not copied once more. The buffers are immutable
        (``bytes`` or views of ``bytes``): they stay valid however long the caller holds them."""
        max_streams = None
        if self._max_streams_dirty and self.state is ConnectionState.OPEN:
            self._max_streams_dirty = False
            if self._granted != self._granted_sent:
                self._granted_sent = max_streams = self._granted
        return self._out.build(
            max_bytes,
            frame_cap=self._hs.peer.max_frame_payload,
            max_streams=max_streams,
            send_data=self.state is not ConnectionState.CLOSED,
            turn_done=self._turn_done,
        )

    def _turn_done(self, stream: StreamRecord) -> None:
        if stream.blocked and self.send_credit(stream.sid) > 0:
            stream.blocked = False
            self._writable.add(stream.sid)
        self._maybe_release(stream)

    # ------------------------------------------------------------------------------------------ termination

    def _fail(self, exc: ProtocolError, events: list[Event]) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        # On an error nothing else goes out: drop queued control and data, keep only the GOAWAY/REFUSE.
        self._out.drop_control()
        self._out.urgent.clear()
        self._out.pong = None
        self._max_streams_dirty = False
        if self.state is ConnectionState.OPEN:
            self._out.urgent.append(F.GoAway(self._goaway_last(), exc.code, _clip(exc.reason)))
        elif self.role is Role.SERVER:
            self._out.urgent.append(F.Refuse(exc.code, _clip(exc.reason)))
        # A client failing in the handshake just closes: a client has no frame to refuse with.
        self._close(events, ConnectionTerminated(exc.code, exc.reason, by_peer=False, error=exc))

    def _terminate_by_peer(self, events: list[Event], code: int, reason: str) -> None:
        self._close(events, ConnectionTerminated(code, reason, by_peer=True))

    def _close(self, events: list[Event], terminated: ConnectionTerminated) -> None:
        self.state = ConnectionState.CLOSED
        self.terminated = terminated
        # The GOAWAY (or REFUSE) in _urgent is the last frame we write: nothing queued behind it goes out.
        self._out.drop_control()
        self._max_streams_dirty = False
        self._streams.clear()
        self._deadlines.clear()
        self._pending = 0
        self._local_opening = 0
        self._budget_used = 0
        self._writable.clear()
        self._requests.clear()
        events.append(terminated)


def _clip(text: str, limit: int = F.REASON_MAX) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."
