"""Datagrams inside a stream, sans-I/O: the framing of a UDP flow's stream, its bounded queue, and the admission of
new flows (per-service cap, shared per-client budget, open rate, one log line per burst of refusals).

A UDP flow (one external source address and port on one exposed port) is one ordinary stream on the link; its OPEN
meta carries ``dgram: true``. The stream's bytes, in each direction, are a sequence of datagrams, each written as

    len:u16 (big-endian)  payload (len bytes)

so boundaries survive however the scheduler cuts the bytes into DATA frames (docs/PROTOCOL.md, section 17). The
protocol itself is unchanged (version 2): only the two ends of a flow read the framing, and a peer that does not
know it never sees such a stream (it refuses the route or request kind first).

Nothing here imports trio, sockets or a clock: time comes in as a number.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from typing import Final

import attrs

from .flow import TokenBucket
from .limits import RateLimit

__all__ = [
    "DGRAM_META",
    "HEADER_SIZE",
    "IDLE_META",
    "MAX_DATAGRAM",
    "Admission",
    "BurstLog",
    "DatagramDecoder",
    "DatagramError",
    "DatagramQueue",
    "FlowBudget",
    "FlowGate",
    "encode_datagram",
    "max_datagram",
]

HEADER_SIZE: Final = 2
"""The length prefix of each datagram."""
MAX_DATAGRAM: Final = 0xFFFF
"""Largest datagram the prefix can describe (a UDP payload over IPv4 is at most 65 507 bytes)."""
DGRAM_META: Final = "dgram"
"""OPEN meta key: ``true`` marks a datagram stream (its bytes are length-prefixed datagrams)."""
IDLE_META: Final = "idle_ms"
"""OPEN meta key: the flow's idle timeout in milliseconds, so both ends expire it alike."""

_PREFIX: Final = struct.Struct("!H")


class DatagramError(ValueError):
    """The peer broke the datagram framing (a length above what we accept, or a datagram cut by the stream's end)."""


def max_datagram(frame_limit: int) -> int:
    """The largest datagram a flow carries over a link whose receiver accepts DATA payloads of ``frame_limit``
    bytes: a datagram and its prefix always fit one frame. Larger ones are dropped (and counted) at the sender."""
    return max(0, min(MAX_DATAGRAM, frame_limit - HEADER_SIZE))


def encode_datagram(payload: bytes | bytearray | memoryview) -> bytes:
    """``payload`` with its length prefix. Raises ValueError above :data:`MAX_DATAGRAM`."""
    size = len(payload)
    if size > MAX_DATAGRAM:
        raise ValueError(f"a datagram of {size} bytes is above {MAX_DATAGRAM}")
    return _PREFIX.pack(size) + bytes(payload)


