"""The link of a test tunnel: a small TCP relay on loopback between the client and the server, with faults a test
turns on and off at any time (``tunnel.link``).

Why a relay and not a fake transport: the client dials a real socket and the server accepts one, so everything
above (TLS, the session, keepalive, reconnects, the kernel's buffers and resets) runs as in production; only the
path between them is shaped, as toxiproxy shapes a plain proxy.

Each link connection the client makes is one *pipe*: two directions, each a reader and a writer joined by a bounded
queue (at most :data:`QUEUE` chunks of :data:`CHUNK` bytes; when it is full the reader stops reading and the kernel's
window pushes back on the sender, as on a real link). The reader stamps every chunk with the time it is due at the
far end (now + the latency, never before the chunk ahead of it: TCP does not reorder); the writer waits for that
time, then for the bandwidth (a chunk of ``n`` bytes occupies the link for ``n / rate`` seconds, sent in slices of
at most :data:`SLICE` seconds each), then for the link to be unpaused, and sends. EOF and resets travel in order
behind the data, so a half-close or an RST arrives after the bytes sent before it.

Every wait is on Trio's clock (``trio.sleep_until``), so under ``trio.testing.MockClock(autojump_threshold=0)``
a shaped transfer takes its shaped time in *virtual* seconds and no real time at all (docs/TESTING.md says when
that holds: real loopback sockets deliver within the ``send`` call, and nothing may wait in a thread).
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import struct
from typing import Final

import attrs
import trio
from trio_tunnel.relay import abort

__all__ = ["CHUNK", "QUEUE", "SLICE", "Link", "LinkStatistics"]

CHUNK: Final = 64 * 1024
"""Bytes read from a socket at a time."""
QUEUE: Final = 16
"""Chunks a direction holds between its reader and its writer (in flight on the simulated wire)."""
SLICE: Final = 0.02
"""Under a bandwidth limit, a chunk goes out in slices of at most this many seconds' worth of bytes."""
_LINGER_ABORT: Final = struct.pack("ii", 1, 0)

_Item = tuple[float, bytes | None]
"""(due time, data): ``b""`` is EOF, None a reset of the source."""


@attrs.frozen
class LinkStatistics:
    """A snapshot of a test link (:meth:`Link.statistics`)."""

    connections: int
    """Link connections carried so far: the client's first and each reconnect."""
    open: int
    """Link connections open now."""
    cuts: int
    """Connections ended by :meth:`Link.cut`."""
    bytes_to_server: int
    bytes_to_client: int
    """Bytes delivered each way (TLS records and frames, as on the wire)."""
    latency: float
    jitter: float
    bandwidth: float | None
    paused: bool


@attrs.define(eq=False)
class _Pipe:
    """One link connection: the client's socket and the relay's socket to the server."""

    client: trio.SocketStream
    server: trio.SocketStream
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    cut: bool = False
    paused: bool = False
    """Stalled by ``pause(existing_only=True)``."""
    free_at: list[float] = attrs.field(factory=lambda: [-math.inf, -math.inf])
    """Per direction (0: to the server, 1: to the client): when the simulated wire is free again."""


