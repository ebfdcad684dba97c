"""The two ways a connection crosses a link, shared by the server and the client, and the count of those in flight.

Every tunnelled connection has an *opening* end and an *answering* end:

* :meth:`Traffic.carry`: a TCP connection arrives at a listener (the server's public port for ``-R``, the client's
  local port for ``-L``); open a stream to the other end, splice, log one line.
* :meth:`Traffic.answer`: a stream arrives (on the client for ``-R``, on the server for ``-L``); decide where it
  goes, dial it, accept or reject the stream with the reason, splice, log one line.

The side-specific parts (which service, which limit, which link) come in as small objects made once per service or
per link (an :class:`Entrance`) or as a route function that returns a :class:`Destination`, so each connection is
one task running one coroutine frame of this module, as it was before these flows were shared.

Log lines, with ``LABEL`` the service (``web``, ``home/web``) or the client (``home``), and the byte counts named
``in``/``out`` for ``-R`` (``in`` towards the service) and ``out``/``back`` for ``-L`` (``out`` towards the target):

* ``LABEL: PEER closed after 1.234 s: in 10 bytes (eof), out 20 bytes (eof)`` (INFO, each connection);
* ``LABEL: closing PEER: the client could not serve it: REASON`` (WARNING, the stream was refused);
* ``LABEL: cannot serve PEER: local service: REASON`` (WARNING, the target could not be dialled).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Final, Protocol, final

import attrs
import trio
from trio_tunnel.proto import ErrorCode, proxyheader
from trio_tunnel.proto.proxyheader import Address, IPAddress

from .console import format_hostport
from .dial import DialError, dial
from .errors import SessionClosedError, StreamOpenError
from .idle import run_splice
from .metrics import ServiceStats, open_result
from .mux import MuxStream, Session
from .relay import Splice, SpliceResult
from .tcp import TcpStream
from .udp import answer_stream

__all__ = ["FORWARD_WORDS", "REVERSE_WORDS", "Arrival", "Destination", "Entrance", "Meta", "Route", "Traffic"]

REVERSE_WORDS: Final = ("in", "out")
"""How the byte counts of a ``-R`` connection are named: ``in`` towards the exposed service, ``out`` back."""
FORWARD_WORDS: Final = ("out", "back")
"""How the byte counts of a ``-L`` connection are named: ``out`` towards the target, ``back`` from it."""

Meta = Mapping[str, str | int | bool | None]

FIRST_BYTES: Final = 16 * 1024
"""At most this much of what a connection already sent goes out with its stream's OPEN (within the peer's initial
window: all of it, with trio-tunnel's 4-64 KiB floor windows)."""


@attrs.frozen
class Destination:
    """Where an arriving stream goes, and how its log lines name it."""

    host: str
    port: int
    label: str
    """First word of every line: the service (``web``) or the client (``home``). Also starts a refusal's reason,
    so the opening end learns which service could not be reached."""
    what: str
    """What the target is, in a failed dial's reason: ``local service``, ``forward target``."""
    words: tuple[str, str] = REVERSE_WORDS
    who: str = ""
    """How the closed line names the connection (default: its peer, from the stream's ``meta["peer"]``)."""
    endings: bool = True
    """Whether the closed line says how each direction ended ("(eof)"); the server's forward line never did."""
    udp: bool = False
    """A UDP target: the stream carries datagrams to a connected UDP socket (:mod:`trio_tunnel.udp`)."""
    proxy_protocol: str | None = None
    """``v1``/``v2``: write a PROXY protocol header (from the stream's meta) to the target before the first byte."""
    stats: ServiceStats | None = None
    """Where the connections it answers are counted (:mod:`trio_tunnel.metrics`)."""
    idle: float | None = None
    """TCP: close a connection after this many seconds without a byte either way (:mod:`trio_tunnel.idle`)."""