@attrs.define
class DatagramDecoder:
    """Stream bytes in, whole datagrams out. Holds at most one partial datagram (``max_size`` + 2 bytes) between
    calls, so its memory is bounded whatever the peer sends."""

    max_size: int
    _buffer: bytearray = attrs.field(factory=bytearray, alias="_buffer")

    def feed(self, data: bytes) -> list[bytes]:
        """The datagrams completed by ``data``. Raises DatagramError for a length above ``max_size``."""
        buf = self._buffer
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        out: list[bytes] = []
        offset = 0
        end = len(view)
        while end - offset >= HEADER_SIZE:
            (size,) = _PREFIX.unpack_from(view, offset)
            if size > self.max_size:
                raise DatagramError(f"a datagram of {size} bytes is above the limit of {self.max_size}")
            stop = offset + HEADER_SIZE + size
            if stop > end:
                break
            out.append(bytes(view[offset + HEADER_SIZE : stop]))
            offset = stop
        if buf:
            del buf[:offset]
        elif offset < end:
            buf += view[offset:]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete datagram held (must be 0 when the stream ends)."""
        return len(self._buffer)

    def end(self) -> None:
        """The stream ended: raises DatagramError if it cut a datagram."""
        if self._buffer:
            raise DatagramError(f"the stream ended inside a datagram ({len(self._buffer)} bytes of it)")


@attrs.define
class DatagramQueue:
    """A flow's datagrams waiting for the link: bounded in count and in bytes. :meth:`push` refuses (the caller drops
    and counts) rather than grow, so a slow flow never holds more than ``max_bytes``."""

    max_count: int = 256
    """A socket read of a burst hands over up to 64 at once (tunnel/udp.py), so room for a few bursts."""
    max_bytes: int = 128 * 1024
    """With the count, what one flow may hold: 1024 flows on a service hold at most 128 MiB."""
    _items: deque[bytes] = attrs.field(factory=deque, alias="_items")
    nbytes: int = 0

    def push(self, datagram: bytes) -> bool:
        """Queue ``datagram``; False when the queue is full (nothing changes)."""
        if len(self._items) >= self.max_count or self.nbytes + len(datagram) > self.max_bytes:
            return False
        self._items.append(datagram)
        self.nbytes += len(datagram)
        return True

    def pop(self) -> bytes | None:
        """The oldest datagram, or None when empty."""
        if not self._items:
            return None
        datagram = self._items.popleft()
        self.nbytes -= len(datagram)
        return datagram

    def __len__(self) -> int:
        return len(self._items)


@attrs.define
class FlowBudget:
    """Flows one client may hold across all its UDP services (shared by their gates)."""

    limit: int
    used: int = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1


class Admission(enum.Enum):
    """What :meth:`FlowGate.admit` decided about a datagram from a new source."""

    OPEN = "open"
    SERVICE_FULL = "flows already open (max flows per service)"
    CLIENT_FULL = "flows already open for this client (max flows per client)"
    RATE = "new flows arrive faster than the open rate"


@attrs.define
class BurstLog:
    """Turns a flood of refusals into one log line per burst: :meth:`note` says when to write one (the first refusal
    after ``quiet`` seconds without a line), and how many refusals it stands for."""

    quiet: float = 10.0
    count: int = 0
    _last: float | None = attrs.field(default=None, alias="_last")

    def note(self, now: float) -> int:
        """Count one refusal; the number to report when a line is due now, else 0."""
        self.count += 1
        if self._last is not None and now - self._last < self.quiet:
            return 0
        self._last = now
        reported, self.count = self.count, 0
        return reported


@attrs.define
class FlowGate:
    """Admission of new flows on one listening UDP socket: at most ``max_flows`` at once, within the client's shared
    ``budget`` (if any), opened no faster than ``rate`` (a token bucket over the caller's clock, like stream opens)."""

    max_flows: int
    rate: RateLimit = attrs.field(factory=lambda: RateLimit(burst=400, rate=200.0))
    budget: FlowBudget | None = None
    active: int = 0
    refused: int = 0
    """Datagrams dropped because their new flow was refused (all reasons)."""
    log: BurstLog = attrs.field(factory=BurstLog)
    _bucket: TokenBucket = attrs.field(init=False, alias="_bucket")

    def __attrs_post_init__(self) -> None:
        self._bucket = TokenBucket(self.rate)

    def admit(self, now: float) -> Admission:
        """Whether a datagram from a new source may open a flow now; OPEN takes a slot (give it back with
        :meth:`release`)."""
        if self.active >= self.max_flows:
            return self._refuse(Admission.SERVICE_FULL)
        if not self._bucket.take(now):
            return self._refuse(Admission.RATE)
        if self.budget is not None and not self.budget.take():
            return self._refuse(Admission.CLIENT_FULL)
        self.active += 1
        return Admission.OPEN

    def _refuse(self, why: Admission) -> Admission:
        self.refused += 1
        return why

    def release(self) -> None:
        self.active -= 1
        if self.budget is not None:
            self.budget.give()
