"""The splice: copy bytes both ways between two streams, as one nursery task pair.

Theory of operation
-------------------
:class:`Splice` runs two copy tasks in one nursery, one per direction. Each loops
``receive_some`` on its source and ``send_all`` on its destination, so backpressure is carried
end to end: a slow reader on one side stops its copy task, which stops reading, which fills the
other side's TCP window (or mux credit). At most ``chunk`` bytes per direction are in memory.

How a direction ends decides what happens to the other side (see :data:`Ending`):

* EOF from the source is carried as ``send_eof()`` on the destination (a half-close), and the
  other direction keeps going: a client that sends a request and ``shutdown(SHUT_WR)`` still
  reads the whole reply. A destination that cannot half-close is closed instead.
* A reset of the source (a TCP RST: ``BrokenResourceError`` caused by ``ConnectionResetError``;
  or a mux stream reset: caused by :class:`~trio_tunnel.errors.StreamResetError`) is carried as an
  *abortive* close of the destination (:func:`abort`: ``SO_LINGER`` 0 on a socket, so its peer
  sees an RST; ``reset(CONN_RESET)`` on a mux stream), and the other direction is cancelled: it
  has nowhere left to deliver.
* Any other receive failure (connection lost) is handled the same way: a truncated stream must
  not look complete to the far peer.
* A send that fails (the destination is gone or was reset) aborts the source and cancels the
  other direction.

These are expected network conditions: they never escape from :meth:`Splice.run`, which reports
them in its :class:`SpliceResult`. Anything else (a bug) propagates. When both directions have
finished, both streams are closed with ``aclose()``; if the splice is cancelled or fails, both
are closed abortively instead, so neither peer mistakes a cut-off stream for a complete one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import typing
from typing import Final, Literal, Protocol, runtime_checkable

import attrs
import trio
from trio_tunnel.dial import describe_connect_error  # re-exported: it lived here before dial.py had it
from trio_tunnel.errors import StreamResetError
from trio_tunnel.mux import MuxStream
from trio_tunnel.proto.errors import ErrorCode
from trio_tunnel.tcp import TcpStream

__all__ = [
    "DEFAULT_CHUNK",
    "Ending",
    "Splice",
    "SpliceResult",
    "SupportsReset",
    "abort",
    "describe_connect_error",
    "splice",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK: Final = 256 * 1024
"""Bytes asked of ``receive_some`` per read. Measured over loopback TCP (one relay process, peers in
another): 256 KiB moved 1050-1270 MiB/s on one stream, 64 KiB ~730 and 16 KiB ~270, at the same
per-round-trip cost for 64-byte ping-pong. The price is memory: a direction blocked on a slow
destination holds up to one chunk, i.e. 512 KiB per connection at worst, small beside the
kernel's own socket buffers (several MiB each under autotuning)."""

_LINGER_ABORT: Final = struct.pack("ii", 1, 0)
_CAUSE_DEPTH: Final = 8

Ending = Literal["open", "eof", "reset", "error", "send_failed", "closed", "cancelled", "idle"]
"""How one direction of a splice ended.

* ``"open"``: still copying (seen only in :meth:`Splice.snapshot` of a running splice).
* ``"eof"``: the source finished cleanly; the EOF was carried to the destination.
* ``"reset"``: the source was reset (TCP RST or mux stream reset); the destination was aborted.
* ``"error"``: receiving from the source failed otherwise (connection lost); the destination
  was aborted.
* ``"send_failed"``: the destination is gone or was reset; the source was aborted.
* ``"closed"``: a stream was closed locally under this direction (e.g. a destination that
  cannot half-close was closed at the other direction's EOF).
* ``"cancelled"``: stopped because the other direction ended abortively, or the splice was
  cancelled.
* ``"idle"``: stopped by a service's idle timeout (:mod:`trio_tunnel.idle`): no bytes either way
  for that long.
"""


