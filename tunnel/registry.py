"""The parent's registry of ``server --workers N``: which worker owns each client name, and the public ports each
client's services had last. Sans-I/O: plain data and decisions; :mod:`trio_tunnel.workers` does the asking.

Why the parent: a client's link lands on whichever worker the kernel picks (``SO_REUSEPORT`` spreads new
connections by a hash of their addresses), so a reconnecting client usually lands on another worker than its stale
predecessor. Only a single place that sees every worker can say "this name is held, ask its owner" or "this is the
201st client" (``max_clients`` counts across workers), and only it can give a reconnecting client the port-0 port
its service had (``last_ports``) wherever it lands. Public ports themselves need no registry: they are bound
without ``SO_REUSEPORT``, so the kernel already refuses a second bind of a port across the worker processes, and a
client hears ``address_in_use`` exactly as with one process.

The rule for a name is the one of :mod:`trio_tunnel.takeover`, split across processes:

* free, and fewer than ``max_clients`` names held: **grant** it to the asking worker;
* held by the asking worker: **local** (that worker judges with :func:`~trio_tunnel.takeover.judge` as it always
  did);
* held by another worker with another token: **refuse** (``NAME_IN_USE``; the digests of the tokens are compared,
  the tokens never reach the parent's memory);
* held by another worker with the same token: **ask** the owner to probe its link; a live holder keeps the name
  (refuse), a stale one is cancelled by its owner, which releases the name, and then it is granted.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

import attrs
from trio_tunnel.proto import ErrorCode

from .takeover import another_token

__all__ = ["MAX_REMEMBERED_PORTS", "Ask", "LastPorts", "Grant", "Local", "Refuse", "Registry", "token_digest"]

MAX_REMEMBERED_PORTS: Final = 4096
"""(client, service) ports remembered at most (as one server process does)."""


def token_digest(token: bytes | None) -> bytes | None:
    """What the registry compares instead of a token (None: a server without authentication)."""
    return None if token is None else hashlib.sha256(b"trio-tunnel name owner\0" + token).digest()


def _same(a: bytes | None, b: bytes | None) -> bool:
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a, b)


@attrs.frozen
class Grant:
    """The name is the asking worker's now."""


@attrs.frozen
class Local:
    """The asking worker owns the name already: it judges the takeover itself."""


@attrs.frozen
class Refuse:
    code: int
    reason: str


@attrs.frozen
class Ask:
    """Another worker owns the name (same token): ask it to probe its link and give the name up if stale."""

    owner: int


Decision = Grant | Local | Refuse | Ask


@attrs.define
class LastPorts:
    """The public port each (client, service) had last, so a service exposed on port 0 gets it again when its client
    reconnects. Bounded: past :data:`MAX_REMEMBERED_PORTS` the oldest entry is forgotten."""

    ports: dict[tuple[str, str], int] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self.ports)

    def get(self, client: str, service: str) -> int | None:
        return self.ports.get((client, service))

    def remember(self, client: str, service: str, port: int) -> None:
        """``client``'s ``service`` is on ``port`` now (the latest counts)."""
        key = (client, service)
        self.ports.pop(key, None)
        self.ports[key] = port
        while len(self.ports) > MAX_REMEMBERED_PORTS:
            del self.ports[next(iter(self.ports))]

    def learn(self, client: str, service: str, port: int) -> None:
        """What another process remembered: kept unless this one knows a port of its own for it."""
        if (client, service) not in self.ports:
            self.remember(client, service, port)

    def of(self, client: str) -> dict[str, int]:
        """Service -> the port it had last, for one client."""
        return {service: port for (who, service), port in self.ports.items() if who == client}


@attrs.define
class _Owner:
    worker: int
    token: bytes | None


@attrs.define
class Registry:
    max_clients: int
    owners: dict[str, _Owner] = attrs.field(factory=dict)
    last_ports: LastPorts = attrs.field(factory=LastPorts)

    def decide(self, name: str, worker: int, token: bytes | None) -> Decision:
        """What to do with a HELLO for ``name`` on ``worker`` (``token``: its :func:`token_digest`). A Grant is
        already recorded."""
        owner = self.owners.get(name)
        if owner is None:
            if len(self.owners) >= self.max_clients:
                return Refuse(ErrorCode.ENHANCE_YOUR_CALM, "the server has too many clients")
            self.owners[name] = _Owner(worker, token)
            return Grant()
        if owner.worker == worker:
            return Local()
        if not _same(owner.token, token):
            return Refuse(ErrorCode.NAME_IN_USE, another_token(name))
        return Ask(owner.worker)

    def hand_over(self, name: str, old: int, new: int, token: bytes | None) -> bool:
        """``old`` gave ``name`` up (its holder was stale): it is ``new``'s now. False only if the name was released
        meanwhile and ``max_clients`` other names have taken its place."""
        owner = self.owners.get(name)
        if owner is None and len(self.owners) >= self.max_clients:
            return False
        if owner is None or owner.worker == old:
            self.owners[name] = _Owner(new, token)
            return True
        return owner.worker == new

    def release(self, name: str, worker: int) -> bool:
        """``worker``'s link for ``name`` ended. False if ``worker`` did not own it (already handed over)."""
        owner = self.owners.get(name)
        if owner is None or owner.worker != worker:
            return False
        del self.owners[name]
        return True

    def forget_worker(self, worker: int) -> list[str]:
        """``worker`` died: every name it owned is free again (the names, for the log)."""
        gone = [name for name, owner in self.owners.items() if owner.worker == worker]
        for name in gone:
            del self.owners[name]
        return gone

    def held_by(self, worker: int) -> int:
        return sum(1 for owner in self.owners.values() if owner.worker == worker)

    def remember(self, client: str, service: str, port: int) -> None:
        """``client``'s ``service`` is on ``port`` now (a reconnect gets it again if it asks for port 0)."""
        self.last_ports.remember(client, service, port)

    def ports_of(self, client: str) -> dict[str, int]:
        """Service -> the port it had last, for one client."""
        return self.last_ports.of(client)
