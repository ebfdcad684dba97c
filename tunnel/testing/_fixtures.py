"""The plugin's fixtures (imported by :mod:`.plugin` only when pytest-trio is there to run them).

Both are function-scoped Trio fixtures: pytest-trio runs each in a task of its own that lives as long as the test,
so a tunnel opened from the test (``await trio_tunnel(port)``) is started *in the fixture's nursery*, not the
test's, and outlives nothing it should not. A tunnel's failure while the test runs (an end raised) cancels the
test with that error; a failed check on leaving (:class:`~trio_tunnel.testing.TunnelCheckError`) fails the test
too (pytest-trio runs the teardown of Trio fixtures inside the test's Trio run).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import pytest
import trio

if TYPE_CHECKING:
    from .harness import Local, Tunnel, TunnelServer

__all__ = ["TunnelFactory", "trio_tunnel", "tunnel_server"]


class TunnelFactory(Protocol):
    """What the ``trio_tunnel`` fixture is: :func:`~trio_tunnel.testing.open_tunnel`'s arguments, awaited."""

    async def __call__(self, local: Local, *, name: str = "test", tls: bool = True, **options: Any) -> Tunnel: ...


@pytest.fixture
async def trio_tunnel() -> AsyncIterator[TunnelFactory]:
    """A factory of tunnels: ``tunnel = await trio_tunnel(local_port, **options)`` (see ``open_tunnel``). Every
    tunnel it opened is closed and checked when the test ends."""
    from .harness import _one_error, open_tunnel

    done = trio.Event()

    async def run(
        local: Local, name: str, tls: bool, options: dict[str, Any], *, task_status: trio.TaskStatus[Tunnel]
    ) -> None:
        async with open_tunnel(local, name=name, tls=tls, **options) as tunnel:
            task_status.started(tunnel)
            await done.wait()

    async with _one_error() as nursery:

        async def factory(local: Local, *, name: str = "test", tls: bool = True, **options: Any) -> Tunnel:
            tunnel: Tunnel = await nursery.start(run, local, name, tls, options)
            return tunnel

        yield factory
        done.set()


@pytest.fixture
async def tunnel_server() -> AsyncIterator[TunnelServer]:
    """A server on 127.0.0.1 for the test's own clients: ``run_client(tunnel_server.client_config("-R spec"),
    ...)`` or the CLI with ``tunnel_server.client_args()``. Stopped and checked when the test ends."""
    from .harness import open_tunnel_server

    async with open_tunnel_server() as server:
        yield server
