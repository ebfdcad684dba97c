"""The configs of the three long-running commands (``server``, ``client``, ``map``) and the flags-over-file merge.

Plain construction (``ServerConfig(...)``) checks types and ranges (raising ValueError or TypeError) but applies no
policy. The named constructors, ``from_toml(path)`` and ``from_sources(config_file=..., <field>=...)``, raise
:class:`~trio_tunnel.errors.ConfigError` naming the file or flag, the key and the fix, and apply the policies a user
relies on: a server needs a token unless ``insecure_no_auth``; a client needs a server address and a service; a
mapper needs ``listen`` and ``target``. A value given on the command line (not None) overrides the file's; ``-R``/``-L``
services are added to the file's, replacing a file service of the same name.

Each field that a config file may set carries its TOML key in its metadata (:mod:`.fields`): adding a key is adding
the field (and a line in docs/CONFIG.md, which a test checks).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Final, Self, final

import attrs
from trio_tunnel.certs import parse_fingerprint
from trio_tunnel.errors import ConfigError

from .addresses import DEFAULT_SERVER_PORT, PROTOCOL, UDP_IDLE_DEFAULT, HostPort, LocalSpec, RemoteSpec, hostport_key
from .binds import BIND_KEY, BindAllowlist
from .fields import BOOLEAN, FRACTION, WORKERS, build, count, dedupe, describe, optional_count, seconds, to_tuple, toml
from .operations import IPNetwork, networks_key
from .policy import PORTS_KEY, TARGETS_KEY, PortSet, TargetAllowlist
from .tokens import _TOKEN_HINT, CLIENT_NAME, default_client_name, logger
from .toml import Section, load_section, path_reader, read_fields, read_tokens

__all__ = ["TABLES", "ClientConfig", "MapConfig", "ServerConfig", "Timeouts", "server_identity_files"]


@final
@attrs.frozen(kw_only=True)
class Timeouts:
    """Every time bound of a session, in seconds (``[server.timeouts]``, ``[client.timeouts]``). Defaults follow
    docs/PROTOCOL.md."""

    handshake: float = seconds(10.0)
    """The whole handshake, from TCP accept (or connect) to an established session."""
    connect: float = seconds(10.0)
    """Dialling a local service (client, -R) or a forward target (server, -L)."""
    keepalive_idle: float = seconds(15.0)
    """Send a PING after this much inbound silence."""
    keepalive_dead: float = seconds(45.0)
    """Declare the link dead after this much inbound silence."""
    drain: float = seconds(10.0)
    """Graceful shutdown: how long open streams may keep running after GOAWAY."""
    open: float = seconds(10.0)
    """How long an OPEN may wait for the peer's OPEN_OK/OPEN_ERR."""
    reconnect_initial: float = seconds(0.5)
    """Client: the first reconnect delay; it doubles after each failure ..."""
    reconnect_max: float = seconds(30.0)
    """... up to this cap."""
    reconnect_jitter: float = FRACTION.field(default=0.2, metadata=toml(rule=FRACTION))
    """Client: each delay is multiplied by a random factor in [1 - jitter, 1 + jitter]; 0 <= jitter < 1."""
    takeover_probe: float = seconds(3.0)
    """Server: when a client connects with a name a session already holds, how long that session has to answer a
    PING. If it answers, the newcomer is refused (NAME_IN_USE); if not, it is stale and the newcomer takes over."""

    def __attrs_post_init__(self) -> None:
        if self.keepalive_dead <= self.keepalive_idle:
            raise ValueError(
                f"keepalive_dead ({self.keepalive_dead:g}) must be longer than keepalive_idle "
                f"({self.keepalive_idle:g}), or a healthy idle link would be declared dead"
            )
        if self.reconnect_max < self.reconnect_initial:
            raise ValueError(
                f"reconnect_max ({self.reconnect_max:g}) must not be shorter than reconnect_initial "
                f"({self.reconnect_initial:g})"
            )


