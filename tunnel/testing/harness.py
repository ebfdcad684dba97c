"""Tunnels in a test: :func:`open_tunnel` (a server, a shaping link and a client exposing one local service) and
:func:`open_tunnel_server` (a server a test's own clients join), both in the caller's Trio run, on loopback.

What a test gets is the real thing: ``run_server`` and ``run_client`` as the CLI runs them, over TLS with a
throwaway identity (:mod:`.identity`), on real sockets; the only addition is the relay between them
(:mod:`.shaping`), which every layer above sees as an ordinary TCP path. Leaving the block is a check, not just a
cleanup: both ends are asked to stop as SIGINT asks them, and the block fails (:class:`TunnelCheckError`) if one
does not stop within its drain time (a task leaked), if a link connection is still open once both have stopped,
or if trio-tunnel logged an error meanwhile (an error it handled instead of raising: "swallowed").
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Final, TypeAlias

import attrs
import trio
from trio_tunnel.certs import fingerprint_of_pem_file, load_or_create_identity
from trio_tunnel.client import run_client
from trio_tunnel.config import ClientConfig, HostPort, PortSet, RemoteSpec, ServerConfig, Timeouts
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.mux import Session, unwrap_group
from trio_tunnel.proto import ErrorCode
from trio_tunnel.relay import splice
from trio_tunnel.server import run_server
from trio_tunnel.session_types import SessionStatistics

from .identity import throwaway_identity
from .shaping import Link, LinkStatistics

__all__ = [
    "TEST_TIMEOUTS",
    "Local",
    "Tunnel",
    "TunnelCheckError",
    "TunnelClient",
    "TunnelServer",
    "TunnelStatistics",
    "open_tunnel",
    "open_tunnel_server",
]

LOCALHOST: Final = "127.0.0.1"

TEST_TIMEOUTS: Final = Timeouts(drain=1.0, reconnect_initial=0.05, reconnect_max=0.5, reconnect_jitter=0.1)
"""The defaults of a test tunnel: production keepalives and handshake, quick reconnects, a short drain (the time
leaving the block may wait for connections the test left open). Any field can be given as an option."""

STOP_MARGIN: Final = 5.0
"""Seconds beyond the drain time that an end may take to stop before it counts as leaked."""

Local: TypeAlias = int | tuple[str, int] | Callable[[], Awaitable[trio.abc.Stream]]
"""What a tunnel exposes: a port on 127.0.0.1, a ``(host, port)``, or a factory of streams (called for each
tunnelled connection; say ``functools.partial(trio.open_unix_socket, path)``)."""

_SERVER_FIELDS: Final = frozenset(f.name for f in attrs.fields(ServerConfig)) - {"listen", "tokens"}
_CLIENT_FIELDS: Final = frozenset(f.name for f in attrs.fields(ClientConfig)) - {"server", "token", "name", "remotes"}
_TIMEOUT_FIELDS: Final = frozenset(f.name for f in attrs.fields(Timeouts))
_TUNNEL_OPTIONS: Final = frozenset({"public_port", "seed"})


class TunnelCheckError(AssertionError):
    """Leaving a tunnel's block found a problem: an end did not stop, a connection leaked, or an error was logged.
    An ``AssertionError``, so pytest reports it as a failed check, with every problem in the message."""


@attrs.frozen
class TunnelStatistics:
    """A snapshot of a tunnel (:meth:`Tunnel.statistics`)."""

    sessions: int
    """Sessions the client has had: 1, plus one per reconnect."""
    session: SessionStatistics | None
    """The client's current session (None while it has no link)."""
    link: LinkStatistics


# --------------------------------------------------------------------------------------------------- server


