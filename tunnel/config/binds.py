"""Which addresses a server binds for its clients' ``-R`` services (``--allow-bind``), and the client's warning
about a bind address that looks like a service name.

Without a rule a client could make the server resolve any host name it sends (``-R web:29002:127.0.0.1:80``, a
colon where ``=`` was meant, has the server look up ``web``) or listen on an address its operator never meant to
expose. The default therefore allows only what a server obviously offers: the wildcard addresses (``0.0.0.0``,
``::``; a client's default is ``0.0.0.0``) and the address the server itself listens on for links. ``*`` allows any
address, names included (resolved by the server, as before this rule existed).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any, Final, Self, final

import attrs
from trio_tunnel.console import format_hostport
from trio_tunnel.errors import ConfigError

from .addresses import RemoteSpec, _host_problem
from .fields import describe, to_tuple, toml

__all__ = [
    "ANY_BIND",
    "BIND_KEY",
    "WILDCARDS",
    "BindAllowlist",
    "bind_name_warnings",
    "bind_refusal",
    "looks_like_service_name",
]

ANY_BIND: Final = "*"
WILDCARDS: Final = ("0.0.0.0", "::")
"""The addresses that mean "every interface" (IPv4, IPv6)."""


def normalize_bind(host: str) -> str:
    """The form two spellings of one bind address share: IP literals compressed (``0:0::0`` is ``::``), names
    lower-case without a trailing dot; brackets around an IPv6 literal are dropped."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


@final
@attrs.frozen(kw_only=True)
class BindAllowlist:
    """The bind addresses clients may ask for (``--allow-bind``). Empty ``hosts`` and not ``any``: the default,
    resolved by :meth:`effective` against the server's listening address."""

    hosts: tuple[str, ...] = attrs.field(default=(), converter=to_tuple)
    """Allowed addresses, normalized (:func:`normalize_bind`)."""
    any: bool = False
    """``*``: any address or name."""

    @classmethod
    def parse(cls, spec: str | Iterable[str]) -> Self:
        """Parse ``"0.0.0.0,192.0.2.7,[::1]"`` (or a list of such strings); ``*`` allows any.

        Raises:
            ConfigError: an empty entry or one that is not an IP address or host name.
        """
        items = [spec] if isinstance(spec, str) else list(spec)
        hosts: list[str] = []
        allow_any = False
        for entry in items:
            for item in entry.split(","):
                item = item.strip()
                if not item:
                    raise ConfigError(f"invalid bind address list {entry!r}: empty entry (a stray comma?)")
                if item == ANY_BIND:
                    allow_any = True
                    continue
                host = normalize_bind(item)
                problem = _host_problem(host)
                if problem:
                    raise ConfigError(f"invalid bind address {item!r}: {problem} (or '*' for any)")
                if host not in hosts:
                    hosts.append(host)
        if not hosts and not allow_any:
            raise ConfigError("the bind address list is empty")
        return cls(hosts=hosts, any=allow_any)

    def effective(self, listen_host: str) -> BindAllowlist:
        """This list, or for the default the wildcards and the server's own listening address."""
        if self.hosts or self.any:
            return self
        hosts = list(WILDCARDS)
        own = normalize_bind(listen_host)
        if own not in hosts:
            hosts.append(own)
        return BindAllowlist(hosts=hosts)

    def allows(self, host: str) -> bool:
        """True when a client may ask for ``host`` (as it wrote it; never resolved here)."""
        return self.any or normalize_bind(host) in self.hosts

    def __str__(self) -> str:
        if self.any:
            return ANY_BIND
        return ",".join(f"[{h}]" if ":" in h else h for h in self.hosts) if self.hosts else "(default)"


def bind_refusal(host: str, allowed: BindAllowlist) -> str:
    """The server's readable refusal of a bind address, naming the flag that would allow it."""
    return (
        f"bind address {host!r} is not allowed by the server (it allows {allowed}); ask its operator to add it "
        f"with --allow-bind, or leave the bind address out"
    )


def _toml_bind(value: object) -> BindAllowlist:
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and value and all(isinstance(item, str) for item in value)):
        raise ValueError(f'expected a string like "0.0.0.0,192.0.2.7" or a list of strings, got {describe(value)}')
    return BindAllowlist.parse(value)


BIND_KEY: Final[Any] = toml(name="allow_bind", parse=_toml_bind)
"""Field metadata: ``allow_bind = "0.0.0.0,192.0.2.7"``, ``"*"`` or a list of such strings."""


def looks_like_service_name(host: str) -> bool:
    """A bind address that is neither an IP literal nor ``localhost`` and has no dot: most likely a service name
    written with ':' where '=' was meant (``-R web:29002:127.0.0.1:80``)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return False
    return "." not in host and host.lower() != "localhost"


def bind_name_warnings(remotes: Sequence[RemoteSpec]) -> list[str]:
    """One warning per ``-R`` whose bind address looks like a service name, with the spelling that was likely
    meant."""
    warnings = []
    for spec in remotes:
        if looks_like_service_name(spec.bind_host):
            written = f"{format_hostport(spec.bind_host, spec.bind_port)}:{spec.target}"
            meant = f"{spec.bind_host}={spec.bind_port}:{spec.target}"
            warnings.append(
                f"-R {written}: the bind address {spec.bind_host!r} looks like a service name; the server would "
                f"listen on the address that name resolves to (if it allows it at all). For a service named "
                f"{spec.bind_host!r} write -R {meant}"
            )
    return warnings
