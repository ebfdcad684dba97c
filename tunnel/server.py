"""``trio-tunnel server``: accept client links, bind public ports for them, carry each external connection as a
stream to the client (``-R``), and dial allowed targets for the client's forwards (``-L``).

Structure (every task has an owner):

    run_server                      nursery: link listener, shutdown watcher, SIGHUP (_Server.reload)
      _Server.handle_link(tcp)      one per client link: handshake, then
        open_session                  the session's reader/writer/timer tasks
        nursery:                      control requests, forward streams, one listener task per exposed service
          _serve_service            serve_tcp -> Traffic.carry (one per external connection): open a stream, splice
          Traffic.accept_streams    -> Traffic.answer (one per forward stream): dial the target, splice

A client that reconnects with the same name takes over its predecessor if that one is stale (it does not answer a
PING within ``takeover_probe``; see :mod:`trio_tunnel.takeover`): the old link's scope is cancelled, and its
listeners are released before the new link binds them again (no "port already in use"). A live holder keeps its name.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import suppress
from functools import partial
from typing import Final, Literal

import attrs
import trio
from trio_tunnel.proto import ErrorCode
from trio_tunnel.proto.datagram import FlowBudget, FlowGate

from . import notify
from .certs import default_state_dir
from .config import BindAllowlist, HostPort, ServerConfig
from .config.binds import bind_refusal
from .config.operations import BALANCES, GROUP_NAME
from .console import announce, format_hostport
from .coordinator import Claim, Coordinator
from .dial import peer_address
from .errors import ConfigError, HandshakeError, SessionClosedError
from .exposure import ClientLink, Exposure, ServiceEntrance, bind_error, bind_public, per_ip_cap, released
from .groups import Group, GroupRegistry, Member
from .guard import Admission, HandshakeCaps, SourceCounts, raise_nofile_limit, source_of
from .handlers import FORWARD_WORDS, Destination
from .httpd import MetricsBindError, bind_metrics, serve_http
from .lifecycle import Shutdown
from .link import LinkMismatchError, ServerTls, refuse_link, secure_server_link
from .metrics import Metrics, ServiceStats, handshake_failure
from .mux import MuxStream, Request, Role, Session, open_session
from .proxyprotocol import front_door
from .registry import LastPorts
from .reload import ReloadError, one_line, plan_server, reload_on_signals, sighup_receiver
from .takeover import holder_answers, judge
from .tally import Tally
from .tcp import TcpStream, serve_tcp
from .tls import TlsHandshakeError
from .udp import DEFAULT_IDLE, serve_udp_service
from .udpsocket import UdpSocket, bind_udp_in
from .wire import EXPOSE, EXPOSE_UDP, FORWARD_ROUTE, FORWARD_UDP_ROUTE, UNEXPOSE, UNEXPOSED, session_config

__all__ = ["run_server"]

logger: Final = logging.getLogger(__name__)

TOKEN_REMOVED: Final = "the server no longer accepts this client's token"


@attrs.define(eq=False)
class _Server:
    config: ServerConfig
    shutdown: Shutdown
    tls: ServerTls | None
    links: dict[str, ClientLink] = attrs.field(factory=dict)
    last_ports: LastPorts = attrs.field(factory=LastPorts)
    """(client, service) -> the port it had last, so a service exposed on port 0 keeps its port across reconnects."""
    admission: Admission = attrs.field(factory=lambda: Admission(HandshakeCaps.sized(1024)))
    """Connections still in the handshake (max_handshakes, max_handshakes_per_ip)."""
    refusals: Tally = attrs.field(factory=lambda: Tally(logger, "handshakes"))
    """Refused and failed handshakes, one line per source and window."""
    visitors: Tally = attrs.field(factory=lambda: Tally(logger, "connections"))
    """External connections refused at a public port (a service's caps), one line per source and window."""
    opens: Tally = attrs.field(factory=lambda: Tally(logger, "stream opens"))
    """Forward streams refused (target not allowed), one line per client and window."""
    allow_bind: BindAllowlist = attrs.field(init=False)
    """The bind addresses clients may ask for (the default resolved against our listening address)."""
    groups: GroupRegistry = attrs.field(factory=GroupRegistry)
    """Load-balancing groups: public ports shared by several clients (tunnel/groups.py)."""
    metrics: Metrics = attrs.field(factory=lambda: Metrics("server"))
    nofile: int = 1024
    """The descriptor limit the handshake caps' defaults are sized from (raised at start)."""
    coordinator: Coordinator | None = None
    """The parent of ``--workers N`` (tunnel/workers.py): names, client count and last ports across workers."""

    def __attrs_post_init__(self) -> None:
        self.allow_bind = self.config.allow_bind.effective(self.config.listen.host)
        if self.coordinator is not None:
            self.coordinator.attach(self)

    async def _claim(self, session: Session, name: str, peer: str) -> Claim | None:
        """Ask the parent of ``--workers`` for ``name``; None when refused (the session is told why)."""
        assert self.coordinator is not None
        claim = await self.coordinator.claim(name, session.peer_token, peer)
        if claim.refused:
            logger.warning("refused client %r from %s: %s", name, peer, claim.reason.split(". ")[0])
            session.go_away(ErrorCode(claim.code), claim.reason)
            return None
        for service, port in claim.ports.items():
            self.last_ports.learn(name, service, port)
        return claim

    async def _holder(self, session: Session, name: str, peer: str) -> ClientLink | Literal[False] | None:
        """Judge whoever holds ``name`` in this process (:func:`judge`): the stale link to replace, None when nobody
        holds it, or False when the holder is alive and the newcomer was refused (and told why)."""
        while (old := self.links.get(name)) is not None:
            verdict = await judge(name, old.session, old.peer, session, self.config.timeouts.takeover_probe)
            if not verdict.take:
                logger.warning("refused client %r from %s: %s", name, peer, verdict.reason.split(". ")[0])
                session.go_away(ErrorCode.NAME_IN_USE, verdict.reason)
                return False
            if self.links.get(name) is old:  # else another newcomer replaced it while we probed: judge again
                break
        return old

    async def give_up(self, name: str, newcomer: str) -> str | None:
        """Another worker's newcomer wants ``name``: probe our holder as :func:`judge` would. A live holder keeps
        it (its address is returned); a stale one is replaced: cancelled, and returns once its ports are released.
        """
        link = self.links.get(name)
        if link is None:
            return None
        if await holder_answers(link.session, self.config.timeouts.takeover_probe):
            return link.peer
        if self.links.get(name) is link:
            logger.info(
                "client %r reconnected from %s (another worker): replacing its link from %s", name, newcomer, link.peer
            )
            link.replace(newcomer)
        await link.done.wait()
        successor = self.links.get(name)  # a newcomer of this worker took it over meanwhile: it keeps the name
        return None if successor is None else successor.peer

    # ---------------------------------------------------------------------------------------------- links

    async def _secure(self, transport: TcpStream, peer: str, source: str) -> tuple[trio.abc.Stream, bytes] | None:
        """TLS (or plaintext) on a new link, within the handshake timeout; None when the link is dropped here.
        Failures are logged through :attr:`refusals`; a peer that does not speak TLS (a scanner) only at DEBUG."""
        note = self.refusals.note
        try:
            with trio.move_on_after(self.config.timeouts.handshake):
                return await secure_server_link(transport, self.tls)
            note(source, logging.INFO, "dropped a connection from %s: no handshake within the handshake timeout", peer)
            self.metrics.handshake_failed("timeout")
        except LinkMismatchError as exc:
            note(source, logging.WARNING, "refused a client from %s: %s", peer, exc)
            self.metrics.handshake_failed("tls")
            with trio.move_on_after(self.config.timeouts.handshake):
                await refuse_link(transport, str(exc))
            return None  # refuse_link closed it
        except (TlsHandshakeError, trio.BrokenResourceError) as exc:
            note(source, logging.DEBUG, "dropped a connection from %s: %s", peer, exc)
            self.metrics.handshake_failed("tls")
        await trio.aclose_forcefully(transport)
        return None

    async def reload(self, new: ServerConfig) -> None:
        """Apply a re-read config (SIGHUP): new tokens, allowed ports and targets, limits, timeouts and TLS files.
        A client whose token was removed is disconnected; a service on a port no longer allowed is released (its
        open connections carry on); everything else is untouched.

        Raises:
            ReloadError: the new config cannot be used (then nothing has changed).
        """
        plan = plan_server(self.config, new)
        tls = self.tls
        if plan.tls_files:
            try:
                tls = server_tls(new)  # the files, or (tls_cert dropped) the server's own key in state_dir
            except (ConfigError, OSError) as exc:
                logger.error("SIGHUP: kept the current TLS certificate: %s", exc)
                raise ReloadError(one_line(exc)) from None
        # Nothing below can fail or checkpoint: the new config takes effect all at once.
        self.config, self.tls = new, tls
        self.admission.caps = HandshakeCaps.sized(
            self.nofile, total=new.max_handshakes, per_ip=new.max_handshakes_per_ip
        )
        if plan.tls_files and tls is not None:
            where = new.tls_cert or "of the server's own key"
            logger.info("SIGHUP: reloaded the TLS certificate %s (fingerprint %s)", where, tls.fingerprint)
        for group in self.groups.groups.values():
            group.sources.cap = per_ip_cap(new)
        released: list[Exposure] = []
        for link in list(self.links.values()):
            if not plan.keeps_token(link.session.peer_token):
                logger.warning(
                    "client %r from %s: its token was removed on reload; disconnecting it", link.name, link.peer
                )
                link.session.go_away(ErrorCode.AUTH, TOKEN_REMOVED)
                link.scope.cancel(reason="its token was removed")
                continue
            for name, exposure in link.exposures.items():
                exposure.limiter.total_tokens = new.max_connections_per_service
                exposure.sources.cap = per_ip_cap(new)
                if not plan.keeps_port(exposure.port, udp=exposure.udp):
                    logger.warning(
                        "client %r: released %s on port %d: the port is no longer allowed (allow_ports %s)",
                        link.name,
                        name,
                        exposure.port,
                        new.allow_ports,
                    )
                    exposure.scope.cancel(reason="port no longer allowed")
                    released.append(exposure)
                    why = f"port {exposure.port} is no longer allowed by the server (allow_ports {new.allow_ports})"
                    with suppress(SessionClosedError):
                        link.session.notify(UNEXPOSED, {"name": name, "reason": why})
        for exposure in released:  # "reloaded" means the ports are closed
            await exposure.closed.wait()
        logger.info("SIGHUP: reloaded the configuration (%s)", plan.summary())

    async def handle_link(self, transport: TcpStream) -> None:
        """Admit the connection (:mod:`trio_tunnel.guard`), then run it as a link until it ends."""
        peer = peer_address(transport)
        source = source_of(transport.socket)
        ticket = self.admission.admit(source)
        if ticket is None:
            self.refusals.note(
                source,
                logging.WARNING,
                "refused a connection from %s: %d handshakes from that address already in progress "
                "(max_handshakes_per_ip)",
                peer,
                self.admission.caps.per_ip,
            )
            await trio.aclose_forcefully(transport)
            return
        with ticket.scope:
            try:
                await self._handle_link(transport, peer, source, ticket.release)
            finally:
                ticket.release()
        if ticket.scope.cancelled_caught:
            self.refusals.note(
                source,
                logging.INFO,
                "dropped a connection from %s still in the handshake: %d handshakes in progress, a newer one "
                "took its place (max_handshakes)",
                peer,
                self.admission.caps.total,
            )

    async def _handle_link(self, transport: TcpStream, peer: str, source: str, admitted: Callable[[], None]) -> None:
        cfg = self.config
        secured = await self._secure(transport, peer, source)
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
                    config=session_config(
                        cfg.timeouts, role=Role.SERVER, max_streams=cfg.max_streams_per_client, memory=cfg.link_memory
                    ),
                    tokens=cfg.tokens,
                    channel_binding=binding,
                ) as session,
            ):
                admitted()  # authenticated: no longer a handshake (nor displaceable)
                await self._run_link(session, peer)
        except HandshakeError as exc:
            self.metrics.handshake_failed(handshake_failure(exc))
            if exc.silent:
                self.refusals.note(
                    source, logging.DEBUG, "dropped a connection from %s that does not speak trio-tunnel", peer
                )
            else:
                self.refusals.note(source, logging.WARNING, "refused a client from %s: %s", peer, exc)

    async def _run_link(self, session: Session, peer: str) -> None:
        name = session.peer_name
        if self.shutdown.requested.is_set():
            session.go_away(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
            return
        if self.config.tokens and session.peer_token not in self.config.tokens:  # removed by a reload meanwhile
            session.go_away(ErrorCode.AUTH, TOKEN_REMOVED)
            return
        claim = None
        if self.coordinator is not None and (claim := await self._claim(session, name, peer)) is None:
            return  # --workers: the parent refused the name
        if (old := await self._holder(session, name, peer)) is False:
            return
        # --workers: if our holder went while we judged it, give_up() may have given the name to another worker:
        # the parent's answer once more, and the judgement of whoever holds the name here now.
        if (
            claim is not None
            and claim.local
            and old is None
            and (
                await self._claim(session, name, peer) is None
                or (old := await self._holder(session, name, peer)) is False
            )
        ):
            return
        if old is None and len(self.links) >= self.config.max_clients:
            logger.warning(
                "refused client %r from %s: %d clients already connected (max_clients)", name, peer, len(self.links)
            )
            session.go_away(ErrorCode.ENHANCE_YOUR_CALM, "the server has too many clients")
            if self.coordinator is not None:  # (max_clients lowered by a reload while the parent granted the name)
                self.coordinator.release(name)
            return
        link = ClientLink(name, peer, session, udp_flows=FlowBudget(self.config.max_flows_per_client))
        self.links[name] = link
        seen = None
        try:
            if old is not None:
                logger.info("client %r reconnected from %s: replacing its previous link from %s", name, peer, old.peer)
                old.replace(peer)
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
                if self.coordinator is not None:
                    self.coordinator.release(name)
            if seen is not None:
                self.metrics.link_down(seen, replaced=link.replaced)
            link.done.set()
            reason = "replaced by a new link" if link.replaced else session.close_reason or "server shutting down"
            logger.info("client %r from %s disconnected: %s", name, peer, reason)

    # --------------------------------------------------------------------------------------- control plane

    async def _control_loop(self, session: Session, link: ClientLink, nursery: trio.Nursery) -> None:
        while True:
            try:
                request = await session.receive_request()
            except SessionClosedError:
                return
            if request.kind in (EXPOSE, EXPOSE_UDP):
                await self._expose(session, link, request, nursery, udp=request.kind == EXPOSE_UDP)
            elif request.kind == UNEXPOSE:
                await self._unexpose(link, request)
            else:
                request.reply_error(ErrorCode.PROHIBITED, {"message": f"unknown request {request.kind!r}"})

    async def _expose(
        self, session: Session, link: ClientLink, request: Request, nursery: trio.Nursery, *, udp: bool = False
    ) -> None:
        body = request.body if isinstance(request.body, Mapping) else {}
        name, bind, port = body.get("name"), body.get("bind", "0.0.0.0"), body.get("port")
        if not isinstance(name, str) or not isinstance(bind, str) or type(port) is not int or not 0 <= port < 65536:
            request.reply_error(ErrorCode.PROTOCOL, {"message": "expose needs name, bind and port"})
            return
        if name in link.services:
            request.reply_error(ErrorCode.PROHIBITED, {"message": f"service {name!r} is already exposed"})
            return
        if len(link.services) >= self.config.max_ports_per_client:
            limit = self.config.max_ports_per_client
            logger.warning(
                "client %r: refused to expose %s: %d services already (max_ports_per_client)", link.name, name, limit
            )
            request.reply_error(
                ErrorCode.ENHANCE_YOUR_CALM,
                {"message": f"this client already exposes {limit} services, the server's limit (max_ports_per_client)"},
            )
            return
        ports, suffix = (self.config.allow_ports.udp, "/udp") if udp else (self.config.allow_ports, "")
        if port not in ports:
            request.reply_error(
                ErrorCode.PROHIBITED,
                {
                    "message": f"port {port}{suffix} is not allowed by the server "
                    f"(--allow-ports {str(self.config.allow_ports) or '(none)'})"
                },
            )
            return
        if not self.allow_bind.allows(bind):
            logger.warning("client %r: refused to expose %s on %r: not in --allow-bind", link.name, name, bind)
            request.reply_error(ErrorCode.PROHIBITED, {"message": bind_refusal(bind, self.allow_bind)})
            return
        if "group" in body:
            if udp:
                request.reply_error(ErrorCode.PROHIBITED, {"message": "load-balancing groups carry TCP only"})
                return
            await self._expose_in_group(session, link, request, name, bind, port, nursery)
            return
        previous = self.last_ports.get(link.name, name)
        try:
            if udp:
                udp_socket = await bind_udp_in(bind, port, ports, ports.allows_any_unprivileged, previous)
                host, bound = udp_socket.local
            else:
                listeners = await bind_public(bind, port, previous, self.config.allow_ports)
                host, bound = listeners[0].socket.getsockname()[:2]
        except OSError as exc:
            code = ErrorCode.ADDRESS_IN_USE if exc.errno == errno.EADDRINUSE else ErrorCode.CONNECT_FAILED
            request.reply_error(code, {"message": bind_error(bind, port, exc)})
            return
        self._remember(link.name, name, int(bound))
        address = format_hostport(str(host), int(bound)) + suffix
        link.services[name] = address
        limiter = trio.CapacityLimiter(self.config.max_connections_per_service)
        exposure = link.exposures[name] = Exposure(int(bound), limiter, SourceCounts(per_ip_cap(self.config)), udp=udp)
        logger.info("client %r: exposing %s on %s", link.name, name, address)
        stats = self.metrics.service(link.name, name, kind="expose", public=address)
        if udp:
            asked = body.get("idle_timeout")
            idle = DEFAULT_IDLE
            if isinstance(asked, int | float) and not isinstance(asked, bool) and 0 < asked < 86400:
                idle = float(asked)
            gate = FlowGate(self.config.max_flows_per_service, budget=link.udp_flows)
            nursery.start_soon(self._serve_udp_service, session, link, name, udp_socket, gate, idle, exposure)
        else:
            nursery.start_soon(self._serve_service, session, link, name, listeners, nursery, exposure, stats)
        request.reply({"host": str(host), "port": int(bound)})

    async def _unexpose(self, link: ClientLink, request: Request) -> None:
        """Release a service's public port (the client's reload removed or changed it); open connections carry on.
        The reply comes once the port is closed, so the client may expose a service on it again at once."""
        body = request.body if isinstance(request.body, Mapping) else {}
        name = body.get("name")
        member = link.members.get(name) if isinstance(name, str) else None
        if member is not None:  # a group member: leave the group (the port stays while others remain)
            member[0].scope.cancel(reason="unexposed by the client")
            await member[1].wait()
            logger.info("client %r: unexposed %s (left its group)", link.name, name)
            request.reply({})
            return
        exposure = link.exposures.get(name) if isinstance(name, str) else None
        if exposure is None:
            request.reply_error(ErrorCode.UNKNOWN_ROUTE, {"message": f"service {name!r} is not exposed"})
            return
        exposure.scope.cancel(reason="unexposed by the client")
        await exposure.closed.wait()
        logger.info("client %r: unexposed %s (port %d); its open connections carry on", link.name, name, exposure.port)
        request.reply({})

    async def _expose_in_group(
        self,
        session: Session,
        link: ClientLink,
        request: Request,
        name: str,
        bind: str,
        port: int,
        nursery: trio.Nursery,
    ) -> None:
        """Join (or found) the load-balancing group the request names; see tunnel/groups.py."""
        body = request.body if isinstance(request.body, Mapping) else {}
        group_name, balance = body.get("group"), body.get("balance", "round-robin")
        if not isinstance(group_name, str) or GROUP_NAME.problem(group_name) or balance not in BALANCES:
            request.reply_error(ErrorCode.PROTOCOL, {"message": f"bad group {group_name!r} or balance {balance!r}"})
            return
        if not self.config.allow_groups:
            request.reply_error(ErrorCode.PROHIBITED, {"message": "this server does not allow groups (allow_groups)"})
            return
        if self.coordinator is not None:
            message = "this server runs several workers (--workers), which do not share groups; ask for workers = 1"
            request.reply_error(ErrorCode.PROHIBITED, {"message": message})
            return
        async with self.groups.lock:
            group = self.groups.groups.get(group_name)
            if group is not None:
                refusal = group.refusal(session.token_id, bind, port, str(balance))
                if refusal is not None:
                    logger.warning("client %r: refused %s in group %s: %s", link.name, name, group_name, refusal[1])
                    request.reply_error(refusal[0], {"message": refusal[1]})
                    return
            else:
                try:
                    listeners = await bind_public(
                        bind, port, self.last_ports.get(link.name, name), self.config.allow_ports
                    )
                except OSError as exc:
                    code = ErrorCode.ADDRESS_IN_USE if exc.errno == errno.EADDRINUSE else ErrorCode.CONNECT_FAILED
                    request.reply_error(code, {"message": bind_error(bind, port, exc)})
                    return
                group = self.groups.create(
                    group_name,
                    session.token_id,
                    bind,
                    str(balance),
                    listeners,
                    partial(front_door, self.config),
                    per_ip_cap(self.config),
                )
            limiter = trio.CapacityLimiter(self.config.max_connections_per_service)
            stats = self.metrics.service(link.name, name, kind="expose", public=group.address)
            member = Member(link.name, name, session, link.traffic, limiter, stats=stats)
            self.groups.join(group, member)
        self._remember(link.name, name, group.port)
        link.services[name] = group.address
        link.accepting.append(member.scope)
        link.members[name] = (member, left := trio.Event())
        nursery.start_soon(self._hold, link, name, group, member, left)
        request.reply({"host": group.host, "port": group.port})

    async def _hold(self, link: ClientLink, name: str, group: Group, member: Member, left: trio.Event) -> None:
        try:
            await self.groups.hold(group, member)
        finally:
            link.services.pop(name, None)
            if link.members.get(name, (None,))[0] is member:
                del link.members[name]
            left.set()

    def _remember(self, client: str, service: str, port: int) -> None:
        self.last_ports.remember(client, service, port)
        if self.coordinator is not None:
            self.coordinator.remember(client, service, port)

    # ---------------------------------------------------------------------------------------- reverse (-R)

    async def _serve_service(
        self,
        session: Session,
        link: ClientLink,
        name: str,
        listeners: list[trio.SocketListener],
        handlers: trio.Nursery,
        exposure: Exposure,
        stats: ServiceStats,
    ) -> None:
        entrance = ServiceEntrance(link, session, name, exposure.limiter, self.visitors, stats, exposure.sources)
        handler = front_door(self.config, partial(link.traffic.carry, entrance))  # a partial unless PROXY is read
        accepting = exposure.scope
        link.accepting.append(accepting)
        try:
            with accepting:
                await serve_tcp(handler, listeners, handler_nursery=handlers)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            stats.active = False
            released(link, name, exposure)

    async def _serve_udp_service(
        self,
        session: Session,
        link: ClientLink,
        name: str,
        udp_socket: UdpSocket,
        gate: FlowGate,
        idle: float,
        exposure: Exposure,
    ) -> None:
        """A ``-R .../udp`` service until unexposed, drained or its link ends (the socket is closed by then)."""
        accepting = exposure.scope
        link.accepting.append(accepting)
        try:
            drops = partial(self.metrics.udp_dropped, link.name, name)
            await serve_udp_service(
                session, udp_socket, f"{link.name}/{name}", name, gate, idle, accepting, logger, on_drops=drops
            )
        finally:
            udp_socket.close()
            released(link, name, exposure)

    # ---------------------------------------------------------------------------------------- forward (-L)

    def _route_forward(self, link: ClientLink, stream: MuxStream) -> Destination | None:
        """Where a client's forward stream goes: a target the allowlist lets it reach, or nowhere (rejected)."""
        meta = stream.meta
        host, port, peer = meta.get("host"), meta.get("port"), meta.get("peer", "?")
        udp = stream.route == FORWARD_UDP_ROUTE
        if not (udp or stream.route == FORWARD_ROUTE) or not isinstance(host, str) or type(port) is not int:
            stream.reject(ErrorCode.UNKNOWN_ROUTE, f"unknown route {stream.route!r}")
            return None
        target = format_hostport(host, port) + ("/udp" if udp else "")
        if not self.config.allow_targets.allows(host, port, "udp" if udp else "tcp"):
            self.opens.note(
                f"client {link.name!r}",
                logging.WARNING,
                "%s: refused forward to %s for %s: not in --allow-target",
                link.name,
                target,
                peer,
            )
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
            udp=udp,
            stats=self._forwards(link),
        )

    def _forwards(self, link: ClientLink) -> ServiceStats:
        """One series for all of a client's ``-L`` forwards (their names are the client's to choose per stream)."""
        return self.metrics.service(link.name, "forward", kind="forward")

    # -------------------------------------------------------------------------------------------- shutdown

    async def drain(self) -> None:
        """Graceful shutdown: every link drains in parallel (bounded by the caller's deadline)."""
        async with trio.open_nursery() as nursery:
            for link in list(self.links.values()):
                nursery.start_soon(link.drain)


