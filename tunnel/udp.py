"""UDP flows: ``-R .../udp``, ``-L .../udp`` and ``map --udp``.

A **flow** is one external source address and port on one listening UDP socket. Each flow is one stream on the
link (``dgram: true`` in its OPEN meta), carrying that source's datagrams with their boundaries kept
(:mod:`trio_tunnel.proto.datagram` frames them), and ending after ``idle`` seconds without a datagram either way.

Two ends, as for TCP (:mod:`trio_tunnel.handlers`):

* the **opening end** (:class:`UdpEntrance`) owns the listening socket: the server's public port for ``-R``, the
  client's local port for ``-L``, the mapper's port. One task receives every datagram and hands it to its flow
  without waiting (:meth:`Flow.offer`): into a bounded queue, or dropped and counted when the queue is full or
  the datagram is larger than the link's frame limit. A new source opens a flow only within the
  :class:`~trio_tunnel.proto.datagram.FlowGate` (flows per service, per client, open rate); a refused one is
  dropped, with one log line per burst. Replies go out of the same socket, to the flow's source.
* the **answering end** (:func:`answer_datagrams`) gets the stream and gives it its own *connected* UDP socket to
  the target, so the target's replies come back on that socket and so to the right source.

Why this never blocks anything but the flow itself: the link's reader only appends to a stream's window-bounded
buffer (as for TCP); a flow's task alone waits for stream credit, and while it waits, its queue fills and further
datagrams are dropped. Datagrams to a UDP socket are sent without waiting; a full socket buffer drops them (UDP
semantics) and counts them.

Sockets (read in bursts, written without waiting) are :mod:`trio_tunnel.udpsocket`; the framing and the admission
rules, sans-I/O, :mod:`trio_tunnel.proto.datagram`.

Each flow ends with one INFO line: ``LABEL: udp PEER closed after 1.2 s (idle): in 3 datagrams (120 bytes),
out 3 datagrams (400 bytes)``, plus ``, dropped N`` when any were dropped. Flows are not drained at shutdown: UDP
has no end of stream to wait for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import trio
from trio_tunnel.proto import ErrorCode
from trio_tunnel.proto.datagram import (
    DGRAM_META,
    IDLE_META,
    MAX_DATAGRAM,
    Admission,
    BurstLog,
    DatagramDecoder,
    DatagramError,
    DatagramQueue,
    FlowGate,
    encode_datagram,
    max_datagram,
)

from .console import announce, format_hostport
from .errors import SessionClosedError, StreamOpenError
from .stream import MuxStream
from .udpsocket import ConnectError, UdpSocket, bind_udp, connect_udp
from .wire import FORWARD_UDP_ROUTE

if TYPE_CHECKING:
    from .config import LocalSpec, MapConfig
    from .handlers import Destination, Meta
    from .lifecycle import Shutdown
    from .mux import Session

__all__ = [
    "DEFAULT_IDLE",
    "Flow",
    "FlowStats",
    "LinkOpener",
    "Pipe",
    "SocketPipe",
    "StreamPipe",
    "UdpEntrance",
    "answer_datagrams",
    "answer_stream",
    "datagram_meta",
    "flow_idle",
    "run_map_udp",
    "serve_udp_forward",
    "serve_udp_service",
]

DEFAULT_IDLE: Final = 60.0
"""Seconds a flow lives without a datagram in either direction."""
DEFAULT_MAX_FLOWS: Final = 1024
"""Flows on one client-side ``-L`` UDP listener (the server's services use ``max_flows_per_service``)."""


class PipeBroken(Exception):
    """The far side of a flow is gone (stream reset, refused, session lost)."""


def datagram_meta(idle: float) -> dict[str, str | int | bool | None]:
    """The OPEN meta entries of a datagram stream."""
    return {DGRAM_META: True, IDLE_META: max(1, math.ceil(idle * 1000))}


def flow_idle(meta: dict[str, Any] | Any, default: float = DEFAULT_IDLE) -> float:
    """The idle timeout a datagram stream's opener asked for (``idle_ms`` in its meta)."""
    value = meta.get(IDLE_META)
    return value / 1000 if type(value) is int and value > 0 else default


# ----------------------------------------------------------------------------------------------------- pipes


class Pipe(Protocol):
    """The far side of a flow: a datagram stream over the link, or (for ``map``) a connected UDP socket."""

    max_send: int
    """The largest datagram :meth:`send` takes (larger ones are dropped and counted before it)."""

    async def send(self, datagrams: list[bytes]) -> None:
        """Raises PipeBroken."""
        ...

    async def receive(self) -> list[bytes] | None:
        """The next datagrams; None when the far side ended the flow. Raises PipeBroken."""
        ...

    def close(self, idle: float | None) -> None:
        """Done with it: after ``idle`` seconds of silence, or (None) for another reason."""
        ...


@attrs.define(eq=False)
class StreamPipe:
    """A datagram stream: each datagram length-prefixed in the stream's bytes."""

    stream: MuxStream
    max_receive: int
    max_send: int
    decoder: DatagramDecoder = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.decoder = DatagramDecoder(self.max_receive)

    async def send(self, datagrams: list[bytes]) -> None:
        data = encode_datagram(datagrams[0]) if len(datagrams) == 1 else b"".join(map(encode_datagram, datagrams))
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PipeBroken(_cause(exc)) from None

    async def receive(self) -> list[bytes] | None:
        while True:
            try:
                data = await self.stream.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PipeBroken(_cause(exc)) from None
            try:
                if not data:
                    self.decoder.end()
                    return None
                datagrams = self.decoder.feed(data)
            except DatagramError as exc:
                self.stream.reset(ErrorCode.PROTOCOL, str(exc))
                raise PipeBroken(f"bad datagram framing from the peer: {exc}") from None
            if datagrams:
                return datagrams

    def close(self, idle: float | None) -> None:
        if idle is not None:
            self.stream.reset(ErrorCode.IDLE_TIMEOUT, f"UDP flow idle for {idle:g} s")
        else:
            self.stream.reset(ErrorCode.CANCEL, "UDP flow closed")


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__
    return str(cause) if cause is not None else str(exc)


@attrs.define(eq=False)
class SocketPipe:
    """``map --udp``: the far side of a flow is a UDP socket connected to the target."""

    udp: UdpSocket
    dropped: int = 0
    max_send: int = MAX_DATAGRAM

    async def send(self, datagrams: list[bytes]) -> None:
        for datagram in datagrams:
            if not self.udp.send_nowait(datagram):
                self.dropped += 1
        await trio.lowlevel.checkpoint()

    async def receive(self) -> list[bytes] | None:
        return [data for data, _ in await self.udp.receive_batch()]

    def close(self, idle: float | None) -> None:
        self.udp.close()


# ------------------------------------------------------------------------------------------------------ flows


@attrs.define
class FlowStats:
    """One flow's counts: ``up`` from its source towards the far side, ``down`` back."""

    up: int = 0
    up_bytes: int = 0
    down: int = 0
    down_bytes: int = 0
    dropped_full: int = 0
    dropped_big: int = 0
    dropped_out: int = 0
    """Dropped by a full local socket buffer on the way out."""

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_big + self.dropped_out


@attrs.define(eq=False)
class Flow:
    """One flow's two directions between a local UDP side and a :class:`Pipe`, with its idle timeout."""

    peer: str
    idle: float
    max_send: int = MAX_DATAGRAM
    queue: DatagramQueue = attrs.field(factory=DatagramQueue)
    stats: FlowStats = attrs.field(factory=FlowStats)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    ending: str = ""
    last: float = 0.0
    """When the flow last saw a datagram (either way)."""
    _ready: trio.Event = attrs.field(factory=trio.Event, alias="_ready")

    def touch(self) -> None:
        """Activity: the idle timer restarts. Only a time is stored (moving a cancel scope's deadline per datagram
        costs more than the rest of a datagram's way); :meth:`_watch` looks at it when the timer runs out."""
        self.last = trio.current_time()

    def offer(self, datagram: bytes) -> None:
        """A datagram from the local side, towards the pipe. Never waits: queued, or dropped and counted."""
        self.touch()
        if len(datagram) > self.max_send:
            self.stats.dropped_big += 1
        elif self.queue.push(datagram):
            self._ready.set()
        else:
            self.stats.dropped_full += 1

    async def run(self, open_pipe: Callable[[], Awaitable[Pipe | None]], deliver: Callable[[bytes], bool]) -> str:
        """Open the pipe, carry datagrams both ways until the flow idles out or either side ends it; how it ended.
        ``deliver`` sends one datagram to the local side without waiting (False: dropped)."""
        pipe: Pipe | None = None
        self.touch()
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch)
                    pipe = await open_pipe()
                    if pipe is None:
                        self.ending = self.ending or "not opened"
                    else:
                        self.max_send = pipe.max_send
                        nursery.start_soon(self._up, pipe, nursery.cancel_scope)
                        await self._down(pipe, deliver)
                    nursery.cancel_scope.cancel()
        finally:
            self.ending = self.ending or "cancelled"
            if pipe is not None:
                pipe.close(self.idle if self.ending == "idle" else None)
        return self.ending

    async def _watch(self) -> None:
        """The idle timeout: sleeps until ``idle`` after the last activity, and again while there was more."""
        while (due := self.last + self.idle) > trio.current_time():  # noqa: ASYNC110 (a timer re-armed, once per idle period at most)
            await trio.sleep_until(due)
        self.ending = self.ending or "idle"
        self.scope.cancel(reason="idle")

    async def _up(self, pipe: Pipe, done: trio.CancelScope) -> None:
        queue = self.queue
        stats = self.stats
        try:
            while True:
                while not len(queue):
                    self._ready = trio.Event()
                    await self._ready.wait()
                batch: list[bytes] = []
                while (datagram := queue.pop()) is not None:
                    if len(datagram) > self.max_send:  # queued before the pipe told its limit
                        stats.dropped_big += 1
                        continue
                    batch.append(datagram)
                    stats.up += 1
                    stats.up_bytes += len(datagram)
                if batch:
                    await pipe.send(batch)
        except PipeBroken as exc:
            self.ending = self.ending or str(exc)
            done.cancel()

    async def _down(self, pipe: Pipe, deliver: Callable[[bytes], bool]) -> None:
        stats = self.stats
        try:
            while (datagrams := await pipe.receive()) is not None:
                self.touch()
                for datagram in datagrams:
                    stats.down += 1
                    stats.down_bytes += len(datagram)
                    if not deliver(datagram):
                        stats.dropped_out += 1
            self.ending = self.ending or "ended by the far side"
        except PipeBroken as exc:
            self.ending = self.ending or str(exc)

    def closed_line(self, label: str, started: float, words: tuple[str, str]) -> tuple[str, tuple[object, ...]]:
        stats = self.stats
        dropped = f", dropped {stats.dropped}" if stats.dropped else ""
        duration = trio.current_time() - started
        args: tuple[object, ...] = (label, self.peer, duration, self.ending, words[0], stats.up, stats.up_bytes)
        args += (words[1], stats.down, stats.down_bytes, dropped)
        return "%s: udp %s closed after %.3f s (%s): %s %d datagrams (%d bytes), %s %d datagrams (%d bytes)%s", args