@attrs.define(eq=False)
class TunnelServer:
    """A running server (``tunnel.server``, or the ``tunnel_server`` fixture)."""

    config: ServerConfig
    address: tuple[str, int]
    """Where clients connect (127.0.0.1 and the port the server bound)."""
    token: bytes
    """The token clients authenticate with (random per server)."""
    fingerprint: str | None
    """The key clients pin (``sha256:...``); None for a plaintext server (``tls=False``)."""
    shutdown: Shutdown
    done: trio.Event = attrs.field(factory=trio.Event)

    def client_config(self, *remotes: str | RemoteSpec, name: str = "test", **options: Any) -> ClientConfig:
        """A ClientConfig for this server (address, token, pin) exposing ``remotes`` (``-R`` syntax or specs);
        ``options`` are other ClientConfig fields, or Timeouts fields."""
        specs = tuple(r if isinstance(r, RemoteSpec) else RemoteSpec.parse(r) for r in remotes)
        timeouts = _timeouts({k: options.pop(k) for k in list(options) if k in _TIMEOUT_FIELDS}, options)
        tls: dict[str, Any] = (
            {"insecure_plaintext": True}
            if self.config.insecure_plaintext
            else {"server_fingerprint": (self.fingerprint,)}
            if self.fingerprint
            else {}
        )
        return ClientConfig(
            server=HostPort(host=self.address[0], port=self.address[1]),
            token=self.token,
            name=name,
            remotes=specs,
            timeouts=timeouts,
            **{**tls, **options},
        )

    def client_args(self) -> list[str]:
        """The ``trio-tunnel client`` flags that reach this server (add ``-R ...``); the token is on the command
        line, which is fine for a throwaway one. (``--token=VALUE`` in one word: a random token may begin with ``-``,
        which argparse would take for an option.)"""
        args = ["--server", f"{self.address[0]}:{self.address[1]}", f"--token={self.token.decode()}"]
        if self.config.insecure_plaintext:
            return [*args, "--insecure-plaintext"]
        return [*args, "--server-fingerprint", self.fingerprint] if self.fingerprint else args


def _timeouts(fields: dict[str, Any], options: dict[str, Any]) -> Timeouts:
    base = options.pop("timeouts", TEST_TIMEOUTS)
    return attrs.evolve(base, **fields) if fields else base  # type: ignore[no-any-return]


async def _run_server(server: TunnelServer, *, task_status: trio.TaskStatus[HostPort]) -> None:
    try:
        await run_server(server.config, server.shutdown, task_status=task_status)
    finally:
        server.done.set()


async def _start_server(nursery: trio.Nursery, tls: bool, options: dict[str, Any]) -> TunnelServer:
    token = secrets.token_urlsafe(24).encode()
    fields: dict[str, Any] = {"allow_ports": "1024-65535"}
    fields.update(options)
    if isinstance(fields["allow_ports"], str):
        fields["allow_ports"] = PortSet.parse(fields["allow_ports"])
    fingerprint: str | None = None
    if not tls or fields.get("insecure_plaintext"):
        fields["insecure_plaintext"] = True
    elif fields.get("tls_cert"):
        fingerprint = fingerprint_of_pem_file(fields["tls_cert"])
    elif fields.get("state_dir"):
        fingerprint = fingerprint_of_pem_file(load_or_create_identity(Path(fields["state_dir"]))[0])
    else:
        identity = throwaway_identity()
        fields["state_dir"], fingerprint = identity.state_dir, identity.fingerprint
    config = ServerConfig(listen=HostPort(host=LOCALHOST, port=0), tokens=(token,), **fields)
    server = TunnelServer(config, (LOCALHOST, 0), token, fingerprint, Shutdown(drain_timeout=config.timeouts.drain))
    bound: HostPort = await nursery.start(_run_server, server)
    server.address = (bound.host, bound.port)
    return server


# --------------------------------------------------------------------------------------------------- client


@attrs.define(eq=False)
class TunnelClient:
    """The tunnel's running client (``tunnel.client``)."""

    config: ClientConfig
    shutdown: Shutdown
    session: Session | None = None
    """The current link's session, once its service is registered; None between links."""
    sessions: int = 0
    cuts_at_session: int = 0
    """The link's cut count when the current session came up (:meth:`Tunnel.wait_connected`)."""
    done: trio.Event = attrs.field(factory=trio.Event)
    changed: trio.Event = attrs.field(factory=trio.Event)


# --------------------------------------------------------------------------------------------------- tunnel


