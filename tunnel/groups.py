"""Load-balancing and failover groups: several clients expose a service in the same ``group`` and share one public
port; the server spreads new connections over the live members.

Ownership: a :class:`Group` owns its listeners and its accept loop, which run in the server's connection nursery
(:attr:`GroupRegistry.nursery`), not in any member's link, so the port outlives every single member. Each member
is held by one task in its own link's nursery (:meth:`GroupRegistry.hold`): when the link ends (or drains, or is
replaced) that task leaves the group, and the last one to leave closes the listeners before its link is done, so a
reconnecting client can bind the port again at once.

Rules:

* A group is bound to the token its first member authenticated with (``Session.token_id``); a client with another
  token is refused with ``GROUP_TOKEN``. A request that differs from the group in bind address, port (0 joins
  whatever port the group has) or ``balance`` is refused with ``GROUP_MISMATCH``. Both are one readable line.
* ``round-robin`` (default) takes the live members in turn; ``least-connections`` the member with the fewest open
  connections (ties in turn). A member whose session has closed, whose link is leaving, or which is at its
  ``max_connections_per_service`` is skipped at once, before its link task has even noticed.
* A connection whose stream cannot be opened on the chosen member (its link just died, it is going away, its local
  service refused) is tried on each other member once before it is closed: nothing of it was read yet, so moving it
  is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import ClassVar, Final

import attrs
import trio
from trio_tunnel.proto import ErrorCode

from .console import format_hostport
from .errors import SessionClosedError, StreamOpenError
from .guard import SourceCounts, host_of
from .handlers import REVERSE_WORDS, Arrival, Meta, Traffic
from .metrics import ServiceStats
from .mux import Session
from .tally import Tally
from .tcp import TcpStream, serve_tcp

__all__ = ["Group", "GroupRegistry", "Member"]

logger: Final = logging.getLogger("trio_tunnel.server")


@attrs.define(eq=False)
class Member:
    """One client's service in a group."""

    client: str
    service: str
    session: Session
    traffic: Traffic
    """The member link's count of work in flight: a graceful drain of that link waits for its group connections."""
    limiter: trio.CapacityLimiter
    """Its share of connections (``max_connections_per_service``); ``borrowed_tokens`` is its open connections."""
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    """The task that holds the membership; cancelled when the member leaves."""
    stats: ServiceStats | None = None
    """Where the connections it takes are counted (:mod:`trio_tunnel.metrics`)."""

    @property
    def label(self) -> str:
        return f"{self.client}/{self.service}"

    def can_take(self) -> bool:
        return not self.session.closed and not self.scope.cancel_called and self.limiter.available_tokens > 0


@attrs.define(eq=False)
class Group:
    """A shared public port and its members."""

    name: str
    token_id: str
    bind: str
    host: str
    """The bound address (``bind`` as the socket reports it)."""
    port: int
    """The bound port (never 0)."""
    address: str
    balance: str
    listeners: list[trio.SocketListener]
    members: list[Member] = attrs.field(factory=list)
    cursor: int = 0
    """Round-robin position: the index in :attr:`members` to try first."""
    accepting: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    sources: SourceCounts = attrs.field(factory=lambda: SourceCounts(1))
    """Connections open now per source address, across all members (``max_connections_per_ip``: the group's port
    counts as one service's)."""

    def refusal(self, token_id: str, bind: str, port: int, balance: str) -> tuple[ErrorCode, str] | None:
        """Why a request to join may not (None: it may)."""
        if token_id != self.token_id:
            return ErrorCode.GROUP_TOKEN, (
                f"group {self.name!r} belongs to clients with another token; use their token or another group name"
            )
        if bind != self.bind or port not in (0, self.port):
            return ErrorCode.GROUP_MISMATCH, (
                f"group {self.name!r} listens on {self.address}; its members must ask for that address (or port 0)"
            )
        if balance != self.balance:
            return ErrorCode.GROUP_MISMATCH, f"group {self.name!r} balances {self.balance}, not {balance}"
        return None

    def pick(self, tried: list[Member]) -> Member | None:
        """The member for the next connection, skipping ``tried`` and those that cannot take one now."""
        count = len(self.members)
        order = [self.members[(self.cursor + i) % count] for i in range(count)]
        candidates = [member for member in order if member not in tried and member.can_take()]
        if not candidates:
            return None
        if self.balance == "least-connections":
            chosen = min(candidates, key=lambda member: member.limiter.borrowed_tokens)
        else:
            chosen = candidates[0]
        self.cursor = (self.members.index(chosen) + 1) % count
        return chosen

    def describe(self) -> str:
        """Membership, for log lines: ``2 members: home/web, office/web``."""
        names = ", ".join(member.label for member in self.members)
        return f"{len(self.members)} member{'s' if len(self.members) != 1 else ''}: {names or '-'}"