@attrs.frozen
class Arrival:
    """Who an accepted connection is from and where it arrived: its peer, or the client that a trusted load
    balancer's PROXY header names (then ``via`` is the balancer and ``early`` the bytes read past the header)."""

    peer: str
    """``HOST:PORT`` for logs (``?`` when the socket no longer knows)."""
    source: Address | None = None
    public: Address | None = None
    """The address the connection arrived at (the server's public address for an exposed service)."""
    early: bytes = b""
    via: str = ""

    @classmethod
    def of(cls, conn: TcpStream) -> Arrival:
        """The connection's own addresses (one ``getpeername`` for the log name and the source both)."""
        sock = conn.socket
        try:
            host, port = sock.getpeername()[:2]
        except OSError:
            return cls("?")
        peer = format_hostport(str(host), int(port))
        try:
            source = Address(_ip_of(host), port)
            public_host, public_port = sock.getsockname()[:2]
            public = Address(_ip_of(public_host), public_port)
        except (OSError, ValueError):
            return cls(peer)
        return cls(peer, source, public)

    def meta(self) -> dict[str, str | int | bool | None]:
        """The stream's open metadata: ``peer`` (for logs) and, when known, ``peer_ip``/``peer_port`` (the external
        user) and ``public_ip``/``public_port`` (where it connected), for a PROXY header at the far end."""
        meta: dict[str, str | int | bool | None] = {"peer": self.peer}
        if self.source is not None:
            meta.update(peer_ip=_text_of(self.source.ip), peer_port=self.source.port)
        if self.public is not None:
            meta.update(public_ip=_text_of(self.public.ip), public_port=self.public.port)
        return meta

    def via_proxy(self, source: Address | None, public: Address | None, early: bytes) -> Arrival:
        """This connection as a PROXY header describes it (None: the header said "use the connection's own")."""
        if source is None or public is None:
            return attrs.evolve(self, early=early)
        return Arrival(format_hostport(str(source.ip), source.port), source, public, early, via=self.peer)


@lru_cache(maxsize=1024)
def _ip_of(host: str) -> IPAddress:
    """:meth:`Address.of`'s address for a socket's host string, parsed once per host (visitors come back, the
    public address is always the same, and ``ipaddress`` parses in Python: the better part of an accept)."""
    return Address.of(host, 0).ip


@lru_cache(maxsize=1024)
def _text_of(ip: IPAddress) -> str:
    """``str(ip)``, formatted once per address."""
    return str(ip)


Route = Callable[[MuxStream], Destination | None]
"""Where an arriving stream goes; None once it has rejected the stream itself (unknown route, not allowed)."""


class Entrance(Protocol):
    """One listener's side of :meth:`Traffic.carry`: made once per exposed service or ``-L`` forward."""

    @property
    def label(self) -> str: ...

    @property
    def route(self) -> str: ...

    @property
    def other(self) -> str:
        """The far end of the link (``client``, ``server``), for "the client could not serve it"."""
        ...

    @property
    def words(self) -> tuple[str, str]: ...

    async def admit(self, peer: str) -> Session | None:
        """The session to carry a connection from ``peer`` over, or None (after logging why) to close it."""
        ...

    def meta(self, arrival: Arrival) -> Meta: ...

    @property
    def stats(self) -> ServiceStats | None:
        """Where its connections are counted (:mod:`trio_tunnel.metrics`); ``admit`` counts its own refusals."""
        ...

    def release(self, peer: str) -> None:
        """The connection from ``peer`` that :meth:`admit` let in has ended."""
        ...

    def retry(self, exc: StreamOpenError | SessionClosedError) -> bool:
        """The stream over :meth:`admit`'s session could not be opened (and :meth:`release` was called); True to
        :meth:`admit` again (a group tries its other members), False to close the connection."""
        ...

    @property
    def optimistic(self) -> bool:
        """Carry without waiting for the far end's answer to the open (its OPEN_OK): the connection's first bytes
        go out right behind the OPEN and the splice starts at once. A refusal then ends the splice (the connection
        is reset) and is logged and counted as before. Only for an entrance that never retries: the bytes already
        read could not be offered to another member."""
        ...


