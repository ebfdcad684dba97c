"""Configuration of the three long-running commands: ``server``, ``client`` and ``map``.

Everything here is pure data plus parsers: no trio, no sockets opened, no environment read (``cli.py`` reads
``TRIO_TUNNEL_TOKEN`` and passes the tokens in). Config classes are ``attrs.frozen(kw_only=True)`` with documented
defaults. Each has two named constructors:

* ``from_toml(path)``: the config from the file's ``[server]``, ``[client]`` or ``[map]`` table alone;
* ``from_sources(config_file=..., <field>=...)``: the file (optional) merged with command-line values. A value given
  on the command line (not ``None``) overrides the file's; ``-R``/``-L`` services are *added* to the file's services,
  replacing a file service of the same name.

Plain construction (``ServerConfig(...)``) validates types and ranges (raising ``ValueError``) but applies no policy;
the named constructors raise :class:`~.errors.ConfigError` with a message that names the file or flag, the key,
and the fix, and they apply the policies a user relies on: a server needs a token unless ``insecure_no_auth``; a
client needs a server address and at least one service; a mapper needs ``listen`` and ``target``.

TOML layout
-----------
One file may hold all three tables; each command reads only its own (and rejects unknown top-level tables). Unknown
keys are errors, with the closest valid key suggested. Relative ``token_file`` paths are relative to the config file.
The seed's case (web -> 9000, ssh -> 9001, mysql -> 9002), plus a forward tunnel and a plain mapper::

    [server]
    listen = "0.0.0.0:7835"                  # HOST:PORT, [IPv6]:PORT or PORT (then 0.0.0.0); default 0.0.0.0:7835
    tokens = ["<token 1>", "<token 2>"]      # several for rotation; or token = "...", or:
    # token_file = "/etc/trio-tunnel/tokens"  # one token per line, '#' comments and blank lines ignored
    # insecure_no_auth = false               # true: run with no authentication (a warning is logged)
    allow_ports = "9000-9010"                # ports clients may expose; default 1024-65535 (0 = "pick one")
    allow_targets = ["10.0.0.0/8:22", "db.internal:5432"]   # -L targets; default: none (deny all)
    max_streams_per_client = 256
    max_connections_per_service = 1024
    max_clients = 1024

    [server.timeouts]                        # seconds; any subset, the rest keep their defaults
    handshake = 10
    keepalive_idle = 15
    keepalive_dead = 45
    drain = 10

    [client]
    server = "tunnel.example.com:7835"
    name = "home"                            # default: this host's name, reduced to [A-Za-z0-9._-], 64 chars
    token_file = "client.token"              # relative to this file; or token = "..."

    [client.timeouts]
    reconnect_initial = 0.5
    reconnect_max = 30

    [client.expose.web]                      # like -R web=0.0.0.0:9000:127.0.0.1:80
    local = "127.0.0.1:80"                   # the local service: HOST:PORT or PORT (then 127.0.0.1)
    remote_port = 9000                       # port on the server; 0 = the server picks a free one
    bind = "0.0.0.0"                         # optional: the server-side address to listen on

    [client.expose.ssh]
    local = "127.0.0.1:22"
    remote_port = 9001

    [client.expose.mysql]
    local = "127.0.0.1:3306"
    remote_port = 9002

    [client.forward.db]                      # like -L db=127.0.0.1:15432:db.internal:5432
    listen = "127.0.0.1:15432"               # where the client listens: HOST:PORT or PORT (then 127.0.0.1)
    target = "db.internal:5432"              # dialled by the server; must be in its allow_targets

    [map]                                    # trio-tunnel map: a plain TCP relay, no server involved
    listen = "0.0.0.0:10022"
    target = "192.168.0.10:22"
    connect_timeout = 10
    max_connections = 1024
    drain_timeout = 10

Specs on the command line
-------------------------
* ``-R [NAME=][bind_address:]port:host:hostport`` (:class:`RemoteSpec`): the server listens on
  ``bind_address:port`` (default 0.0.0.0; port 0 = the server picks), connections reach ``host:hostport`` on the
  client's side. The name defaults to ``host:hostport``.
* ``-L [NAME=][bind_address:]port:host:hostport`` (:class:`LocalSpec`): the client listens on ``bind_address:port``
  (default 127.0.0.1; port 0 = any free port), the server dials ``host:hostport``.
* An empty bind address or ``*`` means all IPv4 interfaces (0.0.0.0), as in ssh. IPv6 addresses go in brackets.
* ``--allow-ports 8000-8999,2222`` (:class:`PortSet`), ``--allow-target 10.0.0.0/8:22,db.internal:5432,127.0.0.1:*``
  (:class:`TargetAllowlist`).
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Self, TypeVar, final

import attrs
from trio_tunnel.console import format_hostport
from trio_tunnel.errors import ConfigError

__all__ = [
    "DEFAULT_SERVER_PORT",
    "ClientConfig",
    "HostPort",
    "LocalSpec",
    "MapConfig",
    "PortSet",
    "RemoteSpec",
    "ServerConfig",
    "TargetAllowlist",
    "TargetRule",
    "Timeouts",
    "default_client_name",
    "parse_hostport",
    "parse_token",
    "parse_token_list",
    "read_token_file",
]

logger = logging.getLogger(__name__)

DEFAULT_SERVER_PORT: Final = 7835
"""The server's default listening port."""

