"""What the two ends of a trio-tunnel link agree on, above the mux protocol: route names, request kinds, the GOAWAY
reason of a replaced link, and the mux settings both derive from the user's timeouts.

Server and client both import these from here, so neither depends on the other's module.
"""

from __future__ import annotations

from typing import Final

import attrs

from .config import Timeouts
from .config.commands import DEFAULT_LINK_MEMORY
from .mux import Role, SessionConfig

__all__ = [
    "CLIENT_MAX_STREAMS",
    "LINK_MEMORY",
    "EXPOSE",
    "EXPOSE_UDP",
    "FORWARD_ROUTE",
    "FORWARD_UDP_ROUTE",
    "REPLACED",
    "UNEXPOSE",
    "UNEXPOSED",
    "session_config",
]

FORWARD_ROUTE: Final = "forward"
"""Route of client-opened streams: "dial ``meta["host"]:meta["port"]`` for me" (``-L``). Server-opened streams are
routed by service name (``-R``)."""

EXPOSE: Final = "expose"
"""Control request kind: "bind a public port for my service" (body: ``name``, ``bind``, ``port``)."""

UNEXPOSE: Final = "unexpose"
"""Control request kind: "release the public port of my service" (body: ``name``; reply: ``{}``). Sent by a client
whose config reload removed or changed a service; the service's open connections carry on. A server that does not
know it answers PROHIBITED ("unknown request"), and the client's reload fails, changing nothing."""

UNEXPOSED: Final = "unexposed"
"""Control notification from the server (no reply): "I released the public port of your service" (body: ``name``,
``reason``), when a server reload no longer allows its port. A client that does not know it ignores it."""

FORWARD_UDP_ROUTE: Final = "forward-udp"
"""Route of client-opened datagram streams (``-L .../udp``): "send these datagrams to ``meta["host"]:meta["port"]``
over UDP". A route of its own, not ``forward`` with a flag, so a server without UDP refuses it (UNKNOWN_ROUTE)
instead of dialling TCP."""

EXPOSE_UDP: Final = "expose-udp"
"""Control request kind: "bind a public UDP port for my service" (body as :data:`EXPOSE`, plus ``idle_timeout``).
A kind of its own so that a server without UDP refuses it instead of binding a TCP port."""

REPLACED: Final = "replaced"
"""Start of the GOAWAY reason sent to a link that another client with the same name took over."""

LINK_MEMORY: Final = DEFAULT_LINK_MEMORY
"""Default ``link_memory``: the stream bytes one link may hold in its buffers (see session_config)."""

MIN_LINK_MEMORY: Final = 1024 * 1024
"""Smaller ``link_memory`` values count as this: below it a lone stream could not have its 256 KiB window."""

FLOOR_SHARE: Final = 1024
"""Each stream's floor window is ``link_memory / FLOOR_SHARE`` (4-64 KiB): the budget is sized for about this many
busy streams, and with more the floors add at most their own share on top of it."""

CLIENT_MAX_STREAMS: Final = 1 << 20
"""Streams a client lets its server have open at once: in effect no limit of its own (see session_config)."""

CLIENT_ACCEPT_BACKLOG: Final = 1024
"""Streams a client lets its server have unanswered at once (dials under way): the protocol's 64 made the server's
openers queue for a slot under a burst of visitors (200 at once in bench.py), a wait and a wakeup each. The server
bounds what it opens (max_connections_per_service); a pending stream holds at most its floor window of early data."""


def session_config(
    timeouts: Timeouts, *, role: Role, max_streams: int = 1024, memory: int = LINK_MEMORY
) -> SessionConfig:
    """The mux settings for a link, from the user's timeouts.

    A stream open waits at least a second longer than the far side may spend dialing its target, so that when a
    dial times out the far side's readable reason ("cannot connect to HOST:PORT: no answer within 10 s") arrives
    before the opener's own, less specific, open timeout fires.

    The protocol's defaults are for a peer we do not trust; here the peer is an authenticated trio-tunnel. The server
    allows ``max_streams`` concurrent streams from a client (its -L connections) and keeps the protocol's rate limits
    on OPEN and RST. The client accepts what its own server opens (one stream per external connection): it sets no
    stream limit of its own (the server's ``max_connections_per_service`` bounds them), does not rate-limit
    them and holds up to :data:`CLIENT_ACCEPT_BACKLOG` of them unanswered, so a burst of visitors is never cut short
    or queued.

    ``memory`` (``link_memory``) is the session's memory budget (proto/budget.py): half for receive windows granted
    above each stream's floor (:data:`FLOOR_SHARE`), half for bytes queued to send. A new stream is granted the floor at
    once and a 256 KiB window (growing by auto-tuning) out of the shared half once it reads, so a lone stream moves
    as fast as before, and 500 busy ones share the budget instead of holding 256 KiB each.
    """
    from trio_tunnel import proto

    memory = max(memory, MIN_LINK_MEMORY)

    # Windows may grow to 16 MiB (protocol default 8): one stream then fills a 1 Gbit/s link at 50 ms RTT (a
    # bandwidth-delay product of 6 MB, and WINDOW goes out at half a window). Growth still comes out of the
    # per-session autotune budget, so memory stays bounded.
    # A 32 KiB round-robin quantum (protocol default 16): many bulk streams move about 10% more with half the
    # frames, and an interactive frame waits behind at most one 32 KiB turn per busy stream.
    limits = proto.Limits(
        open_timeout=max(timeouts.open, timeouts.connect + 1.0),
        max_streams=max_streams,
        max_window=16 * 1024 * 1024,
        send_quantum=32 * 1024,
        initial_window=min(max(memory // FLOOR_SHARE, 4 * 1024), 64 * 1024),
        stream_window=256 * 1024,
        session_window=memory // 2,
        session_send_buffer=memory // 2,
    )
    if role is Role.CLIENT:
        # The server bounds what it opens (max_connections_per_service, per service); a stream cap here as well
        # would silently hold every visitor beyond it, across all of the client's services, waiting for credit.
        limits = attrs.evolve(
            limits,
            max_streams=CLIENT_MAX_STREAMS,
            accept_backlog=CLIENT_ACCEPT_BACKLOG,
            open_rate=proto.RateLimit(burst=1 << 30, rate=float(1 << 30)),
            reset_rate=proto.RateLimit(burst=1 << 30, rate=float(1 << 30)),
        )
    return SessionConfig(
        limits=limits,
        handshake_timeout=timeouts.handshake,
        keepalive_idle=timeouts.keepalive_idle,
        keepalive_timeout=timeouts.keepalive_dead,
        fit_send_buffer=True,
    )
