"""Host names, ports, ``HOST:PORT`` addresses and the ``-R``/``-L`` service specs."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any, ClassVar, Final, Self, TypeVar, final

import attrs
from trio_tunnel.console import format_hostport
from trio_tunnel.errors import ConfigError

from .fields import ANY_PORT, REAL_PORT, SECONDS, Rule, describe, seconds, toml
from .operations import BALANCE, GROUP_NAME, PROXY_VERSION, optional

DEFAULT_SERVER_PORT: Final = 7835
"""The server's default listening port."""

MAX_SERVICE_NAME_LENGTH: Final = 128
"""Longest service name (an -R/-L ``NAME``); it travels as a stream route (at most 255 bytes)."""

_REMOTE_SYNTAX: Final = "[NAME=][bind_address:]port:host:hostport[/udp], e.g. 'web=9000:127.0.0.1:80'"
_LOCAL_SYNTAX: Final = "[NAME=][bind_address:]port:host:hostport[/udp], e.g. 'db=15432:db.internal:5432'"
_HOSTPORT_SYNTAX: Final = "HOST:PORT, [IPv6]:PORT or PORT, e.g. '127.0.0.1:8080'"

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE: Final = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_SERVICE_NAME_RE: Final = re.compile(rf"[A-Za-z0-9._:\[\]-]{{1,{MAX_SERVICE_NAME_LENGTH}}}")


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


HOST: Final = Rule(
    types=(str,),
    expected="a host name or IP address",
    plain="{name}: {problem}",
    wrong_type="{name} must be a str, got {value!r}",
    file="{problem}",
    file_wrong_type="expected a string, got {got}",
    problem=_host_problem,
)
"""A host name or IP literal (IPv6 without brackets)."""


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

    host: str = HOST.field()
    port: int = ANY_PORT.field()

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)

    @classmethod
    def parse(cls, text: str, *, default_host: str = "127.0.0.1", allow_zero: bool = True) -> Self:
        """Same as :func:`parse_hostport`."""
        hp = parse_hostport(text, default_host=default_host, allow_zero=allow_zero)
        return cls(host=hp.host, port=hp.port)


def parse_hostport(
    text: str, *, default_host: str = "127.0.0.1", allow_zero: bool = True, default_port: int | None = None
) -> HostPort:
    """Parse ``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` (the last two use ``default_host``); with a
    ``default_port``, also ``HOST`` and ``[IPv6]`` alone.

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
            if not rest and default_port is not None:
                port_text = str(default_port)
            elif not rest.startswith(":"):
                raise ValueError("expected ':PORT' after ']'")
            else:
                port_text = rest[1:]
        elif text.count(":") > 1:
            raise ValueError("an IPv6 address must be written in brackets, e.g. '[::1]:8080'")
        elif ":" in text:
            host, port_text = text.rsplit(":", 1)
            host = host or default_host
        elif _PORT_RE.fullmatch(text) or not text:
            host, port_text = default_host, text
        elif default_port is not None:
            host, port_text = text, str(default_port)
        else:
            raise ValueError("missing ':PORT'")
        problem = _host_problem(host)
        if problem:
            raise ValueError(problem)
        port = _parse_port(port_text, allow_zero=allow_zero)
    except ValueError as exc:
        raise ConfigError(f"invalid address {text!r}: {exc} (syntax: {_HOSTPORT_SYNTAX})") from None
    return HostPort(host=host, port=port)


def hostport_key(
    *,
    default_host: str,
    allow_zero: bool,
    name: str | None = None,
    spread: tuple[str, str] | None = None,
    default_port: int | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Field metadata: a ``"HOST:PORT"`` (or bare port number) TOML key, parsed as :func:`parse_hostport` does."""

    def parse(value: object) -> HostPort:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f'expected "HOST:PORT", got {describe(value)}')
        return parse_hostport(value, default_host=default_host, allow_zero=allow_zero, default_port=default_port)

    return toml(name=name, parse=parse, spread=spread, **kw)


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


SERVICE_NAME: Final = Rule(
    types=(str,),
    expected=f"1-{MAX_SERVICE_NAME_LENGTH} characters of A-Z a-z 0-9 . _ - : [ ]",
    plain="service name {value!r} must be {expected}",
    wrong_type="name must be a str, got {value!r}",
    problem=lambda name: None if _SERVICE_NAME_RE.fullmatch(name) else "no",
)
"""An -R/-L service name (the ``NAME=`` prefix, or the table name in ``[client.expose.NAME]``)."""


PROTOCOL: Final = Rule(
    types=(str,),
    expected='"tcp" or "udp"',
    plain='{name} must be "tcp" or "udp", got {value!r}',
    wrong_type='{name} must be "tcp" or "udp", got {value!r}',
    problem=lambda value: None if value in ("tcp", "udp") else "no",
)
"""What a service carries: TCP connections (the default) or UDP datagrams (a ``/udp`` suffix on a spec)."""

UDP_IDLE_DEFAULT: Final = 60.0
"""Seconds a UDP flow lives without a datagram either way (``idle_timeout``)."""


