"""``trio-tunnel client``: keep one link to the server, expose local services through it (``-R``) and forward local
listeners through it (``-L``); reconnect forever with capped, jittered exponential backoff.

Structure (every task has an owner):

    run_client                 nursery: the -L listeners (they outlive any one link), the link loop
      _Client.link_loop        dial -> open_session -> register services -> serve, until the link ends; back off
        nursery per link:      Traffic.accept_streams -> Traffic.answer (one per external connection): dial, splice
      _Client.serve_forward    serve_tcp -> Traffic.carry (one per local connection): a stream to the server, splice

Readable, final failures (a refused token, an incompatible server) end the process: retrying cannot fix them.
Everything else (server down, link lost, keepalive timeout) is retried.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import ClassVar, Final

import attrs
import trio
from trio_tunnel.proto import ErrorCode

from .certs import PinMismatchError
from .config import ClientConfig, HostPort, LocalSpec, RemoteSpec
from .console import announce, format_hostport
from .dial import DialError, dial
from .errors import HandshakeError, LinkSecurityError, NameTakenError, RequestError, SessionClosedError
from .handlers import FORWARD_WORDS, Destination, Meta, Traffic
from .httpd import bind_metrics, serve_http
from .lifecycle import Shutdown
from .link import PLAINTEXT_REFUSED, ClientTls, presented_fingerprint, secure_client_link
from .metrics import Metrics, ServiceStats, handshake_failure
from .mux import MuxStream, Role, Session, open_session, unwrap_group
from .tcp import TcpStream, serve_tcp
from .tls import TlsHandshakeError
from .wire import EXPOSE, FORWARD_ROUTE, REPLACED, session_config

__all__ = ["Backoff", "run_client"]

logger: Final = logging.getLogger(__name__)

FATAL_CODES: Final = frozenset({ErrorCode.AUTH, ErrorCode.VERSION})


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
    metrics: Metrics = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.tls = client_tls(self.config)
        self.services = {spec.name: spec for spec in self.config.remotes}
        self.server = format_hostport(self.config.server.host, self.config.server.port)
        self.metrics = Metrics("client", self.config.name)
        self.destinations = {
            spec.name: Destination(
                spec.target_host,
                spec.target_port,
                spec.name,
                "local service",
                stats=self._stats(spec.name, "expose", format_hostport(spec.target_host, spec.target_port)),
            )
            for spec in self.config.remotes
        }

    def _stats(self, name: str, kind: str, target: str) -> ServiceStats:
        stats = self.metrics.service(self.config.name, name, kind=kind)
        stats.target = target
        return stats

    def _set_session(self, session: Session | None) -> None:
        self.session = session
        self.session_changed.set()
        self.session_changed = trio.Event()

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
            delay = backoff.next_delay()
            self.metrics.reconnecting()
            logger.info("reconnecting to %s in %.1f s", self.server, delay)
            with trio.move_on_after(delay):
                await self.shutdown.requested.wait()
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
                config=session_config(cfg.timeouts, role=Role.CLIENT),
                name=cfg.name,
                token=cfg.token,
                channel_binding=binding,
            ) as session:
                announce(f"connected {self.server}")
                logger.info("connected to %s as %r (session %s)", self.server, cfg.name, session.session_id)
                backoff.reset()
                seen = self.metrics.link_up(self.server, self.server, session)
                try:
                    reason = await self._serve_link(session)
                finally:
                    self.metrics.link_down(seen, replaced=self.replaced_by_peer)
        except HandshakeError as exc:
            self.metrics.handshake_failed(handshake_failure(exc))
            if exc.code in FATAL_CODES:
                raise
            if exc.code == ErrorCode.PROHIBITED and PLAINTEXT_REFUSED in exc.reason:
                raise LinkSecurityError(f"the server at {self.server} refused the session: {exc.reason}") from None
            logger.warning("the server refused the session: %s", exc)
            return
        announce(f"disconnected {reason}")
        logger.info("disconnected from %s: %s", self.server, reason)
        if self.replaced_by_peer:
            # Another live client took our name: reconnecting would take it back, and so on forever.
            raise NameTakenError(ErrorCode.PROHIBITED, reason)

    async def _serve_link(self, session: Session) -> str:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.traffic.accept_streams, session, nursery, self._route, self.config.timeouts.connect)
            await self._register(session)
            self._set_session(session)
            self._started()
            with trio.CancelScope() as watch:

                async def on_shutdown() -> None:
                    await self.shutdown.requested.wait()
                    watch.cancel(reason="shutdown")

                nursery.start_soon(on_shutdown)
                await session.wait_closed()
            self._set_session(None)
            self.replaced_by_peer = session.close_code == ErrorCode.PROHIBITED and session.close_reason.startswith(
                REPLACED
            )
            if self.shutdown.requested.is_set():
                await self._drain(session)
                reason = "shutting down"
            else:
                reason = session.close_reason or "link closed"
            nursery.cancel_scope.cancel(reason=f"link ended: {reason}")
        return reason

    async def _drain(self, session: Session) -> None:
        session.go_away(ErrorCode.SHUTTING_DOWN, "the client is shutting down")
        with trio.move_on_after(self.shutdown.drain_timeout):
            await self.traffic.drained()

    async def _register(self, session: Session) -> None:
        self.exposed.clear()
        for spec in self.services.values():
            try:
                reply = await session.request(
                    EXPOSE, {"name": spec.name, "bind": spec.bind_host, "port": spec.bind_port}
                )
            except RequestError as exc:
                logger.error("the server refused to expose %s: %s", spec.name, exc)
                self.metrics.service(self.config.name, spec.name, kind="expose").last_error = str(exc)
                continue
            except SessionClosedError:
                return
            bound = HostPort(host=str(reply["host"]), port=int(reply["port"]))
            self.exposed[spec.name] = bound
            address = format_hostport(bound.host, bound.port)
            self.metrics.service(self.config.name, spec.name, kind="expose", public=address)
            announce(f"exposed {spec.name} {address}")
            logger.info(
                "exposed %s (local %s) on the server at %s",
                spec.name,
                format_hostport(spec.target_host, spec.target_port),
                address,
            )

    # ---------------------------------------------------------------------------------------- reverse (-R)

    def _route(self, stream: MuxStream) -> Destination | None:
        """The local service a server-opened stream is for (its route is the service name)."""
        destination = self.destinations.get(stream.route)
        if destination is None:
            stream.reject(ErrorCode.UNKNOWN_ROUTE, f"this client exposes no service {stream.route!r}")
        return destination

    # ---------------------------------------------------------------------------------------- forward (-L)

    async def serve_forward(
        self, spec: LocalSpec, listeners: list[trio.SocketListener], handlers: trio.Nursery
    ) -> None:
        stats = self._stats(spec.name, "forward", format_hostport(spec.target_host, spec.target_port))
        host, port = listeners[0].socket.getsockname()[:2]
        stats.public = format_hostport(str(host), int(port))
        try:
            await serve_tcp(
                partial(self.traffic.carry, _Forward(self, spec, stats)), listeners, handler_nursery=handlers
            )
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

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
    spec: LocalSpec
    stats: ServiceStats
    route: ClassVar[str] = FORWARD_ROUTE
    other: ClassVar[str] = "server"
    words: ClassVar[tuple[str, str]] = FORWARD_WORDS

    @property
    def label(self) -> str:
        return self.spec.name

    async def admit(self, peer: str) -> Session | None:
        session = await self.client.current_session()
        if session is None:
            logger.warning("%s: closing %s: no link to the server", self.spec.name, peer)
            self.stats.failed("refused", "no link to the server")
        return session

    def meta(self, peer: str) -> Meta:
        spec = self.spec
        return {"host": spec.target_host, "port": spec.target_port, "peer": peer, "name": spec.name}

    def release(self) -> None:
        pass


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
    task_status: trio.TaskStatus[dict[str, HostPort]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the client until ``shutdown`` is requested (then drain for at most ``shutdown.drain_timeout``).

    ``task_status.started(exposed)`` fires once the first link is up and its services are registered, with the
    public address the server bound for each service that it accepted (empty if shut down before connecting).

    Raises:
        HandshakeError: the server refused the token or speaks an incompatible version (retrying cannot help).
        OSError: a ``-L`` listener cannot be bound.
    """
    try:
        await _run_client(config, shutdown, rng or random.Random(), task_status)
    except BaseExceptionGroup as group:  # internal nurseries: surface the one real error
        raise unwrap_group(group) from None