# --------------------------------------------------------------------------------------------- opening end


@attrs.define(eq=False)
class UdpEntrance:
    """One listening UDP socket and its flows (the opening end; see the module docstring)."""

    udp: UdpSocket
    label: str
    log: logging.Logger
    gate: FlowGate
    idle: float
    open_pipe: Callable[[str], Awaitable[Pipe | None]]
    """Opens the far side for a new flow from PEER (None after logging why not)."""
    words: tuple[str, str] = ("in", "out")
    flows: dict[Any, Flow] = attrs.field(factory=dict)
    dropped: int = 0
    """Datagrams dropped by flows that have ended (the live ones count their own)."""
    on_drops: Callable[[int], None] | None = None
    """Told how many datagrams a flow dropped when it ends (the ``udp_datagrams_dropped`` counter)."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive until cancelled; closes the socket at the end."""
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self._receive_loop(nursery)
        finally:
            self.udp.close()

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        udp = self.udp
        flows = self.flows
        while True:
            for data, address in await udp.receive_batch():
                flow = flows.get(address)
                if flow is None:
                    now = trio.current_time()
                    verdict = self.gate.admit(now)
                    if verdict is not Admission.OPEN:
                        self._refused(verdict, now)
                        continue
                    flow = Flow(format_hostport(str(address[0]), int(address[1])), self.idle)
                    flows[address] = flow
                    nursery.start_soon(self._run_flow, address, flow)
                flow.offer(data)

    def _refused(self, verdict: Admission, now: float) -> None:
        reported = self.gate.log.note(now)
        if reported:
            limit = self.gate.max_flows if verdict is Admission.SERVICE_FULL else ""
            self.log.warning(
                "%s: dropping datagrams from new UDP sources: %s%s (%d refused since the last such line)",
                self.label,
                f"{limit} " if limit else "",
                verdict.value,
                reported,
            )

    async def _run_flow(self, address: Any, flow: Flow) -> None:
        started = trio.current_time()
        udp = self.udp

        def deliver(datagram: bytes) -> bool:
            return udp.send_nowait(datagram, address)

        async def open_pipe() -> Pipe | None:
            return await self.open_pipe(flow.peer)

        try:
            await flow.run(open_pipe, deliver)
        finally:
            del self.flows[address]
            self.gate.release()
            self.dropped += flow.stats.dropped
            if flow.stats.dropped and self.on_drops is not None:
                self.on_drops(flow.stats.dropped)
            message, args = flow.closed_line(self.label, started, self.words)
            self.log.info(message, *args)