def _idle_field() -> Any:
    """An attrs field: seconds or None; by default 60 for a UDP service, None (no idle timeout) for a TCP one."""
    return attrs.field(
        default=attrs.Factory(lambda self: UDP_IDLE_DEFAULT if self.protocol == "udp" else None, takes_self=True),
        converter=SECONDS.converter,
        validator=attrs.validators.optional(SECONDS.validator),
        metadata=toml(rule=SECONDS),
    )


def split_protocol(text: str) -> tuple[str, str]:
    """``"53/udp"`` -> ``("53", "udp")``; without a suffix (or with ``/tcp``) the protocol is TCP."""
    stripped = text.strip()
    lowered = stripped.lower()
    for protocol in ("udp", "tcp"):
        if lowered.endswith("/" + protocol):
            return stripped[: -len(protocol) - 1], protocol
    return stripped, "tcp"


def _parse_forward(text: str, *, default_bind: str, syntax: str, kind: str) -> dict[str, Any]:
    original = text
    try:
        name: str | None = None
        group: str | None = None
        if "=" in text:
            name, text = text.split("=", 1)
            if kind == "-R" and "@" in name:  # NAME@GROUP= (a load-balancing group); @GROUP= keeps the default name
                name, group = name.split("@", 1)
                GROUP_NAME.check(group, name="group")
                name = name or None
            if name is not None:
                SERVICE_NAME.check(name, name="name")
        text, protocol = split_protocol(text)
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
    if protocol == "udp":
        fields_out["protocol"] = protocol
    if group is not None:
        fields_out["group"] = group
    return fields_out


_Spec = TypeVar("_Spec", bound="_ForwardSpec")


def _default_service_name(spec: _ForwardSpec) -> str:
    name = format_hostport(spec.target_host, spec.target_port)
    return f"{name}-udp" if spec.protocol == "udp" else name


def _name_field() -> Any:
    return SERVICE_NAME.field(default=attrs.Factory(_default_service_name, takes_self=True))


class _ForwardSpec:
    """Shared behaviour of :class:`RemoteSpec` and :class:`LocalSpec`.

    The attrs fields are declared on each class, one line each, because their defaults, documentation and TOML keys
    differ (``[client.expose.NAME]`` has ``local``/``remote_port``/``bind``, ``[client.forward.NAME]`` has
    ``listen``/``target``); the checks are the shared rules.
    """

    __slots__ = ()
    FLAG: ClassVar[str]
    DEFAULT_BIND: ClassVar[str]
    SYNTAX: ClassVar[str]
    name: str
    bind_host: str
    bind_port: int
    target_host: str
    target_port: int
    protocol: str
    idle_timeout: float | None

    @classmethod
    def parse(cls, text: str, **extra: Any) -> Self:
        """Parse ``[NAME=][bind_address:]port:host:hostport`` (ssh ``-R``/``-L`` syntax plus an optional name; ``-R``
        also takes ``NAME@GROUP=``). ``extra`` fields are added (``proxy_protocol`` from ``--proxy-protocol``).

        Raises:
            ConfigError: the message shows ``text``, what is wrong, and the syntax with an example.
        """
        fields = _parse_forward(text, default_bind=cls.DEFAULT_BIND, syntax=cls.SYNTAX, kind=cls.FLAG)
        try:
            return cls(**fields, **extra)
        except ValueError as exc:
            raise ConfigError(f"invalid {cls.FLAG} spec {text!r}: {exc}") from None

    @classmethod
    def check_unique(cls, specs: Sequence[_ForwardSpec]) -> None:
        """Raise ValueError when two specs share a name, or a fixed listening address."""
        names: set[str] = set()
        binds: dict[tuple[str, int, str], str | None] = {}
        for spec in specs:
            if spec.name in names:
                raise ValueError(
                    f"two {cls.FLAG} services are named {spec.name!r}; give them distinct names with the NAME= prefix"
                )
            names.add(spec.name)
            group = getattr(spec, "group", None)  # services of one group share their port
            key = (spec.bind_host, spec.bind_port, spec.protocol)
            if spec.bind_port and key in binds and (group is None or binds[key] != group):
                raise ValueError(f"two {cls.FLAG} services listen on {spec.bind}{spec.suffix}")
            binds[key] = group

    @classmethod
    def merge(cls, from_file: Sequence[_Spec], from_flags: Sequence[_Spec]) -> tuple[_Spec, ...]:
        """The file's specs with the flags' added; a flag spec replaces the file's spec of the same name in place."""
        try:
            cls.check_unique(from_flags)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        by_flag: dict[str, _Spec] = {spec.name: spec for spec in from_flags}
        merged: list[_Spec] = [by_flag.pop(spec.name, spec) for spec in from_file]
        merged.extend(by_flag.values())
        return tuple(merged)

    @property
    def bind(self) -> HostPort:
        """Where the listener goes (port 0 = any free port)."""
        return HostPort(host=self.bind_host, port=self.bind_port)

    @property
    def target(self) -> HostPort:
        """What each accepted connection is connected to."""
        return HostPort(host=self.target_host, port=self.target_port)

    @property
    def suffix(self) -> str:
        """``/udp`` for a UDP service, else empty: how lifecycle lines and messages mark UDP."""
        return "/udp" if self.protocol == "udp" else ""

    def __str__(self) -> str:
        bind = format_hostport(self.bind_host, self.bind_port)
        return f"{self.name}={bind}:{format_hostport(self.target_host, self.target_port)}{self.suffix}"


