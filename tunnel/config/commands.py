"""The configs of the three long-running commands (``server``, ``client``, ``map``) and the flags-over-file merge."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Self, final

import attrs
from trio_tunnel.errors import ConfigError

from .addresses import (
    DEFAULT_SERVER_PORT,
    HostPort,
    LocalSpec,
    RemoteSpec,
    _check_unique,
    _host_problem,
    _merge_services,
)
from .policy import PortSet, TargetAllowlist
from .tokens import (
    _CLIENT_NAME_RE,
    _T,
    _TOKEN_HINT,
    MAX_NAME_LENGTH,
    _check_client_name,
    _dedupe,
    default_client_name,
    logger,
)
from .toml import _describe, _load_section, _Section

# --------------------------------------------------------------------------------------------------------------------
# Timeouts


def _positive_seconds(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{attr.name} must be a positive number of seconds, got {value}")


def _to_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number of seconds, got {value!r}")
    return float(value)


def _seconds(default: float) -> Any:
    return attrs.field(default=default, converter=_to_seconds, validator=_positive_seconds)


@final
@attrs.frozen(kw_only=True)
class Timeouts:
    """Every time bound of a session, in seconds. Defaults follow docs/PROTOCOL.md."""

    handshake: float = _seconds(10.0)
    """The whole handshake, from TCP accept (or connect) to an established session."""
    connect: float = _seconds(10.0)
    """Dialling a local service (client, -R) or a forward target (server, -L)."""
    keepalive_idle: float = _seconds(15.0)
    """Send a PING after this much inbound silence."""
    keepalive_dead: float = _seconds(45.0)
    """Declare the link dead after this much inbound silence."""
    drain: float = _seconds(10.0)
    """Graceful shutdown: how long open streams may keep running after GOAWAY."""
    open: float = _seconds(10.0)
    """How long an OPEN may wait for the peer's OPEN_OK/OPEN_ERR."""
    reconnect_initial: float = _seconds(0.5)
    """Client: the first reconnect delay; it doubles after each failure ..."""
    reconnect_max: float = _seconds(30.0)
    """... up to this cap."""
    reconnect_jitter: float = attrs.field(default=0.2, converter=_to_seconds)
    """Client: each delay is multiplied by a random factor in [1 - jitter, 1 + jitter]; 0 <= jitter < 1."""

    @reconnect_jitter.validator
    def _check_jitter(self, _attr: attrs.Attribute[float], value: float) -> None:
        if not 0 <= value < 1:
            raise ValueError(f"reconnect_jitter must be a fraction 0 <= jitter < 1, got {value}")

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


# --------------------------------------------------------------------------------------------------------------------
# The command configs


