"""Graceful shutdown, shared by every long-running command."""

from __future__ import annotations

import attrs
import trio

__all__ = ["Shutdown"]


@attrs.define(eq=False)
class Shutdown:
    """Asked for by the CLI on SIGINT/SIGTERM (or by a test).

    A run function that sees :attr:`requested` set stops accepting new work, lets work in flight finish for at most
    :attr:`drain_timeout` seconds, and returns normally.
    """

    drain_timeout: float = 10.0
    requested: trio.Event = attrs.field(factory=trio.Event)

    def request(self) -> None:
        self.requested.set()
