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

:class:`MuxStream` is a :class:`trio.abc.HalfCloseableStream`. ``send_all`` hands bytes to the connection as
credit and buffer room allow and waits (on its own event) for more; ``receive_some`` takes from the stream's
buffer and returns credit as it consumes (not when the bytes arrived), so a reader that stops stalls only its own
stream's sender. Every waiter wakes with ``BrokenResourceError`` (peer reset, session lost) or
``ClosedResourceError`` (closed locally) when its stream or session dies.
"""

from __future__ import annotations

import logging
import operator
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, final

import attrs
import trio
from trio_tunnel import proto
from trio_tunnel.proto import ErrorCode, Role
from trio_tunnel.proto import events as ev

from .errors import HandshakeError, RequestError, SessionClosedError, StreamOpenError, StreamResetError
from .tcp import TcpStream

__all__ = ["MuxStream", "Request", "Role", "Session", "SessionConfig", "SessionStatistics", "open_session"]

logger: Final = logging.getLogger(__name__)

KiB: Final = 1024
RECEIVE_SIZE: Final = 256 * KiB
"""What ``MuxStream.receive_some()`` returns at most when not told a size."""


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


@attrs.frozen
class _Dead:
    code: int
    reason: str


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
        self._timer_event = trio.Event()
        self._closed_event = trio.Event()
        self._handshake_done = trio.Event()
        self._requests: deque[Request] = deque()
        self._request_event = trio.Event()
        self._replies: dict[int, _PendingReply] = {}
        self._request_slots = trio.Semaphore(conn.limits.max_pending_requests)
        self._dead: _Dead | None = None
        self._terminating = False
        self._going_away: tuple[ErrorCode, str] | None = None
        """Code and reason of our first GOAWAY: the final one repeats them, so the peer learns why it ended."""
        self._last_rx = trio.current_time()
        self._ping_sent = False
        self._silent = False
        self._timer_wake_at = 0.0
        self.peer_name = ""
        self.session_id = ""
        self.authenticated = False

    def __repr__(self) -> str:
        return f"<Session {self.session_id or '(handshake)'} {self._conn.role.value} peer={self.peer_name!r}>"

    # ------------------------------------------------------------------------------------------------ public

    @property
    def closed(self) -> bool:
        """True once the session is over (closed locally, by the peer, or lost)."""
        return self._dead is not None

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

    async def open_stream(
        self, route: str, meta: Mapping[str, str | int | bool | None] | None = None, *, wait_accepted: bool = True
    ) -> MuxStream:
        """Open a stream to ``route`` on the peer.

        Waits for stream credit if the peer's MAX_STREAMS is used up. With ``wait_accepted`` (the default) it also
        waits for the peer's OPEN_OK; otherwise the stream is returned at once and data may be sent optimistically
        (a refusal then surfaces as ``BrokenResourceError`` from the stream, caused by :class:`StreamOpenError`).

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
        stream = MuxStream(self, sid, route, dict(meta or {}), opening=True)
        self._streams[sid] = stream
        self._deadline_armed()
        self._wake_writer()
        logger.debug("%s: opened stream %d to %r", self, sid, route)
        if wait_accepted:
            try:
                await stream.wait_accepted()
            except BaseException:
                stream.reset(ErrorCode.CANCEL, "open cancelled")
                self._credit_changed()  # the slot it held is free again
                raise
        return stream

    async def accept_stream(self) -> MuxStream:
        """The next stream the peer opened. Answer it with :meth:`MuxStream.accept` (implicit on the first
        ``send_all``) or :meth:`MuxStream.reject`.

        Raises:
            SessionClosedError: the session is over.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._accept_queue:
            self._check_alive()
            if self._accept_event.is_set():
                self._accept_event = trio.Event()
            await self._accept_event.wait()
        # Take it before the scheduling point: a stream reset while we yield may leave the queue (and it must not
        # be lost to a cancellation either, hence the shielded checkpoint).
        stream = self._accept_queue.popleft()
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
            pending = _PendingReply()
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

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            session_id=self.session_id,
            peer_name=self.peer_name,
            streams=len(self._streams),
            pending_accept=len(self._accept_queue),
            rtt=self._conn.srtt,
            connection=self._conn.statistics(),
        )

    # ------------------------------------------------------------------------------- the stream interface
    # The session's half of the internal interface with MuxStream (the stream's half is its ``on_*`` hooks, which
    # the reader and the writer call). Applications never call these. Each one changes the connection's state and
    # wakes the writer when there is something to write; none waits or checkpoints (the stream does that). They
    # take the stream id, which is all the connection needs, and stream_send and stream_consumed are on the data
    # path: keep them one call each, with nothing the direct connection call would not do.

    def stream_send(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue stream bytes; how many the connection took (0: no credit or buffer room, wait for on_writable)."""
        taken = self._conn.send_data(stream_id, data)
        if taken:
            self._writer_event.set()
        return taken

    def stream_send_credit(self, stream_id: int) -> int:
        """Bytes :meth:`stream_send` would take right now."""
        return self._conn.send_credit(stream_id)

    def stream_consumed(self, stream_id: int, size: int) -> None:
        """The application took ``size`` buffered bytes: return that much credit to the peer."""
        conn = self._conn
        conn.acknowledge(stream_id, size, now=trio.current_time())
        if conn.wants_write:
            self._writer_event.set()

    def stream_accept(self, stream_id: int) -> None:
        """OPEN_OK for a stream the peer opened."""
        self._conn.accept_stream(stream_id)
        self._writer_event.set()

    def stream_reject(self, stream_id: int, code: ErrorCode | int, reason: str) -> None:
        """OPEN_ERR for a stream the peer opened."""
        self._conn.reject_stream(stream_id, code, reason)
        self._writer_event.set()

    def stream_end(self, stream_id: int) -> None:
        """FIN after every byte queued so far."""
        self._conn.end_stream(stream_id)
        self._writer_event.set()

    def stream_close(self, stream_id: int) -> None:
        """The application is done with the stream: FIN (and RST if the peer still sends), or, for a stream the
        peer already ended with an error, only the release of its table entry (no frame, no writer pass)."""
        conn = self._conn
        conn.close_stream(stream_id)
        if conn.wants_write:
            self._writer_event.set()

    def stream_reset(self, stream_id: int, code: ErrorCode | int, reason: str) -> None:
        """RST: abort both directions, drop unsent data."""
        self._conn.reset_stream(stream_id, code, reason)
        self._writer_event.set()

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
        self._conn.send_reply(request_id, body, code)
        self._writer_event.set()

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
        self._dispatch(self._conn.receive_data(data, now=now))
        if self._conn.wants_write:
            self._wake_writer()

    async def _reader(self) -> None:
        while self._dead is None:
            await self._read_once()

    async def _writer(self) -> None:
        conn = self._conn
        # A TcpStream takes the frames as they are (sendmsg); any other stream gets them joined.
        transport = self._transport
        send_parts = transport.send_all_parts if isinstance(transport, TcpStream) else None
        try:
            while True:
                await self._writer_event.wait()
                self._writer_event = trio.Event()
                self._writing = True
                batches = 0
                while True:
                    parts = conn.data_to_send_parts(self._config.write_batch)
                    for sid in conn.pop_writable():
                        stream = self._streams.get(sid)
                        if stream is not None:
                            stream.on_writable()
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
                            self._die(ErrorCode.INTERNAL, f"connection lost while writing ({exc.__cause__ or exc})")
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
                    if rtt is not None:
                        logger.debug(
                            "%s: rtt %.1f ms (smoothed %.1f ms)", self, rtt * 1e3, (self._conn.srtt or 0) * 1e3
                        )
                case ev.RequestReceived(req, kind, body):
                    self._requests.append(Request(self, req, kind, body))
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
                case ev.HandshakeComplete(peer_name, session_id, _, authenticated):
                    self.peer_name = peer_name or self.peer_name
                    self.session_id = session_id
                    self.authenticated = authenticated
                    self._handshake_done.set()
                    self._conn.ping(now=trio.current_time())  # a first RTT sample for window auto-tuning
                    self._ping_sent = False
                case ev.ConnectionTerminated(code, reason, by_peer, error, silent):
                    self._silent = silent
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
        self._dead = _Dead(code, reason)
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
        for pending in self._replies.values():
            pending.event.set()
        self._closed_event.set()
        level = logging.DEBUG if code in (ErrorCode.NO_ERROR, ErrorCode.SHUTTING_DOWN) else logging.INFO
        logger.log(level, "%s: closed: %s (%s)", self, reason, proto.code_name(code))

    async def _shutdown(self, code: ErrorCode, reason: str) -> None:
        """Close the session: flush what is queued (stream data, FINs), then a final GOAWAY, all within
        ``close_timeout`` (shielded: it runs even when the caller is being cancelled)."""
        with trio.move_on_after(self._config.close_timeout, shield=True):
            while self._dead is None and (self._conn.wants_write or self._writing) and not self._writer_done.is_set():
                event = self._flushed_event = trio.Event()
                self._wake_writer()
                await event.wait()
            if self._dead is None:
                self._conn.close(code, reason)
                self._die(code, reason)
            await self._writer_done.wait()
        if self._dead is None:  # the flush timed out: the peer is not reading
            self._die(code, reason)


