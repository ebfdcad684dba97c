"""What a server process asks of the parent when it is one worker of ``server --workers N`` (tunnel/workers.py).

The narrow interface the server calls at three points (claim a name before judging a takeover, release it when the
link ends, remember a service's public port) so that :mod:`trio_tunnel.server` stays one process's code: with one
worker (the default) there is no coordinator and nothing here runs.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

__all__ = ["Claim", "Coordinator"]


@attrs.frozen
class Claim:
    """The parent's answer to "may this link have this name": ``code``/``reason`` when refused (go away with them);
    else the ports the client's services had last, wherever its previous link was."""

    code: int = 0
    reason: str = ""
    ports: dict[str, int] = attrs.field(factory=dict)
    local: bool = False
    """This worker owns the name already: it judges a takeover itself (:func:`~trio_tunnel.takeover.judge`)."""

    @property
    def refused(self) -> bool:
        return bool(self.reason)


class Coordinator(Protocol):
    def attach(self, server: Any) -> None:
        """The server is made: the coordinator answers the parent's requests with it."""

    async def claim(self, name: str, token: bytes | None, peer: str) -> Claim:
        """Before a new link takes ``name``: may it (across workers)?"""

    def release(self, name: str) -> None:
        """This worker's link for ``name`` ended, and no other link of this worker holds it."""

    def remember(self, client: str, service: str, port: int) -> None:
        """``client``'s ``service`` is bound to ``port``."""