# ------------------------------------------------------------------------------------------- answering end


async def answer_datagrams(
    stream: MuxStream,
    host: str,
    port: int,
    *,
    label: str,
    what: str,
    log: logging.Logger,
    words: tuple[str, str],
    max_receive: int,
    max_send: int,
    dial_timeout: float,
) -> None:
    """Serve a datagram stream: a UDP socket connected to ``host:port`` of its own, datagrams both ways until the
    flow idles out or the opener ends it. A target that cannot be used rejects the stream with the reason."""
    peer = str(stream.meta.get("peer", "?"))
    try:
        with trio.fail_after(dial_timeout):  # only a name lookup can take time
            udp = await connect_udp(host, port)
    except (ConnectError, trio.TooSlowError) as exc:
        code, detail = (
            (exc.code, exc.detail)
            if isinstance(exc, ConnectError)
            else (ErrorCode.CONNECT_TIMEOUT, f"no address within {dial_timeout:g} s")
        )
        reason = f"{what}: cannot use {format_hostport(host, port)}/udp: {detail}"
        log.warning("%s: cannot serve udp %s: %s", label, peer, reason)
        stream.reject(code, f"{label}: {reason}")
        return
    stream.accept()
    # The opener's idle timeout, a little longer here: the opener (which sees the source) decides when a flow ends.
    flow = Flow(peer, flow_idle(stream.meta) + 1.0)
    started = trio.current_time()

    async def open_pipe() -> Pipe:
        return StreamPipe(stream, max_receive, max_send)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, udp, flow)
            await flow.run(open_pipe, udp.send_nowait)
            nursery.cancel_scope.cancel()
    finally:
        udp.close()
        # "in" is towards the target here, which is the flow's "up" direction reversed: name them from our side.
        stats = flow.stats
        flow.stats = FlowStats(
            up=stats.down,
            up_bytes=stats.down_bytes,
            down=stats.up,
            down_bytes=stats.up_bytes,
            dropped_full=stats.dropped_full,
            dropped_big=stats.dropped_big,
            dropped_out=stats.dropped_out,
        )
        message, args = flow.closed_line(label, started, words)
        log.info(message, *args)


