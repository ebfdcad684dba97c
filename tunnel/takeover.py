"""Who gets a client name when a second session arrives with it.

Why: takeover exists for one case, the same client reconnecting while the server still holds its old, stale link
(a laptop that changed networks, a NAT that forgot the mapping: the server learns of it only at the keepalive
timeout). It used to be unconditional, so a second client with the same ``--name`` (a copied config, a second
machine) killed the first for good, taking its ports with it. Now:

* a name is bound to the token that registered it: a client with another token never takes it over;
* the holder is probed (a PING, ``takeover_probe`` seconds to show any sign of life): a live holder keeps the name
  and the newcomer is refused with ``NAME_IN_USE`` (it retries with backoff, and gets the name once the holder is
  really gone); a holder that does not answer, or is going away, is stale and is replaced as before.
"""

from __future__ import annotations

import hmac
from typing import Final

import attrs
import trio

from .errors import SessionClosedError
from .mux import Session

__all__ = ["Verdict", "another_token", "judge", "live_holder"]


@attrs.frozen
class Verdict:
    """The outcome for a newcomer: ``take`` over, or be refused with ``reason`` (NAME_IN_USE)."""

    take: bool
    reason: str = ""


TAKE: Final = Verdict(True)


def same_token(a: bytes | None, b: bytes | None) -> bool:
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a, b)


async def holder_answers(holder: Session, probe_timeout: float) -> bool:
    """True if the holder's session shows a sign of life within ``probe_timeout`` (and is not going away)."""
    if holder.closed or holder.going_away:
        return False
    with trio.move_on_after(probe_timeout):
        try:
            await holder.probe()
        except SessionClosedError:
            return False
        return not holder.going_away
    return False


def another_token(name: str) -> str:
    """Why a newcomer with another token than the holder's is refused."""
    return f"the name {name!r} is in use by a client with another token; client names must be unique (--name)"


def live_holder(name: str, holder_peer: str) -> str:
    """Why a newcomer is refused while the holder answers."""
    return (
        f"the name {name!r} is in use by a live client connected from {holder_peer}; client names must be "
        "unique (--name). Retrying: this client gets the name once the other one is gone"
    )


async def judge(name: str, holder: Session, holder_peer: str, newcomer: Session, probe_timeout: float) -> Verdict:
    """May ``newcomer`` take ``name`` from ``holder`` (connected from ``holder_peer``)?"""
    if not same_token(holder.peer_token, newcomer.peer_token):
        return Verdict(False, another_token(name))
    if await holder_answers(holder, probe_timeout):
        return Verdict(False, live_holder(name, holder_peer))
    return TAKE
