"""The session memory budget: how much stream data one connection may make us hold, both ways. Sans-I/O.

Receive side (:class:`ReceivePool`). HTTP/2 bounds a connection's receive memory with a connection window on the
wire, and gets head-of-line blocking with it: bytes sent on a stream whose reader stalls keep the connection
window spent, and once a few stalled streams have spent it, every other stream stops too (golang/go#16510). We bound
the same sum without a session window on the wire, by what the receiver grants:

* every stream always keeps a *floor* window, the declared ``initial_window``: nothing another stream does can
  take it away, so every stream whose reader reads keeps moving, however many others are stalled;
* the window a stream is granted above the floor comes out of a pool of ``session_window`` bytes, and each grant is
  at most a fair share of it (``session_window / streams``) and at most what the others leave free. A stream that
  stops reading keeps only what it was granted last, a share, and its peer feels the backpressure on that stream
  alone.

So the bytes a peer may have in flight towards us, or sitting unread, are at most ``streams * initial_window +
session_window``, and a single busy stream still gets a full window (its share is the whole pool). The peer sees
only WINDOW limits that grow less: nothing changes on the wire, and a version-2 peer interoperates unchanged.

Send side (:class:`StreamTable.send_credit <.streams.StreamTable.send_credit>`): the bytes queued for sending,
summed over streams, stay below ``session_send_buffer``; the queue drains at the link's pace whatever the peer's
readers do (bytes are only queued within the peer's credit), so a cap there cannot block one stream behind another's
reader either. Writers that found the session cap full are woken together once the queue is half drained.
"""

from __future__ import annotations

import attrs

from .stream import StreamRecord

__all__ = ["ReceivePool"]


@attrs.define
class ReceivePool:
    """The receive windows granted above the floor, summed over a connection's streams, kept within ``size``.

    ``held`` is the sum of each stream's ``pool_held``: the part of its outstanding grant (limit minus consumed)
    above ``floor``. It shrinks as the application consumes and grows only through :meth:`grant`.
    """

    floor: int
    size: int
    held: int = 0

    def grant(self, stream: StreamRecord, target: int, streams: int) -> int:
        """The window to grant ``stream`` now (its limit becomes consumed + this), for a wanted ``target``."""
        floor = self.floor
        if target <= floor:
            return target
        free = self.size - (self.held - stream.pool_held)
        extra = min(target - floor, self.size // max(streams, 1), free)
        return floor + max(extra, 0)

    def update(self, stream: StreamRecord, receiving: bool) -> None:
        """Recount ``stream``'s part after its limit or its consumption changed (or its peer stopped sending)."""
        limit = stream.recv_limit if receiving else stream.received
        part = max(0, limit - stream.consumed - self.floor)
        self.held += part - stream.pool_held
        stream.pool_held = part

    def release(self, stream: StreamRecord) -> None:
        """The stream left the table: its part returns to the pool."""
        self.held -= stream.pool_held
        stream.pool_held = 0
