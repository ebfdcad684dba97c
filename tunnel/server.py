"""``trio-tunnel server``: accept client links, bind public ports for them, carry each external connection as a
stream to the client (``-R``), and dial allowed targets for the client's forwards (``-L``).

Structure (every task has an owner):

    run_server                      nursery: link listener, shutdown watcher
      _Server.handle_link(tcp)      one per client link: handshake, then
        open_session                  the session's reader/writer/timer tasks
        nursery:                      control requests, forward streams, one listener task per exposed service
          _serve_service            serve_tcp -> Traffic.carry (one per external connection): open a stream, splice
          Traffic.accept_streams    -> Traffic.answer (one per forward stream): dial the target, splice

A client that reconnects with the same name takes over its predecessor at once: the old link's scope is cancelled,
and its listeners are released before the new link binds them again (no "port already in use").
"""

from __future__ import annotations

import errno
import logging
import signal
from collections.abc import Mapping
from functools import partial
from typing import ClassVar, Final

import attrs
import trio
from trio_tunnel.proto import ErrorCode

from .certs import default_state_dir
from .config import HostPort, ServerConfig
from .console import announce, format_hostport
from .dial import peer_address
from .errors import ConfigError, HandshakeError, SessionClosedError
from .handlers import FORWARD_WORDS, REVERSE_WORDS, Destination, Meta, Traffic
from .httpd import MetricsBindError, bind_metrics, serve_http
from .lifecycle import Shutdown
from .link import LinkMismatchError, ServerTls, refuse_link, secure_server_link
from .metrics import Metrics, ServiceStats, handshake_failure
from .mux import MuxStream, Request, Role, Session, open_session
from .tcp import TcpStream, serve_tcp
from .tls import TlsHandshakeError
from .wire import EXPOSE, FORWARD_ROUTE, REPLACED, session_config

__all__ = ["run_server"]

logger: Final = logging.getLogger(__name__)

MAX_REMEMBERED_PORTS: Final = 4096