async def _run_client(
    config: ClientConfig, shutdown: Shutdown, rng: random.Random, task_status: trio.TaskStatus[dict[str, HostPort]]
) -> None:
    client = _Client(config, shutdown, rng)
    metrics_listeners = None if config.metrics is None else await bind_metrics(config.metrics)
    async with trio.open_nursery() as handlers:  # -L connections: they outlive the accept loops, for the drain
        if metrics_listeners is not None:  # (and the endpoint: it answers while they drain)
            handlers.start_soon(serve_http, client.metrics.respond, metrics_listeners, config.timeouts.handshake)
        async with trio.open_nursery() as nursery:
            accepting: list[trio.CancelScope] = []  # one per -L: a CancelScope can enter only one with block
            for spec in config.locals:
                listeners = await trio.open_tcp_listeners(spec.bind_port, host=spec.bind_host)
                host, port = listeners[0].socket.getsockname()[:2]
                announce(f"forwarding {spec.name} {format_hostport(str(host), int(port))}")
                logger.info(
                    "forwarding %s to %s through the server",
                    format_hostport(str(host), int(port)),
                    format_hostport(spec.target_host, spec.target_port),
                )
                accepting.append(scope := trio.CancelScope())
                nursery.start_soon(_scoped, scope, client.serve_forward, spec, listeners, handlers)

            async def stop_accepting() -> None:
                await shutdown.requested.wait()
                for scope in accepting:
                    scope.cancel(reason="shutting down")

            nursery.start_soon(stop_accepting)
            exposed = await nursery.start(client.link_loop)
            task_status.started(exposed)
        handlers.cancel_scope.cancel(reason="client shut down")
    logger.info("client stopped")


async def _scoped(scope: trio.CancelScope, fn: Callable[..., Awaitable[None]], *args: object) -> None:
    with scope:
        await fn(*args)