@attrs.define(eq=False)
class _Visit:
    """One external connection to a group, as :meth:`Traffic.carry` sees its entrance: each :meth:`admit` picks a
    member it has not tried yet."""

    group: Group
    refusals: Tally
    """Refused connections, one line per source and window (the server's)."""
    tried: list[Member] = attrs.field(factory=list)
    member: Member | None = None
    other: ClassVar[str] = "client"
    words: ClassVar[tuple[str, str]] = REVERSE_WORDS
    optimistic: ClassVar[bool] = False  # a refused open is retried on another member, with the bytes unread

    @property
    def label(self) -> str:
        return f"{self.member.label}@{self.group.name}" if self.member else self.group.name

    @property
    def route(self) -> str:
        assert self.member is not None
        return self.member.service

    async def admit(self, peer: str) -> Session | None:
        if held := self.group.sources.full(peer):
            self.refusals.note(
                host_of(peer),
                logging.WARNING,
                "group %s: refused %s: %d connections already open from that address (max_connections_per_ip)",
                self.group.name,
                peer,
                held,
            )
            return None
        member = self.group.pick(self.tried)
        if member is None:
            logger.warning(
                "group %s: refused %s: no member can take it (%s)", self.group.name, peer, self.group.describe()
            )
            return None
        self.tried.append(member)
        self.member = member
        member.limiter.acquire_nowait()  # pick() checked that a token is available; no checkpoint since
        member.traffic.begin()
        self.group.sources.add(peer)
        return member.session

    @property
    def stats(self) -> ServiceStats | None:
        return self.member.stats if self.member is not None else None

    def meta(self, arrival: Arrival) -> Meta:
        return arrival.meta()

    def release(self, peer: str) -> None:
        assert self.member is not None
        self.member.limiter.release()
        self.member.traffic.end()
        self.group.sources.remove(peer)

    def retry(self, exc: StreamOpenError | SessionClosedError) -> bool:
        logger.info(
            "group %s: %s could not take a connection (%s); trying another member",
            self.group.name,
            self.member.label if self.member else "?",
            exc,
        )
        return True


Handler = Callable[[TcpStream], Awaitable[None]]


@attrs.define(eq=False)
class GroupRegistry:
    """The server's groups by name, and the nursery their accept loops and connections run in."""

    traffic: Traffic = attrs.field(factory=lambda: Traffic(logger))
    groups: dict[str, Group] = attrs.field(factory=dict)
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    """Held from looking a group up to creating it, across the bind: two first members cannot make two groups."""
    nursery: trio.Nursery | None = None
    """The server's connection nursery (set by ``run_server``): it outlives every link."""
    refusals: Tally = attrs.field(factory=lambda: Tally(logger, "connections"))
    """Where refused connections are noted (``run_server`` sets the server's)."""

    def create(
        self,
        name: str,
        token_id: str,
        bind: str,
        balance: str,
        listeners: list[trio.SocketListener],
        front_door: Callable[[Callable[..., Awaitable[None]]], Handler],
        per_ip: int,
    ) -> Group:
        """A new group on ``listeners`` (now owned by it), accepting at once; ``front_door`` wraps its handler
        (reading a trusted load balancer's PROXY header)."""
        assert self.nursery is not None, "run_server sets the nursery"
        host, port = listeners[0].socket.getsockname()[:2]
        address = format_hostport(str(host), int(port))
        group = Group(
            name, token_id, bind, str(host), int(port), address, balance, listeners, sources=SourceCounts(per_ip)
        )
        self.groups[name] = group

        async def carry(conn: TcpStream, arrival: Arrival | None = None) -> None:
            await self.traffic.carry(_Visit(group, self.refusals), conn, arrival)

        self.nursery.start_soon(self._accept, group, front_door(carry))
        return group

    async def _accept(self, group: Group, handler: Handler) -> None:
        assert self.nursery is not None
        with group.accepting:
            try:
                await serve_tcp(handler, group.listeners, handler_nursery=self.nursery)
            except* trio.ClosedResourceError:
                pass  # the last member closed the listeners under the accept loop

    def join(self, group: Group, member: Member) -> None:
        group.members.append(member)
        logger.info("group %s: %s joined on %s (%s)", group.name, member.label, group.address, group.describe())

    async def hold(self, group: Group, member: Member) -> None:
        """The membership's task, in the member's link nursery: it leaves the group when cancelled (the link ended,
        drains or was replaced); the last member to leave closes the port before returning."""
        try:
            with member.scope:
                await trio.sleep_forever()
        finally:
            self._leave(group, member)

    def _leave(self, group: Group, member: Member) -> None:
        member.scope.cancel()
        group.members.remove(member)
        if group.members:
            group.cursor %= len(group.members)
            logger.info("group %s: %s left (%s)", group.name, member.label, group.describe())
            return
        if self.groups.get(group.name) is group:
            del self.groups[group.name]
        group.accepting.cancel(reason="the group's last member left")
        for listener in group.listeners:
            listener.socket.close()  # now, not at the accept task's next turn: the port is free when this returns
        logger.info("group %s: %s left, the last member; released %s", group.name, member.label, group.address)
