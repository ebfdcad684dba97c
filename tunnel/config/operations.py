"""Values of the operations features: the PROXY protocol (a client writing it to its local service, a server reading
it from trusted load balancers) and load-balancing groups of clients sharing one public port."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Final

import attrs

from .fields import Rule, describe, toml

__all__ = [
    "BALANCE",
    "BALANCES",
    "GROUP_NAME",
    "PROXY_VERSION",
    "PROXY_VERSIONS",
    "IPNetwork",
    "optional",
    "parse_networks",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROXY_VERSIONS: Final = ("v1", "v2")
BALANCES: Final = ("round-robin", "least-connections")
_GROUP_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")

PROXY_VERSION: Final = Rule(
    types=(str,),
    expected='"v1" or "v2"',
    plain="{name} must be 'v1' or 'v2', got {value!r}",
    wrong_type="{name} must be a str, got {value!r}",
    problem=lambda value: None if value in PROXY_VERSIONS else "no",
)
"""The PROXY protocol header a client writes to a local service before the first byte."""

GROUP_NAME: Final = Rule(
    types=(str,),
    expected="a group name is 1-64 characters of A-Z a-z 0-9 . _ -",
    plain="group name {value!r} must be 1-64 characters of A-Z a-z 0-9 . _ -",
    wrong_type="{name} must be a str, got {value!r}",
    problem=lambda value: None if _GROUP_RE.fullmatch(value) else "no",
)
"""A load-balancing group: clients exposing a service in the same group share its public port."""

BALANCE: Final = Rule(
    types=(str,),
    expected='"round-robin" or "least-connections"',
    plain="{name} must be 'round-robin' or 'least-connections', got {value!r}",
    wrong_type="{name} must be a str, got {value!r}",
    problem=lambda value: None if value in BALANCES else "no",
)
"""How a group's new connections are spread over its members."""


def optional(rule: Rule) -> Any:
    """An attrs field that is None (not given) or a value ``rule`` accepts; a TOML key of the field's name."""
    return attrs.field(
        default=None,
        converter=rule.converter,
        validator=attrs.validators.optional(rule.validator),
        metadata=toml(rule=rule),
    )


def parse_networks(value: object) -> tuple[IPNetwork, ...]:
    """``proxy_protocol_from``: a CIDR or address string, or a list of them (``["10.0.0.0/8", "192.0.2.7"]``)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise ValueError(f'expected a list of networks like ["10.0.0.0/8"], got {describe(value)}')
    networks: list[IPNetwork] = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip().replace("[", "").replace("]", ""), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network or address (e.g. '10.0.0.0/8', 'fd00::/8')") from None
    return tuple(networks)


def networks_key() -> dict[str, Any]:
    """Field metadata: ``proxy_protocol_from``."""
    return toml(parse=parse_networks)
