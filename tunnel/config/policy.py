"""Server policy: the ports clients may expose and the targets they may make the server dial."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from typing import Any, Final, Self, final

import attrs
from trio_tunnel.errors import ConfigError

from .addresses import _host_problem, _parse_port, split_protocol
from .fields import REAL_PORT, describe, to_tuple, toml

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    udp_ranges: tuple[tuple[int, int], ...] = attrs.field(default=(), converter=_merge_ranges, validator=_check_ranges)
    """UDP ports (entries written ``53/udp``); none by default, so nobody's UDP is opened by surprise. The other
    methods are about TCP; :attr:`udp` is the UDP set as a PortSet of its own."""

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
        tcp: list[tuple[int, int]] = []
        udp: list[tuple[int, int]] = []
        for item in items:
            ports, protocol = split_protocol(item)
            (udp if protocol == "udp" else tcp).append(_parse_port_range(ports, where=where, for_targets=False))
        return cls(ranges=tcp, udp_ranges=udp)

    @property
    def udp(self) -> PortSet:
        """The UDP ports, as a set of their own (its ``ranges``)."""
        return PortSet(ranges=self.udp_ranges)

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
        tcp = [str(low) if low == high else f"{low}-{high}" for low, high in self.ranges]
        udp = [(str(low) if low == high else f"{low}-{high}") + "/udp" for low, high in self.udp_ranges]
        return ",".join(tcp + udp)


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
    port_low: int = REAL_PORT.field()
    port_high: int = REAL_PORT.field()
    protocol: str = "tcp"
    """``udp`` for a rule written ``HOST:PORTS/udp``; a bare rule allows TCP only."""

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
        text, protocol = split_protocol(text)
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
        return cls(network=network, hostname=hostname, port_low=port_low, port_high=port_high, protocol=protocol)

    def matches(self, host: str, port: int, protocol: str = "tcp") -> bool:
        """See :meth:`TargetAllowlist.allows`."""
        if protocol != self.protocol or not self.port_low <= port <= self.port_high:
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
        if self.protocol == "udp":
            ports += "/udp"
        if self.network is not None:
            net = self.network
            host = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
            return f"[{host}]:{ports}" if net.version == 6 else f"{host}:{ports}"
        return f"{self.hostname}:{ports}"


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

    rules: tuple[TargetRule, ...] = attrs.field(default=(), converter=to_tuple)

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

    def allows(self, host: str, port: int, protocol: str = "tcp") -> bool:
        """True when some rule allows dialling ``host:port`` over ``protocol`` (host as the client wrote it; a rule
        without ``/udp`` allows TCP only)."""
        return any(rule.matches(host, port, protocol) for rule in self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __str__(self) -> str:
        return ",".join(str(rule) for rule in self.rules) if self.rules else "(none)"


def _toml_ports(value: Any) -> PortSet:
    if isinstance(value, bool) or not isinstance(value, str | int | list):
        raise ValueError(f'expected a string like "8000-8999,2222", got {describe(value)}')
    return PortSet.parse([value] if isinstance(value, int) else value)


def _toml_targets(value: object) -> TargetAllowlist:
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        raise ValueError(f"expected a string or a list of strings, got {describe(value)}")
    return TargetAllowlist.parse(value)


PORTS_KEY: Final = toml(parse=_toml_ports)
"""Field metadata: ``allow_ports = "8000-8999,2222"`` (or a port number, or a list of both)."""

TARGETS_KEY: Final = toml(parse=_toml_targets)
"""Field metadata: ``allow_targets = "10.0.0.0/8:22"`` or a list of such strings."""