class Link:
    """The shaping relay between a test tunnel's client and server; ``tunnel.link``.

    Faults apply to every link connection, the current ones and the client's reconnects, until changed:

    * :meth:`latency` delays each direction (a round trip gains twice the delay);
    * :meth:`bandwidth` caps each direction's rate;
    * :meth:`pause` stalls the link (nothing forwarded either way, no FIN, no RST: a silent path that only the
      keepalive can notice) until :meth:`resume`;
    * :meth:`cut` resets every link connection now (both ends see an RST); the client reconnects through the link;
    * :meth:`reset` removes every fault (as toxiproxy's ``/reset``).
    """

    def __init__(self, target: tuple[str, int], *, seed: int | None = None) -> None:
        self.target = target
        """Where link connections go: the server's listener."""
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        """Where the client dials: the relay's listener (known once :meth:`serve` started)."""
        self._latency = 0.0
        self._jitter = 0.0
        self._rate: float | None = None
        self._paused = False
        self._resumed = trio.Event()
        self._resumed.set()
        self._rng = random.Random(seed)
        self._pipes: set[_Pipe] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._connections = 0
        self._cuts = 0
        self._bytes = [0, 0]

    # ------------------------------------------------------------------------------------------------ faults

    def latency(self, seconds: float, jitter: float = 0) -> None:
        """Delay every byte by ``seconds`` (each direction), give or take up to ``jitter`` (uniform; a chunk never
        overtakes the one before it). Applies to bytes read from now on; 0 removes the delay."""
        if not (seconds >= 0 and 0 <= jitter < math.inf and seconds < math.inf):
            raise ValueError(f"latency needs 0 <= seconds and 0 <= jitter, got {seconds!r}, {jitter!r}")
        self._latency, self._jitter = float(seconds), float(jitter)

    def bandwidth(self, bytes_per_second: float | None) -> None:
        """Carry at most ``bytes_per_second`` each way (None: unlimited)."""
        if bytes_per_second is not None and not 0 < bytes_per_second < math.inf:
            raise ValueError(f"bandwidth needs bytes_per_second > 0 (or None: unlimited), got {bytes_per_second!r}")
        self._rate = None if bytes_per_second is None else float(bytes_per_second)

    def pause(self, *, existing_only: bool = False) -> None:
        """Stall the link: nothing is forwarded either way (what is in flight stays there, no FIN, no RST) until
        :meth:`resume`. The client's reconnects stall too, unless ``existing_only``: then only the connections
        open now stall, as when a NAT box forgets them, and a reconnect gets through."""
        if existing_only:
            for pipe in self._pipes:
                pipe.paused = True
        else:
            self._paused = True
        if self._resumed.is_set():
            self._resumed = trio.Event()

    def resume(self) -> None:
        """Forward again, starting with what was held while paused."""
        self._paused = False
        for pipe in self._pipes:
            pipe.paused = False
        self._resumed.set()

    def cut(self) -> int:
        """Reset every link connection now (both the client and the server see an RST). The relay keeps
        listening, so the client reconnects as it does in production. Returns how many connections were cut."""
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.cut = True
            for stream in (pipe.client, pipe.server):
                with contextlib.suppress(OSError):  # already closed
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
                stream.socket.close()  # trio's close: wakes (with ClosedResourceError) any task waiting on it
            pipe.scope.cancel(reason="link cut")
        self._cuts += len(pipes)
        return len(pipes)

    def reset(self) -> None:
        """Remove every fault: no latency, no bandwidth limit, not paused."""
        self.latency(0)
        self.bandwidth(None)
        self.resume()

    def statistics(self) -> LinkStatistics:
        return LinkStatistics(
            connections=self._connections,
            open=len(self._pipes),
            cuts=self._cuts,
            bytes_to_server=self._bytes[0],
            bytes_to_client=self._bytes[1],
            latency=self._latency,
            jitter=self._jitter,
            bandwidth=self._rate,
            paused=self._paused or any(pipe.paused for pipe in self._pipes),
        )

    async def wait_idle(self) -> None:
        """Return once no link connection is open."""
        while self._pipes:
            await self._idle.wait()

    # ------------------------------------------------------------------------------------------------ relay

    async def serve(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 (a free port) and relay each connection to :attr:`target` until cancelled;
        ``task_status.started`` gets the listening address."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = (str(host), int(port))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._carry, listeners)
            task_status.started(self.address)

    async def _carry(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            await abort(client)  # as if the path refused: the client sees a reset and retries
            return
        pipe = _Pipe(client, server)
        self._pipes.add(pipe)
        self._idle = trio.Event()
        self._connections += 1
        finished = False
        try:
            with pipe.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._direction, pipe, 0)
                    await self._direction(pipe, 1)
                finished = True  # both directions carried their EOF
        finally:
            self._pipes.discard(pipe)
            if not self._pipes:
                self._idle.set()
            for stream in (client, server):
                if finished:
                    await trio.aclose_forcefully(stream)
                else:  # cut, reset or cancelled: both ends must see a reset, not a clean end
                    await abort(stream)

    async def _direction(self, pipe: _Pipe, way: int) -> None:
        src, dst = (pipe.client, pipe.server) if way == 0 else (pipe.server, pipe.client)
        send, receive = trio.open_memory_channel[_Item](QUEUE)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, src, send)
            await self._write(pipe, way, dst, receive)

    async def _read(self, src: trio.SocketStream, queue: trio.MemorySendChannel[_Item]) -> None:
        async with queue:
            last_due = -math.inf
            while True:
                data: bytes | None
                try:
                    data = await src.receive_some(CHUNK)
                except trio.ClosedResourceError:
                    return  # cut: the writer is cancelled too
                except trio.BrokenResourceError:
                    data = None
                last_due = max(last_due, trio.current_time() + self._delay())
                await queue.send((last_due, data))
                if not data:
                    return

    def _delay(self) -> float:
        if not self._jitter:
            return self._latency
        return max(0.0, self._latency + self._rng.uniform(-self._jitter, self._jitter))

    async def _write(
        self, pipe: _Pipe, way: int, dst: trio.SocketStream, queue: trio.MemoryReceiveChannel[_Item]
    ) -> None:
        async with queue:
            async for due, data in queue:
                await trio.sleep_until(due)
                await self._unpaused(pipe)
                if data is None:  # the source was reset: reset the destination too, after what came before
                    self._abort_pipe(pipe)
                    return
                try:
                    if not data:
                        await dst.send_eof()
                        return
                    await self._send(pipe, way, dst, memoryview(data))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._abort_pipe(pipe)
                    return

    async def _send(self, pipe: _Pipe, way: int, dst: trio.SocketStream, data: memoryview) -> None:
        while data:
            rate = self._rate
            size = len(data) if rate is None else max(1, min(len(data), int(rate * SLICE)))
            if rate is not None:
                finish = max(trio.current_time(), pipe.free_at[way]) + size / rate
                pipe.free_at[way] = finish
                await trio.sleep_until(finish)
                await self._unpaused(pipe)
            await dst.send_all(data[:size])
            self._bytes[way] += size
            data = data[size:]

    async def _unpaused(self, pipe: _Pipe) -> None:
        while self._paused or pipe.paused:
            await self._resumed.wait()

    @staticmethod
    def _abort_pipe(pipe: _Pipe) -> None:
        """End the pipe abortively (its ``finally`` resets both sockets)."""
        pipe.scope.cancel(reason="a link end was reset")
