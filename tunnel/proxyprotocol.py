"""The server's public ports behind a load balancer: read the PROXY protocol header that a *trusted* balancer sends
(``accept_proxy_protocol``, ``proxy_protocol_from``), and carry the address it names instead of the balancer's.

Who is trusted is decided by the connection's source address alone, before a byte is read:

* From a source in ``proxy_protocol_from``: a header (v1 or v2) is **required**, as HAProxy's spec asks of a
  receiver configured for it (it must not guess). It is read within ``proxy_protocol_timeout`` and at most
  :data:`~trio_tunnel.proto.proxyheader.MAX_HEADER` bytes; without a valid one the connection is closed, with one
  log line. Bytes read past the header are the connection's first data.
* From anywhere else: nothing is read and nothing is looked for; the bytes, a PROXY header among them, are the
  connection's data, carried unchanged. Closing such a connection would need a look at its first bytes, which
  would stall every server-speaks-first protocol (SSH, SMTP, MySQL) by the timeout; and carrying the bytes gains an
  attacker nothing: the server's peer address stays the attacker's own, and a local service that reads PROXY
  headers takes only the first one, the one the client writes from that address, so a forged header after it is
  just bytes of the application protocol, not an address anyone trusts.

A v1 ``UNKNOWN`` or v2 ``LOCAL`` header (a balancer's health check) keeps the connection's own addresses.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio
from trio_tunnel.proto import proxyheader

from .config import ServerConfig
from .config.operations import IPNetwork
from .handlers import Arrival
from .tcp import TcpStream

__all__ = ["Carry", "front_door", "read_proxy_header"]

logger: Final = logging.getLogger("trio_tunnel.server")

READ_CHUNK: Final = 4096
"""Bytes asked per read while looking for the header; what comes after it is kept as the first data."""

Carry = Callable[..., Awaitable[None]]
"""What handles a connection, ``carry(conn, arrival=None)`` (``Traffic.carry`` with its entrance bound); without an
arrival it reads the socket's own addresses."""


async def read_proxy_header(conn: TcpStream, arrival: Arrival, timeout: float) -> Arrival | None:  # noqa: ASYNC109
    """``arrival`` as the PROXY header at the start of ``conn`` describes it; None (logged) when there is no valid
    header within ``timeout`` seconds, or the connection ends first. The caller closes ``conn`` then."""
    data = bytearray()
    with trio.move_on_after(timeout):
        try:
            while True:
                header = proxyheader.parse(data)
                if header is not None:
                    break
                block = await conn.receive_some(min(READ_CHUNK, proxyheader.MAX_HEADER - len(data)))
                if not block:
                    logger.info("closing %s: it ended before sending its PROXY header", arrival.peer)
                    return None
                data += block
        except proxyheader.ProxyHeaderError as exc:
            logger.warning("closing %s (a trusted proxy): %s", arrival.peer, exc)
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.info("closing %s: %s", arrival.peer, exc)
            return None
        return arrival.via_proxy(header.source, header.destination, bytes(data[header.length :]))
    logger.warning("closing %s (a trusted proxy): no PROXY header within %g s", arrival.peer, timeout)
    return None


def front_door(config: ServerConfig, carry: Carry) -> Callable[[TcpStream], Awaitable[None]]:
    """The handler of a public port: ``carry(conn, arrival)``, after reading a trusted source's PROXY header when
    ``config.accept_proxy_protocol`` (see the module's docstring)."""
    trusted = config.proxy_protocol_from if config.accept_proxy_protocol else ()
    if not trusted:
        return carry  # called with the connection alone: no frame of ours per connection
    timeout = config.proxy_protocol_timeout

    async def handle(conn: TcpStream) -> None:
        arrival = Arrival.of(conn)
        if arrival.source is not None and _trusted(arrival.source.ip, trusted):
            try:
                found = await read_proxy_header(conn, arrival, timeout)
            except BaseException:
                await trio.aclose_forcefully(conn)
                raise
            if found is None:
                await trio.aclose_forcefully(conn)
                return
            if found.via:
                logger.debug("%s: PROXY header from %s", found.peer, found.via)
            arrival = found
        await carry(conn, arrival)

    return handle


def _trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: tuple[IPNetwork, ...]) -> bool:
    return any(ip.version == network.version and ip in network for network in networks)