def _tokens_rule(_inst: object, _attr: attrs.Attribute[Any], value: tuple[bytes, ...]) -> None:
    for token in value:
        if not isinstance(token, bytes) or not token:
            raise ValueError("tokens must be non-empty bytes")


def _first_token(sec: Section) -> bytes | None:
    tokens = read_tokens(sec)
    return tokens[0] if tokens else None


_TOKEN_KEYS: Final = {"name": "token", "also": ("tokens", "token_file")}
"""One field fed by three TOML keys: ``token = "..."``, ``tokens = [...]``, ``token_file = "PATH"``."""


def _file_fields(cls: type, config_file: str | os.PathLike[str] | None, table: str) -> tuple[dict[str, Any], str]:
    """The fields that ``[table]`` of ``config_file`` sets, and the name errors are reported under."""
    if config_file is None:
        return {}, f"{table} config"
    return read_fields(cls, load_section(config_file, table, tables=tuple(TABLES))), str(config_file)


def server_identity_files(
    config_file: str | os.PathLike[str] | None, *, tls_cert: str | None, tls_key: str | None, state_dir: str | None
) -> tuple[str | None, str | None, str | None]:
    """``(tls_cert, tls_key, state_dir)`` as the server would use them: each flag, else the file's ``[server]`` key.
    Only these keys are read (``server --print-fingerprint`` needs no token). Raises ConfigError for a bad file."""
    fields, _source = _file_fields(ServerConfig, config_file, "server")
    return (
        tls_cert or fields.get("tls_cert"),
        tls_key or fields.get("tls_key"),
        state_dir or fields.get("state_dir"),
    )


DEFAULT_LINK_MEMORY: Final = 4 * 1024 * 1024
"""``link_memory`` unless configured: the stream bytes one link may hold in its buffers (tunnel/wire.py)."""


_METRICS_KEY: Final = hostport_key(default_host="127.0.0.1", allow_zero=True)
"""``metrics`` of ``[server]`` and ``[client]``: an optional HTTP endpoint address, loopback unless a host is given."""


def _path(key: str) -> Any:
    """An optional path field, read from TOML under ``key`` relative to the config file."""
    return attrs.field(default=None, metadata=toml(read=path_reader(key)))


