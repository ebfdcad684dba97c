"""The Trio multiplexer: many byte streams over one transport, driven by the sans-I/O :mod:`proto` connection.

General theory of operation
---------------------------
A :class:`Session` wraps one :class:`proto.Connection` and one transport (any :class:`trio.abc.Stream`: a TCP
``SocketStream``, an ``SSLStream``, a memory stream). :func:`open_session` owns three tasks in one nursery:

* the **reader** awaits nothing but ``transport.receive_some``. It feeds the bytes to the connection and applies
  the resulting events synchronously: data lands in the stream's buffer (bounded by the window we granted, so the
  reader never waits on a consumer and a slow stream never stalls another), and waiters are woken.
* the **writer** is the only task that calls ``transport.send_all`` (which is not cancel-safe). Everyone else
  changes the connection's state synchronously and wakes the writer, which asks
  :meth:`proto.Connection.data_to_send` for the next batch at the last moment, so priorities are real: control
  frames first, then stream data by round robin. A write that makes no progress for ``write_timeout`` kills the
  whole session (never one frame: the link is either whole or gone).
* the **timer** pings when the link has been idle for ``keepalive_idle`` and declares the peer dead after
  ``keepalive_timeout`` without a single inbound byte (any byte counts, so a busy peer with a late PONG lives);
  it also expires unanswered stream opens.

:class:`~trio_tunnel.stream.MuxStream` (in :mod:`trio_tunnel.stream`, with its own theory of operation) is the
application's end of one stream. The session and its streams talk through a small internal interface: the
session's ``stream_*`` methods (the stream changing the connection's state) and the stream's ``on_*`` hooks (the
reader, writer and timer reporting the connection's events); neither touches the other's fields.

One scheduler pass per hop
--------------------------
A byte crossing a hop used to cost two Trio scheduler passes: the task that read it woke the task that writes, which
wrote in the next pass. Now, when the destination has no backlog, the task that read the bytes writes them itself
with a non-blocking send (a :class:`~trio_tunnel.sink.Sink`: ``send_nowait`` never waits and never raises), and only
what the destination does not take goes to the task that owns the waiting:

* **into the link** (:meth:`Session._kick`): whoever changes the connection's state (a splice's copy task in
  ``MuxStream.send_all``, the reader after its batch, an opener, a reply) runs one writer batch synchronously
  (:meth:`Session._write_now`) if the writer is idle: not inside its loop (``_writing``) and no *tail* (bytes a
  synchronous write could not put on the wire). What the link does not take becomes the tail and the writer is
  woken; it sends the tail before asking the connection for anything else. A second batch is the writer's too.
  At most one such write per scheduler pass (passes are counted by a Trio instrument): when a second one is wanted
  in the same pass, many streams are busy at once, and the writer's one batch per pass (one ``sendmsg``, one TLS
  record for all of them) is cheaper than a write each, so the writer takes over until a pass goes by without a
  kick joining its batch. A lone message (the latency-bound case) still crosses in one pass.
* **out of the link** (``MuxStream.set_sink``, used by :mod:`trio_tunnel.relay`): a stream's bytes that arrive while
  its splice task sleeps in ``receive_some`` on an empty buffer are written by the reader, after the whole batch of
  events is applied (one ``sendmsg`` for all of a batch's frames), straight into the socket the splice would have
  written them to; the task is woken only for what the socket did not take, or for EOF, a reset or an error.

Why the invariants still hold:

* *One writer owns the link.* The link is written by one synchronous call at a time (Trio runs one task at a time
  and ``_write_now`` has no checkpoint), and only while the writer is not between its own ``send_all`` calls and no
  tail is waiting; the writer owns every wait for the link and every byte not yet on it, so a write that must wait
  (and ``write_timeout``, and the ``send_all`` that is not cancel-safe) is still only ever the writer's.
* *Ordering.* Bytes go on the link in the order the connection hands them out: a synchronous write happens only
  when nothing handed out earlier is unsent (no tail, writer idle), and its unsent rest is the next thing the
  writer sends. Out of the link, the reader writes only when the stream's buffer held nothing before this batch
  and the destination's one sender (the sleeping splice task) is not sending; the rest stays in the buffer, ahead
  of anything later, for that task.
* *Flow control.* Unchanged: the connection hands out only what credit allows; bytes written out of the link are
  acknowledged as consumed exactly when they are written (as ``receive_some`` would), bytes left in the buffer when
  the task takes them. Nothing is buffered anywhere new: a tail is part of a batch the writer would hold anyway.
* *Fairness between streams.* Who writes does not decide what is written: every batch, synchronous or the writer's,
  is the connection's scheduler's choice (control first, then round robin over all streams with data), at most
  ``write_batch`` bytes. A busy stream's task that writes a batch writes the other streams' data in it too.
  Fairness holds only over the bytes still in the connection's queues: what the kernel holds is first in, first
  out. So a session of the CLI (``SessionConfig.fit_send_buffer``) sizes its link's send buffer from the smallest RTT
  sample (:func:`~trio_tunnel.tcp.fit_send_buffer`: small on a short link, autotuned on a long one) and the
  receive-window auto-tuning halves windows far beyond a stream's pace (:func:`proto.flow.next_window`): a bulk
  stream's backlog then waits here, where a small frame of another stream goes ahead of it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, final

import trio
from trio_tunnel import proto
from trio_tunnel.proto import ErrorCode, Role
from trio_tunnel.proto import events as ev

from .errors import HandshakeError, RequestError, SessionClosedError, StreamOpenError, with_auth_advice
from .session_types import Ended, PendingReply, Request, SessionConfig, SessionStatistics
from .sink import Sink
from .stream import NO_META, MuxStream
from .tcp import SendBufferFit, TcpStream
from .tls import TlsStream

__all__ = [
    "MuxStream",
    "Request",
    "Role",
    "Session",
    "SessionConfig",
    "SessionStatistics",
    "open_session",
    "unwrap_group",
]

logger: Final = logging.getLogger(__name__)


@final
class _Passes(trio.abc.Instrument):
    """Counts Trio's scheduler passes (one ``before_io_wait`` per pass); nothing else. A session writes into its
    link from the calling task at most once per pass: the next write of the same pass goes to the writer, whose
    one batch, a pass later, then takes every frame queued meanwhile (many streams busy at once: one write for all,
    not one each)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