@attrs.define(eq=False)
class Tunnel:
    """A running tunnel (what :func:`open_tunnel` yields): connect to :attr:`public_address` to reach the local
    service through a server, the shaping :attr:`link` and a client."""

    public_address: tuple[str, int]
    server: TunnelServer
    client: TunnelClient
    link: Link
    """The path between the client and the server, with its fault controls."""

    def statistics(self) -> TunnelStatistics:
        session = self.client.session
        return TunnelStatistics(
            sessions=self.client.sessions,
            session=session.statistics() if session is not None and not session.closed else None,
            link=self.link.statistics(),
        )

    async def wait_connected(self) -> None:
        """Return once the client has a live session with its service registered, made after the last
        :meth:`Link.cut` (the caller's ``fail_after`` bounds the wait). Returns at once while the link is up."""
        client = self.client
        while client.session is None or client.session.closed or client.cuts_at_session != self.link.statistics().cuts:
            await client.changed.wait()

    def reset_streams(self) -> int:
        """Reset every tunnelled connection now: each stream is handled as if the server had reset it, so the
        local service and the external peer both see a TCP reset, and the session stays up. Returns how many."""
        session = self.client.session
        if session is None:
            return 0
        # What an RST from the server does, at both layers: the connection state sends RST (so the server resets the
        # external connection) and the stream object fails its waiters as after the peer's RST (so the client's
        # splice resets the connection to the local service). Session keeps its streams private and these two calls
        # are its internal stream interface: the testing harness is the one user outside mux and stream.
        streams = list(session._streams.values())
        reason = "reset by the test (Tunnel.reset_streams)"
        for stream in streams:
            session.stream_reset(stream.stream_id, ErrorCode.CONN_RESET, reason)
            stream.on_reset(ErrorCode.CONN_RESET, reason)
        return len(streams)


def _watch_sessions(client: TunnelClient, link: Link) -> Callable[[Session | None], None]:
    def on_session(session: Session | None) -> None:
        client.session = session
        if session is not None:
            client.sessions += 1
            client.cuts_at_session = link.statistics().cuts
        client.changed.set()
        client.changed = trio.Event()

    return on_session


async def _run_client(
    client: TunnelClient, on_session: Callable[[Session | None], None], *, task_status: trio.TaskStatus[Any]
) -> None:
    try:
        await run_client(client.config, client.shutdown, on_session=on_session, task_status=task_status)
    finally:
        client.done.set()


async def _serve_factory(
    factory: Callable[[], Awaitable[trio.abc.Stream]], *, task_status: trio.TaskStatus[int]
) -> None:
    """A loopback listener whose connections are spliced to streams from ``factory`` (what the client dials when
    the tunnel exposes a factory)."""

    async def handle(conn: trio.SocketStream) -> None:
        await splice(conn, await factory())

    listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(int(listeners[0].socket.getsockname()[1]))


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``options`` as (server fields, client fields, tunnel options); Timeouts fields go to both ends."""
    unknown = set(options) - _SERVER_FIELDS - _CLIENT_FIELDS - _TIMEOUT_FIELDS - _TUNNEL_OPTIONS
    if unknown:
        raise TypeError(
            f"open_tunnel() got unknown option(s) {', '.join(sorted(unknown))}; options are ServerConfig, "
            f"ClientConfig and Timeouts fields, and {', '.join(sorted(_TUNNEL_OPTIONS))}"
        )
    fields = {k: v for k, v in options.items() if k in _TIMEOUT_FIELDS}
    rest = {k: v for k, v in options.items() if k not in _TIMEOUT_FIELDS}
    server = {k: v for k, v in rest.items() if k in _SERVER_FIELDS}
    client = {k: v for k, v in rest.items() if k in _CLIENT_FIELDS}
    timeouts = _timeouts(fields, dict(rest))
    server["timeouts"] = client["timeouts"] = timeouts
    return server, client, {k: v for k, v in options.items() if k in _TUNNEL_OPTIONS}


# --------------------------------------------------------------------------------------------------- checks


class _ErrorLog(logging.Handler):
    """trio-tunnel's error records while a tunnel runs: errors it handled rather than raised."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def _error_log() -> Iterator[_ErrorLog]:
    handler = _ErrorLog()
    logger = logging.getLogger("trio_tunnel")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def _stop(what: str, shutdown: Shutdown, done: trio.Event, problems: list[str]) -> None:
    shutdown.request()
    with trio.move_on_after(shutdown.drain_timeout + STOP_MARGIN):
        await done.wait()
        return
    problems.append(f"the {what} did not stop within {shutdown.drain_timeout + STOP_MARGIN:g} s of its shutdown")


def _raise(problems: list[str], errors: _ErrorLog) -> None:
    problems = problems + [f"error logged: {line}" for line in errors.lines]
    if problems:
        raise TunnelCheckError("leaving the tunnel: " + "; ".join(problems))


