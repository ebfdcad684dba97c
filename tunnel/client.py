"""``trio-tunnel client``: keep one link to the server, expose local services through it (``-R``) and forward local
listeners through it (``-L``); reconnect forever with capped, jittered exponential backoff.

Structure (every task has an owner):

    run_client                 nursery: the -L listeners (they outlive any one link), the link loop
      _Client.link_loop        dial -> open_session -> register services -> serve, until the link ends; back off
        nursery per link:      Traffic.accept_streams -> Traffic.answer (one per external connection): dial, splice
      _Client.serve_forward    serve_tcp -> Traffic.carry (one per local connection): a stream to the server, splice
      reload_on_signals        SIGHUP: client_reload.apply_client_reload changes services and forwards on the live link

Readable, final failures (a refused token, an incompatible server) end the process: retrying cannot fix them.
Everything else (server down, link lost, keepalive timeout) is retried.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from functools import partial
from typing import ClassVar, Final

import attrs
import trio
from trio_tunnel.proto import ErrorCode

from . import notify
from .certs import PinMismatchError
from .config import ClientConfig, HostPort, LocalSpec, RemoteSpec
from .config.binds import bind_name_warnings
from .console import announce, format_hostport
from .dial import DialError, dial
from .errors import HandshakeError, LinkSecurityError, RequestError, SessionClosedError, StreamOpenError
from .forwards import ForwardSet, ForwardSlot
from .handlers import FORWARD_WORDS, Arrival, Destination, Meta, Traffic
from .httpd import bind_metrics, serve_http
from .lifecycle import Shutdown
from .link import PLAINTEXT_REFUSED, ClientTls, presented_fingerprint, secure_client_link
from .metrics import Metrics, ServiceStats, handshake_failure
from .mux import MuxStream, Role, Session, open_session, unwrap_group
from .refusal import Refusals, can_heal
from .reload import reload_on_signals, sighup_receiver
from .tcp import TcpStream, serve_tcp
from .tls import TlsHandshakeError
from .udp import serve_udp_forward
from .udpsocket import UdpSocket
from .wire import EXPOSE, EXPOSE_UDP, FORWARD_ROUTE, REPLACED, UNEXPOSE, UNEXPOSED, session_config

__all__ = ["Backoff", "run_client"]

logger: Final = logging.getLogger(__name__)

FATAL_CODES: Final = frozenset({ErrorCode.AUTH, ErrorCode.VERSION})
REFUSAL_CODES: Final = frozenset({ErrorCode.NAME_IN_USE, ErrorCode.ENHANCE_YOUR_CALM})
"""A session the server ends with one of these right after the handshake was refused (name in use, server full):
retried, with the backoff growing."""


@attrs.define
class Backoff:
    """Capped exponential backoff with jitter: ``initial * 2**n`` up to ``maximum``, each delay scaled by a random
    factor in ``[1 - jitter, 1 + jitter]`` so that many clients do not reconnect in lockstep."""

    initial: float
    maximum: float
    jitter: float
    rng: random.Random = attrs.field(factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return float(base * self.rng.uniform(1 - self.jitter, 1 + self.jitter))

    def reset(self) -> None:
        self.attempt = 0


@attrs.define(eq=False)
class _Client:
    config: ClientConfig
    shutdown: Shutdown
    rng: random.Random
    session: Session | None = None
    session_changed: trio.Event = attrs.field(factory=trio.Event)
    services: dict[str, RemoteSpec] = attrs.field(init=False)
    server: str = attrs.field(init=False)
    destinations: dict[str, Destination] = attrs.field(init=False)
    """Route (service name) -> where the server's streams for it go."""
    traffic: Traffic = attrs.field(factory=lambda: Traffic(logger))
    status: trio.TaskStatus[dict[str, HostPort]] | None = None
    replaced_by_peer: bool = False
    exposed: dict[str, HostPort] = attrs.field(factory=dict)
    """Service name -> the public address the server bound for it on the current link."""
    tls: ClientTls | None = attrs.field(init=False)
    refusals: Refusals = attrs.field(init=False)
    ready_sent: bool = False
    registry: trio.Lock = attrs.field(factory=trio.Lock)
    """Held while services are registered on a new link or changed by a reload: one at a time."""
    relink_pending: bool = False
    """A reload changed the link's settings: the current link (if any) ends and a new one starts at once."""
    link_watch: trio.CancelScope | None = None
    """The link's serving scope, or the backoff wait between links: :meth:`relink` cancels it."""
    on_session: Callable[[Session | None], object] | None = None
    """Told each link's session once its services are registered, and None when it ends (trio_tunnel.testing)."""

    metrics: Metrics = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.refusals = Refusals(self.config.exit_on_refusal, logger)
        self.metrics = Metrics("client", self.config.name)
        self.set_config(self.config, client_tls(self.config))

    def set_config(self, config: ClientConfig, tls: ClientTls | None) -> None:
        """Take ``config`` (at start, and when a reload commits): the next link, registration and dial use it."""
        for warning in bind_name_warnings(config.remotes):
            logger.warning("%s", warning)
        self.config, self.tls = config, tls
        self.refusals.exit_on_refusal = config.exit_on_refusal
        self.services = {spec.name: spec for spec in config.remotes}
        self.server = format_hostport(config.server.host, config.server.port)
        self.destinations = {spec.name: self.destination(spec) for spec in config.remotes}

    def destination(self, spec: RemoteSpec) -> Destination:
        """Where ``spec``'s streams go, counted under its name (:mod:`trio_tunnel.metrics`)."""
        target = format_hostport(spec.target_host, spec.target_port) + spec.suffix
        return attrs.evolve(destination(spec), stats=self._stats(spec.name, "expose", target))

    def _stats(self, name: str, kind: str, target: str) -> ServiceStats:
        stats = self.metrics.service(self.config.name, name, kind=kind)
        stats.target = target
        return stats

    def relink(self) -> None:
        """End the current link (its connections too) and make a new one with the current config at once."""
        self.relink_pending = True
        if self.link_watch is not None:
            self.link_watch.cancel(reason="reconnecting with a new configuration")

    def _set_session(self, session: Session | None) -> None:
        self.session = session
        self.session_changed.set()
        self.session_changed = trio.Event()
        if self.on_session is not None:
            self.on_session(session)

    # ------------------------------------------------------------------------------------------ the link

    async def link_loop(self, *, task_status: trio.TaskStatus[dict[str, HostPort]] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a link up until shutdown; ``task_status.started()`` once the first link serves (or at shutdown)."""
        cfg = self.config
        backoff = Backoff(
            cfg.timeouts.reconnect_initial, cfg.timeouts.reconnect_max, cfg.timeouts.reconnect_jitter, self.rng
        )
        self.status = task_status
        while not self.shutdown.requested.is_set():
            await self._one_link(backoff)
            if self.shutdown.requested.is_set():
                break
            if self.relink_pending:
                continue
            delay = backoff.next_delay()
            self.metrics.reconnecting()
            logger.info("reconnecting to %s in %.1f s", self.server, delay)
            with trio.move_on_after(delay) as self.link_watch:  # a reload's relink() ends the wait too
                await self.shutdown.requested.wait()
            self.link_watch = None
        self._started()

    def _started(self) -> None:
        if self.status is not None:
            self.status.started(dict(self.exposed))
            self.status = None

    async def _secure(self, transport: TcpStream) -> tuple[trio.abc.Stream, bytes] | None:
        """TLS (unless plaintext) on a new link, within the handshake timeout; None for a failure worth a retry.

        Raises:
            LinkSecurityError: the server's key or certificate is not the one configured, or it does not speak TLS.
        """
        cfg = self.config
        try:
            with trio.move_on_after(cfg.timeouts.handshake):
                return await secure_client_link(transport, self.tls, cfg.server.host)
            logger.warning(
                "cannot reach the server: no TLS handshake with %s within %g s", self.server, cfg.timeouts.handshake
            )
        except PinMismatchError as exc:
            raise LinkSecurityError(
                f"refusing the server at {self.server}: {exc.verify_message} (--server-fingerprint)"
            ) from None
        except TlsHandshakeError as exc:
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                with trio.move_on_after(cfg.timeouts.handshake):
                    presented = await presented_fingerprint(cfg.server.host, cfg.server.port)
                raise LinkSecurityError(_unverified(self.server, exc, presented)) from None
            if exc.plaintext_peer:
                raise LinkSecurityError(
                    f"{exc}: the server at {self.server} runs without TLS (--insecure-plaintext); add "
                    "--insecure-plaintext to this client too, or remove it from the server"
                ) from None
            logger.warning("cannot reach the server: %s", exc)
        except trio.BrokenResourceError as exc:
            logger.warning("cannot reach the server: %s", exc)
        await trio.aclose_forcefully(transport)
        return None

    async def _one_link(self, backoff: Backoff) -> None:
        cfg = self.config
        self.relink_pending = False
        try:
            transport = await dial(cfg.server.host, cfg.server.port, timeout=cfg.timeouts.connect)
        except DialError as exc:
            logger.warning("cannot reach the server: %s", exc.reason)
            return
        secured = await self._secure(transport)
        if secured is None:
            return
        link, binding = secured
        try:
            async with open_session(
                link,
                role=Role.CLIENT,
                config=session_config(cfg.timeouts, role=Role.CLIENT, memory=cfg.link_memory),
                name=cfg.name,
                token=cfg.token,
                channel_binding=binding,
            ) as session:
                announce(f"connected {self.server}")
                logger.info("connected to %s as %r (session %s)", self.server, cfg.name, session.session_id)
                seen = self.metrics.link_up(self.server, self.server, session)
                try:
                    reason = await self._serve_link(session)
                finally:
                    self.metrics.link_down(seen, replaced=self.replaced_by_peer)
                refused = session.close_code in REFUSAL_CODES and not self.shutdown.requested.is_set()
                if not refused:
                    backoff.reset()
        except HandshakeError as exc:
            self.metrics.handshake_failed(handshake_failure(exc))
            if exc.code in FATAL_CODES:
                raise
            if exc.code == ErrorCode.PROHIBITED and PLAINTEXT_REFUSED in exc.reason:
                raise LinkSecurityError(f"the server at {self.server} refused the session: {exc.reason}") from None
            logger.warning("the server refused the session: %s", exc)
            return
        announce(f"disconnected {reason}")
        if refused:
            logger.warning("the server refused the session: %s", reason)
        elif self.replaced_by_peer:
            # The server found this link stale and gave the name to a newcomer. Reconnecting is safe: if that one
            # is alive, the server refuses us (NAME_IN_USE) and we retry with a growing backoff; we never exit.
            logger.warning("replaced on the server: %s; reconnecting", reason)
        else:
            logger.info("disconnected from %s: %s", self.server, reason)

    async def _serve_link(self, session: Session) -> str:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.traffic.accept_streams, session, nursery, self._route, self.config.timeouts.connect)
            nursery.start_soon(self._control_loop, session)
            await self._register(session, nursery)
            self._set_session(session)
            if session.close_code not in REFUSAL_CODES:  # refused (name in use, server full): not up yet
                self._started()
            with trio.CancelScope() as watch:
                self.link_watch = watch
                if self.relink_pending:  # a reload changed the link while this one was being made
                    watch.cancel(reason="reconnecting with a new configuration")

                async def on_shutdown() -> None:
                    await self.shutdown.requested.wait()
                    watch.cancel(reason="shutdown")

                nursery.start_soon(on_shutdown)
                await session.wait_closed()
            self.link_watch = None
            self._set_session(None)
            self.replaced_by_peer = session.close_code == ErrorCode.PROHIBITED and session.close_reason.startswith(
                REPLACED
            )
            if self.shutdown.requested.is_set():
                await self._drain(session)
                reason = "shutting down"
            elif self.relink_pending and not session.closed:
                reason = "reconnecting with a new configuration"
                session.go_away(ErrorCode.NO_ERROR, f"the client is {reason}")
            else:
                reason = session.close_reason or "link closed"
            nursery.cancel_scope.cancel(reason=f"link ended: {reason}")
        return reason

    async def _drain(self, session: Session) -> None:
        session.go_away(ErrorCode.SHUTTING_DOWN, "the client is shutting down")
        with trio.move_on_after(self.shutdown.drain_timeout):
            await self.traffic.drained()

    async def _register(self, session: Session, nursery: trio.Nursery) -> None:
        async with self.registry:
            self.exposed.clear()
            self.refusals.new_link()
            for spec in self.services.values():
                try:
                    await self.expose_one(session, spec)
                except RequestError as exc:
                    self.refusals.refused(spec.name, exc)  # raises ServiceRefusedError with exit_on_refusal
                    if can_heal(exc.code):
                        nursery.start_soon(self._retry_expose, session, spec)
                except SessionClosedError:
                    return
        self._maybe_ready()

    async def _retry_expose(self, session: Session, spec: RemoteSpec) -> None:
        """Ask again for a service whose refusal may heal (its port in use), with the reconnect backoff, until the
        server binds it, refuses it for good, a reload changes or removes it, or the link ends (the next link asks
        afresh)."""
        cfg = self.config.timeouts
        backoff = Backoff(cfg.reconnect_initial, cfg.reconnect_max, cfg.reconnect_jitter, self.rng)
        while True:
            delay = backoff.next_delay()
            logger.info("asking the server again to expose %s in %.1f s", spec.name, delay)
            with trio.move_on_after(delay):
                await self.shutdown.requested.wait()
            if self.shutdown.requested.is_set():
                return
            async with self.registry:
                if self.services.get(spec.name) != spec or spec.name in self.exposed:
                    return  # a reload changed or removed it, and registered what it needed
                try:
                    await self.expose_one(session, spec)
                except RequestError as exc:
                    self.refusals.refused(spec.name, exc)
                    if can_heal(exc.code):
                        continue
                except SessionClosedError:
                    return
            self._maybe_ready()
            return

    def _maybe_ready(self) -> None:
        """READY=1 for systemd once every service is exposed (at once for a client without -R)."""
        if not self.ready_sent and len(self.exposed) == len(self.services):
            self.ready_sent = True
            notify.ready()

    async def expose_one(self, session: Session, spec: RemoteSpec) -> None:
        """Ask the server for ``spec``'s public port; prints ``exposed NAME HOST:PORT``.

        Raises:
            RequestError: the server refused (port not allowed, in use, ...).
            SessionClosedError: the link ended first.
        """
        body: dict[str, str | int | float] = {"name": spec.name, "bind": spec.bind_host, "port": spec.bind_port}
        if spec.protocol == "udp" and spec.idle_timeout is not None:
            body["idle_timeout"] = spec.idle_timeout
        if spec.group is not None:
            body.update(group=spec.group, balance=spec.balance)
        try:
            reply = await session.request(EXPOSE_UDP if spec.protocol == "udp" else EXPOSE, body)
        except RequestError as exc:
            if spec.protocol == "udp" and EXPOSE_UDP in str(exc):  # "unknown request 'expose-udp'"
                logger.error("the server is older and carries no UDP: upgrade it to expose %s", spec.name)
            self.metrics.service(self.config.name, spec.name, kind="expose").last_error = str(exc)
            raise
        self.refusals.exposed(spec.name)
        bound = HostPort(host=str(reply["host"]), port=int(reply["port"]))
        self.exposed[spec.name] = bound
        address = format_hostport(bound.host, bound.port) + spec.suffix
        self.metrics.service(self.config.name, spec.name, kind="expose", public=address)
        announce(f"exposed {spec.name} {address}")
        logger.info(
            "exposed %s (local %s) on the server at %s",
            spec.name,
            format_hostport(spec.target_host, spec.target_port),
            address,
        )

    async def unexpose_one(self, session: Session, name: str) -> None:
        """Ask the server to release ``name``'s public port (its open connections carry on); prints ``unexposed
        NAME``. Raises RequestError (e.g. a server too old to know UNEXPOSE) or SessionClosedError."""
        await session.request(UNEXPOSE, {"name": name})
        self.exposed.pop(name, None)
        announce(f"unexposed {name}")
        logger.info("unexposed %s: the server released its public port", name)

    async def _control_loop(self, session: Session) -> None:
        """The server's requests: the notice that it released a service's port (its reload no longer allows it)."""
        while True:
            try:
                request = await session.receive_request()
            except SessionClosedError:
                return
            body = request.body if isinstance(request.body, Mapping) else {}
            name = body.get("name")
            if request.kind == UNEXPOSED and isinstance(name, str):
                if self.exposed.pop(name, None) is not None:
                    announce(f"unexposed {name}")
                    logger.warning("the server released %s: %s", name, body.get("reason") or "no reason given")
            else:
                request.reply_error(ErrorCode.PROHIBITED, {"message": f"unknown request {request.kind!r}"})

    # ---------------------------------------------------------------------------------------- reverse (-R)

    def _route(self, stream: MuxStream) -> Destination | None:
        """The local service a server-opened stream is for (its route is the service name)."""
        destination = self.destinations.get(stream.route)
        if destination is None:
            stream.reject(ErrorCode.UNKNOWN_ROUTE, f"this client exposes no service {stream.route!r}")
        elif not destination.udp and stream.meta.get("dgram") is not None:
            stream.reject(ErrorCode.PROTOCOL, f"{stream.route}: a TCP service, and the stream carries datagrams")
            return None
        return destination

    # ---------------------------------------------------------------------------------------- forward (-L)

    async def serve_forward(
        self, slot: ForwardSlot, listeners: list[trio.SocketListener], handlers: trio.Nursery
    ) -> None:
        spec = slot.spec
        stats = self._stats(spec.name, "forward", format_hostport(spec.target_host, spec.target_port))
        host, port = listeners[0].socket.getsockname()[:2]
        stats.public = format_hostport(str(host), int(port))
        try:
            await serve_tcp(
                partial(self.traffic.carry, _Forward(self, slot, stats)), listeners, handler_nursery=handlers
            )
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def serve_udp_forward(self, spec: LocalSpec, udp: UdpSocket) -> None:
        drops = partial(self.metrics.udp_dropped, self.config.name, spec.name)
        await serve_udp_forward(self.current_session, spec, udp, logger, on_drops=drops)

    async def current_session(self) -> Session | None:
        """The link's session; while there is none, wait for one for at most the connect timeout."""
        if self.session is None:
            with trio.move_on_after(self.config.timeouts.connect):
                while self.session is None:
                    await self.session_changed.wait()
        return self.session


@attrs.frozen(eq=False)
class _Forward:
    """A ``-L`` listener's side of :meth:`Traffic.carry`: each local connection becomes a stream to the server,
    which dials ``spec``'s target for it."""

    client: _Client
    slot: ForwardSlot
    stats: ServiceStats
    route: ClassVar[str] = FORWARD_ROUTE
    other: ClassVar[str] = "server"
    words: ClassVar[tuple[str, str]] = FORWARD_WORDS
    optimistic: ClassVar[bool] = True

    @property
    def spec(self) -> LocalSpec:
        return self.slot.spec

    @property
    def label(self) -> str:
        return self.spec.name

    async def admit(self, peer: str) -> Session | None:
        session = await self.client.current_session()
        if session is None:
            logger.warning("%s: closing %s: no link to the server", self.spec.name, peer)
            self.stats.failed("refused", "no link to the server")
        return session

    def meta(self, arrival: Arrival) -> Meta:
        spec = self.spec
        return {"host": spec.target_host, "port": spec.target_port, "peer": arrival.peer, "name": spec.name}

    def release(self, peer: str) -> None:
        pass

    def retry(self, exc: StreamOpenError | SessionClosedError) -> bool:
        return False


def _unverified(server: str, exc: Exception, presented: str | None) -> str:
    """The refusal of a certificate the client cannot verify, with the fingerprint it showed and the flag to add."""
    cause = exc.__cause__
    why = getattr(cause, "verify_message", None) or str(exc)
    if presented is None:
        return f"cannot verify the server at {server}: {why}; pin its key with --server-fingerprint sha256:..."
    return (
        f"cannot verify the server at {server} ({why}); it presented the key {presented}. Check that fingerprint "
        f"on the server ('trio-tunnel server --print-fingerprint'), then add --server-fingerprint {presented}"
    )


def destination(spec: RemoteSpec) -> Destination:
    """Where the server's streams for service ``spec`` go: its local target."""
    return Destination(
        spec.target_host,
        spec.target_port,
        spec.name,
        "local service",
        udp=spec.protocol == "udp",
        proxy_protocol=spec.proxy_protocol,
        idle=spec.idle_timeout if spec.protocol == "tcp" else None,
    )


def client_tls(config: ClientConfig) -> ClientTls | None:
    """The client's TLS settings; None with ``insecure_plaintext``."""
    if config.insecure_plaintext:
        return None
    return ClientTls.create(pins=config.server_fingerprint, ca_file=config.tls_ca)


async def run_client(
    config: ClientConfig,
    shutdown: Shutdown,
    *,
    rng: random.Random | None = None,
    reload: Callable[[], ClientConfig] | None = None,
    on_session: Callable[[Session | None], object] | None = None,
    task_status: trio.TaskStatus[dict[str, HostPort]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the client until ``shutdown`` is requested (then drain for at most ``shutdown.drain_timeout``).

    ``task_status.started(exposed)`` fires once the first link is up and its services are registered, with the
    public address the server bound for each service that it accepted (empty if shut down before connecting).
    ``on_session`` (if given) is called with each link's session once its services are registered, and with None
    when that link ends: how :mod:`trio_tunnel.testing` knows when a link is back, without polling.

    With ``reload`` (the CLI reads its command line and files again; raises ConfigError), SIGHUP applies the new
    config on the live link (:func:`trio_tunnel.client_reload.apply_client_reload`); without it, SIGHUP is not
    handled here.

    Raises:
        HandshakeError: the server refused the token or speaks an incompatible version (retrying cannot help).
        ServiceRefusedError: the server refused a service and ``config.exit_on_refusal`` is set.
        OSError: a ``-L`` listener cannot be bound.
    """
    try:
        with sighup_receiver(reload is not None) as hups:
            await _run_client(config, shutdown, rng or random.Random(), reload, hups, task_status, on_session)
    except BaseExceptionGroup as group:  # internal nurseries: surface the one real error
        raise unwrap_group(group) from None


async def _run_client(
    config: ClientConfig,
    shutdown: Shutdown,
    rng: random.Random,
    reload: Callable[[], ClientConfig] | None,
    hups: AsyncIterator[int] | None,
    task_status: trio.TaskStatus[dict[str, HostPort]],
    on_session: Callable[[Session | None], object] | None = None,
) -> None:
    from .client_reload import apply_client_reload

    client = _Client(config, shutdown, rng, on_session=on_session)
    metrics_listeners = None if config.metrics is None else await bind_metrics(config.metrics)
    async with trio.open_nursery() as handlers:  # -L connections: they outlive the accept loops, for the drain
        if metrics_listeners is not None:  # (and the endpoint: it answers while they drain)
            handlers.start_soon(serve_http, client.metrics.respond, metrics_listeners, config.timeouts.handshake)
        async with trio.open_nursery() as nursery:
            forwards = ForwardSet(client.serve_forward, nursery, handlers, serve_udp=client.serve_udp_forward)
            for spec in config.locals:
                forwards.start(await forwards.bind(spec))
            reloading = trio.CancelScope()

            async def stop_accepting() -> None:
                await shutdown.requested.wait()
                reloading.cancel(reason="shutting down")
                forwards.stop_all()

            async def reload_on_sighup(signals: AsyncIterator[int], load: Callable[[], ClientConfig]) -> None:
                with reloading:
                    await reload_on_signals(signals, load, partial(apply_client_reload, client, forwards))

            nursery.start_soon(stop_accepting)
            if hups is not None and reload is not None:
                nursery.start_soon(reload_on_sighup, hups, reload)
            exposed = await nursery.start(client.link_loop)
            task_status.started(exposed)
        handlers.cancel_scope.cancel(reason="client shut down")
    logger.info("client stopped")