MIN_TOKEN_LENGTH: Final = 16
"""Tokens shorter than this are accepted with a warning."""

MAX_NAME_LENGTH: Final = 64
"""Longest client name (the client's identity on the server)."""

MAX_SERVICE_NAME_LENGTH: Final = 128
"""Longest service name (an -R/-L ``NAME``); it travels as a stream route (at most 255 bytes)."""

_TOKEN_HINT: Final = 'make one with: python3 -c "import secrets; print(secrets.token_urlsafe(32))"'
_REMOTE_SYNTAX: Final = "[NAME=][bind_address:]port:host:hostport, e.g. 'web=9000:127.0.0.1:80'"
_LOCAL_SYNTAX: Final = "[NAME=][bind_address:]port:host:hostport, e.g. 'db=15432:db.internal:5432'"
_HOSTPORT_SYNTAX: Final = "HOST:PORT, [IPv6]:PORT or PORT, e.g. '127.0.0.1:8080'"

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE: Final = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_CLIENT_NAME_RE: Final = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_NAME_LENGTH}}}")
_SERVICE_NAME_RE: Final = re.compile(rf"[A-Za-z0-9._:\[\]-]{{1,{MAX_SERVICE_NAME_LENGTH}}}")
_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------------------------------
# Hosts and ports


def _host_problem(host: str) -> str | None:
    """Why ``host`` is not a usable host name or IP literal (None when it is)."""
    if not host:
        return "the host is empty"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return None
    if ":" in host:
        return f"{host!r} is not a valid IPv6 address"
    if re.fullmatch(r"[0-9.]+", host):
        return f"{host!r} is not a valid IPv4 address"
    if not _HOSTNAME_RE.fullmatch(host):
        return f"{host!r} is not a valid host name or IP address"
    return None