def announce_link_security(tls: ServerTls | None) -> None:
    """The ``fingerprint`` line clients pin, or the warning that the link is plaintext."""
    if tls is not None:
        announce(f"fingerprint {tls.fingerprint}")
        logger.info("TLS on the link; clients pin this server with --server-fingerprint %s", tls.fingerprint)
    else:
        logger.warning(
            "the link is NOT encrypted (--insecure-plaintext): traffic and sessions can be read and taken over "
            "by anyone on the path"
        )


def warn_if_open(config: ServerConfig, address: HostPort) -> None:
    """The warning that anyone may bind public ports (``--insecure-no-auth``)."""
    if not config.tokens:
        logger.warning(
            "running WITHOUT authentication (--insecure-no-auth): anyone who reaches %s can bind public ports "
            "through this server",
            address,
        )


def server_tls(config: ServerConfig) -> ServerTls | None:
    """The server's TLS identity: the operator's files, or its own key in the state directory (made on first
    use); None with ``insecure_plaintext``. Raises ConfigError with one readable line."""
    if config.insecure_plaintext:
        return None
    if config.tls_cert is not None and config.tls_key is not None:
        return ServerTls.from_files(config.tls_cert, config.tls_key)
    return ServerTls.from_state_dir(config.state_dir or default_state_dir())