def _positive_int(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{attr.name} must be a positive integer, got {value!r}")


def _tokens_tuple(value: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(value)


def _check_tokens(_inst: object, _attr: attrs.Attribute[Any], value: tuple[bytes, ...]) -> None:
    for token in value:
        if not isinstance(token, bytes) or not token:
            raise ValueError("tokens must be non-empty bytes")


def _build(cls: Callable[..., _T], fields: Mapping[str, Any], *, source: str) -> _T:
    """Construct a config, turning a validator's ValueError/TypeError into a ConfigError naming ``source``."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


@final
@attrs.frozen(kw_only=True)
class ServerConfig:
    """``trio-tunnel server``. Logging settings are command-line only and not part of this."""

    listen: HostPort = attrs.field(factory=lambda: HostPort(host="0.0.0.0", port=DEFAULT_SERVER_PORT))
    """Where clients connect; default 0.0.0.0:7835."""
    tokens: tuple[bytes, ...] = attrs.field(default=(), converter=_tokens_tuple, validator=_check_tokens)
    """Accepted client tokens (several for rotation). Empty means no authentication: the named constructors allow
    that only with ``insecure_no_auth``; the plain constructor does not enforce it."""
    insecure_no_auth: bool = False
    """Run without authentication (the CLI logs a warning). Ignored (False) when tokens are given."""
    allow_ports: PortSet = attrs.field(factory=PortSet)
    """Ports clients may expose; default 1024-65535, and 0 ("pick one")."""
    allow_targets: TargetAllowlist = attrs.field(factory=TargetAllowlist)
    """Where -L clients may make the server dial; default nowhere."""
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    max_streams_per_client: int = attrs.field(default=256, validator=_positive_int)
    """Concurrent streams one client session may have open."""
    max_connections_per_service: int = attrs.field(default=1024, validator=_positive_int)
    """Concurrent external connections to one exposed service; more are refused at accept."""
    max_clients: int = attrs.field(default=1024, validator=_positive_int)
    """Concurrent client sessions (including ones still in the handshake)."""

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Self:
        """The ``[server]`` table of ``path``. Raises ConfigError (see the module docstring for the layout)."""
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
    ) -> Self:
        """The config file (if any) with the given values overriding it (``None`` = not given).

        Raises:
            ConfigError: a bad file, or no token and not ``insecure_no_auth``.
        """
        fields: dict[str, Any] = {}
        source = "server config"
        if config_file is not None:
            source = str(config_file)
            fields = _server_fields(_load_section(config_file, "server"))
        overrides: dict[str, Any] = {
            "listen": listen,
            "tokens": None if tokens is None else _dedupe(tokens),
            "insecure_no_auth": insecure_no_auth,
            "allow_ports": allow_ports,
            "allow_targets": allow_targets,
        }
        fields.update({key: value for key, value in overrides.items() if value is not None})
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
        return _build(cls, fields, source=source)


def _remotes_tuple(specs: Iterable[RemoteSpec]) -> tuple[RemoteSpec, ...]:
    return tuple(specs)


def _locals_tuple(specs: Iterable[LocalSpec]) -> tuple[LocalSpec, ...]:
    return tuple(specs)


@final
@attrs.frozen(kw_only=True)
class ClientConfig:
    """``trio-tunnel client``."""

    server: HostPort
    """The server to dial."""
    token: bytes | None = None
    """This client's token (the first one when several are given); None = no authentication."""
    name: str = attrs.field(factory=default_client_name, validator=_check_client_name)
    """The client's identity: a reconnecting client with the same name takes over its stale predecessor."""
    remotes: tuple[RemoteSpec, ...] = attrs.field(default=(), converter=_remotes_tuple)
    """-R services, exposed on the server."""
    locals: tuple[LocalSpec, ...] = attrs.field(default=(), converter=_locals_tuple)
    """-L forwards, listened on by the client."""
    timeouts: Timeouts = attrs.field(factory=Timeouts)

    def __attrs_post_init__(self) -> None:
        if self.server.port == 0:
            raise ValueError(f"server address {self.server}: port 0 cannot be dialled")
        _check_unique("-R", self.remotes)
        _check_unique("-L", self.locals)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Self:
        """The ``[client]`` table of ``path``. Raises ConfigError (see the module docstring for the layout)."""
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
    ) -> Self:
        """The config file (if any) merged with command-line values.

        ``server``, ``tokens`` and ``name`` override the file's when not None; ``remotes``/``locals`` are added to
        the file's services, replacing a file service of the same name.

        Raises:
            ConfigError: a bad file or value, no server address, or no service at all.
        """
        fields: dict[str, Any] = {}
        source = "client config"
        if config_file is not None:
            source = str(config_file)
            fields = _client_fields(_load_section(config_file, "client"))
        if server is not None:
            fields["server"] = server
        if tokens is not None:
            fields["token"] = tokens[0] if tokens else None
        if name is not None:
            if not _CLIENT_NAME_RE.fullmatch(name):
                raise ConfigError(
                    f"--name {name!r}: a client name is 1-{MAX_NAME_LENGTH} characters of A-Z a-z 0-9 . _ -"
                )
            fields["name"] = name
        fields["remotes"] = _merge_services("-R", fields.get("remotes", ()), remotes)
        fields["locals"] = _merge_services("-L", fields.get("locals", ()), locals)
        if "server" not in fields:
            raise ConfigError('no server address: pass --server HOST:PORT (or set server = "HOST:PORT" in [client])')
        if not fields["remotes"] and not fields["locals"]:
            raise ConfigError(
                "nothing to do: expose a local service with -R [NAME=][bind_address:]port:host:hostport "
                "(e.g. -R web=9000:127.0.0.1:80) or forward one with -L (e.g. -L 15432:db.internal:5432), "
                "or add [client.expose.NAME] / [client.forward.NAME] tables to the config file"
            )
        return _build(cls, fields, source=source)


@final
@attrs.frozen(kw_only=True)
class MapConfig:
    """``trio-tunnel map LISTEN TARGET``: a standalone TCP relay."""

    listen: HostPort
    """Where to accept connections (port 0 = any free port; the bound port is announced)."""
    target: HostPort
    """Where each accepted connection is relayed to."""
    connect_timeout: float = _seconds(10.0)
    """Dialling the target; on timeout the accepted connection is closed."""
    max_connections: int = attrs.field(default=1024, validator=_positive_int)
    """Concurrent relayed connections; a connection beyond the cap is closed at once, with a warning."""
    drain_timeout: float = _seconds(10.0)
    """Graceful shutdown: how long relayed connections may continue after Ctrl+C."""

    def __attrs_post_init__(self) -> None:
        if self.target.port == 0:
            raise ValueError(f"target {self.target}: port 0 cannot be dialled")

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Self:
        """The ``[map]`` table of ``path``. Raises ConfigError (see the module docstring for the layout)."""
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
    ) -> Self:
        """The config file (if any) with the given values overriding it (``None`` = not given).

        Raises:
            ConfigError: a bad file or value, or no listen/target address.
        """
        fields: dict[str, Any] = {}
        source = "map config"
        if config_file is not None:
            source = str(config_file)
            fields = _map_fields(_load_section(config_file, "map"))
        overrides: dict[str, Any] = {
            "listen": listen,
            "target": target,
            "connect_timeout": connect_timeout,
            "max_connections": max_connections,
        }
        fields.update({key: value for key, value in overrides.items() if value is not None})
        for key in ("listen", "target"):
            if key not in fields:
                raise ConfigError(f"no {key} address: pass LISTEN and TARGET, e.g. map 0.0.0.0:10022 10.0.0.5:22")
        return _build(cls, fields, source=source)


