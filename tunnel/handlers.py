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
from typing import Final, Protocol

import attrs
import trio

from .dial import DialError, dial, peer_address
from .errors import SessionClosedError, StreamOpenError
from .metrics import ServiceStats, open_result
from .mux import MuxStream, Session
from .relay import Splice, SpliceResult
from .tcp import TcpStream

__all__ = ["FORWARD_WORDS", "REVERSE_WORDS", "Destination", "Entrance", "Meta", "Route", "Traffic"]

REVERSE_WORDS: Final = ("in", "out")
"""How the byte counts of a ``-R`` connection are named: ``in`` towards the exposed service, ``out`` back."""
FORWARD_WORDS: Final = ("out", "back")
"""How the byte counts of a ``-L`` connection are named: ``out`` towards the target, ``back`` from it."""

Meta = Mapping[str, str | int | bool | None]


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
    stats: ServiceStats | None = None
    """Where the connections it answers are counted (:mod:`trio_tunnel.metrics`)."""


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

    def meta(self, peer: str) -> Meta: ...

    @property
    def stats(self) -> ServiceStats | None:
        """Where its connections are counted (:mod:`trio_tunnel.metrics`); ``admit`` counts its own refusals."""
        ...

    def release(self) -> None:
        """The connection that :meth:`admit` let in has ended."""
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
            nursery.start_soon(self.answer, stream, route, dial_timeout)

    async def answer(self, stream: MuxStream, route: Route, dial_timeout: float) -> None:
        """Dial where ``route`` sends ``stream``, accept it (or reject it with the reason), splice, log. Ends the
        in-flight count that :meth:`accept_streams` began."""
        try:
            destination = route(stream)
            if destination is None:
                return
            peer = stream.meta.get("peer", "?")
            stats = destination.stats
            try:
                target = await dial(destination.host, destination.port, timeout=dial_timeout)
            except DialError as exc:
                reason = f"{destination.what}: {exc.reason}"
                self.log.warning("%s: cannot serve %s: %s", destination.label, peer, reason)
                if stats is not None:
                    stats.failed(open_result(exc.code), reason)
                stream.reject(exc.code, f"{destination.label}: {reason}")
                return
            stream.accept()
            started = trio.current_time()
            splicer = Splice(stream, target)
            if stats is not None:
                stats.begin(splicer)
            try:
                result = await splicer.run()
            finally:
                if stats is not None:
                    stats.end(splicer)
            self._closed(
                destination.label, destination.who or str(peer), started, result, destination.words, destination.endings
            )
        finally:
            self.end()

    # ---------------------------------------------------------------------------------------- opening end

    async def carry(self, entrance: Entrance, conn: TcpStream) -> None:
        """Carry ``conn`` (just accepted by ``entrance``'s listener) over a stream to the far end, splice, log.
        Closes ``conn`` on every path (the splice closes it too; closing twice is fine)."""
        try:  # (not "async with": its bound __aexit__ would be held for the whole connection)
            peer = peer_address(conn)
            self.begin()
            try:
                session = await entrance.admit(peer)
                if session is None:
                    return
                try:
                    try:
                        stream = await session.open_stream(entrance.route, entrance.meta(peer))
                    except (StreamOpenError, SessionClosedError) as exc:
                        self.log.warning(
                            "%s: closing %s: the %s could not serve it: %s", entrance.label, peer, entrance.other, exc
                        )
                        if (stats := entrance.stats) is not None:
                            failed = isinstance(exc, StreamOpenError)
                            stats.failed(open_result(exc.code) if failed else "refused", str(exc))
                        return
                    started = trio.current_time()
                    splicer = Splice(conn, stream)
                    if (stats := entrance.stats) is not None:
                        stats.begin(splicer)
                    try:
                        result = await splicer.run()
                    finally:
                        if stats is not None:
                            stats.end(splicer)
                    self._closed(entrance.label, peer, started, result, entrance.words, True)
                finally:
                    entrance.release()
            finally:
                self.end()
        finally:
            await conn.aclose()

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
