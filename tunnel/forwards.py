"""The client's ``-L`` listeners by name: bound at start, and added, moved, retargeted or stopped by a reload.

Binding is separate from serving so that a reload can bind every new listener first and give up, changing
nothing, when one of the ports is taken. A stopped listener closes its port at once; the connections it accepted
live in the client's handler nursery and carry on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

from .config import LocalSpec
from .console import announce, format_hostport
from .udpsocket import UdpSocket, bind_udp

__all__ = ["BoundForward", "ForwardSet", "ForwardSlot"]

logger: Final = logging.getLogger(__name__)


@attrs.define(eq=False)
class ForwardSlot:
    """A forward's current spec; a reload that changes only its target replaces ``spec`` in place, so the
    listener keeps its port and new connections ask for the new target."""

    spec: LocalSpec


@attrs.define(eq=False)
class BoundForward:
    slot: ForwardSlot
    listeners: list[trio.SocketListener]
    host: str
    port: int
    """Where it listens (the port actually bound)."""
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    closed: trio.Event = attrs.field(factory=trio.Event)
    udp: UdpSocket | None = None
    """A ``/udp`` forward's socket (then ``listeners`` is empty)."""

    @property
    def address(self) -> str:
        return format_hostport(self.host, self.port) + ("/udp" if self.udp is not None else "")


Serve = Callable[[ForwardSlot, list[trio.SocketListener], trio.Nursery], Awaitable[None]]
ServeUdp = Callable[[LocalSpec, UdpSocket], Awaitable[None]]


@attrs.define(eq=False)
class ForwardSet:
    """``serve(slot, listeners, handlers)`` runs one forward's accept loop (it closes the listeners when it ends);
    accept loops run in ``nursery``, connections in ``handlers``."""

    serve: Serve
    nursery: trio.Nursery
    handlers: trio.Nursery
    serve_udp: ServeUdp | None = None
    """Runs a ``/udp`` forward on its socket (closing it at the end); its flows live inside it."""
    running: dict[str, BoundForward] = attrs.field(factory=dict)

    @staticmethod
    async def bind(spec: LocalSpec) -> BoundForward:
        """Listen for ``spec`` (not serving yet). Raises OSError (address in use, ...)."""
        if spec.protocol == "udp":
            udp = await bind_udp(spec.bind_host, spec.bind_port)
            host, port = udp.local[:2]
            return BoundForward(ForwardSlot(spec), [], str(host), int(port), udp=udp)
        listeners = await trio.open_tcp_listeners(spec.bind_port, host=spec.bind_host)
        host, port = listeners[0].socket.getsockname()[:2]
        return BoundForward(ForwardSlot(spec), listeners, str(host), int(port))

    @staticmethod
    async def discard(bound: BoundForward) -> None:
        """Close a bound forward that was never started."""
        if bound.udp is not None:
            bound.udp.close()
        for listener in bound.listeners:
            await trio.aclose_forcefully(listener)

    def start(self, bound: BoundForward) -> None:
        spec = bound.slot.spec
        self.running[spec.name] = bound
        announce(f"forwarding {spec.name} {bound.address}")
        logger.info(
            "forwarding %s to %s%s through the server",
            bound.address,
            format_hostport(spec.target_host, spec.target_port),
            "/udp" if bound.udp is not None else "",
        )
        self.nursery.start_soon(self._run, bound)

    async def _run(self, bound: BoundForward) -> None:
        try:
            with bound.scope:
                if bound.udp is not None:
                    assert self.serve_udp is not None, "a /udp forward needs serve_udp"
                    await self.serve_udp(bound.slot.spec, bound.udp)
                else:
                    await self.serve(bound.slot, bound.listeners, self.handlers)
        finally:
            if bound.udp is not None:
                bound.udp.close()
            bound.closed.set()

    async def stop(self, name: str, *, quiet: bool = False) -> None:
        """Close ``name``'s port (its open connections carry on); prints ``unforwarded NAME`` unless ``quiet``."""
        bound = self.running.pop(name)
        bound.scope.cancel(reason="forward removed")
        await bound.closed.wait()
        if not quiet:
            announce(f"unforwarded {name}")
        logger.info("stopped forwarding %s (%s); its open connections carry on", name, bound.address)

    def stop_all(self) -> None:
        """Shutdown: stop accepting on every forward."""
        for bound in self.running.values():
            bound.scope.cancel(reason="shutting down")
