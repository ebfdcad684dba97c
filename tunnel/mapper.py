"""``trio-tunnel map LISTEN TARGET``: the standalone TCP relay (the seed's port mapper, done right).

Hosts A, B, C: A reaches B, B reaches C, A cannot reach C. The mapper runs on B, listens on ``LISTEN`` and relays
every accepted connection to ``TARGET`` with :func:`trio_tunnel.relay.splice` (half-close and resets carried through).

* Dialling the target (:func:`trio_tunnel.dial.dial`) is bounded by ``config.connect_timeout``; on failure the
  accepted connection is closed at once and one WARNING names the peer, the target and the reason (connection
  refused, timed out, name not found, ...).
* At most ``config.max_connections`` connections are relayed at a time; one beyond the cap is closed at once with a
  WARNING, so an overload never builds an unbounded queue of tasks.
* Each relayed connection ends with one INFO line: peer, target, duration, bytes and how each direction ended.
* Accept errors that mean "out of file descriptors / memory" (EMFILE, ENFILE, ENOBUFS, ENOMEM) do not stop the
  listener: :func:`trio_tunnel.tcp.serve_tcp` logs them and retries 100 ms later.
* Graceful shutdown (``shutdown.requested``): the listeners close at once, connections in flight continue for at
  most ``shutdown.drain_timeout`` seconds (a deadline on the handler nursery), then the rest are reset and
  :func:`run_map` returns normally.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence

import attrs
import trio
from trio_tunnel.config import MapConfig
from trio_tunnel.console import announce, format_hostport
from trio_tunnel.dial import DialError, dial, peer_address
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.proto.errors import ErrorCode
from trio_tunnel.relay import Ending, Splice, abort
from trio_tunnel.tcp import TcpStream, serve_tcp
from trio_tunnel.udp import run_map_udp

__all__ = ["run_map", "serve_map"]

logger = logging.getLogger(__name__)


async def run_map(
    config: MapConfig,
    shutdown: Shutdown,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``config.listen`` and relay each connection to ``config.target`` until shutdown.

    Prints ``listening HOST:PORT`` on stdout for each bound address (the port actually bound), then reports the
    first one through ``task_status``. Returns normally after a graceful shutdown (see the module docstring).

    Raises:
        OSError: when the listening address cannot be bound.
    """
    if config.protocol == "udp":
        await run_map_udp(config, shutdown, task_status=task_status)
        return
    listeners = await trio.open_tcp_listeners(config.listen.port, host=config.listen.host or None)
    bound = [_sockname(listener) for listener in listeners]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_map, listeners, config, shutdown)
        for host, port in bound:
            logger.info("map: listening on %s, relaying to %s", format_hostport(host, port), config.target)
            announce(f"listening {format_hostport(host, port)}")
        task_status.started(bound[0])


async def serve_map(
    listeners: Sequence[trio.abc.Listener[trio.SocketStream]],
    config: MapConfig,
    shutdown: Shutdown,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Relay connections accepted on ``listeners`` (which it owns and closes) until ``shutdown`` is requested."""
    mapper = _Mapper(config)
    async with trio.open_nursery() as connections:
        try:
            async with trio.open_nursery() as acceptors:
                await acceptors.start(
                    functools.partial(serve_tcp, mapper.handle, list(listeners), handler_nursery=connections)
                )
                task_status.started()
                await shutdown.requested.wait()
                acceptors.cancel_scope.cancel(reason="shutdown requested")
        finally:
            # serve_tcp closed the listeners it ran; this covers a failure before it started.
            for listener in listeners:
                await trio.aclose_forcefully(listener)
        logger.info(
            "map: shutdown requested; stopped accepting, draining %d connections for at most %gs",
            len(connections.child_tasks),
            shutdown.drain_timeout,
        )
        deadline = trio.current_time() + shutdown.drain_timeout
        connections.cancel_scope.deadline = min(connections.cancel_scope.deadline, deadline)
    if connections.cancel_scope.cancelled_caught:
        logger.warning(
            "map: drain timeout (%gs) expired; the connections still open were reset", shutdown.drain_timeout
        )
    logger.info("map: stopped")


@attrs.define(eq=False)
class _Mapper:
    config: MapConfig
    limiter: trio.CapacityLimiter = attrs.field(init=False)
    ids: itertools.count[int] = attrs.field(init=False, factory=lambda: itertools.count(1))
    target: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.limiter = trio.CapacityLimiter(self.config.max_connections)
        self.target = format_hostport(self.config.target.host, self.config.target.port)

    async def handle(self, client: TcpStream) -> None:
        """One accepted connection: admit it under the cap, dial the target, splice, log. Closes ``client`` on
        every path (serve_tcp leaves that to the handler)."""
        conn = next(self.ids)
        peer = peer_address(client)
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            logger.warning(
                "map #%d %s -> %s: refused: %d connections already open (max_connections)",
                conn,
                peer,
                self.target,
                self.limiter.total_tokens,
            )
            await client.aclose()
            return
        try:
            await self._relay(conn, peer, client)
        finally:
            self.limiter.release()

    async def _relay(self, conn: int, peer: str, client: TcpStream) -> None:
        logger.debug("map #%d %s -> %s: accepted", conn, peer, self.target)
        started = trio.current_time()
        splicer: Splice | None = None
        finished = False
        try:
            upstream = await self._dial(conn, peer)
            if upstream is None:
                finished = True
                await client.aclose()
                return
            splicer = Splice(client, upstream)
            await splicer.run()
            finished = True
        finally:
            self._log_closed(conn, peer, trio.current_time() - started, splicer, finished)
            if splicer is None and not finished:
                # Cut while dialling (drain deadline): a reset, not a FIN that would look like the target's answer.
                await abort(client, ErrorCode.CANCEL, "shutting down")

    async def _dial(self, conn: int, peer: str) -> TcpStream | None:
        """The target connection (with keepalive), or None after logging why it failed."""
        try:
            return await dial(self.config.target.host, self.config.target.port, timeout=self.config.connect_timeout)
        except DialError as exc:
            reason = exc.detail if exc.timeout is None else f"timed out after {exc.timeout:g}s"
        logger.warning("map #%d %s -> %s: cannot connect to target: %s; closing", conn, peer, self.target, reason)
        return None

    def _log_closed(self, conn: int, peer: str, duration: float, splicer: Splice | None, finished: bool) -> None:
        if splicer is None:
            if not finished:
                logger.info("map #%d %s -> %s: cancelled while connecting (%.3fs)", conn, peer, self.target, duration)
            return
        result = splicer.snapshot()
        logger.info(
            "map #%d %s -> %s: closed after %.3fs: up %d bytes (%s), down %d bytes (%s)%s",
            conn,
            peer,
            self.target,
            duration,
            result.bytes_a_to_b,
            _ending(result.a_to_b, result.a_to_b_detail),
            result.bytes_b_to_a,
            _ending(result.b_to_a, result.b_to_a_detail),
            "" if finished else "; cut by shutdown",
        )


def _ending(end: Ending, detail: str) -> str:
    return f"{end}: {detail}" if detail and end not in ("eof", "cancelled") else end


def _sockname(listener: trio.SocketListener) -> tuple[str, int]:
    host, port = listener.socket.getsockname()[:2]
    return str(host), int(port)