def _check_host(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{attr.name} must be a str, got {value!r}")
    problem = _host_problem(value)
    if problem:
        raise ValueError(f"{attr.name}: {problem}")


def _port_checker(low: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attr.name} must be an int, got {value!r}")
        if not low <= value <= 65535:
            raise ValueError(f"{attr.name} must be {low}-65535, got {value}")

    return check


_any_port = _port_checker(0)
_real_port = _port_checker(1)


def _parse_port(text: str, *, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not _PORT_RE.fullmatch(text):
        raise ValueError("the port is missing" if not text else f"port {text!r} is not a number")
    port = int(text)
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range {low}-65535")
    return port


@final
@attrs.frozen(kw_only=True)
class HostPort:
    """A host name or IP literal (IPv6 without brackets) and a port (0 = any free port, where that makes sense)."""

    host: str = attrs.field(validator=_check_host)
    port: int = attrs.field(validator=_any_port)

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)

    @classmethod
    def parse(cls, text: str, *, default_host: str = "127.0.0.1", allow_zero: bool = True) -> Self:
        """Same as :func:`parse_hostport`."""
        hp = parse_hostport(text, default_host=default_host, allow_zero=allow_zero)
        return cls(host=hp.host, port=hp.port)


def parse_hostport(text: str, *, default_host: str = "127.0.0.1", allow_zero: bool = True) -> HostPort:
    """Parse ``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` (the last two use ``default_host``).

    Raises:
        ConfigError: the message shows ``text`` and the expected syntax.
    """
    text = text.strip()
    try:
        host: str
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ValueError("'[' without a closing ']'")
            host, rest = text[1:end], text[end + 1 :]
            if ":" not in host:
                raise ValueError("brackets are only for IPv6 addresses")
            if not rest.startswith(":"):
                raise ValueError("expected ':PORT' after ']'")
            port_text = rest[1:]
        elif text.count(":") > 1:
            raise ValueError("an IPv6 address must be written in brackets, e.g. '[::1]:8080'")
        elif ":" in text:
            host, port_text = text.rsplit(":", 1)
            host = host or default_host
        elif _PORT_RE.fullmatch(text) or not text:
            host, port_text = default_host, text
        else:
            raise ValueError("missing ':PORT'")
        problem = _host_problem(host)
        if problem:
            raise ValueError(problem)
        port = _parse_port(port_text, allow_zero=allow_zero)
    except ValueError as exc:
        raise ConfigError(f"invalid address {text!r}: {exc} (syntax: {_HOSTPORT_SYNTAX})") from None
    return HostPort(host=host, port=port)


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
# -R / -L specs


def _split_fields(text: str) -> list[str]:
    """Split on ':' outside brackets; bracketed fields lose their brackets and must be IPv6 literals."""
    fields: list[str] = []
    i = 0
    while True:
        if text.startswith("[", i):
            end = text.find("]", i)
            if end < 0:
                raise ValueError("'[' without a closing ']'")
            inner = text[i + 1 : end]
            if ":" not in inner:
                raise ValueError(f"brackets are only for IPv6 addresses, got '[{inner}]'")
            fields.append(inner)
            i = end + 1
            if i == len(text):
                return fields
            if text[i] != ":":
                raise ValueError(f"expected ':' after '[{inner}]'")
            i += 1
        else:
            j = text.find(":", i)
            if j < 0:
                fields.append(text[i:])
                return fields
            fields.append(text[i:j])
            i = j + 1


def _check_service_name(name: str) -> None:
    if not _SERVICE_NAME_RE.fullmatch(name):
        raise ValueError(
            f"service name {name!r} must be 1-{MAX_SERVICE_NAME_LENGTH} characters of A-Z a-z 0-9 . _ - : [ ]"
        )


def _validate_service_name(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"name must be a str, got {value!r}")
    _check_service_name(value)


def _parse_forward(text: str, *, default_bind: str, syntax: str, kind: str) -> dict[str, Any]:
    original = text
    try:
        name: str | None = None
        if "=" in text:
            name, text = text.split("=", 1)
            _check_service_name(name)
        fields = _split_fields(text.strip())
        if len(fields) == 3:
            bind_host = default_bind
            port_text, target_host, target_port_text = fields
        elif len(fields) == 4:
            bind_host, port_text, target_host, target_port_text = fields
            if bind_host in ("", "*"):
                bind_host = "0.0.0.0"
        elif len(fields) > 4 and "[" not in text:
            raise ValueError("too many ':' (an IPv6 address must be written in brackets, e.g. '[::1]')")
        else:
            raise ValueError(f"expected 3 or 4 fields separated by ':', got {len(fields)}")
        for what, host in (("bind address", bind_host), ("host", target_host)):
            problem = _host_problem(host)
            if problem:
                raise ValueError(f"{what}: {problem}")
        bind_port = _parse_port(port_text, allow_zero=True)
        target_port = _parse_port(target_port_text, allow_zero=False)
    except ValueError as exc:
        raise ConfigError(f"invalid {kind} spec {original!r}: {exc} (syntax: {syntax})") from None
    fields_out: dict[str, Any] = {
        "bind_host": bind_host,
        "bind_port": bind_port,
        "target_host": target_host,
        "target_port": target_port,
    }
    if name is not None:
        fields_out["name"] = name
    return fields_out


class _ForwardSpec:
    """Shared behaviour of :class:`RemoteSpec` and :class:`LocalSpec` (attrs fields are declared on each)."""

    __slots__ = ()
    name: str
    bind_host: str
    bind_port: int
    target_host: str
    target_port: int

    @property
    def bind(self) -> HostPort:
        """Where the listener goes (port 0 = any free port)."""
        return HostPort(host=self.bind_host, port=self.bind_port)

    @property
    def target(self) -> HostPort:
        """What each accepted connection is connected to."""
        return HostPort(host=self.target_host, port=self.target_port)

    def __str__(self) -> str:
        bind = format_hostport(self.bind_host, self.bind_port)
        return f"{self.name}={bind}:{format_hostport(self.target_host, self.target_port)}"


def _default_service_name(self: _ForwardSpec) -> str:
    return format_hostport(self.target_host, self.target_port)


@final
@attrs.frozen(kw_only=True)
class RemoteSpec(_ForwardSpec):
    """One ``-R`` service: the *server* listens on ``bind_host:bind_port`` and each connection is carried to the
    client, which dials ``target_host:target_port`` (its local service)."""

    bind_host: str = attrs.field(default="0.0.0.0", validator=_check_host)
    """Server-side listening address; default all IPv4 interfaces."""
    bind_port: int = attrs.field(validator=_any_port)
    """Server-side port; 0 = the server picks a free port within its allowed ports."""
    target_host: str = attrs.field(validator=_check_host)
    target_port: int = attrs.field(validator=_real_port)
    name: str = attrs.field(
        default=attrs.Factory(_default_service_name, takes_self=True), validator=_validate_service_name
    )
    """The service's name (``exposed NAME HOST:PORT``); default ``target_host:target_port``."""

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``[NAME=][bind_address:]port:host:hostport`` (ssh ``-R`` syntax plus an optional name).

        Raises:
            ConfigError: the message shows ``text``, what is wrong, and the syntax with an example.
        """
        return cls(**_parse_forward(text, default_bind="0.0.0.0", syntax=_REMOTE_SYNTAX, kind="-R"))


@final
@attrs.frozen(kw_only=True)
class LocalSpec(_ForwardSpec):
    """One ``-L`` forward: the *client* listens on ``bind_host:bind_port`` and each connection is carried to the
    server, which dials ``target_host:target_port`` if its ``allow_targets`` permit."""

    bind_host: str = attrs.field(default="127.0.0.1", validator=_check_host)
    """Client-side listening address; default loopback only."""
    bind_port: int = attrs.field(validator=_any_port)
    """Client-side port; 0 = any free port (the bound port is announced in ``forwarding NAME HOST:PORT``)."""
    target_host: str = attrs.field(validator=_check_host)
    target_port: int = attrs.field(validator=_real_port)
    name: str = attrs.field(
        default=attrs.Factory(_default_service_name, takes_self=True), validator=_validate_service_name
    )
    """The forward's name (``forwarding NAME HOST:PORT``); default ``target_host:target_port``."""

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``[NAME=][bind_address:]port:host:hostport`` (ssh ``-L`` syntax plus an optional name).

        Raises:
            ConfigError: the message shows ``text``, what is wrong, and the syntax with an example.
        """
        return cls(**_parse_forward(text, default_bind="127.0.0.1", syntax=_LOCAL_SYNTAX, kind="-L"))


# --------------------------------------------------------------------------------------------------------------------
# Port sets and target allowlists


def _spec_items(spec: str | Iterable[str | int]) -> list[str]:
    if isinstance(spec, str) and not spec.strip():
        raise ConfigError("it is empty")
    raw: list[str | int] = [spec] if isinstance(spec, str) else list(spec)
    items: list[str] = []
    for entry in raw:
        if isinstance(entry, bool) or not isinstance(entry, str | int):
            raise ConfigError(f"expected a string or port number, got {entry!r}")
        if isinstance(entry, int):
            items.append(str(entry))
            continue
        for item in entry.split(","):
            item = item.strip()
            if not item:
                raise ConfigError(f"empty entry in {entry!r} (a stray comma?)")
            items.append(item)
    if not items:
        raise ConfigError("the list is empty")
    return items


def _parse_port_range(item: str, *, where: str, for_targets: bool) -> tuple[int, int]:
    if for_targets and item == "*":
        return (1, 65535)
    low_text, dash, high_text = item.partition("-")
    try:
        low = _parse_port(low_text.strip(), allow_zero=False)
        high = _parse_port(high_text.strip(), allow_zero=False) if dash else low
    except ValueError as exc:
        if item.strip() == "0" and not for_targets:
            raise ConfigError(
                f"{where}: port 0 cannot be listed: asking for port 0 always means 'pick a free allowed port'"
            ) from None
        raise ConfigError(f"{where}: {exc} (expected PORT or LOW-HIGH, e.g. 8000-8999)") from None
    if high < low:
        raise ConfigError(f"{where}: range {item!r} is reversed (write {high}-{low})")
    return (low, high)


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


def _check_ranges(_inst: object, _attr: attrs.Attribute[Any], value: tuple[tuple[int, int], ...]) -> None:
    for low, high in value:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {low}-{high}")


@final
@attrs.frozen(kw_only=True)
class PortSet:
    """The ports a server lets clients expose (``--allow-ports 8000-8999,2222``).

    ``ranges`` are inclusive, sorted and merged. The default (:meth:`default`) is every unprivileged port,
    1024-65535. Privileged ports (< 1024) are allowed only when listed explicitly (and binding them needs root).

    A request for port 0 means "pick one": ``0 in ports`` is True whenever the set is not empty, and the server
    then binds a free port *inside* the set: when :attr:`allows_any_unprivileged` it may let the OS choose (bind
    port 0); otherwise it tries the ports of the set (:meth:`__iter__`).
    """

    ranges: tuple[tuple[int, int], ...] = attrs.field(
        default=((1024, 65535),), converter=_merge_ranges, validator=_check_ranges
    )

    @classmethod
    def default(cls) -> Self:
        """Every unprivileged port, 1024-65535 (and 0, "pick one")."""
        return cls()

    @classmethod
    def parse(cls, spec: str | Iterable[str | int]) -> Self:
        """Parse ``"8000-8999,2222"`` (or a list of such strings and port numbers).

        Raises:
            ConfigError: the message shows the bad entry and the expected form.
        """
        where = f"invalid port set {spec!r}" if isinstance(spec, str) else "invalid port set"
        try:
            items = _spec_items(spec)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc} (expected e.g. '8000-8999,2222')") from None
        return cls(ranges=[_parse_port_range(item, where=where, for_targets=False) for item in items])

    @property
    def allows_any_unprivileged(self) -> bool:
        """True when every port 1024-65535 is allowed, so an OS-chosen ephemeral port is always inside the set."""
        return any(low <= 1024 and high == 65535 for low, high in self.ranges)

    def __contains__(self, port: object) -> bool:
        if isinstance(port, bool) or not isinstance(port, int):
            return False
        if port == 0:
            return bool(self.ranges)
        return any(low <= port <= high for low, high in self.ranges)

    def __iter__(self) -> Iterator[int]:
        """The allowed ports (not 0), ascending."""
        for low, high in self.ranges:
            yield from range(low, high + 1)

    def __len__(self) -> int:
        return sum(high - low + 1 for low, high in self.ranges)

    def __str__(self) -> str:
        return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in self.ranges)


def _normalize_name(host: str) -> str:
    return host.lower().rstrip(".")


def _as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@final
@attrs.frozen(kw_only=True)
class TargetRule:
    """One ``--allow-target`` entry: ``HOST:PORTS``.

    ``HOST`` is a CIDR network (``10.0.0.0/8``, ``[fd00::/8]``), a single IP address, or an exact DNS name
    (``db.internal``). ``PORTS`` is a port, a range ``LOW-HIGH``, or ``*`` (1-65535).
    """

    network: IPNetwork | None = None
    """Set for an address rule (a single address is a /32 or /128)."""
    hostname: str | None = None
    """Set for a name rule: lower case, without a trailing dot."""
    port_low: int = attrs.field(validator=_real_port)
    port_high: int = attrs.field(validator=_real_port)

    def __attrs_post_init__(self) -> None:
        if (self.network is None) == (self.hostname is None):
            raise ValueError("a TargetRule has exactly one of network and hostname")
        if self.port_high < self.port_low:
            raise ValueError(f"port range {self.port_low}-{self.port_high} is reversed")

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse one rule, e.g. ``10.0.0.0/8:22``, ``db.internal:5432``, ``127.0.0.1:*``, ``[::1]:8000-8999``.

        Raises:
            ConfigError: the message shows ``text`` and the expected form.
        """
        where = f"invalid target rule {text!r}"
        example = "expected HOST:PORT, CIDR:PORT, HOST:* or HOST:LOW-HIGH, e.g. '10.0.0.0/8:22' or 'db.internal:5432'"
        text = text.strip()
        if text.startswith("["):
            end = text.find("]")
            if end < 0 or not text[end + 1 :].startswith(":"):
                raise ConfigError(f"{where}: an IPv6 rule is written '[ADDRESS/BITS]:PORTS'; {example}")
            host, ports = text[1:end], text[end + 2 :]
        else:
            host, colon, ports = text.rpartition(":")
            if not colon:
                raise ConfigError(f"{where}: missing ':PORT' (use ':*' for any port); {example}")
            if ":" in host:
                raise ConfigError(f"{where}: an IPv6 address must be written in brackets; {example}")
        if not host:
            raise ConfigError(f"{where}: the host is empty; {example}")
        if host == "*":
            raise ConfigError(
                f"{where}: any host ('*') is not supported, since an open proxy is a security hole; "
                "list networks or names (write 0.0.0.0/0:PORTS if you really mean every IPv4 address)"
            )
        port_low, port_high = _parse_port_range(ports, where=where, for_targets=True)
        network: IPNetwork | None = None
        hostname: str | None = None
        if "/" in host or _as_ip(host) is not None:
            try:
                network = ipaddress.ip_network(host, strict=False)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        else:
            problem = _host_problem(host)
            if problem:
                raise ConfigError(f"{where}: {problem}; {example}")
            hostname = _normalize_name(host)
        return cls(network=network, hostname=hostname, port_low=port_low, port_high=port_high)

    def matches(self, host: str, port: int) -> bool:
        """See :meth:`TargetAllowlist.allows`."""
        if not self.port_low <= port <= self.port_high:
            return False
        address = _as_ip(host)
        if self.network is not None:
            if address is None:
                return False
            if address in self.network:
                return True
            mapped = getattr(address, "ipv4_mapped", None)
            return mapped is not None and mapped in self.network
        return address is None and _host_problem(host) is None and _normalize_name(host) == self.hostname

    def __str__(self) -> str:
        ports = (
            "*"
            if (self.port_low, self.port_high) == (1, 65535)
            else str(self.port_low)
            if self.port_low == self.port_high
            else f"{self.port_low}-{self.port_high}"
        )
        if self.network is not None:
            net = self.network
            host = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
            return f"[{host}]:{ports}" if net.version == 6 else f"{host}:{ports}"
        return f"{self.hostname}:{ports}"


def _rules_tuple(rules: Iterable[TargetRule]) -> tuple[TargetRule, ...]:
    return tuple(rules)


@final
@attrs.frozen(kw_only=True)
class TargetAllowlist:
    """Where a server may dial on behalf of ``-L`` clients (``--allow-target``). Empty (the default) denies all.

    An IP-address target is allowed when it lies in an address rule's network (an IPv4-mapped IPv6 address is also
    checked as IPv4). A DNS-name target is matched **by name**: it is allowed only when a name rule spells the same
    name (case-insensitive, trailing dot ignored) exactly as the client wrote it. Names are never resolved to be
    checked against address rules, and the addresses a named target resolves to are **not** re-checked: allowing
    ``db.internal:5432`` trusts whoever controls the DNS for ``db.internal``.
    """

    rules: tuple[TargetRule, ...] = attrs.field(default=(), converter=_rules_tuple)

    @classmethod
    def deny_all(cls) -> Self:
        return cls()

    @classmethod
    def parse(cls, spec: str | Iterable[str]) -> Self:
        """Parse ``"10.0.0.0/8:22,db.internal:5432,127.0.0.1:*"`` or a list of such strings.

        Raises:
            ConfigError: the message shows the bad rule and the expected form.
        """
        try:
            items = _spec_items(spec)
        except ConfigError as exc:
            raise ConfigError(f"invalid target list {spec!r}: {exc}") from None
        return cls(rules=[TargetRule.parse(item) for item in items])

    def allows(self, host: str, port: int) -> bool:
        """True when some rule allows dialling ``host:port`` (host as the client wrote it)."""
        return any(rule.matches(host, port) for rule in self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __str__(self) -> str:
        return ",".join(str(rule) for rule in self.rules) if self.rules else "(none)"


# --------------------------------------------------------------------------------------------------------------------
# Tokens and names


def parse_token(text: str, *, source: str) -> bytes:
    """One token: the UTF-8 bytes of ``text`` without surrounding whitespace.

    ``source`` names where it came from (a flag, a file, an environment variable) for messages; the token itself is
    never logged. A token shorter than 16 characters is accepted with a warning.

    Raises:
        ConfigError: the token is empty.
    """
    token = text.strip()
    if not token:
        raise ConfigError(f"{source}: the token is empty; {_TOKEN_HINT}")
    if len(token) < MIN_TOKEN_LENGTH:
        logger.warning(
            "%s: the token is only %d characters long; use at least %d (%s)",
            source,
            len(token),
            MIN_TOKEN_LENGTH,
            _TOKEN_HINT,
        )
    return token.encode("utf-8")


def parse_token_list(text: str, *, source: str) -> tuple[bytes, ...]:
    """Comma-separated tokens (the form of ``TRIO_TUNNEL_TOKEN``); a token itself cannot contain a comma."""
    return tuple(parse_token(part, source=source) for part in text.split(","))


def read_token_file(path: str | os.PathLike[str]) -> tuple[bytes, ...]:
    """Tokens from a file: one per line; blank lines and lines starting with ``#`` are ignored.

    Logs a warning when the file is readable by other users.

    Raises:
        ConfigError: the file cannot be read or holds no token.
    """
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: token file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: token file is not valid UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read token file: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s: token file is accessible by other users; run: chmod 600 %s", path, path)
    tokens = tuple(
        parse_token(line, source=f"{path}:{number}")
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise ConfigError(f"{path}: token file holds no token (one per line); {_TOKEN_HINT}")
    return tokens


def _dedupe(items: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(dict.fromkeys(items))


def default_client_name() -> str:
    """This host's name, reduced to ``[A-Za-z0-9._-]`` and 64 characters (``client`` if nothing is left)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:MAX_NAME_LENGTH].strip("-")
    return name or "client"


def _check_client_name(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not _CLIENT_NAME_RE.fullmatch(value):
        raise ValueError(f"client name {value!r} must be 1-{MAX_NAME_LENGTH} characters of A-Z a-z 0-9 . _ -")


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


_Spec = TypeVar("_Spec", RemoteSpec, LocalSpec)


def _check_unique(flag: str, specs: Sequence[RemoteSpec] | Sequence[LocalSpec]) -> None:
    names: set[str] = set()
    binds: set[tuple[str, int]] = set()
    for spec in specs:
        if spec.name in names:
            raise ValueError(
                f"two {flag} services are named {spec.name!r}; give them distinct names with the NAME= prefix"
            )
        names.add(spec.name)
        if spec.bind_port and (spec.bind_host, spec.bind_port) in binds:
            raise ValueError(f"two {flag} services listen on {spec.bind}")
        binds.add((spec.bind_host, spec.bind_port))


def _merge_services(flag: str, from_file: Sequence[_Spec], from_flags: Sequence[_Spec]) -> tuple[_Spec, ...]:
    try:
        _check_unique(flag, from_flags)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    by_flag: dict[str, _Spec] = {spec.name: spec for spec in from_flags}
    merged: list[_Spec] = [by_flag.pop(spec.name, spec) for spec in from_file]
    merged.extend(by_flag.values())
    return tuple(merged)


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


# --------------------------------------------------------------------------------------------------------------------
# TOML reading


def _key_path(path: str, key: str) -> str:
    part = key if _BARE_KEY_RE.fullmatch(key) else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{path}.{part}" if path else part


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__} value"


@attrs.frozen
class _Section:
    """One TOML table being read, with what is needed to report errors precisely."""

    data: Mapping[str, Any]
    path: str
    file: str
    base_dir: Path

    def error(self, key: str | None, message: str) -> ConfigError:
        where = _key_path(self.path, key) if key is not None else self.path
        return ConfigError(f"{self.file}: {where}: {message}")

    def check_keys(self, allowed: Sequence[str]) -> None:
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(allowed)}"
                raise self.error(key, f"unknown key; {hint}")

    def sub(self, key: str) -> _Section | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table ([{_key_path(self.path, key)}]), got {_describe(value)}")
        return _Section(value, _key_path(self.path, key), self.file, self.base_dir)

    def string(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None or isinstance(value, str):
            return value
        raise self.error(key, f"expected a string, got {_describe(value)}")

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None or isinstance(value, bool):
            return value
        raise self.error(key, f"expected true or false, got {_describe(value)}")

    def integer(self, key: str, *, low: int, high: int | None, what: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        expected = f"expected an integer {what} {low}-{high}" if high else f"expected an integer {what} >= {low}"
        if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
            raise self.error(key, f"{expected}, got {value!r} (a string: remove the quotes)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"{expected}, got {_describe(value)}")
        if value < low or (high is not None and value > high):
            raise self.error(key, f"{expected}, got {value}")
        return value

    def seconds(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            raise self.error(key, f"expected a number of seconds > 0, got {_describe(value)}")
        return float(value)

    def strings(self, key: str) -> list[str] | None:
        """A string or a list of strings."""
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        raise self.error(key, f"expected a string or a list of strings, got {_describe(value)}")

    def hostport(self, key: str, *, default_host: str, allow_zero: bool) -> HostPort | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise self.error(key, f'expected "HOST:PORT", got {_describe(value)}')
        return self.parsed(key, parse_hostport, value, default_host=default_host, allow_zero=allow_zero)

    def parsed(self, key: str, parser: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return parser(*args, **kwargs)
        except ConfigError as exc:
            raise self.error(key, str(exc)) from None

    def tokens(self) -> tuple[bytes, ...] | None:
        found: list[bytes] = []
        token_list = self.data.get("tokens")
        if token_list is not None and not (
            isinstance(token_list, list) and all(isinstance(item, str) for item in token_list)
        ):
            raise self.error("tokens", f"expected a list of strings, got {_describe(token_list)}")
        for index, text in enumerate(token_list or ()):
            found.append(self.parsed("tokens", parse_token, text, source=f"{self.file}: {self.path}.tokens[{index}]"))
        token = self.string("token")
        if token is not None:
            found.append(self.parsed("token", parse_token, token, source=f"{self.file}: {self.path}.token"))
        token_file = self.string("token_file")
        if token_file is not None:
            found.extend(self.parsed("token_file", read_token_file, self.base_dir / Path(token_file).expanduser()))
        return _dedupe(found) if token_list is not None or token is not None or token_file is not None else None

    def timeouts(self) -> Timeouts | None:
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


def _load_section(path: str | os.PathLike[str], table: str) -> _Section:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not valid UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    file = str(path)
    top = _Section(data, "", file, Path(path).parent)
    for key in data:
        if key not in ("server", "client", "map"):
            close = difflib.get_close_matches(key, ("server", "client", "map"), n=1, cutoff=0.6)
            hint = f"did you mean [{close[0]}]?" if close else "valid tables: [server], [client], [map]"
            raise ConfigError(f"{file}: {_key_path('', key)}: unknown table; {hint}")
    section = top.sub(table)
    if section is None:
        raise ConfigError(f"{file}: no [{table}] table in this file")
    return section


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
        "timeouts": sec.timeouts(),
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
        "timeouts": sec.timeouts(),
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
