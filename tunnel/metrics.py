"""What a running server or client can tell an operator: the Prometheus metrics and the ``/status`` document.

Why collect at scrape time
--------------------------
Counting must not cost the data path anything. Most of what an operator wants already exists: the mux session
counts frames, wire bytes and its RTT (:meth:`~trio_tunnel.mux.Session.statistics`), and every splice counts the
bytes it moved (:meth:`~trio_tunnel.relay.Splice.snapshot`). So nothing here is incremented per read or per frame:
:class:`Metrics` keeps references to the live sessions and splices and reads their counters when ``/metrics`` or
``/status`` is asked for. What happens at connection or session granularity (a stream opened or refused, a session
up or down, a failed handshake) is a plain integer added to in a dict, once per event.

The registry is a :class:`prometheus_client.CollectorRegistry` of this object alone (never the global one), so
several servers and clients can run in one process (tests do) and each exposes only its own numbers.

Label cardinality is bounded: ``client`` is a session's name (a server keeps the series of at most
:data:`MAX_CLIENT_SERIES` clients, live ones first), ``service`` a name from a client's configuration (the server
labels all of a client's ``-L`` forwards ``forward``: their names are the client's to choose per stream), ``reason``
and ``result`` come from fixed sets. Remote addresses are never labels; they appear only in ``/status``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any, Final

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from trio_tunnel import __version__
from trio_tunnel.proto import ErrorCode

from .errors import HandshakeError
from .mux import Session
from .relay import Splice

__all__ = ["MAX_CLIENT_SERIES", "RESULTS", "Metrics", "Response", "ServiceStats", "open_result"]

MAX_CLIENT_SERIES: Final = 1024
"""Clients whose series a server keeps; beyond that, the series of the client gone longest are dropped."""

RESULTS: Final = ("ok", "refused", "local-connect-failed", "timeout", "limit")
"""The ``result`` label of ``trio_tunnel_streams_opened_total``."""

_RESULT_OF_CODE: Final[dict[int, str]] = {
    ErrorCode.CONNECT_FAILED: "local-connect-failed",
    ErrorCode.NAME_NOT_FOUND: "local-connect-failed",
    ErrorCode.CONN_RESET: "local-connect-failed",
    ErrorCode.CONNECT_TIMEOUT: "timeout",
    ErrorCode.IDLE_TIMEOUT: "timeout",
    ErrorCode.STREAM_LIMIT: "limit",
    ErrorCode.ENHANCE_YOUR_CALM: "limit",
}

_HANDSHAKE_REASONS: Final[dict[int, str]] = {
    ErrorCode.AUTH: "bad-token",
    ErrorCode.VERSION: "version",
    ErrorCode.IDLE_TIMEOUT: "timeout",
}
_PROTOCOL_CODES: Final = frozenset({ErrorCode.PROTOCOL, ErrorCode.FLOW_CONTROL, ErrorCode.FRAME_SIZE})
MAX_ERROR: Final = 200
"""Characters of a service's last error kept for ``/status``."""


def open_result(code: int) -> str:
    """The ``result`` label for a stream that could not be opened with ``code`` (OPEN_ERR, a failed dial)."""
    return _RESULT_OF_CODE.get(code, "refused")


def _code_label(code: int | None) -> str:
    if code is None:
        return "closed"
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return "other"


def handshake_failure(exc: HandshakeError) -> str:
    """The ``reason`` label of ``trio_tunnel_auth_failures_total`` for a failed handshake."""
    if exc.silent:
        return "not-trio-tunnel"
    return _HANDSHAKE_REASONS.get(exc.code, "refused")


@attrs.frozen
class Response:
    """One HTTP answer of the endpoint (see :mod:`trio_tunnel.httpd`)."""

    status: str
    content_type: str
    body: bytes


def _not_found() -> Response:
    return Response("404 Not Found", "text/plain; charset=utf-8", b"not found: try /, /metrics or /status\n")


