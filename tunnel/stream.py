"""One multiplexed byte stream: :class:`MuxStream`, the application's end of a :class:`~trio_tunnel.mux.Session`.

Theory of operation
-------------------
:class:`MuxStream` is a :class:`trio.abc.HalfCloseableStream`. ``send_all`` hands bytes to the connection as
credit and buffer room allow and waits (on its own wakeup) for more; ``receive_some`` takes from the stream's
buffer and returns credit as it consumes (not when the bytes arrived), so a reader that stops stalls only its own
stream's sender. Every waiter wakes with ``BrokenResourceError`` (peer reset, session lost) or
``ClosedResourceError`` (closed locally) when its stream or session dies.

The stream and its session talk through a small internal interface, in both directions synchronous (no awaits,
no checkpoints: the stream's public methods own those):

* the stream changes the connection's state through the session's ``stream_*`` methods (``stream_send``,
  ``stream_consumed``, ``stream_accept``, ``stream_reject``, ``stream_end``, ``stream_close``, ``stream_reset``,
  ``stream_forget``, ...), which also wake the session's writer when there is something to write;
* the session's reader, writer and timer report the connection's events through the stream's ``on_*`` hooks
  (``on_data``, ``on_end``, ``on_writable``, ``on_accepted``, ``on_rejected``, ``on_reset``, ``on_session_lost``),
  which record the new state and wake the stream's waiters.

Neither side touches the other's fields. Applications use neither half.

Idle streams are what a tunnel holds most of, so a stream is small: ``__slots__``, a list (not a deque) as its
receive buffer, and at most one sleeping task per direction, parked in a slot or a :class:`_Wakeup` made on first
use rather than in a :class:`trio.Event`.
"""

from __future__ import annotations

import operator
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, final

import trio
from trio_tunnel.proto import ErrorCode

from .errors import SessionClosedError, StreamOpenError, StreamResetError

if TYPE_CHECKING:
    from .mux import Session
    from .sink import Sink

__all__ = ["RECEIVE_SIZE", "MuxStream"]

NO_META: Final[Mapping[str, Any]] = MappingProxyType({})
"""The (shared, read-only) meta of a stream we opened, and of one whose meta was dropped."""