async def run_server(
    config: ServerConfig,
    shutdown: Shutdown,
    *,
    reload: Callable[[], ServerConfig] | None = None,
    listeners: list[trio.SocketListener] | None = None,
    coordinator: Coordinator | None = None,
    task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve client links until ``shutdown`` is requested, then drain for at most ``shutdown.drain_timeout``.

    Prints ``listening HOST:PORT`` once per listening address; ``task_status.started`` gets the first one.

    On SIGHUP, ``reload()`` (the CLI reads its command line and files again; raises ConfigError) is applied: see
    :meth:`_Server.reload`. Without ``reload``, SIGHUP re-reads ``tls_cert``/``tls_key`` if they are set, and is
    not handled otherwise (so a library caller keeps its own SIGHUP).

    One worker of ``--workers N`` (tunnel/workers.py) gets its ``listeners`` and a ``coordinator``; its SIGHUP
    comes from the parent.

    Raises:
        OSError: the link port cannot be bound (address in use, permission denied, no such address).
    """
    with sighup_receiver(coordinator is None and (reload is not None or config.tls_cert is not None)) as hups:
        await _run_server(config, shutdown, reload, hups, task_status, listeners, coordinator)


async def _run_server(
    config: ServerConfig,
    shutdown: Shutdown,
    reload: Callable[[], ServerConfig] | None,
    hups: AsyncIterator[int] | None,
    task_status: trio.TaskStatus[HostPort],
    listeners: list[trio.SocketListener] | None = None,
    coordinator: Coordinator | None = None,
) -> None:
    tls = server_tls(config)
    before, nofile = raise_nofile_limit()
    if listeners is None:
        listeners = await trio.open_tcp_listeners(config.listen.port, host=config.listen.host)
    caps = HandshakeCaps.sized(nofile, total=config.max_handshakes, per_ip=config.max_handshakes_per_ip)
    server = _Server(config, shutdown, tls, admission=Admission(caps), nofile=nofile, coordinator=coordinator)
    logger.info(
        "descriptor limit %d%s; at most %d connections in the handshake, %d per address",
        nofile,
        f" (raised from {before})" if nofile != before else "",
        caps.total,
        caps.per_ip,
    )
    if coordinator is None:  # (with --workers the parent has said it, once)
        announce_link_security(tls)
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
    if coordinator is None:  # (with --workers the parent says these, once)
        warn_if_open(config, addresses[0])
        logger.info("server listening on %s", ", ".join(map(str, addresses)))
    async with trio.open_nursery() as handlers:  # the links live here, so they outlive the accept loop
        server.groups.nursery = handlers  # and the groups' ports, which outlive any one member's link
        server.groups.refusals = server.visitors
        if metrics_listeners is not None:  # (and the endpoint: it answers while the links drain)
            handlers.start_soon(serve_http, server.metrics.respond, metrics_listeners, config.timeouts.handshake)
        async with trio.open_nursery() as acceptor:
            acceptor.start_soon(
                partial(serve_tcp, server.handle_link, listeners, handler_nursery=handlers, keepalive=False)
            )  # links have PING
            if hups is not None:
                acceptor.start_soon(reload_on_signals, hups, reload or (lambda: server.config), server.reload)
            notify.ready()  # SIGHUP has been ours since before the first stdout line (sighup_receiver)
            for tally in (server.refusals, server.visitors, server.opens):
                handlers.start_soon(tally.run)
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