@attrs.define(eq=False)
class ServiceStats:
    """One service of one client (an exposed ``-R`` service or a ``-L`` forward): connections in flight, how stream
    opens ended, and the bytes moved. Bytes of finished connections are summed when they end; those of live ones
    are read from their splices when asked (:meth:`totals`).

    ``in`` is the direction towards the service or target (what the connecting peer sent), ``out`` the way back."""

    client: str
    name: str
    kind: str
    """``expose`` (``-R``) or ``forward`` (``-L``)."""
    public: str = ""
    """Where connections arrive: the public address of an exposed service, the local listener of a forward."""
    target: str = ""
    """Where they go (known to the side that dials it: the client for ``-R``)."""
    active: bool = True
    open: int = 0
    opened: dict[str, int] = attrs.field(factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    last_error: str = ""
    last_error_at: float | None = None
    live: set[Splice] = attrs.field(factory=set)

    def begin(self, splice: Splice) -> None:
        """A stream was opened for a connection (result ``ok``) and ``splice`` is about to carry it."""
        self.open += 1
        self.opened["ok"] = self.opened.get("ok", 0) + 1
        self.live.add(splice)

    def end(self, splice: Splice) -> None:
        """``splice`` has finished (or was cancelled): its bytes join the finished total."""
        self.open -= 1
        self.live.discard(splice)
        done = splice.snapshot()
        self.bytes_in += done.bytes_a_to_b
        self.bytes_out += done.bytes_b_to_a

    def withdraw(self, splice: Splice) -> None:
        """The stream ``splice`` carried (:meth:`begin` to :meth:`end`) was refused by the far end after all (it was
        opened optimistically, and the refusal was counted with :meth:`failed` as it came): not ``ok``, and its
        bytes were never delivered."""
        self.opened["ok"] = self.opened.get("ok", 1) - 1
        done = splice.snapshot()
        self.bytes_in -= done.bytes_a_to_b
        self.bytes_out -= done.bytes_b_to_a

    def failed(self, result: str, error: str) -> None:
        """A connection could not be carried (``result`` one of :data:`RESULTS`, not ``ok``)."""
        self.opened[result] = self.opened.get(result, 0) + 1
        self.last_error = error[:MAX_ERROR]
        self.last_error_at = time.time()

    def totals(self) -> tuple[int, int]:
        """Bytes in and out so far, live connections included."""
        moved_in, moved_out = self.bytes_in, self.bytes_out
        for splice in self.live:
            now = splice.snapshot()
            moved_in += now.bytes_a_to_b
            moved_out += now.bytes_b_to_a
        return moved_in, moved_out


@attrs.define(eq=False)
class _Link:
    """A live session, as the metrics see it."""

    client: str
    address: str
    since: float
    session: Session


@attrs.define
class _LinkTotals:
    """The counters of a client's sessions that have ended (so the counters never go backwards on a reconnect)."""

    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    stalls: int = 0


def _dashboard() -> bytes:
    return resources.files("trio_tunnel").joinpath("dashboard.html").read_bytes()


class Metrics:
    """The numbers of one server or client process (``role``), its registry, and the answers of its endpoint.

    The server and client call the event methods (:meth:`link_up`, :meth:`link_down`, :meth:`handshake_failed`,
    :meth:`service`, :meth:`reconnecting`); the endpoint calls :meth:`respond`.
    """

    def __init__(self, role: str, name: str = "") -> None:
        self.role = role
        self.name = name
        """The client's own name (the ``client`` label of all its series); empty on a server."""
        self.started = time.time()
        self.links: dict[str, _Link] = {}
        """Live sessions: by client name on a server, by server address on a client."""
        self.services: dict[tuple[str, str], ServiceStats] = {}
        self.clients: dict[str, None] = {}
        """Clients with series, oldest activity first (for :data:`MAX_CLIENT_SERIES`)."""
        self.connects: dict[str, int] = {}
        self.disconnects: dict[tuple[str, str], int] = {}
        self.protocol_errors: dict[str, int] = {}
        self.auth_failures: dict[str, int] = {}
        self.reconnects = 0
        self.ended: dict[str, _LinkTotals] = {}
        self.udp_datagrams_dropped: dict[tuple[str, str], int] = {}
        """(client, service) -> datagrams dropped: where UDP forwarding counts what it had to drop."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self._dashboard: bytes | None = None

    # ---------------------------------------------------------------------------------------------- events

    def service(self, client: str, name: str, *, kind: str, public: str = "", target: str = "") -> ServiceStats:
        """The stats of ``client``'s service ``name`` (made on first use; kept across reconnects), now active."""
        stats = self.services.get((client, name))
        if stats is None:
            stats = self.services[(client, name)] = ServiceStats(client, name, kind, public, target)
            self._touch(client)
        stats.active = True
        if public:
            stats.public = public
        return stats

    def link_up(self, client: str, address: str, session: Session) -> _Link:
        """A session is up: ``client`` is the client's name on a server, the server's address on a client."""
        link = self.links[client] = _Link(client, address, time.time(), session)
        label = self._label(link)
        self.connects[label] = self.connects.get(label, 0) + 1
        self._touch(label)
        return link

    def _label(self, link: _Link) -> str:
        """The ``client`` label of a link's series: the peer's name on a server, our own name on a client."""
        return link.client if self.role == "server" else self.name

    def link_down(self, link: _Link, *, replaced: bool = False) -> None:
        """``link``'s session is over: keep its final counters, count the disconnect by its reason."""
        session = link.session
        label = self._label(link)
        stats = session.statistics()
        totals = self.ended.setdefault(label, _LinkTotals())
        conn = stats.connection
        totals.frames_sent += conn.frames_sent
        totals.frames_received += conn.frames_received
        totals.bytes_sent += conn.bytes_sent
        totals.bytes_received += conn.bytes_received
        totals.stalls += stats.send_stalls
        reason = "replaced" if replaced else _code_label(session.close_code)
        key = (label, reason)
        self.disconnects[key] = self.disconnects.get(key, 0) + 1
        if session.close_code in _PROTOCOL_CODES:
            self.protocol_errors[label] = self.protocol_errors.get(label, 0) + 1
        if self.links.get(link.client) is link:
            del self.links[link.client]
        self._touch(label)

    def udp_dropped(self, client: str, service: str, count: int) -> None:
        """A UDP flow of ``client``'s ``service`` ended having dropped ``count`` datagrams (queue full, too big, or a
        full socket buffer): counted per flow, not per datagram, so the data path never touches the registry."""
        key = (client, service)
        self.udp_datagrams_dropped[key] = self.udp_datagrams_dropped.get(key, 0) + count

    def handshake_failed(self, reason: str) -> None:
        """A link was refused before it became a session (``reason``: ``bad-token``, ``tls``, ``timeout``, ...)."""
        self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1

    def reconnecting(self) -> None:
        self.reconnects += 1

    def _touch(self, client: str) -> None:
        clients = self.clients
        clients.pop(client, None)
        clients[client] = None
        if len(clients) > MAX_CLIENT_SERIES:
            live = {self._label(link) for link in self.links.values()} | {self.name}
            for old in list(clients):
                if len(clients) <= MAX_CLIENT_SERIES:
                    break
                if old not in live:
                    self._forget(old)

    def _forget(self, client: str) -> None:
        del self.clients[client]
        for table in (self.connects, self.protocol_errors, self.ended):
            table.pop(client, None)
        for keyed in (self.services, self.disconnects, self.udp_datagrams_dropped):
            for key in [key for key in keyed if key[0] == client]:
                del keyed[key]

    # ------------------------------------------------------------------------------------------- answers

    def respond(self, method: str, path: str) -> Response:
        """The endpoint's answer to ``GET path`` (``/metrics``, ``/status``, ``/``; anything else 404)."""
        if method not in ("GET", "HEAD"):
            return Response("405 Method Not Allowed", "text/plain; charset=utf-8", b"only GET\n")
        if path == "/metrics":
            return Response("200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry))
        if path == "/status":
            body = json.dumps(self.status(), separators=(",", ":")).encode()
            return Response("200 OK", "application/json", body)
        if path in ("/", "/index.html"):
            if self._dashboard is None:
                self._dashboard = _dashboard()
            return Response("200 OK", "text/html; charset=utf-8", self._dashboard)
        return _not_found()

    def status(self) -> dict[str, Any]:
        """The ``/status`` document (docs in README, "Observing it"); ``trio_tunnel`` marks it as ours."""
        sessions = []
        for link in self.links.values():
            stats = link.session.statistics()
            conn = stats.connection
            sessions.append(
                {
                    "client": self._label(link),
                    "address": link.address,
                    "since": link.since,
                    "rtt": stats.rtt,
                    "streams": stats.streams,
                    "bytes_received": conn.data_bytes_received,
                    "bytes_sent": conn.data_bytes_sent,
                }
            )
        services = []
        for service in self.services.values():
            if not service.active:
                continue
            moved_in, moved_out = service.totals()
            services.append(
                {
                    "client": service.client,
                    "name": service.name,
                    "kind": service.kind,
                    "public": service.public,
                    "target": service.target,
                    "open": service.open,
                    "opened": dict(service.opened),
                    "bytes_in": moved_in,
                    "bytes_out": moved_out,
                    "last_error": service.last_error,
                    "last_error_at": service.last_error_at,
                }
            )
        return {
            "trio_tunnel": __version__,
            "role": self.role,
            "name": self.name,
            "now": time.time(),
            "started": self.started,
            "sessions": sessions,
            "services": services,
            "auth_failures": dict(self.auth_failures),
            "reconnects": self.reconnects,
        }


class _Collector(Collector):
    """Builds every family from :class:`Metrics` at scrape time (see the module docstring)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        server = m.role == "server"

        def family(kind: type[CounterMetricFamily | GaugeMetricFamily], name: str, doc: str, *labels: str) -> Any:
            return kind(f"trio_tunnel_{name}", doc, labels=list(labels))

        info = family(GaugeMetricFamily, "info", "Always 1: the version and role of this process.", "version", "role")
        info.add_metric([__version__, m.role], 1)
        yield info
        connected = family(GaugeMetricFamily, "sessions_connected", "Client sessions up now (a client: 0 or 1).")
        connected.add_metric([], len(m.links))
        yield connected
        connects = family(CounterMetricFamily, "session_connects", "Sessions established.", "client")
        for client, n in m.connects.items():
            connects.add_metric([client], n)
        yield connects
        disconnects = family(
            CounterMetricFamily, "session_disconnects", "Sessions ended, by how they ended.", "client", "reason"
        )
        for (client, reason), n in m.disconnects.items():
            disconnects.add_metric([client, reason], n)
        yield disconnects
        auth = family(
            CounterMetricFamily, "auth_failures", "Links refused before a session: bad token, TLS, ...", "reason"
        )
        for reason, n in m.auth_failures.items():
            auth.add_metric([reason], n)
        yield auth
        yield from self._links()
        yield from self._services()
        protocol = family(
            CounterMetricFamily, "protocol_errors", "Sessions ended by a protocol or flow-control error.", "client"
        )
        for client, n in m.protocol_errors.items():
            protocol.add_metric([client], n)
        yield protocol
        if not server:
            reconnects = family(CounterMetricFamily, "reconnects", "Reconnect attempts after a link was lost.")
            reconnects.add_metric([], m.reconnects)
            yield reconnects
        udp = family(
            CounterMetricFamily, "udp_datagrams_dropped", "UDP datagrams dropped (no room).", "client", "service"
        )
        for (client, service), n in m.udp_datagrams_dropped.items():
            udp.add_metric([client, service], n)
        yield udp

    def _links(self) -> Iterator[Metric]:
        m = self.m
        labels = ["client"]
        streams = GaugeMetricFamily("trio_tunnel_streams_open", "Mux streams open on the link.", labels=labels)
        rtt = GaugeMetricFamily("trio_tunnel_link_rtt_seconds", "Smoothed keepalive round-trip time.", labels=labels)
        frames_sent = CounterMetricFamily("trio_tunnel_frames_sent", "Frames written to the link.", labels=labels)
        frames_received = CounterMetricFamily("trio_tunnel_frames_received", "Frames read.", labels=labels)
        sent = CounterMetricFamily("trio_tunnel_link_bytes_sent", "Bytes written to the link (framed).", labels=labels)
        received = CounterMetricFamily("trio_tunnel_link_bytes_received", "Bytes read from the link.", labels=labels)
        stalls = CounterMetricFamily(
            "trio_tunnel_flow_control_stalls", "Times a stream waited for the peer's credit.", labels=labels
        )
        totals: dict[str, _LinkTotals] = {client: attrs.evolve(t) for client, t in m.ended.items()}
        for link in m.links.values():
            client = m._label(link)
            stats = link.session.statistics()
            conn = stats.connection
            streams.add_metric([client], stats.streams)
            if stats.rtt is not None:
                rtt.add_metric([client], stats.rtt)
            t = totals.setdefault(client, _LinkTotals())
            t.frames_sent += conn.frames_sent
            t.frames_received += conn.frames_received
            t.bytes_sent += conn.bytes_sent
            t.bytes_received += conn.bytes_received
            t.stalls += stats.send_stalls
        for client, t in totals.items():
            frames_sent.add_metric([client], t.frames_sent)
            frames_received.add_metric([client], t.frames_received)
            sent.add_metric([client], t.bytes_sent)
            received.add_metric([client], t.bytes_received)
            stalls.add_metric([client], t.stalls)
        yield from (streams, rtt, frames_sent, frames_received, sent, received, stalls)

    def _services(self) -> Iterator[Metric]:
        labels = ["client", "service"]
        conns = GaugeMetricFamily(
            "trio_tunnel_connections_open", "Connections being carried for a service now.", labels=labels
        )
        opened = CounterMetricFamily(
            "trio_tunnel_streams_opened",
            "Connections a service was asked to carry, by result: " + ", ".join(RESULTS) + ".",
            labels=[*labels, "result"],
        )
        moved_in = CounterMetricFamily(
            "trio_tunnel_bytes_in", "Bytes carried towards the service (or -L target).", labels=labels
        )
        moved_out = CounterMetricFamily("trio_tunnel_bytes_out", "Bytes carried back from it.", labels=labels)
        for stats in self.m.services.values():
            key = [stats.client, stats.name]
            if stats.active:
                conns.add_metric(key, stats.open)
            for result, n in stats.opened.items():
                opened.add_metric([*key, result], n)
            b_in, b_out = stats.totals()
            moved_in.add_metric(key, b_in)
            moved_out.add_metric(key, b_out)
        yield from (conns, opened, moved_in, moved_out)