async def _feed(udp: UdpSocket, flow: Flow) -> None:
    while True:
        for data, _ in await udp.receive_batch():
            flow.offer(data)


# ------------------------------------------------------------------------------------------------ over a link


@attrs.define(eq=False)
class LinkOpener:
    """Opens each new flow's datagram stream over the link: the opening end of ``-R`` (server) and ``-L`` (client).

    The stream is opened without waiting for OPEN_OK, so a flow's first datagram costs no extra round trip; a
    refusal then ends the flow with the far side's reason."""

    session: Callable[[], Awaitable[Session | None]]
    route: str
    meta: Meta
    label: str
    other: str
    log: logging.Logger
    idle: float

    failures: BurstLog = attrs.field(factory=BurstLog)
    """Flows that could not be opened (no link, no stream): one line per burst, since every datagram from a new
    source tries again."""

    async def __call__(self, peer: str) -> Pipe | None:
        session = await self.session()
        if session is None:
            self._failed(peer, f"no link to the {self.other}")
            return None
        try:
            stream = await session.open_stream(
                self.route, {**self.meta, "peer": peer, **datagram_meta(self.idle)}, wait_accepted=False
            )
        except (StreamOpenError, SessionClosedError) as exc:
            self._failed(peer, f"the {self.other} could not serve it: {exc}")
            return None
        ours, peers = session.frame_limits
        return StreamPipe(stream, max_datagram(ours), max_datagram(peers))

    def _failed(self, peer: str, why: str) -> None:
        reported = self.failures.note(trio.current_time())
        if reported:
            more = f" ({reported - 1} more flows since the last such line)" if reported > 1 else ""
            self.log.warning("%s: dropping udp %s: %s%s", self.label, peer, why, more)