def _server_fields(sec: _Section) -> dict[str, Any]:
    sec.check_keys(
        (
            "listen",
            "token",
            "tokens",
            "token_file",
            "insecure_no_auth",
            "allow_ports",
            "allow_targets",
            "max_streams_per_client",
            "max_connections_per_service",
            "max_clients",
            "timeouts",
        )
    )
    fields: dict[str, Any] = {
        "listen": sec.hostport("listen", default_host="0.0.0.0", allow_zero=True),
        "tokens": sec.tokens(),
        "insecure_no_auth": sec.boolean("insecure_no_auth"),
        "timeouts": _read_timeouts(sec),
    }
    ports = sec.data.get("allow_ports")
    if ports is not None:
        if isinstance(ports, bool) or not isinstance(ports, str | int | list):
            raise sec.error("allow_ports", f'expected a string like "8000-8999,2222", got {_describe(ports)}')
        fields["allow_ports"] = sec.parsed("allow_ports", PortSet.parse, ports)
    targets = sec.strings("allow_targets")
    if targets is not None:
        fields["allow_targets"] = sec.parsed("allow_targets", TargetAllowlist.parse, targets)
    for key in ("max_streams_per_client", "max_connections_per_service", "max_clients"):
        fields[key] = sec.integer(key, low=1, high=None, what="count")
    return {key: value for key, value in fields.items() if value is not None}