def _fingerprints(value: object) -> tuple[str, ...]:
    """``server_fingerprint``: one ``sha256:...`` string or a list of them (several for key rotation)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items or not all(isinstance(item, str) for item in items):
        raise ValueError(f"expected a fingerprint string or a list of them, got {describe(value)}")
    for item in items:
        parse_fingerprint(item)
    return dedupe(items)


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """The command-line values that were given (None = not given)."""
    return {key: value for key, value in values.items() if value is not None}


@final
@attrs.frozen(kw_only=True)
class ServerConfig:
    """``trio-tunnel server`` (``[server]``). Logging settings are command-line only and not part of this."""

    listen: HostPort = attrs.field(
        factory=lambda: HostPort(host="0.0.0.0", port=DEFAULT_SERVER_PORT),
        metadata=hostport_key(default_host="0.0.0.0", allow_zero=True, default_port=DEFAULT_SERVER_PORT),
    )
    """Where clients connect; default 0.0.0.0:7835 (a host alone: port 7835)."""
    tokens: tuple[bytes, ...] = attrs.field(
        default=(), converter=to_tuple, validator=_tokens_rule, metadata=toml(read=read_tokens, **_TOKEN_KEYS)
    )
    """Accepted client tokens (several for rotation). Empty means no authentication: the named constructors allow
    that only with ``insecure_no_auth``; the plain constructor does not enforce it."""
    insecure_no_auth: bool = BOOLEAN.field(default=False, metadata=toml(rule=BOOLEAN))
    """Run without authentication (the CLI logs a warning). Ignored (False) when tokens are given."""
    allow_ports: PortSet = attrs.field(factory=PortSet, metadata=PORTS_KEY)
    """Ports clients may expose; default 1024-65535, and 0 ("pick one")."""
    allow_targets: TargetAllowlist = attrs.field(factory=TargetAllowlist, metadata=TARGETS_KEY)
    """Where -L clients may make the server dial; default nowhere."""
    allow_bind: BindAllowlist = attrs.field(factory=BindAllowlist, metadata=BIND_KEY)
    """Bind addresses clients may ask for; default (empty) 0.0.0.0, :: and ``listen``'s host; ``*`` any."""
    max_streams_per_client: int = count(256)
    """Concurrent streams one client session may have open."""
    max_connections_per_service: int = count(1024)
    """Concurrent external connections to one exposed service; more are refused at accept."""
    max_clients: int = count(1024)
    """Concurrent authenticated client sessions (connections still in the handshake count against
    ``max_handshakes`` instead: strangers must not be able to fill the places of clients)."""
    max_ports_per_client: int = count(64)
    """Services (public ports) one client session may expose."""
    max_connections_per_ip: int | None = optional_count()
    """Concurrent external connections to one exposed service from one source address; None:
    ``max_connections_per_service`` / 4, so that one host cannot hold every slot of a service."""
    max_handshakes: int | None = optional_count()
    """Connections still in the handshake, in all; None: a quarter of the descriptor limit, at most 4,096
    (:mod:`trio_tunnel.guard`). At the cap a new connection displaces the oldest handshake."""
    max_handshakes_per_ip: int | None = optional_count()
    """Connections still in the handshake from one source address; None: ``max_handshakes`` / 8, at least 2."""
    max_flows_per_service: int = count(1024)
    """Concurrent UDP flows (sources) on one exposed UDP service; datagrams from more are dropped."""
    max_flows_per_client: int = count(4096)
    """Concurrent UDP flows over one client's link, all its UDP services together."""
    link_memory: int = count(DEFAULT_LINK_MEMORY)
    """Bytes of stream data one link may hold in its buffers (the session memory budget, proto/budget.py): half
    for receive windows above each stream's floor (link_memory / 1024, 4-64 KiB), half for bytes queued to send."""
    tls_cert: str | None = _path("tls_cert")
    """The server's certificate (PEM; a chain: the server's first) for the link; with ``tls_key``. None: the
    server's own key and self-signed certificate in ``state_dir``, made on first start."""
    tls_key: str | None = _path("tls_key")
    """The private key (PEM, unencrypted) of ``tls_cert``."""
    state_dir: str | None = _path("state_dir")
    """Where the server keeps its own key and certificate (mode 0600). None: ``$XDG_STATE_HOME/trio-tunnel``, or
    ``/var/lib/trio-tunnel`` for root."""
    insecure_plaintext: bool = BOOLEAN.field(default=False, metadata=toml(rule=BOOLEAN))
    """No TLS on the link: every byte crosses the network readable and changeable. Both sides must say so."""
    timeouts: Timeouts = attrs.field(factory=Timeouts, metadata=toml(table=Timeouts))
    accept_proxy_protocol: bool = BOOLEAN.field(default=False, metadata=toml(rule=BOOLEAN))
    """Read a PROXY protocol header (v1 or v2) on the public ports from connections whose source is in
    ``proxy_protocol_from`` (a load balancer in front of the server), and use the address it names as the peer."""
    proxy_protocol_from: tuple[IPNetwork, ...] = attrs.field(default=(), converter=to_tuple, metadata=networks_key())
    """The sources trusted to send a PROXY header (required with ``accept_proxy_protocol``). Connections from
    anywhere else are never read for one: their bytes are data."""
    proxy_protocol_timeout: float = seconds(5.0)
    """How long a trusted source may take to send its PROXY header before its connection is closed."""
    allow_groups: bool = BOOLEAN.field(default=True, metadata=toml(rule=BOOLEAN))
    """Let clients that authenticated with the same token share a public port as a load-balancing group."""
    metrics: HostPort | None = attrs.field(default=None, metadata=_METRICS_KEY)
    """Serve Prometheus metrics, the ``/status`` document and the dashboard here (HTTP; a bare port binds 127.0.0.1).
    None: no endpoint."""
    workers: int | str = WORKERS.field(default=1, metadata=toml(rule=WORKERS))
    """Server processes sharing the link port (``SO_REUSEPORT``), supervised by a parent; ``"auto"``: one per core.
    1: one process, as before (tunnel/workers.py)."""

    def __attrs_post_init__(self) -> None:
        if self.accept_proxy_protocol and not self.proxy_protocol_from:
            raise ValueError(
                "accept_proxy_protocol needs proxy_protocol_from, the addresses of the load balancers allowed to send "
                'a PROXY header, e.g. proxy_protocol_from = ["10.0.0.0/8"]'
            )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Self:
        """The ``[server]`` table of ``path``. Raises ConfigError (docs/CONFIG.md describes the layout)."""
        return cls.from_sources(config_file=path)

    @classmethod
    def from_sources(
        cls,
        *,
        config_file: str | os.PathLike[str] | None = None,
        listen: HostPort | None = None,
        tokens: Sequence[bytes] | None = None,
        insecure_no_auth: bool | None = None,
        allow_ports: PortSet | None = None,
        allow_targets: TargetAllowlist | None = None,
        allow_bind: BindAllowlist | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        state_dir: str | None = None,
        insecure_plaintext: bool | None = None,
        metrics: HostPort | None = None,
        workers: int | str | None = None,
    ) -> Self:
        """The config file (if any) with the given values overriding it (``None`` = not given).

        Raises:
            ConfigError: a bad file, no token and not ``insecure_no_auth``, a certificate without its key (or
                the other way round), or TLS files together with ``insecure_plaintext``.
        """
        fields, source = _file_fields(cls, config_file, "server")
        fields.update(
            _given(
                {
                    "listen": listen,
                    "tokens": None if tokens is None else dedupe(tokens),
                    "insecure_no_auth": insecure_no_auth,
                    "allow_ports": allow_ports,
                    "allow_targets": allow_targets,
                    "allow_bind": allow_bind,
                    "tls_cert": tls_cert,
                    "tls_key": tls_key,
                    "state_dir": state_dir,
                    "insecure_plaintext": insecure_plaintext,
                    "metrics": metrics,
                    "workers": workers,
                }
            )
        )
        if (fields.get("tls_cert") is None) != (fields.get("tls_key") is None):
            raise ConfigError(
                "--tls-cert and --tls-key go together (tls_cert and tls_key in [server]): give both, or neither "
                "to use the server's own self-signed certificate"
            )
        if fields.get("insecure_plaintext") and fields.get("tls_cert") is not None:
            raise ConfigError(
                "--insecure-plaintext turns TLS off, so --tls-cert/--tls-key would not be used; drop one or the other"
            )
        if not fields.get("tokens"):
            if not fields.get("insecure_no_auth"):
                raise ConfigError(
                    "the server needs a token: pass --token-file PATH (one token per line), --token TOKEN or env "
                    "TRIO_TUNNEL_TOKEN (or tokens/token_file in [server]); "
                    f"{_TOKEN_HINT}; or pass --insecure-no-auth to run without authentication"
                )
        elif fields.get("insecure_no_auth"):
            logger.warning("tokens are configured, so insecure_no_auth is ignored: clients must authenticate")
            fields["insecure_no_auth"] = False
        return build(cls, fields, source=source)