@runtime_checkable
class SupportsReset(Protocol):
    """A stream with an abortive close, like the mux stream (an RST frame carrying ``code``)."""

    def reset(self, code: ErrorCode = ..., reason: str = ...) -> None: ...


async def abort(
    stream: trio.abc.AsyncResource,
    code: ErrorCode = ErrorCode.CONN_RESET,
    reason: str = "",
) -> None:
    """Close ``stream`` abortively, so its peer learns the byte stream was cut short.

    A :class:`~trio_tunnel.tcp.TcpStream` or :class:`trio.SocketStream` gets ``SO_LINGER`` (on, 0)
    before its close, so the kernel sends an RST instead of a FIN; a :class:`SupportsReset`
    stream is ``reset(code, reason)`` and then closed; anything else is closed with
    :func:`trio.aclose_forcefully`. The close happens before the first checkpoint, so it is done
    even when the caller is cancelled: like ``aclose()``, it is safe in a ``finally``. Aborting a
    closed socket does nothing more.

    Args:
        stream: the stream to close.
        code: the code a mux stream's RST carries; the default means "a TCP reset".
        reason: a readable reason for the RST.
    """
    if isinstance(stream, (TcpStream, trio.SocketStream)):
        # EBADF once the socket is already closed: nothing left to abort.
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        await stream.aclose()
    elif isinstance(stream, SupportsReset):
        stream.reset(code, reason)
        await trio.aclose_forcefully(stream)
    else:
        await trio.aclose_forcefully(stream)


@attrs.frozen
class SpliceResult:
    """What a splice moved, and how each direction ended (see :data:`Ending`).

    Byte counts are bytes fully handed to the destination's ``send_all``.
    """

    bytes_a_to_b: int
    bytes_b_to_a: int
    a_to_b: Ending
    b_to_a: Ending
    a_to_b_detail: str = ""
    """Why the a-to-b direction ended, for logs (the error text); empty for a clean EOF."""
    b_to_a_detail: str = ""

    @property
    def clean(self) -> bool:
        """True when both directions ended with EOF."""
        return self.a_to_b == "eof" and self.b_to_a == "eof"