@final
class _Wakeup:
    """Where one task sleeps until a stream's state changes: a :class:`trio.Event` without the set of waiters and
    without the latch. The waiter checks its condition, then sleeps; whoever changes the state calls :meth:`wake`
    (which does nothing when nobody sleeps). Nothing runs between the check and the sleep, so no wakeup is lost.
    Every idle stream has a task asleep on one of these, so it is kept small: one slot, no per-wait objects
    beyond Trio's own."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    def wait(self) -> Awaitable[object]:
        """``await wait()`` sleeps until :meth:`wake` (a checkpoint: raises Cancelled if cancelled meanwhile).

        A plain function returning Trio's awaitable, not a coroutine of its own: one frame fewer held by every
        idle stream."""
        assert self._task is None, "one waiter at a time"
        self._task = trio.lowlevel.current_task()
        return trio.lowlevel.wait_task_rescheduled(self._abort)  # noqa: ASYNC105 (awaited by the caller)

    def _abort(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)


@final
class MuxStream(trio.abc.HalfCloseableStream):
    """One multiplexed byte stream; behaves like a TCP connection (see the module docstring)."""

    # Slots, not a __dict__: one of these per connection, and idle connections are many.
    __slots__ = (
        "_accepted_wakeup",
        "_closed",
        "_eof",
        "_eof_sent",
        "_error",
        "_opening",
        "_pending",
        "_receiving",
        "_recv_buf",
        "_recv_buffered",
        "_recv_offset",
        "_recv_task",
        "_send_wakeup",
        "_sending",
        "_session",
        "meta",
        "route",
        "stream_id",
    )

    def __init__(self, session: Session, stream_id: int, route: str, meta: dict[str, Any], *, opening: bool) -> None:
        self._session = session
        self.stream_id = stream_id
        self.route = route
        self.meta = meta
        self._recv_buf: list[bytes] = []  # few entries; a list is 56 bytes empty, a deque 760
        self._recv_offset = 0
        self._recv_buffered = 0
        self._eof = False
        self._eof_sent = False
        self._closed = False
        self._error: BaseException | None = None  # why sending (and, without EOF, receiving) fails
        self._opening = opening  # we opened it and no answer came yet
        self._pending = not opening  # the peer opened it and we have not answered
        self._recv_task: trio.lowlevel.Task | None = None  # asleep in receive_some until data, EOF or an error
        # Made on first use (most streams never wait for these; every idle one waits to receive):
        self._accepted_wakeup: _Wakeup | None = None  # wait_accepted: until _opening is False or _error is set
        self._send_wakeup: _Wakeup | None = None  # send_all, wait_send_all_might_not_block: until credit or error
        self._receiving = False
        self._sending = False

    def __repr__(self) -> str:
        return f"<MuxStream {self.stream_id} {self.route!r}>"

    # ------------------------------------------------------------------------------------------ open handshake

    async def wait_accepted(self) -> None:
        """Wait until the peer answered our OPEN with OPEN_OK.

        Raises:
            StreamOpenError: refused or timed out.
            SessionClosedError: the session is over first.
        """
        if self._opening and self._error is None:
            await trio.lowlevel.checkpoint_if_cancelled()
            wakeup = self._accepted_wakeup = _Wakeup()
            try:
                while self._opening and self._error is None:
                    await wakeup.wait()
            finally:
                self._accepted_wakeup = None  # answered once: never needed again
        else:
            await trio.lowlevel.checkpoint()
        if self._opening:
            error = self._error
            if isinstance(error, StreamResetError):
                raise StreamOpenError(error.code, error.reason)
            assert error is not None
            raise error

    def accept(self) -> None:
        """Answer the peer's OPEN with OPEN_OK (done implicitly by the first ``send_all``)."""
        if self._pending and self._error is None and not self._closed:
            self._pending = False
            self._session.stream_accept(self.stream_id)

    def reject(self, code: ErrorCode | int, reason: str = "") -> None:
        """Answer the peer's OPEN with OPEN_ERR; the stream is closed."""
        if self._pending and self._error is None and not self._closed:
            self._pending = False
            self._closed = True
            self._session.stream_reject(self.stream_id, code, reason)
            self._session.stream_forget(self.stream_id)

    # ------------------------------------------------------------------------------- the session interface
    # The stream's half of the internal interface with Session: the session's reader, writer and timer call these
    # hooks as the connection reports events (never an application). Each one records the new state and wakes the
    # waiters it concerns; none waits. The stream's other half is the session's ``stream_*`` methods, through
    # which it changes the connection's state.

    def on_data(self, data: bytes) -> None:
        """Bytes arrived (within the window we granted, so the buffer stays bounded)."""
        self._recv_buf.append(data)
        self._recv_buffered += len(data)
        self._wake_recv()

    def on_end(self) -> None:
        """The peer's FIN: receive_some returns b"" once the buffer is drained."""
        self._eof = True
        self._wake_recv()

    def on_writable(self) -> None:
        """Send credit or buffer room appeared (or the stream died): a blocked sender looks again."""
        wakeup = self._send_wakeup
        if wakeup is not None:
            wakeup.wake()

    def on_accepted(self) -> None:
        """The peer's OPEN_OK."""
        self._opening = False
        self._wake_accepted()

    def on_rejected(self, code: int, reason: str) -> None:
        """The peer's OPEN_ERR, or our open timed out."""
        self._error = StreamOpenError(code, reason)
        self._drop_recv()
        self._wake_all()

    def on_reset(self, code: int, reason: str) -> None:
        """The peer's RST. Bytes that came before a FIN stay readable (like TCP); otherwise they are dropped."""
        self._error = StreamResetError(code, reason)
        if not self._eof:
            self._drop_recv()
        self._wake_all()
        if self._pending and not self._eof and self._session.stream_withdraw(self):
            # Reset before the application ever saw it (the opener gave up or it timed out): release it now.
            self._close_now()

    def on_session_lost(self, code: int, reason: str) -> None:
        """The session is over: every waiter fails (after a FIN, buffered bytes stay readable)."""
        if self._error is None:
            self._error = SessionClosedError(code, reason)
        if not self._eof:
            self._drop_recv()
        self._wake_all()

    def _wake_all(self) -> None:
        self._wake_accepted()
        self._wake_recv()
        self.on_writable()

    def _drop_recv(self) -> None:
        self._recv_buf.clear()
        self._recv_buffered = 0
        self._recv_offset = 0

    def _wake_recv(self) -> None:
        # Every idle connection has a task asleep here, so no _Wakeup object: the task in a slot.
        task = self._recv_task
        if task is not None:
            self._recv_task = None
            trio.lowlevel.reschedule(task)

    def _abort_recv(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self._recv_task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake_accepted(self) -> None:
        if self._accepted_wakeup is not None:
            self._accepted_wakeup.wake()

    def _broken(self) -> trio.BrokenResourceError:
        error = self._error
        exc = trio.BrokenResourceError(f"stream {self.stream_id} {self._describe(error)}")
        exc.__cause__ = error
        return exc

    @staticmethod
    def _describe(error: BaseException | None) -> str:
        if isinstance(error, StreamResetError):
            return f"was reset by the peer: {error}"
        if isinstance(error, StreamOpenError):
            return f"was refused by the peer: {error}"
        if isinstance(error, SessionClosedError):
            return f"lost its session: {error}"
        return "is broken"

    # --------------------------------------------------------------------------------------------- receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False  # a call is a schedule point; a wait already was one (no extra scheduler pass)
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                if self._recv_buffered:
                    data = self._take(max_bytes)
                    self._session.stream_consumed(self.stream_id, len(data))
                    if not waited:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                if self._eof:
                    if not waited:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                if self._error is not None:
                    raise self._broken()
                self._recv_task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_recv)
                waited = True
        finally:
            self._receiving = False

    def _take(self, max_bytes: int | None) -> bytes:
        """Up to ``max_bytes`` (default :data:`RECEIVE_SIZE`) buffered bytes. Several small frames are joined into
        one chunk: one copy here saves the caller a write per frame."""
        buf = self._recv_buf
        limit = RECEIVE_SIZE if max_bytes is None else max_bytes
        head = buf[0]
        off = self._recv_offset
        avail = len(head) - off
        if avail > limit:
            data = head[off : off + limit]
            self._recv_offset = off + limit
        else:
            del buf[0]
            self._recv_offset = 0
            data = head[off:] if off else head
            if buf and avail < limit:
                parts = [data]
                total = avail
                while buf and total < limit:
                    nxt = buf[0]
                    room = limit - total
                    if len(nxt) <= room:
                        parts.append(nxt)
                        del buf[0]
                        total += len(nxt)
                    else:
                        parts.append(nxt[:room])
                        self._recv_offset = room
                        total = limit
                data = b"".join(parts)
        self._recv_buffered -= len(data)
        return data

    # ----------------------------------------------------------------------------------------------- sending

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("cannot send after send_eof")
        if self._error is not None:
            raise self._broken()

    async def send_all(self, data: bytes | bytearray | memoryview, *, checkpoint: bool = True) -> None:
        """:meth:`trio.abc.SendStream.send_all`; ``checkpoint=False`` as for :meth:`trio_tunnel.tcp.TcpStream.send_all`
        (no scheduler pass unless it had to wait for credit)."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_send()
            self.accept()
            with memoryview(data) as view:
                view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
                offset = 0
                total = len(view)
                session = self._session
                whole = type(data) is bytes
                waited = False
                while offset < total:
                    # Whole bytes go in as they are (the protocol keeps the immutable object: no copy).
                    taken = session.stream_send(self.stream_id, data if whole and not offset else view[offset:])
                    if taken:
                        offset += taken
                        continue
                    if self._send_wakeup is None:
                        self._send_wakeup = _Wakeup()
                    await self._send_wakeup.wait()
                    waited = True
                    self._check_send()
            if checkpoint and not waited:  # a call is a schedule point; a wait already was one
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                self._check_send()
                if self._session.stream_send_credit(self.stream_id) > 0:
                    break
                if self._send_wakeup is None:
                    self._send_wakeup = _Wakeup()
                await self._send_wakeup.wait()
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            if not self._eof_sent:
                if self._error is not None:
                    raise self._broken()
                self.accept()
                self._eof_sent = True
                self._session.stream_end(self.stream_id)
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    # ------------------------------------------------------------------------------------------------ closing

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        session = self._session
        if not session.closed:
            if self._pending and self._error is None:
                self._pending = False
                session.stream_reject(self.stream_id, ErrorCode.REFUSED, "closed before it was accepted")
            else:
                session.stream_close(self.stream_id)  # for a dead stream: no frame, it releases the table entry
        self._drop_recv()
        session.stream_forget(self.stream_id)
        self._wake_recv()
        self.on_writable()

    async def aclose(self) -> None:
        """Close gracefully: FIN after all queued data; if the peer is still sending, one RST(STREAM_CLOSED)
        after it tells it to stop (like closing a TCP socket with unread data)."""
        self._close_now()
        await trio.lowlevel.checkpoint()

    def reset(self, code: ErrorCode | int = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abort the stream in both directions (RST): unsent data is dropped. ``CONN_RESET`` tells the peer to
        reset its TCP side too. Closes this stream object."""
        if self._closed:
            return
        self._closed = True
        session = self._session
        if not session.closed:
            session.stream_reset(self.stream_id, code, reason)
        self._drop_recv()
        session.stream_forget(self.stream_id)
        self._wake_recv()
        self.on_writable()