@asynccontextmanager
async def _one_error() -> AsyncIterator[trio.Nursery]:
    """A nursery that raises the one real error of its group as itself: a test's ``pytest.raises`` and its
    traceback see the exception raised in the block (or by an end), not an ExceptionGroup around it."""
    leaf: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaf = unwrap_group(group)
        if leaf is group:
            raise
    if leaf is not None:
        raise leaf  # outside the except block: the exception keeps its own __context__ and __cause__


# --------------------------------------------------------------------------------------------------- API


@asynccontextmanager
async def open_tunnel_server(*, tls: bool = True, **options: Any) -> AsyncIterator[TunnelServer]:
    """Run a trio-tunnel server on 127.0.0.1 (a free port) for the block; ``options`` are ServerConfig fields and
    Timeouts fields. Join it with ``run_client(server.client_config(...), ...)`` or the CLI and
    ``server.client_args()``. Leaving the block stops it and checks as :func:`open_tunnel` does."""
    timeout_fields = {k: options.pop(k) for k in list(options) if k in _TIMEOUT_FIELDS}
    unknown = set(options) - _SERVER_FIELDS
    if unknown:
        raise TypeError(f"open_tunnel_server() got unknown option(s) {', '.join(sorted(unknown))}")
    options["timeouts"] = _timeouts(timeout_fields, options)
    problems: list[str] = []
    with _error_log() as errors:
        async with _one_error() as nursery:
            server = await _start_server(nursery, tls, options)
            try:
                yield server
            except BaseException:
                nursery.cancel_scope.cancel(reason="the test's block raised")
                raise
            await _stop("server", server.shutdown, server.done, problems)
            nursery.cancel_scope.cancel(reason="tunnel server stopped")
        _raise(problems, errors)


@asynccontextmanager
async def open_tunnel(local: Local, *, name: str = "test", tls: bool = True, **options: Any) -> AsyncIterator[Tunnel]:
    """Expose ``local`` through a real server and client in the current Trio run, all on 127.0.0.1, with a
    shaping :class:`~.shaping.Link` between them; yield the :class:`Tunnel` once its public port serves.

    Args:
        local: a port on 127.0.0.1, a ``(host, port)``, or an async factory of streams (one per connection).
        name: the client's name and the service's (``exposed NAME HOST:PORT``).
        tls: TLS on the link (default, with the process's throwaway identity); False: ``insecure_plaintext``.
        options: ServerConfig fields (``max_connections_per_service=...``), ClientConfig fields, Timeouts fields
            (both ends: ``keepalive_idle=1``), ``public_port`` (default 0: any free port) and ``seed`` (the
            link's jitter).

    Raises:
        TunnelCheckError: when leaving the block, see the module docstring.
        TypeError: an unknown option.
    """
    server_fields, client_fields, extra = _split(dict(options))
    problems: list[str] = []
    with _error_log() as errors:
        async with _one_error() as nursery:
            if callable(local):
                target: tuple[str, int] = (LOCALHOST, await nursery.start(_serve_factory, local))
            else:
                target = (LOCALHOST, local) if isinstance(local, int) else local
            server = await _start_server(nursery, tls, server_fields)
            link = Link(server.address, seed=extra.get("seed"))
            await nursery.start(link.serve)
            relay = HostPort(host=link.address[0], port=link.address[1])
            spec = RemoteSpec(
                name=name,
                bind_host=LOCALHOST,
                bind_port=extra.get("public_port", 0),
                target_host=target[0],
                target_port=target[1],
            )
            config = attrs.evolve(server.client_config(spec, name=name, **client_fields), server=relay)
            client = TunnelClient(config, Shutdown(drain_timeout=config.timeouts.drain))
            exposed = await nursery.start(_run_client, client, _watch_sessions(client, link))
            if name not in exposed:
                client.shutdown.request()
                raise TunnelCheckError(f"the server did not expose {name!r}: {'; '.join(errors.lines) or '?'}")
            tunnel = Tunnel((exposed[name].host, exposed[name].port), server, client, link)
            try:
                yield tunnel
            except BaseException:
                nursery.cancel_scope.cancel(reason="the test's block raised")
                raise
            link.reset()  # a paused or throttled link would hold up the goodbyes
            await _stop("client", client.shutdown, client.done, problems)
            await _stop("server", server.shutdown, server.done, problems)
            with trio.move_on_after(STOP_MARGIN):
                await link.wait_idle()
            if link.statistics().open:
                problems.append(f"{link.statistics().open} link connection(s) still open after both ends stopped")
            nursery.cancel_scope.cancel(reason="tunnel stopped")
        _raise(problems, errors)