@typing.final
@attrs.define(eq=False, init=False)
class Splice:
    """Copies bytes both ways between ``a`` and ``b`` until both directions end; closes both.

    Use :func:`splice` for the one-liner. Keep a :class:`Splice` object when you want live
    counts (:meth:`snapshot`), e.g. to log how far a connection got when it was cancelled.
    """

    a: trio.abc.Stream
    b: trio.abc.Stream
    chunk: int
    _ran: bool
    _scope: trio.CancelScope | None
    # Each direction's count, ending and detail, as plain slots (one object per connection end, not three).
    _n_ab: int
    active_at: float
    """When a chunk last went through, either way (0.0 before the first): :mod:`trio_tunnel.idle` reads it.
    Storing a time per chunk is cheaper than moving a deadline per read."""
    _n_ba: int
    _end_ab: Ending | None
    _end_ba: Ending | None
    _detail_ab: str
    _detail_ba: str

    def __init__(self, a: trio.abc.Stream, b: trio.abc.Stream, *, chunk: int = DEFAULT_CHUNK) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, not {chunk}")
        self.a = a
        self.b = b
        self.chunk = chunk
        self._ran = False
        self._scope = None
        self._n_ab = self._n_ba = 0
        self.active_at = 0.0
        self._end_ab = self._end_ba = None
        self._detail_ab = self._detail_ba = ""

    def snapshot(self) -> SpliceResult:
        """The counts and endings so far (``"open"`` for a direction still copying)."""
        return SpliceResult(
            bytes_a_to_b=self._n_ab,
            bytes_b_to_a=self._n_ba,
            a_to_b=self._end_ab or "open",
            b_to_a=self._end_ba or "open",
            a_to_b_detail=self._detail_ab,
            b_to_a_detail=self._detail_ba,
        )

    async def run(self) -> SpliceResult:
        """Copy both ways until both directions end; then close both streams. Runs once.

        Backpressure: each direction holds at most ``chunk`` bytes and reads again only when
        the destination took the last chunk.

        Returns:
            The byte counts and how each direction ended. Resets, lost connections and closed
            peers are reported here, never raised.

        Raises:
            RuntimeError: when run a second time.
            trio.Cancelled: when cancelled; both streams are then closed abortively (their
                peers see a reset).
            BaseExceptionGroup: wrapping an unexpected error of a copy task; both streams are
                closed abortively.
        """
        if self._ran:
            raise RuntimeError("a Splice runs only once")
        self._ran = True
        finished = False
        try:
            async with trio.open_nursery() as nursery:
                # One direction in a child task, the other in this (the connection's) task: the same pair of
                # copy loops with one task fewer per connection. A direction that ends abortively stops the
                # other by cancelling the nursery; no cancel scope of their own (an idle connection is mostly
                # tasks and scopes, and there are many).
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._copy, False, name="trio_tunnel.relay.Splice._copy")  # (no name per task)
                await self._copy(True)
            finished = True
        finally:
            for stream in (self.a, self.b):
                if isinstance(stream, MuxStream):
                    stream.set_sink(None)  # nobody copies it into the socket any more
            self._end_ab = self._end_ab or "cancelled"
            self._end_ba = self._end_ba or "cancelled"
            try:
                await self._close(self.a, finished)
            finally:
                await self._close(self.b, finished)
        result = self.snapshot()
        logger.debug(
            "splice ended: a->b %s (%d bytes) %s; b->a %s (%d bytes) %s",
            result.a_to_b,
            result.bytes_a_to_b,
            result.a_to_b_detail,
            result.b_to_a,
            result.bytes_b_to_a,
            result.b_to_a_detail,
        )
        return result

    @staticmethod
    async def _close(stream: trio.abc.Stream, finished: bool) -> None:
        if finished:
            await stream.aclose()
        else:
            await abort(stream, ErrorCode.CANCEL, "relay cancelled")

    def _stop(self, reason: str) -> None:
        """Stop both directions: one ended abortively, so the other has nowhere left to deliver."""
        assert self._scope is not None
        self._scope.cancel(reason=reason)

    def count(self, forward: bool, size: int) -> None:
        """Bytes moved for this splice outside its loops (a connection's first bytes, sent with the stream's OPEN
        before the splice ran): counted as its own, and activity."""
        self._count(forward, size)

    def _count(self, forward: bool, size: int) -> None:
        """Bytes the session's reader wrote into our socket for us (:class:`_SpliceSink`): counted, and activity."""
        self.active_at = trio.current_time()
        if forward:
            self._n_ab += size
        else:
            self._n_ba += size

    def _finish(self, forward: bool, end: Ending, detail: str = "") -> None:
        if forward:
            self._end_ab, self._detail_ab = end, detail
        else:
            self._end_ba, self._detail_ba = end, detail

    async def _copy(self, forward: bool) -> None:
        """Copy a -> b (``forward``) or b -> a until that direction ends."""
        src, dst = (self.a, self.b) if forward else (self.b, self.a)
        if isinstance(src, MuxStream) and isinstance(dst, TcpStream):
            # While this task waits for the stream, the session's reader writes arriving bytes straight into the
            # socket (one scheduler pass per hop); this loop gets only what the socket did not take.
            src.set_sink(_SpliceSink(self, forward, dst))
        # Our own streams can skip the scheduler pass at the end of send_all: the loop's next receive_some is a
        # checkpoint anyway (it yields or waits), so each turn of the loop still has one.
        light = dst if isinstance(dst, (TcpStream, MuxStream)) else None
        budgeted = dst if isinstance(dst, MuxStream) else None  # read only what the link can queue now
        while True:
            try:
                data = await src.receive_some(self.chunk if budgeted is None else await budgeted.send_room(self.chunk))
            except trio.BrokenResourceError as exc:
                detail = _describe(exc)
                code = _reset_code(exc)
                end: Ending = "error" if code is None else "reset"
                self._finish(forward, end, detail)
                self._stop(f"{_name(forward)} source {end}: {detail}")
                await abort(dst, ErrorCode.CONN_RESET if code is None else code, detail)
                return
            except trio.ClosedResourceError:
                self._finish(forward, "closed", "source closed locally")
                return
            if not data:
                try:
                    await _send_eof(dst)
                except trio.BrokenResourceError as exc:
                    await self._send_failed(forward, src, exc)
                except trio.ClosedResourceError:
                    self._finish(forward, "closed", "destination closed locally")
                else:
                    self._finish(forward, "eof")
                return
            try:
                if light is not None:
                    await light.send_all(data, checkpoint=False)
                else:
                    await dst.send_all(data)
            except trio.BrokenResourceError as exc:
                await self._send_failed(forward, src, exc)
                return
            except trio.ClosedResourceError:
                self._finish(forward, "closed", "destination closed locally")
                return
            self.active_at = trio.current_time()
            if forward:
                self._n_ab += len(data)
            else:
                self._n_ba += len(data)

    async def _send_failed(self, forward: bool, src: trio.abc.Stream, exc: trio.BrokenResourceError) -> None:
        detail = _describe(exc)
        self._finish(forward, "send_failed", detail)
        # Nothing can reach the source's peer any more (its destination is broken), and the
        # other direction would deliver to the source we are aborting: stop both.
        self._stop(f"{_name(forward)} destination broken: {detail}")
        await abort(src, ErrorCode.CONN_RESET, detail)


