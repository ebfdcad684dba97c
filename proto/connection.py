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

:class:`Connection` dispatches frames, owns GOAWAY and termination, and keeps the public methods; the work is in
:mod:`.handshake`, :mod:`.streams` (the stream table: stream frames and commands, credit, open timeouts, windows),
:mod:`.scheduler` (what is written next) and :mod:`.control` (CTRL requests, keepalive).

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
from typing import Any

import attrs

from . import frames as F
from .control import Keepalive, Requests
from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    ConnectionTerminated,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    PongReceived,
    ReplyReceived,
    RequestReceived,
    StreamCreditGranted,
)
from .flow import TokenBucket
from .handshake import PROTOCOL_VERSION, Handshake, Step
from .limits import Limits
from .scheduler import Scheduler
from .stream import StreamRecord, StreamState
from .streams import StreamTable, clip

__all__ = ["PROTOCOL_VERSION", "Connection", "ConnectionState", "ConnectionStatistics", "Role"]


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
        # streams and output
        streams: dict[int, StreamRecord] = {}
        self._out = Scheduler(lim, streams)
        self._keepalive = Keepalive()
        self._table = StreamTable(
            streams,
            client=role is Role.CLIENT,
            limits=lim,
            hs=self._hs,
            out=self._out,
            keepalive=self._keepalive,
            queue_control=self._queue_control,
        )
        self._turn_done = self._table.turn_done  # bound once: data_to_send runs often
        self._goaway_sent = False
        self._goaway_received = False
        self._peer_goaway: tuple[int, str] = (ErrorCode.NO_ERROR, "")  # code and reason of its latest GOAWAY
        # control plane
        self._requests = Requests(lim.max_pending_requests)
        # defences
        self._ping_bucket = TokenBucket(lim.ping_rate)
        # statistics
        self._frames_received = 0
        self._bytes_received = 0

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
    def peer_token(self) -> bytes | None:
        """The token the client authenticated with (server side; None without authentication or before it)."""
        return self._hs.matched_token

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
        return self._table.max_streams_dirty or self._out.wants_write

    @property
    def write_due(self) -> bool:
        """:attr:`wants_write`, less raised stream credit the peer does not need yet: that goes out with the next
        write (:meth:`data_to_send` includes it whenever there is one) rather than in a write of its own, so a
        connection that ends does not cost the link a frame and a write (see :attr:`StreamTable.max_streams_urgent
        <.streams.StreamTable.max_streams_urgent>`). A writer that only runs when there is something to send asks
        this."""
        return self._table.max_streams_urgent or self._out.wants_write

    @property
    def streams_available(self) -> int:
        """How many more streams we may open now (the peer's MAX_STREAMS credit minus streams opened)."""
        if self.state is not ConnectionState.OPEN or self._goaway_sent or self._goaway_received:
            return 0
        return self._table.available()

    @property
    def can_open_streams(self) -> bool:
        """False once either side sent GOAWAY or the connection is not open: no new stream will ever fit."""
        return self.state is ConnectionState.OPEN and not (self._goaway_sent or self._goaway_received)

    @property
    def peer_max_frame_payload(self) -> int:
        return self._hs.peer.max_frame_payload

    @property
    def peer_initial_window(self) -> int:
        """What a new stream may send before the peer's first WINDOW (optimistic data included)."""
        return self._hs.peer.initial_window

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The state of a stream in the table, or None once it is released (or never existed)."""
        stream = self._table.streams.get(stream_id)
        return stream.state if stream is not None else None

    def send_credit(self, stream_id: int) -> int:
        """Bytes :meth:`send_data` would accept on this stream right now (0 for an unknown or closed stream)."""
        return self._table.send_credit(stream_id)

    def pop_writable(self) -> set[int]:
        """Streams whose writers found no room before and have room now (more credit or a drained buffer)."""
        table = self._table
        out, table.writable = table.writable, set()
        return out

    def statistics(self) -> ConnectionStatistics:
        table = self._table
        streams = table.streams.values()
        return ConnectionStatistics(
            state=self.state,
            streams=len(streams),
            pending_streams=table.pending,
            local_streams_available=self.streams_available,
            frames_sent=self._out.frames_sent,
            frames_received=self._frames_received,
            bytes_sent=self._out.bytes_sent,
            bytes_received=self._bytes_received,
            data_bytes_sent=self._out.data_sent,
            data_bytes_received=table.data_received,
            discarded_data_bytes=table.discarded,
            buffered_send_bytes=sum(s.send_buffered for s in streams),
            receive_window_total=sum(s.recv_limit - s.consumed for s in streams),
            autotune_budget_used=table.budget_used,
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
            self._close(events, ConnectionTerminated(code, reason or "the peer closed the connection", by_peer=True))
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
                self._table.on_data(frame, events)
            case F.Window(sid, limit):
                self._table.on_window(sid, limit, events)
            case F.Open():
                self._table.on_open(frame, events)
            case F.OpenOk(sid):
                self._table.on_open_answer(sid, None, events)
            case F.OpenErr():
                self._table.on_open_answer(frame.stream_id, frame, events)
            case F.Reset(sid, code, reason):
                self._table.on_reset(sid, code, reason, events)
            case F.Ping(opaque):
                if not self._ping_bucket.take(self._table.now):
                    raise RemoteProtocolError("too many PINGs", ErrorCode.ENHANCE_YOUR_CALM)
                self._out.pong = opaque  # one slot: a newer PING overwrites an unanswered one
            case F.Pong(opaque):
                events.append(PongReceived(opaque, self._keepalive.pong(opaque, self._table.now)))
            case F.GoAway(last, code, reason):
                self._on_goaway(last, code, reason, events)
            case F.MaxStreams(count):
                if count <= self._table.local_credit:
                    self._table.count_empty("MAX_STREAMS")
                else:
                    self._table.local_credit = count
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
            # Raw, ahead of every queue: a GOAWAY (urgent) the application sends right after the handshake must
            # not overtake the WELCOME, nor a close drop it (drop_control keeps raw bytes).
            self._out.raw_out.append(F.encode(reply))
            self._out.frames_sent += 1
        if hs.done:
            self._table.local_credit = hs.peer.max_streams
            self.state = ConnectionState.OPEN
            peer = hs.peer_name if self.role is Role.SERVER else ""
            events.append(HandshakeComplete(peer, hs.session_id, dict(hs.peer_limits), hs.authenticated, hs.token_id))

    def _on_goaway(self, last: int, code: int, reason: str, events: list[Event]) -> None:
        # A later GOAWAY (e.g. an error after a graceful one) is reported too: its code and reason are the news.
        self._goaway_received = True
        self._peer_goaway = (code, reason)
        events.append(GoAwayReceived(last, code, reason))
        self._table.on_goaway(last, reason, events)

    def _goaway_last(self) -> int:
        """The last stream id for a GOAWAY: never above one we already sent (it may only decrease)."""
        return min(self._table.highest_peer_sid, self._table.last_peer_sid_allowed)

    # ---------------------------------------------------------------------------------------------- commands

    def _require_open(self) -> None:
        if self.state is not ConnectionState.OPEN:
            raise LocalProtocolError(f"the connection is {self.state.value}")

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
        frame = F.Open(self._table.next_sid, route, dict(meta or {}))
        # Encoded once, for both checks (what F.check does, on these bytes): it must pass our own decoder, and
        # route and meta may legally add up to ~5 KiB while the peer cuts the connection (FRAME_SIZE) for a header
        # above its max_header, which is not declared: assume it is ours (1 KiB by default).
        raw = F.encode(frame)
        header = F.PREFIX.unpack_from(raw)[0]
        try:
            F.decode_frame(raw[F.PREFIX.size : F.PREFIX.size + header], b"")
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"cannot open stream: {exc.reason}") from None
        if header > self.limits.max_header:
            raise LocalProtocolError(
                f"cannot open stream: OPEN header of {header} bytes (limit {self.limits.max_header}); shorten the meta"
            )
        self._set_now(now)
        return self._table.open(frame)

    def accept_stream(self, stream_id: int) -> None:
        """Answer a peer's OPEN with OPEN_OK; our data may follow."""
        self._table.accept(stream_id)

    def reject_stream(self, stream_id: int, code: ErrorCode | int, reason: str = "") -> None:
        """Answer a peer's OPEN with OPEN_ERR (the stream is released at once)."""
        self._table.reject(stream_id, code, reason)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue stream bytes; returns how many were taken (0 when there is no credit or buffer room).

        The bytes taken are copied. When fewer than ``len(data)`` are taken, the stream is marked blocked and
        appears in :meth:`pop_writable` once room appears (or it is reset).
        """
        return self._table.send_data(stream_id, data)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction: FIN goes out on the last DATA frame, after every byte queued before it."""
        self._table.end(stream_id)

    def acknowledge(self, stream_id: int, size: int, *, now: float | None = None) -> None:
        """The application consumed ``size`` bytes of a stream: return that much credit to the peer.

        A WINDOW goes out once half the window is consumed; the window may grow (auto-tuning) when the reader
        keeps up. Acknowledging a released stream does nothing.
        """
        self._set_now(now)
        self._table.acknowledge(stream_id, size, now)

    def close_stream(self, stream_id: int) -> None:
        """The application is done with the stream (``aclose``): FIN if our direction is open, and a single
        RST(STREAM_CLOSED) after it if the peer's direction is still open (its later data is discarded). The entry
        is released once everything queued for it has been written. Idempotent."""
        self._table.close(stream_id)

    def reset_stream(self, stream_id: int, code: ErrorCode | int = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abort the stream in both directions (RST); unsent data is dropped and the stream released. Idempotent
        on a closed stream."""
        self._table.reset(stream_id, code, reason)

    def _set_now(self, now: float | None) -> None:
        if now is not None:
            self._table.now = now
            self._table.time_given = True

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has work: the earliest open timeout, or None."""
        deadlines = self._table.deadlines
        return min(deadlines.values()) if deadlines else None

    def expire(self, now: float) -> list[Event]:
        """Time out streams whose open was not answered in ``Limits.open_timeout``.

        Ours get RST(CONNECT_TIMEOUT) and a :class:`StreamRejected`; the peer's that we never answered get
        OPEN_ERR(CONNECT_TIMEOUT) and a local :class:`StreamReset`.
        """
        self._set_now(now)
        events: list[Event] = self._take_deferred()
        self._table.expire(now, events)
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
        self._table.last_peer_sid_allowed = self._table.highest_peer_sid
        self._out.urgent.append(F.GoAway(self._goaway_last(), int(code), clip(reason)))

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
            self._out.urgent.append(F.GoAway(self._goaway_last(), int(code), clip(reason)))
        elif self._hs.can_refuse:
            self._out.urgent.append(F.Refuse(int(code), clip(reason)))
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
        if self._table.max_streams_dirty and self.state is ConnectionState.OPEN:
            max_streams = self._table.take_max_streams()
        return self._out.build(
            max_bytes,
            frame_cap=self._hs.peer.max_frame_payload,
            max_streams=max_streams,
            send_data=self.state is not ConnectionState.CLOSED,
            turn_done=self._turn_done,
        )

    # ------------------------------------------------------------------------------------------ termination

    def _fail(self, exc: ProtocolError, events: list[Event]) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        # On an error nothing else goes out: drop queued control and data, keep only the GOAWAY/REFUSE.
        self._out.drop_control()
        self._out.urgent.clear()
        self._out.pong = None
        self._table.max_streams_dirty = False
        if self.state is ConnectionState.OPEN:
            self._out.urgent.append(F.GoAway(self._goaway_last(), exc.code, clip(exc.reason)))
        elif self.role is Role.SERVER:
            self._out.urgent.append(F.Refuse(exc.code, clip(exc.reason)))
        # A client failing in the handshake just closes: a client has no frame to refuse with.
        self._close(events, ConnectionTerminated(exc.code, exc.reason, by_peer=False, error=exc))

    def _close(self, events: list[Event], terminated: ConnectionTerminated) -> None:
        self.state = ConnectionState.CLOSED
        self.terminated = terminated
        # The GOAWAY (or REFUSE) in _urgent is the last frame we write: nothing queued behind it goes out.
        self._out.drop_control()
        self._table.clear()
        self._requests.clear()
        events.append(terminated)
