"""Sink: the one synchronous write the multiplexer may make without owning the waiting (see ``mux.py``'s theory of
operation, "One scheduler pass per hop").

A byte crossing a hop used to need two Trio scheduler passes: the task that read it woke the task that writes,
and that task wrote in the next pass. A :class:`Sink` lets the reading task write the bytes itself, at once, when
the destination has no backlog: ``send_nowait`` never waits and never raises; whatever it does not take stays
with the caller, who hands it to the task that owns the waiting (the session's writer, a splice's copy task).

Implemented by :class:`~trio_tunnel.tcp.TcpStream` (``sendmsg``) and :class:`~trio_tunnel.tls.TlsStream`
(``SSL_write`` into memory, then ``send``). The multiplexer calls it on its link (the session's transport) and,
through a splice, on a local socket a stream's bytes are bound for; it never touches a socket otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["Sink"]


class Sink(Protocol):
    """A byte stream that can take bytes synchronously, without waiting (a non-blocking send)."""

    def send_nowait(self, parts: Sequence[bytes | memoryview]) -> int:
        """Take as much of ``b"".join(parts)`` as can go now; return how many bytes were taken, in order.

        0 when nothing can go now: the socket would block, another task is sending, the stream was half-closed,
        closed or broke (never an exception: the owner's next awaited ``send_all`` reports the error). The parts
        are ``bytes`` or byte views; they are not kept (a sink that must keep bytes copies them).
        """
        ...

    @property
    def holds_unsent(self) -> bool:
        """True while bytes that ``send_nowait`` took are not on the wire yet (encrypted TLS records queued):
        the next ``send_all`` finishes them before anything else, so whoever owns the waiting must call it."""
        ...