_PASSES: Final = trio.lowlevel.RunVar[_Passes]("trio_tunnel_mux_passes")


def _passes() -> _Passes:
    """The run's pass counter (one instrument per Trio run, installed by the first session)."""
    try:
        return _PASSES.get()
    except LookupError:
        passes = _Passes()
        trio.lowlevel.add_instrument(passes)
        _PASSES.set(passes)
        return passes


def unwrap_group(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The single real exception inside a nursery's group (internal tasks never raise), else the group."""
    leaves = [e for e in eg.exceptions if not isinstance(e, trio.Cancelled)] or list(eg.exceptions)
    if len(leaves) == 1:
        leaf = leaves[0]
        return unwrap_group(leaf) if isinstance(leaf, BaseExceptionGroup) else leaf
    return eg


@final
class Session:
    """One multiplexed link. Create it with :func:`open_session`; never directly."""

    def __init__(self, transport: trio.abc.Stream, conn: proto.Connection, config: SessionConfig) -> None:
        self._transport = transport
        self._conn = conn
        self._config = config
        self._streams: dict[int, MuxStream] = {}
        self._accept_queue: deque[MuxStream] = deque()
        self._accept_event = trio.Event()
        self._openers = trio.lowlevel.ParkingLot()  # open_stream calls waiting for stream credit, FIFO
        self._writer_event = trio.Event()
        self._writer_done = trio.Event()
        self._flushed_event = trio.Event()
        self._writing = False
        # One scheduler pass per hop (see the module docstring): the link as a Sink when it is one of ours, the
        # bytes a synchronous write left for the writer, whether the reader is applying a batch of events (then it
        # writes once at the end), and the streams whose bytes go straight into their sink after that batch.
        self._sink: Sink | None = transport if isinstance(transport, TcpStream | TlsStream) else None
        self._send_fit: SendBufferFit | None = None
        """The link's send buffer fitted to its smallest RTT sample (``SessionConfig.fit_send_buffer``)."""
        self._tail: list[bytes | memoryview] | None = None
        self._dispatching = False
        self._deliveries: list[MuxStream] = []
        self._passes = _passes()
        self._written_in_pass = -1  # the pass in which a task other than the writer last wrote into the link
        self._busy_through = -1  # until this pass, writes go to the writer (several were wanted in one pass)
        self._timer_event = trio.Event()
        self._closed_event = trio.Event()
        self._handshake_done = trio.Event()
        self._requests: deque[Request] = deque()
        self._request_event = trio.Event()
        self._replies: dict[int, PendingReply] = {}
        self._request_slots = trio.Semaphore(conn.limits.max_pending_requests)
        self._dead: Ended | None = None
        self._terminating = False
        self._going_away: tuple[ErrorCode, str] | None = None
        """Code and reason of our first GOAWAY: the final one repeats them, so the peer learns why it ended."""
        self._last_rx = trio.current_time()
        self._ping_sent = False
        self._silent = False
        self._timer_wake_at = 0.0
        self._rx_waiter: trio.Event | None = None
        """Set by the reader on the next inbound bytes (for :meth:`probe`)."""
        self.peer_name = ""
        self.session_id = ""
        self.authenticated = False
        self.token_id = ""
        """Server side: which token the client proved (a digest; see proto's HandshakeComplete.token_id)."""
        self.send_stalls = 0
        """Times a stream's ``send_all`` waited for credit (counted by the stream, once per wait, not per byte)."""

    def __repr__(self) -> str:
        return f"<Session {self.session_id or '(handshake)'} {self._conn.role.value} peer={self.peer_name!r}>"

    # ------------------------------------------------------------------------------------------------ public

    @property
    def closed(self) -> bool:
        """True once the session is over (closed locally, by the peer, or lost)."""
        return self._dead is not None

    @property
    def peer_token(self) -> bytes | None:
        """Server side: the token this client authenticated with (None without authentication), so that a reload
        which removes the token can end exactly the sessions that used it."""
        return self._conn.peer_token

    @property
    def close_reason(self) -> str:
        return self._dead.reason if self._dead is not None else ""

    @property
    def close_code(self) -> int | None:
        """The :class:`~trio_tunnel.proto.ErrorCode` the session ended with (the peer's GOAWAY code, if it sent one)."""
        return self._dead.code if self._dead is not None else None

    async def wait_closed(self) -> None:
        """Return when the session is over."""
        await self._closed_event.wait()

    @property
    def going_away(self) -> bool:
        """True once either side sent GOAWAY (or the session is over)."""
        return not self._conn.can_open_streams

    async def probe(self) -> None:
        """Send a PING and return when the peer next shows it is alive: any inbound byte counts (a busy peer's PONG
        may queue behind its data). The caller bounds the wait with a cancel scope.

        Raises:
            SessionClosedError: the session is (or gets) over.
        """
        self._check_alive()
        if self._rx_waiter is None:
            self._rx_waiter = trio.Event()
        waiter = self._rx_waiter
        self._conn.ping(now=trio.current_time())
        self._wake_writer()
        await waiter.wait()
        self._check_alive()

    async def open_stream(
        self,
        route: str,
        meta: Mapping[str, str | int | bool | None] | None = None,
        *,
        wait_accepted: bool = True,
        first: bytes = b"",
    ) -> MuxStream:
        """Open a stream to ``route`` on the peer.

        Waits for stream credit if the peer's MAX_STREAMS is used up. With ``wait_accepted`` (the default) it also
        waits for the peer's OPEN_OK; otherwise the stream is returned at once and data may be sent optimistically
        (a refusal then surfaces as ``BrokenResourceError`` from the stream, caused by :class:`StreamOpenError`).
        ``first`` is the stream's first bytes, sent right behind the OPEN in the same write (as ``send_all`` would,
        one write and one frame batch earlier); keep it within :attr:`open_room` or the rest waits for credit here.

        Raises:
            StreamOpenError: the peer refused (``retryable`` tells whether the peer never processed it, e.g. it is
                going away), did not answer within ``limits.open_timeout``, or had no room for another stream
                (stream credit or accept backlog) within that time (STREAM_LIMIT).
            SessionClosedError: the session is over.
        """
        give_up_at: float | None = None
        while True:
            self._check_alive()
            if not self._conn.can_open_streams:
                raise StreamOpenError(ErrorCode.REFUSED, "the session is going away")
            if self._conn.streams_available > 0:
                break
            # Waiting for credit counts against the open timeout too: a visitor is not held forever by a peer
            # that never returns credit.
            timeout = self._conn.limits.open_timeout
            if give_up_at is None:
                give_up_at = trio.current_time() + timeout
            # Parked in order; _credit_changed wakes as many as there is room for, not all of them (with hundreds
            # of openers waiting on a shared event, every returned credit woke them all to find one slot).
            with trio.move_on_at(give_up_at) as waiting:
                try:
                    await self._openers.park()
                except BaseException:
                    self._credit_changed()  # we may have been woken for a slot we now will not take: pass it on
                    raise
            if waiting.cancelled_caught:
                raise StreamOpenError(
                    ErrorCode.STREAM_LIMIT,
                    f"no room for another stream within {timeout:g} s (the peer's stream limit or "
                    "accept backlog is full)",
                )
        await trio.lowlevel.checkpoint_if_cancelled()
        sid = self._conn.open_stream(route, meta, now=trio.current_time())
        # Our meta went out with the OPEN; the stream does not keep a copy for its lifetime (``meta`` is what the
        # peer sent on a stream it opened).
        stream = MuxStream(self, sid, route, NO_META, opening=True)
        self._streams[sid] = stream
        taken = self._conn.send_data(sid, first) if first else 0
        self._deadline_armed()
        self._kick()
        logger.debug("%s: opened stream %d to %r", self, sid, route)
        if wait_accepted:
            try:
                await stream.wait_accepted()
            except BaseException:
                stream.reset(ErrorCode.CANCEL, "open cancelled")
                self._credit_changed()  # the slot it held is free again
                raise
        if taken < len(first):  # (beyond the credit or the send buffer: as send_all, wait for room)
            await stream.send_all(memoryview(first)[taken:])
        return stream

    @property
    def open_room(self) -> int:
        """How many bytes ``open_stream(first=...)`` sends right away: the peer's initial stream window."""
        return self._conn.peer_initial_window

    async def accept_stream(self) -> MuxStream:
        """The next stream the peer opened. Answer it with :meth:`MuxStream.accept` (implicit on the first
        ``send_all``) or :meth:`MuxStream.reject`.

        Raises:
            SessionClosedError: the session is over.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while not self._accept_queue:
            self._check_alive()
            if self._accept_event.is_set():
                self._accept_event = trio.Event()
            await self._accept_event.wait()
            waited = True
        # Take it before the scheduling point: a stream reset while we yield may leave the queue (and it must not
        # be lost to a cancellation either, hence the shielded checkpoint). After a wait, which was the call's
        # schedule point, no second one: one scheduler pass fewer per stream answered.
        stream = self._accept_queue.popleft()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return stream

    async def request(self, kind: str, body: Any = None) -> Any:
        """Send a CTRL request and return the peer's reply body.

        Raises:
            RequestError: the peer answered with an error code.
            SessionClosedError: the session is over before the reply came.
        """
        async with self._request_slots:
            self._check_alive()
            req = self._conn.send_request(kind, body)
            pending = PendingReply()
            self._replies[req] = pending
            self._wake_writer()
            try:
                await pending.event.wait()
            finally:
                self._replies.pop(req, None)
            if pending.code is None:  # woken without a reply: the session died
                self._check_alive()
                raise SessionClosedError(ErrorCode.INTERNAL, "no reply")
            if pending.code != ErrorCode.NO_ERROR:
                raise RequestError(pending.code, pending.body)
            return pending.body

    def notify(self, kind: str, body: Any = None) -> None:
        """Send a CTRL notification (no reply)."""
        self._check_alive()
        self._conn.send_request(kind, body, expect_reply=False)
        self._wake_writer()

    async def receive_request(self) -> Request:
        """The next CTRL request (or notification) from the peer.

        Raises:
            SessionClosedError: the session is over.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._requests:
            self._check_alive()
            if self._request_event.is_set():
                self._request_event = trio.Event()
            await self._request_event.wait()
        request = self._requests.popleft()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return request

    def go_away(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Tell the peer to open no more streams; streams already open carry on."""
        if self._dead is None:
            self._conn.go_away(code, reason)
            if self._going_away is None:
                self._going_away = (code, reason)
            self._wake_writer()
            self._credit_changed()

    @property
    def frame_limits(self) -> tuple[int, int]:
        """(ours, the peer's) largest DATA payload: a datagram stream keeps each datagram within one."""
        return self._conn.limits.max_frame_payload, self._conn.peer_max_frame_payload

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            session_id=self.session_id,
            peer_name=self.peer_name,
            streams=len(self._streams),
            pending_accept=len(self._accept_queue),
            rtt=self._conn.srtt,
            connection=self._conn.statistics(),
            send_stalls=self.send_stalls,
        )

    # ------------------------------------------------------------------------------- the stream interface
    # The session's half of the internal interface with MuxStream (see trio_tunnel.stream); not for applications.
    # Each changes the connection's state and wakes the writer when there is something to write; none waits.
    # stream_send and stream_consumed are on the data path: one call each, nothing the connection call would not do.

    def stream_send(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue stream bytes; how many the connection took (0: no credit or buffer room, wait for on_writable)."""
        taken = self._conn.send_data(stream_id, data)
        if taken:
            self._kick()
        return taken

    def stream_send_credit(self, stream_id: int) -> int:
        """Bytes :meth:`stream_send` would take right now."""
        return self._conn.send_credit(stream_id)

    def stream_consumed(self, stream_id: int, size: int) -> None:
        """The application took ``size`` buffered bytes: return that much credit to the peer."""
        conn = self._conn
        conn.acknowledge(stream_id, size, now=trio.current_time())
        if conn.write_due:
            self._kick()

    def stream_accept(self, stream_id: int) -> None:
        """OPEN_OK for a stream the peer opened."""
        self._conn.accept_stream(stream_id)
        self._kick()

    def stream_reject(self, stream_id: int, code: ErrorCode | int, reason: str) -> None:
        """OPEN_ERR for a stream the peer opened."""
        self._conn.reject_stream(stream_id, code, reason)
        self._kick()

    def stream_end(self, stream_id: int) -> None:
        """FIN after every byte queued so far."""
        self._conn.end_stream(stream_id)
        self._kick()

    def stream_close(self, stream_id: int) -> None:
        """The application is done with the stream: FIN (and RST if the peer still sends), or, for a stream the
        peer already ended with an error, only the release of its table entry (no frame, no writer pass)."""
        conn = self._conn
        conn.close_stream(stream_id)
        if conn.write_due:
            self._kick()

    def stream_reset(self, stream_id: int, code: ErrorCode | int, reason: str) -> None:
        """RST: abort both directions, drop unsent data."""
        self._conn.reset_stream(stream_id, code, reason)
        self._kick()

    def stream_deliver(self, stream: MuxStream) -> None:
        """Bytes arrived for a stream whose receiver waits with a sink: call its ``on_deliver`` once the reader has
        applied the whole batch (one write for all of the batch's frames, not one per frame)."""
        self._deliveries.append(stream)

    def stream_forget(self, stream_id: int) -> None:
        """The stream object is closed: events for its id no longer reach it."""
        self._streams.pop(stream_id, None)

    def stream_withdraw(self, stream: MuxStream) -> bool:
        """Take a stream the application has not accepted yet off the accept queue (the peer reset it first);
        False if the application already has it."""
        queue = self._accept_queue
        if stream in queue:
            queue.remove(stream)
            return True
        return False

    def _send_reply(self, request_id: int, code: ErrorCode | int, body: Any) -> None:
        """Answer a CTRL request (see :class:`Request`); nothing once the session is over."""
        if self._dead is None:
            self._conn.send_reply(request_id, body, code)
            self._kick()

    # ------------------------------------------------------------------------------------------------ tasks

    def _credit_changed(self) -> None:
        """Stream credit or the peer's backlog may have room now (or the session can no longer open streams):
        wake the waiting openers that can proceed."""
        openers = self._openers
        if not openers:
            return
        if self._dead is not None or not self._conn.can_open_streams:
            openers.unpark_all()  # each raises its reason
        elif (room := self._conn.streams_available) > 0:
            openers.unpark(count=room)

    def _wake_writer(self) -> None:
        self._writer_event.set()

    def _kick(self) -> None:
        """There is something to write: write it now from this task if the writer is idle (one scheduler pass per
        hop), else wake the writer. During the reader's batch, nothing: the reader writes once after it."""
        if self._dispatching:
            return  # the reader writes once after its batch
        now = self._passes.count
        if self._writer_event.is_set():
            self._busy_through = now + 1  # a woken writer's next batch takes this too; stay with it a while
            return
        sink = self._sink
        if (
            sink is None
            or self._writing
            or self._tail is not None
            or self._dead is not None
            or now <= self._busy_through
        ):
            self._writer_event.set()
        elif self._written_in_pass == now:
            # A second write in one pass: many streams are busy at once. The writer batches them (one write, one
            # TLS record for all) until a pass goes by with at most one.
            self._busy_through = now + 1
            self._writer_event.set()
        else:
            self._written_in_pass = now
            self._write_now(sink)

    def _next_batch(self) -> list[bytes | memoryview]:
        """The connection's next batch of frames (at most ``write_batch`` bytes); the streams whose queued bytes it
        took, making room, are told they may send again."""
        parts = self._conn.data_to_send_parts(self._config.write_batch)
        for sid in self._conn.pop_writable():
            stream = self._streams.get(sid)
            if stream is not None:
                stream.on_writable()
        return parts

    def _write_now(self, sink: Sink) -> None:
        """One writer batch, made and written synchronously by the calling task: what the link does not take now
        becomes the writer's tail, and the writer is woken for it (and for a second batch: those are its job)."""
        conn = self._conn
        parts = self._next_batch()
        if not parts:
            return
        sent = sink.send_nowait(parts)
        for i, part in enumerate(parts):
            size = len(part)
            if sent < size:
                tail = parts[i:]
                if sent:
                    tail[0] = memoryview(part)[sent:]
                self._tail = tail
                self._writer_event.set()
                return
            sent -= size
        if sink.holds_unsent:
            self._tail = []  # the link keeps bytes it must finish itself: the writer's send_all does that
            self._writer_event.set()
        elif conn.wants_write:
            self._writer_event.set()

    def _deadline_armed(self) -> None:
        """An open timeout was armed: wake the timer only if it would otherwise sleep past it."""
        deadline = self._conn.next_deadline()
        if deadline is not None and deadline < self._timer_wake_at:
            self._timer_event.set()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise SessionClosedError(self._dead.code, self._dead.reason)

    async def _handshake(self) -> None:
        self._wake_writer()
        with trio.move_on_after(self._config.handshake_timeout) as scope:
            while not self._handshake_done.is_set() and self._dead is None:
                await self._read_once()
        if self._dead is not None:
            error = HandshakeError(self._dead.code, self._dead.reason)
            error.silent = self._silent
            raise error
        if scope.cancelled_caught:
            self._die(ErrorCode.IDLE_TIMEOUT, f"no handshake within {self._config.handshake_timeout:g} s", send=True)
            raise HandshakeError(ErrorCode.IDLE_TIMEOUT, self.close_reason)

    async def _read_once(self) -> None:
        try:
            data = await self._transport.receive_some(self._config.read_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__ or exc
            self._die(ErrorCode.INTERNAL, f"connection lost ({cause})")
            return
        self._last_rx = now = trio.current_time()
        self._ping_sent = False
        if self._rx_waiter is not None:
            self._rx_waiter.set()
            self._rx_waiter = None
        self._dispatch(self._conn.receive_data(data, now=now))
        if self._conn.write_due:
            self._kick()

    async def _reader(self) -> None:
        while self._dead is None:
            await self._read_once()

    async def _writer(self) -> None:
        conn = self._conn
        # A TcpStream takes the frames as they are (sendmsg), a TlsStream into one SSL_write and one send, both
        # without an extra checkpoint per send; any other stream gets them joined.
        transport = self._transport
        send_parts = transport.send_all_parts if isinstance(transport, TcpStream | TlsStream) else None
        try:
            while True:
                await self._writer_event.wait()
                self._writer_event = trio.Event()
                self._writing = True
                batches = 0
                while True:
                    if self._tail is not None:  # what a synchronous write left (see _write_now) goes first
                        parts, self._tail = self._tail, None
                    else:
                        parts = self._next_batch()
                        if not parts:
                            break
                    batches += 1
                    if batches > 1 and send_parts is not None:
                        # Between batches, let the other tasks run (the reader above all); after the last one the
                        # wait for the next wakeup is the checkpoint, so the send itself need not add a pass.
                        await trio.lowlevel.checkpoint()
                    with trio.move_on_after(self._config.write_timeout) as scope:
                        try:
                            if send_parts is not None:
                                await send_parts(parts, checkpoint=False)
                            else:
                                await transport.send_all(b"".join(parts))
                        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                            reason = f"connection lost while writing ({exc.__cause__ or exc})"
                            await self._last_words()
                            self._die(ErrorCode.INTERNAL, reason)
                            return
                    if scope.cancelled_caught:
                        self._die(
                            ErrorCode.IDLE_TIMEOUT,
                            f"the peer has not read anything for {self._config.write_timeout:g} s",
                        )
                        return
                self._writing = False
                self._flushed_event.set()
                if self._terminating or (self._dead is not None and not conn.wants_write):
                    return
        finally:
            self._writing = False
            self._writer_done.set()
            self._flushed_event.set()  # nothing more will be flushed: do not keep _shutdown waiting

    async def _last_words(self) -> None:
        """A write failed because the peer closed: what it sent before closing (a GOAWAY saying why: "name in use",
        "too many clients", "shutting down") may still be unread. Give the reader up to ``close_timeout`` to reach
        it, so the session ends with the peer's reason rather than a broken pipe."""
        if self._dead is None and self._handshake_done.is_set():
            with trio.move_on_after(self._config.close_timeout):
                await self._closed_event.wait()

    async def _timers(self) -> None:
        cfg = self._config
        while self._dead is None:
            now = trio.current_time()
            deadline = self._conn.next_deadline()
            if deadline is not None and deadline <= now:
                self._dispatch(self._conn.expire(now))
                self._wake_writer()
                continue
            if now >= self._last_rx + cfg.keepalive_timeout:
                self._die(
                    ErrorCode.IDLE_TIMEOUT,
                    f"no data from the peer for {cfg.keepalive_timeout:g} s (keepalive timeout)",
                    send=True,
                )
                return
            if now >= self._last_rx + cfg.keepalive_idle and not self._ping_sent:
                self._ping_sent = True
                self._conn.ping(now=now)
                self._wake_writer()
            wake_at = self._last_rx + (cfg.keepalive_timeout if self._ping_sent else cfg.keepalive_idle)
            if deadline is not None:
                wake_at = min(wake_at, deadline)
            event = self._timer_event = trio.Event()
            self._timer_wake_at = wake_at
            with trio.move_on_at(wake_at):
                await event.wait()

    # ------------------------------------------------------------------------------------------------ events

    def _dispatch(self, events: list[proto.Event]) -> None:
        self._dispatching = True
        try:
            self._dispatch_events(events)
            deliveries = self._deliveries
            if deliveries:
                self._deliveries = []
                for stream in deliveries:
                    stream.on_deliver()
        finally:
            self._dispatching = False

    def _dispatch_events(self, events: list[proto.Event]) -> None:
        streams = self._streams
        for event in events:
            match event:
                case ev.DataReceived(sid, data):
                    stream = streams.get(sid)
                    if stream is not None:
                        stream.on_data(data)
                case ev.WindowUpdated(sid):
                    stream = streams.get(sid)
                    if stream is not None:
                        stream.on_writable()
                case ev.StreamEnded(sid):
                    stream = streams.get(sid)
                    if stream is not None:
                        stream.on_end()
                case ev.StreamOpened(sid, route, meta):
                    # The decoder built this dict for us alone: no copy.
                    stream = MuxStream(self, sid, route, meta if type(meta) is dict else dict(meta), opening=False)
                    streams[sid] = stream
                    self._accept_queue.append(stream)
                    self._accept_event.set()
                    self._deadline_armed()
                case ev.StreamAccepted(sid):
                    self._credit_changed()  # one fewer unanswered open: room in the peer's backlog
                    stream = streams.get(sid)
                    if stream is not None:
                        stream.on_accepted()
                case ev.StreamRejected(sid, code, reason):
                    self._credit_changed()
                    stream = streams.get(sid)
                    if stream is not None:
                        stream.on_rejected(code, reason)
                case ev.StreamReset(sid, code, reason):
                    self._credit_changed()
                    stream = streams.get(sid)
                    if stream is not None:
                        stream.on_reset(code, reason)
                case ev.StreamCreditGranted():
                    self._credit_changed()
                case ev.PongReceived(_, rtt):
                    if rtt is not None and self._config.fit_send_buffer and self._sink is not None:
                        # The RTT samples (the handshake's PING, then keepalives) size the link's kernel send queue.
                        if self._send_fit is None:
                            transport = self._transport
                            assert isinstance(transport, TcpStream | TlsStream)
                            self._send_fit = SendBufferFit(transport.socket)
                        self._send_fit.sample(rtt)
                    if rtt is not None:
                        logger.debug(
                            "%s: rtt %.1f ms (smoothed %.1f ms)", self, rtt * 1e3, (self._conn.srtt or 0) * 1e3
                        )
                case ev.RequestReceived(req, kind, body):
                    self._requests.append(Request(self._send_reply, req, kind, body))
                    self._request_event.set()
                case ev.ReplyReceived(req, code, body):
                    pending = self._replies.get(req)
                    if pending is not None:
                        pending.code, pending.body = code, body
                        pending.event.set()
                case ev.GoAwayReceived(_, code, reason):
                    logger.info(
                        "%s: peer is going away (%s%s)", self, proto.code_name(code), f": {reason}" if reason else ""
                    )
                    self._credit_changed()
                case ev.HandshakeComplete(peer_name, session_id, _, authenticated, token_id):
                    self.peer_name = peer_name or self.peer_name
                    self.session_id = session_id
                    self.authenticated = authenticated
                    self.token_id = token_id
                    self._handshake_done.set()
                    self._conn.ping(now=trio.current_time())  # a first RTT sample for window auto-tuning
                    self._ping_sent = False
                case ev.ConnectionTerminated(code, reason, by_peer, error, silent):
                    self._silent = silent
                    reason = with_auth_advice(code, reason, by_peer=by_peer, error=error)
                    if by_peer:
                        self._die(code, reason if reason else "the peer closed the connection")
                    else:
                        if not silent:
                            # During the handshake the caller reports the failure (HandshakeError); after it,
                            # the peer misbehaved and this is the only word of it.
                            level = logging.WARNING if self._handshake_done.is_set() else logging.DEBUG
                            logger.log(level, "%s: protocol error, closing: %s", self, error or reason)
                        self._die(code, reason, send=True)

    def _die(self, code: int, reason: str, *, send: bool = False) -> None:
        """The session is over: wake every waiter. With ``send``, the final GOAWAY/REFUSE is flushed first."""
        if self._dead is not None:
            return
        self._dead = Ended(code, reason)
        if send:
            self._conn.close(code, reason)
        self._terminating = True
        self._wake_writer()
        for stream in list(self._streams.values()):
            stream.on_session_lost(code, reason)
        self._streams.clear()
        self._accept_queue.clear()  # never seen by the application: nobody else holds them
        self._requests.clear()
        self._accept_event.set()
        self._credit_changed()
        self._request_event.set()
        self._timer_event.set()
        if self._rx_waiter is not None:
            self._rx_waiter.set()
        for pending in self._replies.values():
            pending.event.set()
        self._closed_event.set()
        # A failed handshake is reported once, by the caller (HandshakeError); here only at DEBUG.
        quiet = code in (ErrorCode.NO_ERROR, ErrorCode.SHUTTING_DOWN) or not self._handshake_done.is_set()
        level = logging.DEBUG if quiet else logging.INFO
        logger.log(level, "%s: closed: %s (%s)", self, reason, proto.code_name(code))

    async def _shutdown(self, code: ErrorCode, reason: str) -> None:
        """Close the session: flush what is queued (stream data, FINs), then a final GOAWAY, all within
        ``close_timeout`` (shielded: it runs even when the caller is being cancelled)."""
        with trio.move_on_after(self._config.close_timeout, shield=True):
            while (
                self._dead is None
                and (self._conn.wants_write or self._writing or self._tail is not None)
                and not self._writer_done.is_set()
            ):
                event = self._flushed_event = trio.Event()
                self._wake_writer()
                await event.wait()
            if self._dead is None:
                self._conn.close(code, reason)
                self._die(code, reason)
            await self._writer_done.wait()
        if self._dead is None:  # the flush timed out: the peer is not reading
            self._die(code, reason)


@asynccontextmanager
async def open_session(
    transport: trio.abc.Stream,
    *,
    role: Role,
    config: SessionConfig | None = None,
    name: str = "",
    token: bytes | None = None,
    tokens: Sequence[bytes] = (),
    channel_binding: bytes = b"",
) -> AsyncIterator[Session]:
    """Run a session over ``transport`` (which it then owns and closes) for the duration of the block.

    ``channel_binding`` (from :mod:`trio_tunnel.link`) ties the HMAC handshake to the TLS certificate the link runs
    over; both sides must pass what they know of the same certificate, or authentication fails.

    The handshake happens before the block is entered, bounded by ``config.handshake_timeout``. Leaving the block
    closes the session: a final GOAWAY is flushed (for at most ``config.close_timeout``), then the transport is
    closed; streams still open break. When the peer or the link ends the session first, blocked calls raise and
    :meth:`Session.wait_closed` returns; the block itself is not cancelled.

    Raises:
        HandshakeError: the handshake failed (refused, wrong token, timeout, not a trio-tunnel peer).
    """
    config = config if config is not None else SessionConfig()
    conn = proto.Connection(
        role, limits=config.limits, name=name, token=token, tokens=tokens, channel_binding=channel_binding
    )
    session = Session(transport, conn, config)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session._writer)
            try:
                await session._handshake()
            except BaseException:
                await session._shutdown(ErrorCode.PROTOCOL, "handshake failed")
                nursery.cancel_scope.cancel()
                raise
            nursery.start_soon(session._reader)
            nursery.start_soon(session._timers)
            try:
                yield session
            finally:
                await session._shutdown(*session._going_away or (ErrorCode.NO_ERROR, "session closed"))
                nursery.cancel_scope.cancel(reason="session closed")
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None
    finally:
        await trio.aclose_forcefully(transport)
