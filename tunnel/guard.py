"""Admission of connections that have not authenticated yet, and the file descriptor budget they may use.

Why: every TCP connection costs the server a descriptor from the moment it is accepted, and a stranger who opens
connections and never finishes the handshake costs nothing himself. Without a cap, a few thousand idle connections
used every descriptor: the public ports of authenticated clients stopped accepting and no client could connect.

The rules (sizes in docs/CONFIG.md, ``max_handshakes`` and ``max_handshakes_per_ip``):

* At start the soft ``RLIMIT_NOFILE`` is raised to the hard limit (as Go's runtime does): the soft default of 1,024
  is a relic of ``select()``, which nothing here uses.
* Connections still in the handshake (TLS and the session's HELLO/WELCOME) hold at most ``max_handshakes``
  descriptors, by default a quarter of the descriptor limit: the other three quarters are the reserve for the
  links of authenticated clients, their public ports and the connections those carry.
* One source address may hold at most ``max_handshakes_per_ip`` of them; a connection past that is closed at once
  (the flooder only hurts himself).
* At the global cap a new connection displaces the one that has been handshaking longest: a legitimate client
  finishes its handshake in a few round trips, so it is displaced only if ``max_handshakes`` strangers arrive
  within that time, while an idle stranger holds his slot only until the next ones come. (Refusing the newcomer
  instead would let a flood that keeps the cap full lock every client out for good.)
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import resource
import socket
from collections import OrderedDict
from functools import lru_cache
from typing import Final

import attrs
import trio

__all__ = ["AcceptTrouble", "Admission", "HandshakeCaps", "Ticket", "address_key", "raise_nofile_limit", "source_of"]

logger: Final = logging.getLogger(__name__)

HANDSHAKE_SHARE: Final = 4
"""Default ``max_handshakes``: the descriptor limit divided by this (a quarter)."""
MAX_DEFAULT_HANDSHAKES: Final = 4096
"""... but no more than this by default: a server with a million descriptors needs no million strangers."""
PER_IP_SHARE: Final = 8
"""Default ``max_handshakes_per_ip``: ``max_handshakes`` divided by this, at least :data:`MIN_PER_IP`."""
MIN_PER_IP: Final = 2


def source_of(sock: socket.socket) -> str:
    """The source of a connection as the per-address caps count it (:func:`address_key`); ``?`` once it is gone."""
    try:
        return address_key(str(sock.getpeername()[0]))
    except OSError:
        return "?"


def address_key(host: str) -> str:
    """What one "address" is for the per-address caps: an IPv4 address, or an IPv6 /64 (one host usually has a
    whole /64 to pick addresses from; counting /128s would give a flooder 2**64 shares)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@lru_cache(maxsize=1024)
def host_of(peer: str) -> str:
    """What the per-address caps count for a ``HOST:PORT`` or ``[V6]:PORT`` peer (:func:`address_key`). Cached:
    it parses the address (twice per connection: admit and release), visitors come back, and the cache is bounded."""
    return address_key(peer.rpartition(":")[0].strip("[]") or peer)


@attrs.define(eq=False)
class SourceCounts:
    """The connections open now through one public port, per source address, against ``max_connections_per_ip``
    (so one host cannot hold every slot of a service or a group)."""

    cap: int
    held: dict[str, int] = attrs.field(factory=dict)
    """:func:`host_of` key -> its connections open now (no entry at 0: bounded by the connections open)."""

    def full(self, peer: str) -> int:
        """How many connections ``peer``'s address holds when that is its cap already, else 0."""
        held = self.held.get(host_of(peer), 0)
        return held if held >= self.cap else 0

    def add(self, peer: str) -> None:
        source = host_of(peer)
        self.held[source] = self.held.get(source, 0) + 1

    def remove(self, peer: str) -> None:
        source = host_of(peer)
        left = self.held.get(source, 1) - 1
        if left > 0:
            self.held[source] = left
        else:
            self.held.pop(source, None)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; ``(before, now)``. A limit that cannot be raised (no
    such resource, an infinite hard limit the kernel refuses) is left as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