@typing.final
class _SpliceSink:
    """One direction's destination socket as a :class:`~trio_tunnel.sink.Sink` that counts for the splice."""

    __slots__ = ("_dst", "_forward", "_splice")

    def __init__(self, splice: Splice, forward: bool, dst: TcpStream) -> None:
        self._splice = splice
        self._forward = forward
        self._dst = dst

    def send_nowait(self, parts: typing.Sequence[bytes | memoryview]) -> int:
        sent = self._dst.send_nowait(parts)
        if sent:
            self._splice._count(self._forward, sent)
        return sent

    @property
    def holds_unsent(self) -> bool:
        return False


def _name(forward: bool) -> str:
    return "a->b" if forward else "b->a"


def splice(
    a: trio.abc.Stream, b: trio.abc.Stream, *, chunk: int = DEFAULT_CHUNK
) -> typing.Coroutine[typing.Any, typing.Any, SpliceResult]:
    """Copy bytes both ways between ``a`` and ``b`` until both directions end; close both. Await it.

    See :meth:`Splice.run` for the result, cancellation and error behaviour, and the module
    docstring for how EOF and resets are carried from one side to the other. (A plain function
    returning :meth:`Splice.run`'s coroutine: one frame fewer held by every idle connection.)
    """
    return Splice(a, b, chunk=chunk).run()


async def _send_eof(stream: trio.abc.Stream) -> None:
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    else:
        await stream.aclose()


def _causes(exc: BaseException) -> typing.Iterator[BaseException]:
    cause = exc.__cause__
    for _ in range(_CAUSE_DEPTH):
        if cause is None:
            return
        yield cause
        cause = cause.__cause__


def _reset_code(exc: trio.BrokenResourceError) -> ErrorCode | None:
    """The code to carry on when ``exc`` is a reset (TCP RST or mux stream reset), else None."""
    for cause in _causes(exc):
        if isinstance(cause, ConnectionResetError):
            return ErrorCode.CONN_RESET
        if isinstance(cause, StreamResetError):
            code = ErrorCode.parse(cause.code)
            return code if isinstance(code, ErrorCode) else ErrorCode.CONN_RESET
    return None


def _describe(exc: BaseException) -> str:
    """The most specific text of an error chain (the OS error, or the peer's reset reason)."""
    innermost: BaseException = exc
    for cause in _causes(exc):
        innermost = cause
    return str(innermost) or type(innermost).__name__
