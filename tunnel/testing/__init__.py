"""Tunnels in a test: a real trio-tunnel server and client in the test's Trio run, with faults on the link.

::

    from trio_tunnel.testing import open_tunnel

    async with open_tunnel(service_port) as tunnel:
        stream = await trio.open_tcp_stream(*tunnel.public_address)
        tunnel.link.latency(0.05)
        tunnel.link.cut()
        await tunnel.wait_connected()

docs/TESTING.md is the guide. The pytest plugin (:mod:`trio_tunnel.testing.plugin`, registered through the
``pytest11`` entry point) adds the ``trio_tunnel`` and ``tunnel_server`` fixtures when pytest-trio is installed.

The names are loaded on first use: pytest imports this package for the plugin in every run, and a run that never
opens a tunnel should not pay for the server, the client and the TLS stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._fixtures import TunnelFactory
    from .harness import (
        TEST_TIMEOUTS,
        Local,
        Tunnel,
        TunnelCheckError,
        TunnelClient,
        TunnelServer,
        TunnelStatistics,
        open_tunnel,
        open_tunnel_server,
    )
    from .identity import Identity, throwaway_identity
    from .shaping import Link, LinkStatistics

__all__ = [
    "TEST_TIMEOUTS",
    "Identity",
    "Link",
    "LinkStatistics",
    "Local",
    "Tunnel",
    "TunnelCheckError",
    "TunnelClient",
    "TunnelFactory",
    "TunnelServer",
    "TunnelStatistics",
    "open_tunnel",
    "open_tunnel_server",
    "throwaway_identity",
]

_HOMES = {
    **dict.fromkeys(["Identity", "throwaway_identity"], "identity"),
    **dict.fromkeys(["Link", "LinkStatistics"], "shaping"),
    "TunnelFactory": "_fixtures",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOMES.get(name, 'harness')}"), name)
    globals()[name] = value
    return value