@attrs.frozen
class HandshakeCaps:
    """How many connections may be in the handshake at once: in all, and from one source address."""

    total: int
    per_ip: int

    @classmethod
    def sized(cls, nofile: int, *, total: int | None = None, per_ip: int | None = None) -> HandshakeCaps:
        """The configured caps, or the defaults for a descriptor limit of ``nofile``."""
        if total is None:
            total = max(1, min(MAX_DEFAULT_HANDSHAKES, nofile // HANDSHAKE_SHARE))
        if per_ip is None:
            per_ip = max(MIN_PER_IP, total // PER_IP_SHARE)
        return cls(total, min(per_ip, total))


@attrs.define(eq=False)
class Ticket:
    """One admitted connection's place in the handshake: :attr:`scope` is cancelled if it is displaced."""

    source: str
    admission: Admission
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    released: bool = False

    def release(self) -> None:
        """The handshake is over (done or failed): the slot is free, and the connection can no longer be
        displaced. Idempotent."""
        if not self.released:
            self.released = True
            self.admission._release(self)


@attrs.define(eq=False)
class Admission:
    """Counts the connections in the handshake and decides on each new one (see the module docstring)."""

    caps: HandshakeCaps
    waiting: OrderedDict[int, Ticket] = attrs.field(factory=OrderedDict)
    """id(ticket) -> ticket, oldest first."""
    per_source: dict[str, int] = attrs.field(factory=dict)
    displaced: int = 0
    refused: int = 0

    def __len__(self) -> int:
        return len(self.waiting)

    def admit(self, source: str) -> Ticket | None:
        """A ticket for a new connection from ``source`` (an IP address), or None if that address already holds
        its share. At the global cap the oldest handshake is displaced (its ticket's scope is cancelled)."""
        held = self.per_source.get(source, 0)
        if held >= self.caps.per_ip:
            self.refused += 1
            return None
        if len(self.waiting) >= self.caps.total:
            _, oldest = self.waiting.popitem(last=False)
            self._forget(oldest)
            oldest.released = True
            oldest.scope.cancel(reason="displaced by a newer handshake (max_handshakes)")
            self.displaced += 1
            held = self.per_source.get(source, 0)
        ticket = Ticket(source, self)
        self.waiting[id(ticket)] = ticket
        self.per_source[source] = held + 1
        return ticket

    def _release(self, ticket: Ticket) -> None:
        if self.waiting.pop(id(ticket), None) is not None:
            self._forget(ticket)

    def _forget(self, ticket: Ticket) -> None:
        left = self.per_source[ticket.source] - 1
        if left:
            self.per_source[ticket.source] = left
        else:
            del self.per_source[ticket.source]


ACCEPT_RETRY_FIRST: Final = 0.1
ACCEPT_RETRY_MAX: Final = 1.0


@attrs.define
class AcceptTrouble:
    """An accept loop out of descriptors (or memory): back off, doubling the wait from
    :data:`ACCEPT_RETRY_FIRST` up to :data:`ACCEPT_RETRY_MAX`, and log once per burst (one line when it starts,
    one when accepting works again), not once per failed accept."""

    where: str
    log: logging.Logger = logger
    """The accept loop's logger (``trio_tunnel.tcp``)."""
    failures: int = 0
    started: float = 0.0
    delay: float = ACCEPT_RETRY_FIRST
    errno_name: str = ""

    def failed(self, exc: OSError) -> float:
        """Seconds to wait before accepting again."""
        if not self.failures:
            self.started = trio.current_time()
            self.delay = ACCEPT_RETRY_FIRST
            self.errno_name = str(errno.errorcode.get(exc.errno or 0, exc.errno))
            self.log.error(
                "accept on %s failed: %s (%s); retrying in %g s, then less often until descriptors are free "
                "again (one line per burst; raise the descriptor limit, or lower max_handshakes and "
                "max_connections_per_service)",
                self.where,
                exc.strerror,
                self.errno_name,
                self.delay,
            )
        else:
            self.delay = min(ACCEPT_RETRY_MAX, self.delay * 2)
        self.failures += 1
        return self.delay

    def accepted(self) -> None:
        if self.failures:
            self.log.warning(
                "accept on %s works again after %d failed attempts (%s) over %.1f s",
                self.where,
                self.failures,
                self.errno_name,
                trio.current_time() - self.started,
            )
            self.failures = 0
