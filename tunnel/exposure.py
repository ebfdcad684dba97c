"""The server's side of a client's link and of the public ports it exposes: the link as the server's registry sees
it (:class:`ClientLink`), one exposed port (:class:`Exposure`), the entrance each external connection passes
(:class:`ServiceEntrance`: ``max_connections_per_service`` and ``max_connections_per_ip``), and binding a public port
(:func:`bind_public`, :func:`bind_error`). :mod:`trio_tunnel.server` decides; this module holds what it decides on."""

from __future__ import annotations

import errno
import logging
from typing import ClassVar, Final

import attrs
import trio
from trio_tunnel.proto import ErrorCode
from trio_tunnel.proto.datagram import FlowBudget

from .config import ServerConfig
from .config.policy import PortSet
from .console import format_hostport
from .errors import SessionClosedError, StreamOpenError
from .groups import Member
from .guard import SourceCounts, host_of
from .handlers import REVERSE_WORDS, Arrival, Meta, Traffic
from .metrics import ServiceStats
from .mux import Session
from .tally import Tally
from .wire import REPLACED

__all__ = ["ClientLink", "Exposure", "ServiceEntrance", "bind_error", "bind_public", "per_ip_cap", "released"]

logger: Final = logging.getLogger("trio_tunnel.server")
"""The server's logger: these lines are the server's."""


@attrs.define(eq=False)
class ClientLink:
    """One authenticated client link, as the registry sees it."""

    name: str
    peer: str
    session: Session
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)
    services: dict[str, str] = attrs.field(factory=dict)
    """Service name -> public address bound for it."""
    replaced: bool = False
    accepting: list[trio.CancelScope] = attrs.field(factory=list)
    """One per exposed service: its accept loop (its connections live in the link's nursery)."""
    traffic: Traffic = attrs.field(factory=lambda: Traffic(logger))
    """External connections and forwards in flight (graceful shutdown waits for them)."""
    exposures: dict[str, Exposure] = attrs.field(factory=dict)
    """Service name -> its listener, for UNEXPOSE and reloads."""
    udp_flows: FlowBudget = attrs.field(factory=lambda: FlowBudget(4096))
    """UDP flows of all this client's UDP services (``max_flows_per_client``)."""
    members: dict[str, tuple[Member, trio.Event]] = attrs.field(factory=dict)
    """Service name -> its membership of a load-balancing group, and the event set once it has left."""

    def replace(self, newcomer: str) -> None:
        """A newer link of the same name (from ``newcomer``) takes this one's place: if this link is still alive (two
        clients share a name), tell it why (a stale one hears nothing), and end it. Its ``done`` is set once ended."""
        self.replaced = True
        self.session.go_away(
            ErrorCode.PROHIBITED,
            f"{REPLACED}: another client named {self.name!r} connected from {newcomer}; client names must be unique "
            "(--name)",
        )
        self.scope.cancel(reason="replaced by a new link of the same client")

    async def drain(self) -> None:
        """Stop accepting on the public ports, GOAWAY, wait for the work in flight, then end the link."""
        for scope in self.accepting:
            scope.cancel(reason="draining")
        self.session.go_away(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        await self.traffic.drained()
        self.scope.cancel(reason="drained")
        await self.done.wait()


@attrs.define(eq=False)
class Exposure:
    """One exposed service's public port: cancelling ``scope`` releases it (``closed`` is set once it is closed);
    the connections already accepted carry on in the link's nursery."""

    port: int
    limiter: trio.CapacityLimiter
    """``max_connections_per_service``"""
    sources: SourceCounts
    """``max_connections_per_ip``"""
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    closed: trio.Event = attrs.field(factory=trio.Event)
    udp: bool = False


@attrs.frozen(eq=False)
class ServiceEntrance:
    """An exposed service's side of :meth:`Traffic.carry`: each external connection becomes a stream to the client,
    at most ``limiter.total_tokens`` at a time (``max_connections_per_service``)."""

    link: ClientLink
    session: Session
    route: str
    limiter: trio.CapacityLimiter
    refusals: Tally
    stats: ServiceStats
    sources: SourceCounts
    """Connections open now per source address (``max_connections_per_ip``)."""
    other: ClassVar[str] = "client"
    words: ClassVar[tuple[str, str]] = REVERSE_WORDS
    optimistic: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return f"{self.link.name}/{self.route}"

    async def admit(self, peer: str) -> Session | None:
        if held := self.sources.full(peer):
            self.refusals.note(
                host_of(peer),
                logging.WARNING,
                "%s: refused %s: %d connections already open from that address (max_connections_per_ip)",
                self.label,
                peer,
                held,
            )
            self.stats.failed("limit", f"{held} connections already open from one address")
            return None
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            self.refusals.note(
                host_of(peer),
                logging.WARNING,
                "%s: refused %s: %d connections already open (max_connections_per_service)",
                self.label,
                peer,
                self.limiter.total_tokens,
            )
            self.stats.failed("limit", f"{self.limiter.total_tokens} connections already open")
            return None
        self.sources.add(peer)
        return self.session

    def meta(self, arrival: Arrival) -> Meta:
        return arrival.meta()

    def release(self, peer: str) -> None:
        self.limiter.release()
        self.sources.remove(peer)

    def retry(self, exc: StreamOpenError | SessionClosedError) -> bool:
        return False


def released(link: ClientLink, name: str, exposure: Exposure) -> None:
    """A service's public port is closed (unexposed, drained, or its link ended): forget it, and tell whoever waits
    on ``exposure.closed`` (UNEXPOSE's reply, a reload's ``reloaded``)."""
    link.services.pop(name, None)
    link.accepting.remove(exposure.scope)
    if link.exposures.get(name) is exposure:
        del link.exposures[name]
    exposure.closed.set()


def per_ip_cap(config: ServerConfig) -> int:
    """``max_connections_per_ip``, or its default: a quarter of ``max_connections_per_service``."""
    return config.max_connections_per_ip or max(1, config.max_connections_per_service // 4)


def bind_error(host: str, port: int, exc: OSError) -> str:
    where = format_hostport(host, port)
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: address already in use on the server"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: the server has no such address"
    return f"cannot listen on {where}: {exc.strerror or exc}"


async def bind_public(host: str, port: int, previous: int | None, ports: PortSet) -> list[trio.SocketListener]:
    """The listeners of a TCP service's public port: ``port``, or (0) the port it had before if still free, else any
    port ``ports`` allows."""
    if not port and previous is not None and previous in ports:
        try:  # the port this service had before (a reconnect): keep its public address if still free
            return await trio.open_tcp_listeners(previous, host=host)
        except OSError:
            pass
    if port or ports.allows_any_unprivileged:
        return await trio.open_tcp_listeners(port, host=host)
    last: OSError | None = None
    for candidate in ports:  # port 0 inside a restricted set: the first free port of the set
        if candidate == 0:
            continue
        try:
            return await trio.open_tcp_listeners(candidate, host=host)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            last = exc
    raise last or OSError(errno.EADDRINUSE, "no free port in the allowed set")