@attrs.define(eq=False)
class _PendingReply:
    event: trio.Event = attrs.field(factory=trio.Event)
    code: int | None = None
    body: Any = None


@final
class Request:
    """A CTRL request received from the peer; answer it exactly once (not for notifications, id 0)."""

    def __init__(self, session: Session, request_id: int, kind: str, body: Any) -> None:
        self._session = session
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
        if self.request_id and not self._session.closed:
            self._session._send_reply(self.request_id, code, body)


@asynccontextmanager
async def open_session(
    transport: trio.abc.Stream,
    *,
    role: Role,
    config: SessionConfig | None = None,
    name: str = "",
    token: bytes | None = None,
    tokens: Sequence[bytes] = (),
) -> AsyncIterator[Session]:
    """Run a session over ``transport`` (which it then owns and closes) for the duration of the block.

    The handshake happens before the block is entered, bounded by ``config.handshake_timeout``. Leaving the block
    closes the session: a final GOAWAY is flushed (for at most ``config.close_timeout``), then the transport is
    closed; streams still open break. When the peer or the link ends the session first, blocked calls raise and
    :meth:`Session.wait_closed` returns; the block itself is not cancelled.

    Raises:
        HandshakeError: the handshake failed (refused, wrong token, timeout, not a trio-tunnel peer).
    """
    config = config if config is not None else SessionConfig()
    conn = proto.Connection(role, limits=config.limits, name=name, token=token, tokens=tokens)
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