@attrs.define(eq=False)
class Traffic:
    """The connections one end of a link carries: counted, so that a graceful shutdown can wait for them, and
    logged to the end's own logger (``trio_tunnel.server``, ``trio_tunnel.client``)."""

    log: logging.Logger
    active: int = 0
    """Connections and streams in flight."""
    _idle: trio.Event = attrs.field(factory=trio.Event, alias="_idle")

    def begin(self) -> None:
        self.active += 1

    def end(self) -> None:
        self.active -= 1
        if not self.active:
            self._idle.set()

    async def drained(self) -> None:
        """Wait until nothing is in flight (the caller bounds the time)."""
        while self.active:
            event = self._idle = trio.Event()
            await event.wait()

    # -------------------------------------------------------------------------------------- answering end

    async def accept_streams(self, session: Session, nursery: trio.Nursery, route: Route, dial_timeout: float) -> None:
        """Answer every stream the peer opens, each in a task of ``nursery``, until the session ends."""
        while True:
            try:
                stream = await session.accept_stream()
            except SessionClosedError:
                return
            self.begin()
            # (a constant name: Trio would format one per task, held for the connection's lifetime)
            nursery.start_soon(self.answer, stream, route, dial_timeout, name="trio_tunnel.handlers.Traffic.answer")

    async def answer(self, stream: MuxStream, route: Route, dial_timeout: float) -> None:
        """Dial where ``route`` sends ``stream``, accept it (or reject it with the reason), splice, log. Ends the
        in-flight count that :meth:`accept_streams` began."""
        try:
            destination = route(stream)
            if destination is None:
                return
            if destination.udp:
                await answer_stream(stream, destination, self.log, dial_timeout)
                return
            peer = stream.meta.get("peer", "?")
            stats = destination.stats
            try:
                target = await dial(destination.host, destination.port, timeout=dial_timeout)
                if destination.proxy_protocol is not None:
                    await _send_proxy_header(target, destination.proxy_protocol, stream.meta)
            except DialError as exc:
                reason = f"{destination.what}: {exc.reason}"
                self.log.warning("%s: cannot serve %s: %s", destination.label, peer, reason)
                if stats is not None:
                    stats.failed(open_result(exc.code), reason)
                stream.reject(exc.code, f"{destination.label}: {reason}")
                return
            stream.accept()
            stream.drop_meta()  # read (peer, PROXY header): not held for the connection's lifetime
            started = trio.current_time()
            splicer = Splice(stream, target)
            if stats is not None:
                stats.begin(splicer)
            try:
                result = await run_splice(splicer, destination.idle)
            finally:
                if stats is not None:
                    stats.end(splicer)
            self._closed(
                destination.label, destination.who or str(peer), started, result, destination.words, destination.endings
            )
        finally:
            self.end()

    # ---------------------------------------------------------------------------------------- opening end

    async def carry(self, entrance: Entrance, conn: TcpStream, arrival: Arrival | None = None) -> None:
        """Carry ``conn`` (just accepted by ``entrance``'s listener) over a stream to the far end, splice, log.
        ``arrival`` says who it is from when a PROXY header was read (default: the socket's peer). Closes ``conn``
        on every path (the splice closes it too; closing twice is fine)."""
        try:  # (not "async with": its bound __aexit__ would be held for the whole connection)
            arrival = arrival or Arrival.of(conn)
            peer = arrival.peer
            early = arrival.early
            first = b""
            self.begin()
            try:
                while True:
                    session = await entrance.admit(peer)
                    if session is None:
                        return
                    if entrance.optimistic and not early and not first:  # (read once, whatever the retries)
                        # What the visitor already sent goes out with the OPEN, in one write (a TLS record).
                        first = conn.receive_nowait(min(session.open_room, FIRST_BYTES))
                    try:
                        stream = await session.open_stream(
                            entrance.route,
                            entrance.meta(arrival),
                            wait_accepted=not entrance.optimistic,
                            first=first,
                        )
                        break
                    except (StreamOpenError, SessionClosedError) as exc:
                        entrance.release(peer)
                        if entrance.retry(exc):
                            continue
                        self._refused(entrance, peer, exc)
                        if (stats := entrance.stats) is not None:
                            failed = isinstance(exc, StreamOpenError)
                            stats.failed(open_result(exc.code) if failed else "refused", str(exc))
                        return
                    except BaseException:
                        entrance.release(peer)
                        raise
                arrival = None  # (its addresses went out with the OPEN: not held for the connection's lifetime)
                if entrance.optimistic:  # a refusal closes the connection as it arrives, as if it had been awaited
                    stream.when_refused(_Refusal(self, entrance, peer, conn))
                try:
                    if early:  # bytes read past a PROXY header: the connection's first data
                        try:
                            await stream.send_all(early)
                            early = b""
                        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                            if stream.refusal is None:  # (a refusal said so already: _Refusal)
                                self.log.warning("%s: closing %s: %s", entrance.label, peer, exc)
                            stream.reset(ErrorCode.CANCEL, "could not deliver the first bytes")
                            return
                    started = trio.current_time()
                    splicer = Splice(conn, stream)
                    if first:
                        splicer.count(True, len(first))
                        first = b""
                    if (stats := entrance.stats) is not None:
                        stats.begin(splicer)
                    try:
                        result = await splicer.run()
                    finally:
                        if stats is not None:
                            stats.end(splicer)
                    if stream.refusal is not None:  # opened optimistically, and refused after all (see _Refusal)
                        if stats is not None:
                            stats.withdraw(splicer)
                        return
                    self._closed(entrance.label, peer, started, result, entrance.words, True)
                finally:
                    entrance.release(peer)
            finally:
                self.end()
        finally:
            await conn.aclose()

    def _refused(self, entrance: Entrance, peer: str, exc: StreamOpenError | SessionClosedError) -> None:
        self.log.warning("%s: closing %s: the %s could not serve it: %s", entrance.label, peer, entrance.other, exc)

    def _closed(
        self, label: str, who: str, started: float, result: SpliceResult, words: tuple[str, str], endings: bool
    ) -> None:
        duration = trio.current_time() - started
        if endings:
            self.log.info(
                "%s: %s closed after %.3f s: %s %d bytes (%s), %s %d bytes (%s)",
                label,
                who,
                duration,
                words[0],
                result.bytes_a_to_b,
                result.a_to_b,
                words[1],
                result.bytes_b_to_a,
                result.b_to_a,
            )
        else:
            self.log.info(
                "%s: %s closed after %.3f s: %s %d bytes, %s %d bytes",
                label,
                who,
                duration,
                words[0],
                result.bytes_a_to_b,
                words[1],
                result.bytes_b_to_a,
            )