KiB: Final = 1024
RECEIVE_SIZE: Final = 256 * KiB
"""What ``MuxStream.receive_some()`` returns at most when not told a size."""


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
        "_on_refused",
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
        "_sink",
        "meta",
        "route",
        "stream_id",
    )

    def __init__(self, session: Session, stream_id: int, route: str, meta: Mapping[str, Any], *, opening: bool) -> None:
        self._session = session
        self.stream_id = stream_id
        self.route = route
        self.meta: Mapping[str, Any] = meta
        """The OPEN's metadata of a stream the peer opened (empty on one we opened: ours is not kept; and after
        :meth:`drop_meta`)."""
        self._recv_buf: list[bytes] = []  # few entries; a list is 56 bytes empty, a deque 760
        self._recv_offset = 0
        self._recv_buffered = 0
        self._eof = False
        self._eof_sent = False
        self._closed = False
        self._error: BaseException | None = None  # why sending (and, without EOF, receiving) fails
        self._opening = opening  # we opened it and no answer came yet
        self._on_refused: Callable[[StreamOpenError], object] | None = None
        self._pending = not opening  # the peer opened it and we have not answered
        self._recv_task: trio.lowlevel.Task | None = None  # asleep in receive_some until data, EOF or an error
        # Made on first use (most streams never wait for these; every idle one waits to receive):
        self._accepted_wakeup: _Wakeup | None = None  # wait_accepted: until _opening is False or _error is set
        self._send_wakeup: _Wakeup | None = None  # send_all, wait_send_all_might_not_block: until credit or error
        self._receiving = False
        self._sending = False
        self._sink: Sink | None = None  # where bytes go while the receiver waits (set_sink)

    def __repr__(self) -> str:
        return f"<MuxStream {self.stream_id} {self.route!r}>"

    @property
    def session(self) -> Session:
        """The session the stream belongs to."""
        return self._session

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

    def drop_meta(self) -> None:
        """Forget :attr:`meta` once it has been read: an accepted stream holds it for its whole life otherwise
        (half a KiB for a visitor's addresses, per idle connection)."""
        self.meta = NO_META

    @property
    def refusal(self) -> StreamOpenError | None:
        """Why the peer refused the stream we opened (OPEN_ERR, or no answer in time), else None. For an opener
        that did not wait for the answer (``open_stream(..., wait_accepted=False)``) and learns it afterwards."""
        error = self._error
        return error if isinstance(error, StreamOpenError) else None

    def when_refused(self, callback: Callable[[StreamOpenError], object] | None) -> None:
        """Call ``callback(error)`` when the peer refuses the stream, synchronously, before any waiter wakes: an
        opener that did not wait for the answer says why (logs it) before its tasks close anything."""
        self._on_refused = callback

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
        """Bytes arrived (within the window we granted, so the buffer stays bounded). With a sink and the receiver
        asleep, they wait for :meth:`on_deliver` at the end of the reader's batch instead of waking it."""
        buf = self._recv_buf
        buf.append(data)
        self._recv_buffered += len(data)
        if self._sink is not None and self._recv_task is not None:
            if len(buf) == 1:  # the receiver sleeps only on an empty buffer: the batch's first bytes
                self._session.stream_deliver(self)
            return
        self._wake_recv()

    def on_deliver(self) -> None:
        """The reader's batch is applied: bytes that came while the receiver slept go straight into its sink, and
        the receiver is woken only for what the sink did not take (and for anything else that happened)."""
        if self._recv_task is None:
            return  # woken meanwhile (EOF, reset, close, cancelled): it takes the bytes itself
        sink = self._sink
        if sink is not None and not self._recv_offset:
            buf = self._recv_buf
            sent = sink.send_nowait(buf)
            if sent:
                self._recv_buffered -= sent
                consumed = sent
                while buf and sent >= len(buf[0]):
                    sent -= len(buf[0])
                    del buf[0]
                self._recv_offset = sent
                self._session.stream_consumed(self.stream_id, consumed)
        if self._recv_buffered:
            self._wake_recv()

    def set_sink(self, sink: Sink | None) -> None:
        """While a task waits in :meth:`receive_some`, let the session's reader write arriving bytes straight
        into ``sink`` (synchronously, when it takes them) instead of waking the task to receive them: one
        scheduler pass per hop. Only for a receiver that would send everything it receives to ``sink``, and the
        only one sending to it (a splice's copy direction); ``receive_some`` returns just what the sink did not
        take. ``None`` turns it off."""
        self._sink = sink

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
        error = self._error = StreamOpenError(code, reason)
        if self._on_refused is not None:
            self._on_refused(error)
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
                    session.send_stalls += 1
                    await self._send_wakeup.wait()
                    waited = True
                    self._check_send()
            if checkpoint and not waited:  # a call is a schedule point; a wait already was one
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_room(self, limit: int) -> int:
        """How many bytes to read from a source for this stream: its send credit, at most ``limit``, waiting while
        there is none. A relay that reads no more than this never holds bytes it cannot queue: they stay in the
        kernel's socket buffer and the session's memory budget (``link_memory``) bounds what the process holds.

        No schedule point unless it waits (the relay's next read is one). When the stream cannot send (not yet
        accepted, closed, broken) it answers ``limit``: ``send_all`` then does what it always did.
        """
        session = self._session
        while True:
            if self._pending or self._closed or self._eof_sent or self._error is not None or self._sending:
                return limit
            room = session.stream_send_credit(self.stream_id)
            if room > 0:
                return min(room, limit)
            if self._send_wakeup is None:
                self._send_wakeup = _Wakeup()
            await self._send_wakeup.wait()

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