@final
@attrs.frozen(kw_only=True)
class ClientConfig:
    """``trio-tunnel client`` (``[client]``)."""

    server: HostPort = attrs.field(
        metadata=hostport_key(default_host="127.0.0.1", allow_zero=False, default_port=DEFAULT_SERVER_PORT)
    )
    """The server to dial (a host alone: port 7835)."""
    name: str = CLIENT_NAME.field(factory=default_client_name, metadata=toml(rule=CLIENT_NAME))
    """The client's identity: a reconnecting client with the same name takes over its stale predecessor."""
    token: bytes | None = attrs.field(default=None, metadata=toml(read=_first_token, **_TOKEN_KEYS))
    """This client's token (the first one when several are given); None = no authentication."""
    timeouts: Timeouts = attrs.field(factory=Timeouts, metadata=toml(table=Timeouts))
    remotes: tuple[RemoteSpec, ...] = attrs.field(
        default=(), converter=to_tuple, metadata=toml(name="expose", entries=RemoteSpec, check=RemoteSpec.check_unique)
    )
    """-R services, exposed on the server (``[client.expose.NAME]``)."""
    locals: tuple[LocalSpec, ...] = attrs.field(
        default=(), converter=to_tuple, metadata=toml(name="forward", entries=LocalSpec, check=LocalSpec.check_unique)
    )
    """-L forwards, listened on by the client (``[client.forward.NAME]``)."""
    server_fingerprint: tuple[str, ...] = attrs.field(
        default=(), converter=to_tuple, metadata=toml(parse=_fingerprints)
    )
    """Pinned server keys (``sha256:...``, as ``trio-tunnel server`` prints them); any one may match. Empty: the
    server's certificate chain and name are verified against ``tls_ca`` or the system's store."""
    tls_ca: str | None = _path("tls_ca")
    """CA certificates (PEM) to verify the server's certificate with, instead of the system's store."""
    insecure_plaintext: bool = BOOLEAN.field(default=False, metadata=toml(rule=BOOLEAN))
    """No TLS on the link (the server must say so too): every byte crosses the network readable and changeable."""
    exit_on_refusal: bool = BOOLEAN.field(default=False, metadata=toml(rule=BOOLEAN))
    """End the client (exit 1) when the server refuses a service, instead of retrying or carrying on without it."""
    link_memory: int = count(DEFAULT_LINK_MEMORY)
    """Bytes of stream data one link may hold in its buffers (the session memory budget, proto/budget.py): half
    for receive windows above each stream's floor (link_memory / 1024, 4-64 KiB), half for bytes queued to send."""
    metrics: HostPort | None = attrs.field(default=None, metadata=_METRICS_KEY)
    """Serve Prometheus metrics, the ``/status`` document and the dashboard here (HTTP; a bare port binds 127.0.0.1).
    None: no endpoint."""

    def __attrs_post_init__(self) -> None:
        if self.server.port == 0:
            raise ValueError(f"server address {self.server}: port 0 cannot be dialled")
        RemoteSpec.check_unique(self.remotes)
        LocalSpec.check_unique(self.locals)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Self:
        """The ``[client]`` table of ``path``. Raises ConfigError (docs/CONFIG.md describes the layout)."""
        return cls.from_sources(config_file=path)

    @classmethod
    def from_sources(
        cls,
        *,
        config_file: str | os.PathLike[str] | None = None,
        server: HostPort | None = None,
        tokens: Sequence[bytes] | None = None,
        name: str | None = None,
        remotes: Sequence[RemoteSpec] = (),
        locals: Sequence[LocalSpec] = (),
        server_fingerprint: Sequence[str] | None = None,
        tls_ca: str | None = None,
        insecure_plaintext: bool | None = None,
        exit_on_refusal: bool | None = None,
        metrics: HostPort | None = None,
    ) -> Self:
        """The config file (if any) merged with command-line values.

        ``server``, ``tokens`` and ``name`` override the file's when not None; ``remotes``/``locals`` are added to
        the file's services, replacing a file service of the same name.

        Raises:
            ConfigError: a bad file or value, no server address, or no service at all.
        """
        fields, source = _file_fields(cls, config_file, "client")
        if server is not None:
            fields["server"] = server
        if tokens is not None:
            fields["token"] = tokens[0] if tokens else None
        if name is not None:
            fields["name"] = CLIENT_NAME.from_flag("--name", name)
        if server_fingerprint:
            try:
                fields["server_fingerprint"] = _fingerprints(list(server_fingerprint))
            except ValueError as exc:
                raise ConfigError(f"--server-fingerprint: {exc}") from None
        fields.update(
            _given(
                {
                    "tls_ca": tls_ca,
                    "insecure_plaintext": insecure_plaintext,
                    "exit_on_refusal": exit_on_refusal,
                    "metrics": metrics,
                }
            )
        )
        if fields.get("insecure_plaintext") and (fields.get("server_fingerprint") or fields.get("tls_ca")):
            raise ConfigError(
                "--insecure-plaintext turns TLS off, so --server-fingerprint/--tls-ca would not be checked; "
                "drop one or the other"
            )
        fields["remotes"] = RemoteSpec.merge(fields.get("remotes", ()), remotes)
        fields["locals"] = LocalSpec.merge(fields.get("locals", ()), locals)
        if "server" not in fields:
            raise ConfigError('no server address: pass --server HOST:PORT (or set server = "HOST:PORT" in [client])')
        if not fields["remotes"] and not fields["locals"]:
            raise ConfigError(
                "nothing to do: expose a local service with -R [NAME=][bind_address:]port:host:hostport "
                "(e.g. -R web=9000:127.0.0.1:80) or forward one with -L (e.g. -L 15432:db.internal:5432), "
                "or add [client.expose.NAME] / [client.forward.NAME] tables to the config file"
            )
        return build(cls, fields, source=source)