async def answer_stream(stream: MuxStream, destination: Destination, log: logging.Logger, dial_timeout: float) -> None:
    """:meth:`trio_tunnel.handlers.Traffic.answer` for a datagram stream (``destination.udp``)."""
    if stream.meta.get(DGRAM_META) is not True:
        stream.reject(ErrorCode.PROTOCOL, f"{destination.label}: this is a UDP service, the stream is not datagrams")
        return
    ours, peers = stream.session.frame_limits
    await answer_datagrams(
        stream,
        destination.host,
        destination.port,
        label=destination.label,
        what=destination.what,
        log=log,
        words=destination.words,
        max_receive=max_datagram(ours),
        max_send=max_datagram(peers),
        dial_timeout=dial_timeout,
    )


async def serve_udp_service(
    session: Session,
    udp: UdpSocket,
    label: str,
    route: str,
    gate: FlowGate,
    idle: float,
    accepting: trio.CancelScope,
    log: logging.Logger,
    on_drops: Callable[[int], None] | None = None,
) -> None:
    """The server's side of one ``-R .../udp`` service: every flow on ``udp`` becomes a datagram stream to the
    client's service ``route``, until ``accepting`` is cancelled (drain) or the link ends."""

    async def current() -> Session:
        return session

    opener = LinkOpener(current, route, {}, label, "client", log, idle)
    with accepting:
        await UdpEntrance(udp, label, log, gate, idle, opener, on_drops=on_drops).serve()


async def serve_udp_forward(
    current: Callable[[], Awaitable[Session | None]],
    spec: LocalSpec,
    udp: UdpSocket,
    log: logging.Logger,
    on_drops: Callable[[int], None] | None = None,
) -> None:
    """The client's side of one ``-L .../udp`` forward: every flow on ``udp`` becomes a datagram stream to the server,
    which sends its datagrams to ``spec``'s target if its ``allow_targets`` permit (``HOST:PORT/udp``)."""
    meta: Meta = {"host": spec.target_host, "port": spec.target_port, "name": spec.name}
    opener = LinkOpener(current, FORWARD_UDP_ROUTE, meta, spec.name, "server", log, spec.idle_timeout)
    gate = FlowGate(DEFAULT_MAX_FLOWS)
    await UdpEntrance(
        udp, spec.name, log, gate, spec.idle_timeout, opener, words=("out", "back"), on_drops=on_drops
    ).serve()


async def run_map_udp(
    config: MapConfig, shutdown: Shutdown, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    """``map --udp``: every source on ``config.listen`` gets its own UDP socket connected to ``config.target``, until
    shutdown (flows are cut then: UDP has nothing to drain). Prints ``listening HOST:PORT/udp``."""
    log = logging.getLogger("trio_tunnel.mapper")
    udp = await bind_udp(config.listen.host or "0.0.0.0", config.listen.port)
    host, port = udp.local
    target = f"{config.target}/udp"

    async def open_pipe(peer: str) -> Pipe | None:
        try:
            with trio.fail_after(config.connect_timeout):
                return SocketPipe(await connect_udp(config.target.host, config.target.port))
        except ConnectError as exc:
            reason = exc.detail
        except trio.TooSlowError:
            reason = f"no address within {config.connect_timeout:g}s"
        log.warning("map udp %s -> %s: cannot use the target: %s; dropping", peer, target, reason)
        return None

    gate = FlowGate(config.max_connections)
    entrance = UdpEntrance(udp, f"map {target}", log, gate, config.idle_timeout, open_pipe, words=("up", "down"))
    async with trio.open_nursery() as nursery:
        await nursery.start(entrance.serve)
        log.info("map: listening on %s/udp, relaying to %s", format_hostport(host, port), target)
        announce(f"listening {format_hostport(host, port)}/udp")
        task_status.started((host, port))
        await shutdown.requested.wait()
        log.info("map: shutdown requested; cutting %d UDP flows", len(entrance.flows))
        nursery.cancel_scope.cancel(reason="shutdown requested")
    log.info("map: stopped")