def _client_fields(sec: _Section) -> dict[str, Any]:
    sec.check_keys(("server", "name", "token", "tokens", "token_file", "timeouts", "expose", "forward"))
    tokens = sec.tokens()
    fields: dict[str, Any] = {
        "server": sec.hostport("server", default_host="127.0.0.1", allow_zero=False),
        "name": sec.string("name"),
        "timeouts": _read_timeouts(sec),
    }
    if tokens is not None:
        fields["token"] = tokens[0]
    name = fields["name"]
    if name is not None and not _CLIENT_NAME_RE.fullmatch(name):
        raise sec.error("name", f"a client name is 1-{MAX_NAME_LENGTH} characters of A-Z a-z 0-9 . _ -")
    remotes: list[RemoteSpec] = []
    expose = sec.sub("expose")
    for service in expose.data if expose else ():
        entry = expose.sub(service) if expose else None
        assert entry is not None
        entry.check_keys(("local", "remote_port", "bind"))
        local = entry.hostport("local", default_host="127.0.0.1", allow_zero=False)
        remote_port = entry.integer("remote_port", low=0, high=65535, what="port")
        bind = entry.string("bind")
        if local is None:
            raise entry.error("local", 'missing: the local service, e.g. local = "127.0.0.1:80"')
        if remote_port is None:
            raise entry.error("remote_port", "missing: the port on the server (0 = the server picks one)")
        if bind is not None and (problem := _host_problem(bind)):
            raise entry.error("bind", problem)
        remotes.append(
            _build(
                RemoteSpec,
                {
                    "name": service,
                    "bind_host": bind if bind is not None else "0.0.0.0",
                    "bind_port": remote_port,
                    "target_host": local.host,
                    "target_port": local.port,
                },
                source=f"{sec.file}: {entry.path}",
            )
        )
    forwards: list[LocalSpec] = []
    forward = sec.sub("forward")
    for service in forward.data if forward else ():
        entry = forward.sub(service) if forward else None
        assert entry is not None
        entry.check_keys(("listen", "target"))
        listen = entry.hostport("listen", default_host="127.0.0.1", allow_zero=True)
        target = entry.hostport("target", default_host="127.0.0.1", allow_zero=False)
        if listen is None:
            raise entry.error("listen", 'missing: where the client listens, e.g. listen = "127.0.0.1:15432"')
        if target is None:
            raise entry.error("target", 'missing: what the server dials, e.g. target = "db.internal:5432"')
        forwards.append(
            _build(
                LocalSpec,
                {
                    "name": service,
                    "bind_host": listen.host,
                    "bind_port": listen.port,
                    "target_host": target.host,
                    "target_port": target.port,
                },
                source=f"{sec.file}: {entry.path}",
            )
        )
    for flag, key, specs in (("-R", "expose", remotes), ("-L", "forward", forwards)):
        try:
            _check_unique(flag, specs)
        except ValueError as exc:
            raise ConfigError(f"{sec.file}: {sec.path}.{key}: {exc}") from None
    fields["remotes"] = tuple(remotes)
    fields["locals"] = tuple(forwards)
    return {key: value for key, value in fields.items() if value is not None}


def _map_fields(sec: _Section) -> dict[str, Any]:
    sec.check_keys(("listen", "target", "connect_timeout", "max_connections", "drain_timeout"))
    fields: dict[str, Any] = {
        "listen": sec.hostport("listen", default_host="0.0.0.0", allow_zero=True),
        "target": sec.hostport("target", default_host="127.0.0.1", allow_zero=False),
        "connect_timeout": sec.seconds("connect_timeout"),
        "max_connections": sec.integer("max_connections", low=1, high=None, what="count"),
        "drain_timeout": sec.seconds("drain_timeout"),
    }
    return {key: value for key, value in fields.items() if value is not None}


def _read_timeouts(self: _Section) -> Timeouts | None:
    sec = self.sub("timeouts")
    if sec is None:
        return None
    keys = [field.name for field in attrs.fields(Timeouts)]
    sec.check_keys(keys)
    values = {key: sec.seconds(key) for key in keys if key != "reconnect_jitter"}
    jitter = sec.data.get("reconnect_jitter")
    if jitter is not None:
        if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
            raise sec.error("reconnect_jitter", f"expected a fraction 0 <= jitter < 1, got {_describe(jitter)}")
        values["reconnect_jitter"] = float(jitter)
    given = {key: value for key, value in values.items() if value is not None}
    try:
        return Timeouts(**given)
    except ValueError as exc:
        raise ConfigError(f"{self.file}: {sec.path}: {exc}") from None