@final
@attrs.frozen(kw_only=True)
class MapConfig:
    """``trio-tunnel map LISTEN TARGET`` (``[map]``): a standalone TCP relay."""

    listen: HostPort = attrs.field(metadata=hostport_key(default_host="0.0.0.0", allow_zero=True))
    """Where to accept connections (port 0 = any free port; the bound port is announced)."""
    target: HostPort = attrs.field(metadata=hostport_key(default_host="127.0.0.1", allow_zero=False))
    """Where each accepted connection is relayed to."""
    connect_timeout: float = seconds(10.0)
    """Dialling the target; on timeout the accepted connection is closed."""
    max_connections: int = count(1024)
    """Concurrent relayed connections; a connection beyond the cap is closed at once, with a warning."""
    drain_timeout: float = seconds(10.0)
    """Graceful shutdown: how long relayed connections may continue after Ctrl+C."""
    protocol: str = PROTOCOL.field(default="tcp", metadata=toml(rule=PROTOCOL))
    """``"udp"``: relay UDP datagrams (``map --udp``), one flow per source, ``max_connections`` flows at most."""
    idle_timeout: float = seconds(UDP_IDLE_DEFAULT)
    """UDP only: a flow ends after this many seconds without a datagram either way."""

    def __attrs_post_init__(self) -> None:
        if self.target.port == 0:
            raise ValueError(f"target {self.target}: port 0 cannot be dialled")

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Self:
        """The ``[map]`` table of ``path``. Raises ConfigError (docs/CONFIG.md describes the layout)."""
        return cls.from_sources(config_file=path)

    @classmethod
    def from_sources(
        cls,
        *,
        config_file: str | os.PathLike[str] | None = None,
        listen: HostPort | None = None,
        target: HostPort | None = None,
        connect_timeout: float | None = None,
        max_connections: int | None = None,
        protocol: str | None = None,
    ) -> Self:
        """The config file (if any) with the given values overriding it (``None`` = not given).

        Raises:
            ConfigError: a bad file or value, or no listen/target address.
        """
        fields, source = _file_fields(cls, config_file, "map")
        fields.update(
            _given(
                {
                    "listen": listen,
                    "target": target,
                    "connect_timeout": connect_timeout,
                    "max_connections": max_connections,
                    "protocol": protocol,
                }
            )
        )
        for key in ("listen", "target"):
            if key not in fields:
                raise ConfigError(f"no {key} address: pass LISTEN and TARGET, e.g. map 0.0.0.0:10022 10.0.0.5:22")
        return build(cls, fields, source=source)


TABLES: Final[dict[str, type]] = {"server": ServerConfig, "client": ClientConfig, "map": MapConfig}
"""The top-level tables of a config file and the config each one holds."""