@final
class _Refusal:
    """:meth:`MuxStream.when_refused`'s callback for :meth:`Traffic.carry` when it did not wait for the far end's
    answer: what a refusal did when the open was awaited, at the moment it arrives and before the splice's tasks
    wake. The warning line and the count, then the connection closed (a FIN, as a visitor of a service that is down
    always saw, not the reset the splice would send for a stream that broke). A small object of its own rather than
    a ``partial``: one is held by every open connection."""

    __slots__ = ("conn", "entrance", "peer", "traffic")

    def __init__(self, traffic: Traffic, entrance: Entrance, peer: str, conn: TcpStream) -> None:
        self.traffic = traffic
        self.entrance = entrance
        self.peer = peer
        self.conn = conn

    def __call__(self, exc: StreamOpenError) -> None:
        self.traffic._refused(self.entrance, self.peer, exc)
        if (stats := self.entrance.stats) is not None:
            stats.failed(open_result(exc.code), str(exc))
        self.conn.close_now()


async def _send_proxy_header(target: TcpStream, version: str, meta: Mapping[str, object]) -> None:
    """Write the PROXY protocol header for the connection ``meta`` describes (the server's ``peer_ip``,
    ``peer_port``, ``public_ip``, ``public_port``) to the freshly dialled ``target``; a server that sends none
    gets an "unknown" header, which tells the service to use the connection's own addresses.

    Raises:
        DialError: the target closed the connection at once (it is closed here).
    """
    source = _address(meta.get("peer_ip"), meta.get("peer_port"))
    public = _address(meta.get("public_ip"), meta.get("public_port"))
    try:
        await target.send_all(proxyheader.encode(version, source, public))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(target)
        raise DialError(ErrorCode.CONNECT_FAILED, f"the connection closed before the PROXY header: {exc}") from None


def _address(ip: object, port: object) -> Address | None:
    if not isinstance(ip, str) or type(port) is not int:
        return None
    try:
        return Address.of(ip, port)
    except ValueError:
        return None
