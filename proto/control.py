"""The connection's own traffic besides streams: CTRL request bookkeeping and keepalive (PING/PONG, RTT). Sans-I/O.

Both are small ledgers the connection consults; neither queues frames itself (the connection does, so its control
queue bound applies).
"""

from __future__ import annotations

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = ["Keepalive", "Requests"]


class Requests:
    """Request ids in flight both ways, each bounded by ``max_pending`` (``Limits.max_pending_requests``)."""

    def __init__(self, max_pending: int) -> None:
        self._max = max_pending
        self._next_id = 1
        self._ours: set[int] = set()
        self._theirs: set[int] = set()

    def next_id(self) -> int:
        """The id our next request would take (raises when too many of ours are unanswered)."""
        if len(self._ours) >= self._max:
            raise LocalProtocolError(f"more than {self._max} requests outstanding")
        return self._next_id

    def sent(self, req: int) -> None:
        """The request with :meth:`next_id` was queued: it now waits for its reply."""
        self._next_id += 1
        self._ours.add(req)

    def replied(self, req: int) -> None:
        """A CTRL_REPLY arrived for ``req``."""
        if req not in self._ours:
            raise RemoteProtocolError(f"CTRL_REPLY for unknown request id {req}")
        self._ours.discard(req)

    def received(self, req: int) -> None:
        """The peer sent a request that expects a reply."""
        if req in self._theirs:
            raise RemoteProtocolError(f"CTRL request id {req} is already in use")
        if len(self._theirs) >= self._max:
            raise RemoteProtocolError(f"more than {self._max} CTRL requests outstanding", ErrorCode.ENHANCE_YOUR_CALM)
        self._theirs.add(req)

    def check_answerable(self, req: int) -> None:
        if req not in self._theirs:
            raise LocalProtocolError(f"no outstanding request {req} to reply to")

    def answered(self, req: int) -> None:
        self._theirs.discard(req)

    def clear(self) -> None:
        self._ours.clear()
        self._theirs.clear()


class Keepalive:
    """PING opaque values and the smoothed RTT measured from their PONGs."""

    def __init__(self) -> None:
        self._counter = 0
        self._outstanding: int | None = None
        self._sent_at: float | None = None
        self.srtt: float | None = None

    def ping(self, now: float | None) -> int:
        """A new PING's opaque value (it replaces an unanswered one for RTT purposes)."""
        self._counter += 1
        self._outstanding = self._counter
        self._sent_at = now
        return self._counter

    def pong(self, opaque: int, now: float) -> float | None:
        """A PONG arrived; returns the RTT it measured (None: not our latest PING, or no time was given)."""
        rtt = None
        if opaque == self._outstanding:
            if self._sent_at is not None:
                rtt = max(0.0, now - self._sent_at)
                self.srtt = rtt if self.srtt is None else self.srtt / 2 + rtt / 2
            self._outstanding = None
            self._sent_at = None
        return rtt