@final
@attrs.frozen(kw_only=True)
class RemoteSpec(_ForwardSpec):
    """One ``-R`` service (``[client.expose.NAME]``): the *server* listens on ``bind_host:bind_port`` and each
    connection is carried to the client, which dials ``target_host:target_port`` (its local service)."""

    FLAG = "-R"
    DEFAULT_BIND = "0.0.0.0"
    SYNTAX = _REMOTE_SYNTAX

    target_host: str = HOST.field(
        metadata=hostport_key(
            name="local",
            default_host="127.0.0.1",
            allow_zero=False,
            spread=("target_host", "target_port"),
            missing='the local service, e.g. local = "127.0.0.1:80"',
        )
    )
    """The client-side service; TOML ``local = "HOST:PORT"`` (or a port, then 127.0.0.1)."""
    target_port: int = REAL_PORT.field()
    bind_port: int = ANY_PORT.field(
        metadata=toml(name="remote_port", rule=ANY_PORT, missing="the port on the server (0 = the server picks one)")
    )
    """Server-side port; 0 = the server picks a free port within its allowed ports."""
    bind_host: str = HOST.field(default="0.0.0.0", metadata=toml(name="bind", rule=HOST))
    """Server-side listening address; default all IPv4 interfaces."""
    protocol: str = PROTOCOL.field(default="tcp", metadata=toml(rule=PROTOCOL))
    """``"udp"``: a UDP service (``-R ...:53/udp``); each flow is one stream on the link."""
    idle_timeout: float | None = _idle_field()
    """UDP: a flow ends after this many seconds without a datagram either way (default 60). TCP: a visitor's
    connection is closed after this many seconds without a byte either way (default None: never,
    :mod:`trio_tunnel.idle`)."""
    name: str = _name_field()
    """The service's name (``exposed NAME HOST:PORT``); default ``target_host:target_port`` (``-udp`` appended for
    a UDP service)."""
    proxy_protocol: str | None = optional(PROXY_VERSION)
    """``"v1"``/``"v2"``: the client writes a PROXY protocol header with the external user's address to the local
    service before the first byte; None: no header."""
    group: str | None = optional(GROUP_NAME)
    """A load-balancing group: clients exposing a service in the same group (with the same token) share one public
    port, and the server spreads new connections over them (``-R NAME@GROUP=...``)."""
    balance: str = BALANCE.field(default="round-robin", metadata=toml(rule=BALANCE))
    """How the group spreads connections: ``round-robin`` or ``least-connections``."""

    def __attrs_post_init__(self) -> None:
        if self.balance != "round-robin" and self.group is None:
            raise ValueError(f'balance {self.balance!r} needs a group (group = "NAME", or -R NAME@GROUP=...)')

    def __str__(self) -> str:
        text = super().__str__()
        return text.replace("=", f"@{self.group}=", 1) if self.group else text


@final
@attrs.frozen(kw_only=True)
class LocalSpec(_ForwardSpec):
    """One ``-L`` forward (``[client.forward.NAME]``): the *client* listens on ``bind_host:bind_port`` and each
    connection is carried to the server, which dials ``target_host:target_port`` if its ``allow_targets`` permit."""

    FLAG = "-L"
    DEFAULT_BIND = "127.0.0.1"
    SYNTAX = _LOCAL_SYNTAX

    bind_host: str = HOST.field(
        default="127.0.0.1",
        metadata=hostport_key(
            name="listen",
            default_host="127.0.0.1",
            allow_zero=True,
            spread=("bind_host", "bind_port"),
            missing='where the client listens, e.g. listen = "127.0.0.1:15432"',
        ),
    )
    """Client-side listening address; default loopback only."""
    bind_port: int = ANY_PORT.field()
    """Client-side port; 0 = any free port (the bound port is announced in ``forwarding NAME HOST:PORT``)."""
    target_host: str = HOST.field(
        metadata=hostport_key(
            name="target",
            default_host="127.0.0.1",
            allow_zero=False,
            spread=("target_host", "target_port"),
            missing='what the server dials, e.g. target = "db.internal:5432"',
        )
    )
    target_port: int = REAL_PORT.field()
    protocol: str = PROTOCOL.field(default="tcp", metadata=toml(rule=PROTOCOL))
    """``"udp"``: a UDP forward (``-L ...:53/udp``); each flow is one stream on the link."""
    idle_timeout: float = seconds(UDP_IDLE_DEFAULT)
    """UDP only: a flow ends after this many seconds without a datagram either way."""
    name: str = _name_field()
    """The forward's name (``forwarding NAME HOST:PORT``); default ``target_host:target_port`` (``-udp`` appended
    for a UDP forward)."""
