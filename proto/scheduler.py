"""What goes out next, and in which order: the output queues and the batch builder. Sans-I/O.

Scheduling happens at the last moment, when the transport can take bytes (:meth:`Scheduler.build`):

1. raw bytes (the client's preamble);
2. PONG (one slot: a newer PING overwrites an unanswered one), then GOAWAY/REFUSE;
3. WINDOW, one per stream however often its credit moved since the last batch;
4. the ordered control queue: handshake frames, OPEN, OPEN_OK, OPEN_ERR, RST, PING, CTRL;
5. MAX_STREAMS, coalesced (the caller passes the latest count);
6. stream data, only once the control queue is empty, by deficit round robin: each ready stream sends up to
   ``Limits.send_quantum`` per turn and goes to the back of the queue, so a bulk stream cannot starve an
   interactive one. A stream alone sends up to ``Limits.solo_quantum`` per turn (fewer frames, same order). FIN
   rides on a stream's last DATA frame, so it can never overtake queued data.

Stream data leaves as views of the buffers the application handed over: nothing is copied once more.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from . import frames as F
from .errors import ErrorCode
from .limits import Limits
from .stream import StreamRecord

__all__ = ["Scheduler"]


class Scheduler:
    """The output queues of one connection. The connection fills them; :meth:`build` drains them in order.

    ``streams`` is the connection's stream table (shared, never rebound): WINDOW frames read the current limit from
    it, and the ready queue holds ids that may have been released meanwhile.
    """

    def __init__(self, limits: Limits, streams: dict[int, StreamRecord]) -> None:
        self._limits = limits
        self._streams = streams
        self.raw_out: list[bytes] = []
        self.urgent: deque[F.Frame] = deque()  # GOAWAY, REFUSE
        self.pong: int | None = None
        self.window_dirty: dict[int, None] = {}
        self.control: deque[F.Frame] = deque()  # OPEN, OPEN_OK, OPEN_ERR, RST, PING, CTRL, handshake frames
        self.ready: deque[int] = deque()
        self.frames_sent = 0
        self.bytes_sent = 0
        self.data_sent = 0

    @property
    def wants_write(self) -> bool:
        return bool(
            self.raw_out or self.urgent or self.pong is not None or self.window_dirty or self.control or self.ready
        )

    def mark_ready(self, stream: StreamRecord) -> None:
        """The stream has bytes or a FIN to send: give it a turn (once; it stays queued until it has none)."""
        if not stream.in_ready:
            stream.in_ready = True
            self.ready.append(stream.sid)

    def drop_control(self) -> None:
        """Nothing queued goes out any more (the connection is ending): keep only raw bytes and GOAWAY/REFUSE."""
        self.control.clear()
        self.window_dirty.clear()
        self.ready.clear()

    def build(
        self,
        max_bytes: int,
        *,
        frame_cap: int,
        max_streams: int | None,
        send_data: bool,
        turn_done: Callable[[StreamRecord], None],
    ) -> list[bytes | memoryview]:
        """The next batch, in the order of the module docstring, at most about ``max_bytes`` (control frames are
        never split and may go over).

        Args:
            frame_cap: largest DATA payload the peer accepts.
            max_streams: a MAX_STREAMS count to announce, or None.
            send_data: False once the connection is closed: no stream data goes out.
            turn_done: called after each stream's turn (it may have room for its writer now, or be releasable).
        """
        out: list[bytes | memoryview] = list(self.raw_out)
        self.raw_out = []
        size = sum(map(len, out))
        nframes = 0

        def put(frame: F.Frame) -> None:
            nonlocal size, nframes
            raw = F.encode(frame)
            out.append(raw)
            size += len(raw)
            nframes += 1

        if self.pong is not None:
            put(F.Pong(self.pong))
            self.pong = None
        while self.urgent:
            put(self.urgent.popleft())
        if self.window_dirty:
            for sid in self.window_dirty:
                stream = self._streams.get(sid)
                if stream is not None:
                    put(F.Window(sid, stream.recv_limit))
            self.window_dirty.clear()
        while self.control and size < max_bytes:
            put(self.control.popleft())
        if max_streams is not None:
            put(F.MaxStreams(max_streams))
        if not self.control and send_data:
            size, nframes = self._send_stream_data(out, size, nframes, max_bytes, frame_cap, turn_done)
        self.frames_sent += nframes
        self.bytes_sent += size
        return out

    def _send_stream_data(
        self,
        out: list[bytes | memoryview],
        size: int,
        nframes: int,
        max_bytes: int,
        frame_cap: int,
        turn_done: Callable[[StreamRecord], None],
    ) -> tuple[int, int]:
        ready = self.ready
        limits = self._limits
        while ready and size < max_bytes:
            sid = ready.popleft()
            stream = self._streams.get(sid)
            if stream is None:
                continue
            stream.in_ready = False
            # Deficit round robin with a fixed quantum: a stream alone may use bigger frames (fewer, same order).
            budget = min(limits.solo_quantum if not ready else limits.send_quantum, max_bytes - size)
            while True:
                take = min(budget, frame_cap, stream.send_buffered)
                fin = stream.fin_pending and take == stream.send_buffered
                if not take and not fin:
                    break
                header = F.encode_data_header(sid, take, fin)
                out.append(header)
                if take:
                    _take_send(stream, take, out)
                size += len(header) + take
                nframes += 1
                budget -= take
                self.data_sent += take
                if fin:
                    stream.fin_pending = False
                    if stream.rst_pending:
                        stream.rst_pending = False
                        raw = F.encode(F.Reset(sid, ErrorCode.STREAM_CLOSED, "stream closed"))
                        out.append(raw)
                        size += len(raw)
                        nframes += 1
                    break
                if budget <= 0:
                    break
            if stream.send_buffered or stream.fin_pending:
                stream.in_ready = True
                ready.append(sid)
            turn_done(stream)
        return size, nframes


def _take_send(stream: StreamRecord, n: int, out: list[bytes | memoryview]) -> None:
    """Move ``n`` queued bytes of ``stream`` to ``out`` as zero-copy views (joined once, or not at all)."""
    buf = stream.send_buf
    need = n
    while need:
        head = buf[0]
        off = stream.head_offset
        avail = len(head) - off
        if avail <= need:
            out.append(memoryview(head)[off:] if off else head)
            del buf[0]
            stream.head_offset = 0
            need -= avail
        else:
            out.append(memoryview(head)[off : off + need])
            stream.head_offset = off + need
            need = 0
    stream.send_buffered -= n