@attrs.define(eq=False)
class _Link:
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

    async def drain(self) -> None:
        """Stop accepting on the public ports, GOAWAY, wait for the work in flight, then end the link."""
        for scope in self.accepting:
            scope.cancel(reason="draining")
        self.session.go_away(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        await self.traffic.drained()
        self.scope.cancel(reason="drained")
        await self.done.wait()


@attrs.define(eq=False)
class _Server:
    config: ServerConfig
    shutdown: Shutdown
    tls: ServerTls | None
    links: dict[str, _Link] = attrs.field(factory=dict)
    last_ports: dict[tuple[str, str], int] = attrs.field(factory=dict)
    """(client, service) -> the port it had last, so a service exposed on port 0 keeps its port across reconnects."""
    metrics: Metrics = attrs.field(factory=lambda: Metrics("server"))

    # ---------------------------------------------------------------------------------------------- links

    async def _secure(self, transport: TcpStream, peer: str) -> tuple[trio.abc.Stream, bytes] | None:
        """TLS (or plaintext) on a new link, within the handshake timeout; None when the link is dropped here."""
        try:
            with trio.move_on_after(self.config.timeouts.handshake):
                return await secure_server_link(transport, self.tls)
            logger.info("dropped a connection from %s: no handshake within the handshake timeout", peer)
            self.metrics.handshake_failed("timeout")
        except LinkMismatchError as exc:
            logger.warning("refused a client from %s: %s", peer, exc)
            self.metrics.handshake_failed("tls")
            with trio.move_on_after(self.config.timeouts.handshake):
                await refuse_link(transport, str(exc))
            return None  # refuse_link closed it
        except (TlsHandshakeError, trio.BrokenResourceError) as exc:
            logger.info("dropped a connection from %s: %s", peer, exc)
            self.metrics.handshake_failed("tls")
        await trio.aclose_forcefully(transport)
        return None

    async def reload_tls_on_sighup(self) -> None:
        """Re-read --tls-cert/--tls-key on SIGHUP (a renewed certificate needs no restart). New links use the new
        files; live links keep theirs. Files that cannot be used change nothing: the old ones stay, with one log
        line saying why."""
        cfg = self.config
        assert cfg.tls_cert is not None and cfg.tls_key is not None
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                try:
                    tls = ServerTls.from_files(cfg.tls_cert, cfg.tls_key)
                except (ConfigError, OSError) as exc:
                    logger.error("SIGHUP: kept the current TLS certificate: %s", exc)
                    continue
                self.tls = tls
                logger.info("SIGHUP: reloaded the TLS certificate %s (fingerprint %s)", cfg.tls_cert, tls.fingerprint)

    async def handle_link(self, transport: TcpStream) -> None:
        peer = peer_address(transport)
        cfg = self.config
        secured = await self._secure(transport, peer)
        if secured is None:
            return
        link, binding = secured
        try:
            # open_session owns the link once it runs; "async with" covers a cancellation before that.
            async with (
                link,
                open_session(
                    link,
                    role=Role.SERVER,
                    config=session_config(cfg.timeouts, role=Role.SERVER, max_streams=cfg.max_streams_per_client),
                    tokens=cfg.tokens,
                    channel_binding=binding,
                ) as session,
            ):
                await self._run_link(session, peer)
        except HandshakeError as exc:
            self.metrics.handshake_failed(handshake_failure(exc))
            if exc.silent:
                logger.debug("dropped a connection from %s that does not speak trio-tunnel", peer)
            else:
                logger.warning("refused a client from %s: %s", peer, exc)

    async def _run_link(self, session: Session, peer: str) -> None:
        name = session.peer_name
        if self.shutdown.requested.is_set():
            session.go_away(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
            return
        old = self.links.get(name)
        if old is None and len(self.links) >= self.config.max_clients:
            logger.warning(
                "refused client %r from %s: %d clients already connected (max_clients)", name, peer, len(self.links)
            )
            session.go_away(ErrorCode.ENHANCE_YOUR_CALM, "the server has too many clients")
            return
        link = _Link(name, peer, session)
        self.links[name] = link
        seen = None
        try:
            if old is not None:
                logger.info("client %r reconnected from %s: replacing its previous link from %s", name, peer, old.peer)
                old.replaced = True
                # If the old link is still alive (two clients share a name), tell it why; a stale one hears nothing.
                old.session.go_away(
                    ErrorCode.PROHIBITED,
                    f"{REPLACED}: another client named {name!r} connected "
                    f"from {peer}; client names must be unique (--name)",
                )
                old.scope.cancel(reason="replaced by a new link of the same client")
                await old.done.wait()
            logger.info(
                "client %r connected from %s (session %s%s)",
                name,
                peer,
                session.session_id,
                "" if session.authenticated else ", NOT authenticated",
            )
            seen = self.metrics.link_up(name, peer, session)
            with link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._control_loop, session, link, nursery)
                    nursery.start_soon(
                        link.traffic.accept_streams,
                        session,
                        nursery,
                        partial(self._route_forward, link),
                        self.config.timeouts.connect,
                    )
                    await session.wait_closed()
                    nursery.cancel_scope.cancel(reason="session closed")
        finally:
            if self.links.get(name) is link:
                del self.links[name]
            if seen is not None:
                self.metrics.link_down(seen, replaced=link.replaced)
            link.done.set()
            reason = "replaced by a new link" if link.replaced else session.close_reason or "server shutting down"
            logger.info("client %r from %s disconnected: %s", name, peer, reason)

    # --------------------------------------------------------------------------------------- control plane

    async def _control_loop(self, session: Session, link: _Link, nursery: trio.Nursery) -> None:
        while True:
            try:
                request = await session.receive_request()
            except SessionClosedError:
                return
            if request.kind == EXPOSE:
                await self._expose(session, link, request, nursery)
            else:
                request.reply_error(ErrorCode.PROHIBITED, {"message": f"unknown request {request.kind!r}"})

    async def _expose(self, session: Session, link: _Link, request: Request, nursery: trio.Nursery) -> None:
        body = request.body if isinstance(request.body, Mapping) else {}
        name, bind, port = body.get("name"), body.get("bind", "0.0.0.0"), body.get("port")
        if not isinstance(name, str) or not isinstance(bind, str) or type(port) is not int or not 0 <= port < 65536:
            request.reply_error(ErrorCode.PROTOCOL, {"message": "expose needs name, bind and port"})
            return
        if name in link.services:
            request.reply_error(ErrorCode.PROHIBITED, {"message": f"service {name!r} is already exposed"})
            return
        if port not in self.config.allow_ports:
            request.reply_error(
                ErrorCode.PROHIBITED,
                {"message": f"port {port} is not allowed by the server (--allow-ports {self.config.allow_ports})"},
            )
            return
        try:
            listeners = await self._bind(bind, port, self.last_ports.get((link.name, name)))
        except OSError as exc:
            request.reply_error(ErrorCode.CONNECT_FAILED, {"message": _bind_error(bind, port, exc)})
            return
        host, bound = listeners[0].socket.getsockname()[:2]
        self._remember(link.name, name, int(bound))
        address = format_hostport(str(host), int(bound))
        link.services[name] = address
        logger.info("client %r: exposing %s on %s", link.name, name, address)
        stats = self.metrics.service(link.name, name, kind="expose", public=address)
        nursery.start_soon(self._serve_service, session, link, name, listeners, nursery, stats)
        request.reply({"host": str(host), "port": int(bound)})

    def _remember(self, client: str, service: str, port: int) -> None:
        key = (client, service)
        self.last_ports.pop(key, None)
        self.last_ports[key] = port
        while len(self.last_ports) > MAX_REMEMBERED_PORTS:  # bounded: forget the oldest
            del self.last_ports[next(iter(self.last_ports))]

    async def _bind(self, host: str, port: int, previous: int | None) -> list[trio.SocketListener]:
        ports = self.config.allow_ports
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

    # ---------------------------------------------------------------------------------------- reverse (-R)

    async def _serve_service(
        self,
        session: Session,
        link: _Link,
        name: str,
        listeners: list[trio.SocketListener],
        handlers: trio.Nursery,
        stats: ServiceStats,
    ) -> None:
        entrance = _Service(link, session, name, trio.CapacityLimiter(self.config.max_connections_per_service), stats)
        handler = partial(link.traffic.carry, entrance)  # a partial: no frame per connection
        accepting = trio.CancelScope()
        link.accepting.append(accepting)
        try:
            with accepting:
                await serve_tcp(handler, listeners, handler_nursery=handlers)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            link.services.pop(name, None)
            stats.active = False

    # ---------------------------------------------------------------------------------------- forward (-L)

    def _route_forward(self, link: _Link, stream: MuxStream) -> Destination | None:
        """Where a client's forward stream goes: a target the allowlist lets it reach, or nowhere (rejected)."""
        meta = stream.meta
        host, port, peer = meta.get("host"), meta.get("port"), meta.get("peer", "?")
        if stream.route != FORWARD_ROUTE or not isinstance(host, str) or type(port) is not int:
            stream.reject(ErrorCode.UNKNOWN_ROUTE, f"unknown route {stream.route!r}")
            return None
        target = format_hostport(host, port)
        if not self.config.allow_targets.allows(host, port):
            logger.warning("%s: refused forward to %s for %s: not in --allow-target", link.name, target, peer)
            self._forwards(link).failed("refused", f"{target} is not in --allow-target")
            stream.reject(
                ErrorCode.PROHIBITED,
                f"target {target} is not allowed by the server (ask its operator to add --allow-target)",
            )
            return None
        return Destination(
            host,
            port,
            link.name,
            "forward target",
            FORWARD_WORDS,
            who=f"forward {peer} -> {target}",
            endings=False,
            stats=self._forwards(link),
        )

    def _forwards(self, link: _Link) -> ServiceStats:
        """One series for all of a client's ``-L`` forwards (their names are the client's to choose per stream)."""
        return self.metrics.service(link.name, "forward", kind="forward")

    # -------------------------------------------------------------------------------------------- shutdown

    async def drain(self) -> None:
        """Graceful shutdown: every link drains in parallel (bounded by the caller's deadline)."""
        async with trio.open_nursery() as nursery:
            for link in list(self.links.values()):
                nursery.start_soon(link.drain)


@attrs.frozen(eq=False)
class _Service:
    """An exposed service's side of :meth:`Traffic.carry`: each external connection becomes a stream to the client,
    at most ``limiter.total_tokens`` at a time (``max_connections_per_service``)."""

    link: _Link
    session: Session
    route: str
    limiter: trio.CapacityLimiter
    stats: ServiceStats
    other: ClassVar[str] = "client"
    words: ClassVar[tuple[str, str]] = REVERSE_WORDS

    @property
    def label(self) -> str:
        return f"{self.link.name}/{self.route}"

    async def admit(self, peer: str) -> Session | None:
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            logger.warning(
                "%s: refused %s: %d connections already open (max_connections_per_service)",
                self.label,
                peer,
                self.limiter.total_tokens,
            )
            self.stats.failed("limit", f"{self.limiter.total_tokens} connections already open")
            return None
        return self.session

    def meta(self, peer: str) -> Meta:
        return {"peer": peer}

    def release(self) -> None:
        self.limiter.release()


def _bind_error(host: str, port: int, exc: OSError) -> str:
    where = format_hostport(host, port)
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: address already in use on the server"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: the server has no such address"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def server_tls(config: ServerConfig) -> ServerTls | None:
    """The server's TLS identity: the operator's files, or its own key in the state directory (made on first
    use); None with ``insecure_plaintext``. Raises ConfigError with one readable line."""
    if config.insecure_plaintext:
        return None
    if config.tls_cert is not None and config.tls_key is not None:
        return ServerTls.from_files(config.tls_cert, config.tls_key)
    return ServerTls.from_state_dir(config.state_dir or default_state_dir())


async def run_server(
    config: ServerConfig, shutdown: Shutdown, *, task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve client links until ``shutdown`` is requested, then drain for at most ``shutdown.drain_timeout``.

    Prints ``listening HOST:PORT`` once per listening address; ``task_status.started`` gets the first one.

    Raises:
        OSError: the link port cannot be bound (address in use, permission denied, no such address).
    """
    tls = server_tls(config)
    listeners = await trio.open_tcp_listeners(config.listen.port, host=config.listen.host)
    server = _Server(config, shutdown, tls)
    if tls is not None:
        announce(f"fingerprint {tls.fingerprint}")
        logger.info("TLS on the link; clients pin this server with --server-fingerprint %s", tls.fingerprint)
    else:
        logger.warning(
            "the link is NOT encrypted (--insecure-plaintext): traffic and sessions can be read and taken over "
            "by anyone on the path"
        )
    addresses = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        addresses.append(HostPort(host=str(host), port=int(port)))
        announce(f"listening {format_hostport(str(host), int(port))}")
    try:
        metrics_listeners = None if config.metrics is None else await bind_metrics(config.metrics)
    except MetricsBindError:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    if not config.tokens:
        logger.warning(
            "running WITHOUT authentication (--insecure-no-auth): anyone who reaches %s can bind "
            "public ports through this server",
            addresses[0],
        )
    logger.info("server listening on %s", ", ".join(map(str, addresses)))
    async with trio.open_nursery() as handlers:  # the links live here, so they outlive the accept loop
        if metrics_listeners is not None:  # (and the endpoint: it answers while the links drain)
            handlers.start_soon(serve_http, server.metrics.respond, metrics_listeners, config.timeouts.handshake)
        async with trio.open_nursery() as acceptor:
            acceptor.start_soon(
                partial(serve_tcp, server.handle_link, listeners, handler_nursery=handlers, keepalive=False)
            )  # links have PING
            if config.tls_cert is not None and config.tls_key is not None:
                acceptor.start_soon(server.reload_tls_on_sighup)
            task_status.started(addresses[0])
            await shutdown.requested.wait()
            acceptor.cancel_scope.cancel(reason="shutting down: no new links")
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        logger.info("shutting down: draining %d client(s) for up to %g s", len(server.links), shutdown.drain_timeout)
        with trio.move_on_after(shutdown.drain_timeout):
            await server.drain()
        handlers.cancel_scope.cancel(reason="server shut down")
    logger.info("server stopped")
