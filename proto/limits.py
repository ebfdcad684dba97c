"""Every bound the protocol enforces, in one place, with its default and the reason for it."""

from __future__ import annotations

import attrs

__all__ = ["Limits", "RateLimit"]

KiB = 1024
MiB = 1024 * KiB
ACCEPT_BACKLOG = 64
"""Default ``accept_backlog``; also what we assume for a peer that does not declare one (handshake.PeerLimits)."""


@attrs.frozen(kw_only=True)
class RateLimit:
    """A token bucket: ``burst`` events at once, refilled at ``rate`` per second.

    When a peer empties a bucket the connection ends with GOAWAY(ENHANCE_YOUR_CALM).
    """

    burst: int
    rate: float


def _positive(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} must be positive, got {value}")


@attrs.frozen(kw_only=True)
class Limits:
    """What one side of a connection accepts and enforces.

    The first block is *declared* to the peer in the handshake (HELLO/WELCOME), exactly once: the peer must respect
    our ``max_frame_payload``, ``initial_window`` and ``max_streams``. The rest are local defences and tuning that
    never go on the wire. Defaults follow docs/PROTOCOL.md, "Limits".
    """

    # --- declared to the peer ---
    max_frame_payload: int = attrs.field(default=64 * KiB, validator=_positive)
    """Largest DATA payload (or CTRL body) the peer may send us in one frame."""
    initial_window: int = attrs.field(default=256 * KiB, validator=_positive)
    """Bytes the peer may send on a new stream before our first WINDOW."""
    max_streams: int = attrs.field(default=256, validator=_positive)
    """Streams the peer may have open towards us at once (its MAX_STREAMS credit)."""

    # --- local: framing ---
    max_header: int = attrs.field(default=1 * KiB, validator=_positive)
    """Largest msgpack header we decode; checked from the 6-byte prefix before anything is buffered."""
    send_quantum: int = attrs.field(default=16 * KiB, validator=_positive)
    """Bytes one stream may send per round-robin turn while other streams wait."""
    solo_quantum: int = attrs.field(default=64 * KiB, validator=_positive)
    """Bytes per DATA frame when a stream is the only one with data to send (fewer frames, same fairness)."""

    # --- local: flow control and memory ---
    max_send_buffer: int = attrs.field(default=256 * KiB, validator=_positive)
    """Stream bytes queued for sending per stream (on top of the peer's credit, which also bounds it)."""
    max_window: int = attrs.field(default=8 * MiB, validator=_positive)
    """Cap of a stream's receive window after auto-tuning."""
    autotune_budget: int = attrs.field(default=32 * MiB, validator=_positive)
    """Window growth above ``initial_window``, summed over all streams of the connection."""
    stream_window: int | None = None
    """The receive window a stream starts with once it sends its first WINDOW (auto-tuning grows it from there);
    None: ``initial_window``. Set above ``initial_window`` with a ``session_window``: a new stream is granted
    the small declared window at once, and more, out of the session's pool, once it shows it reads."""
    session_window: int | None = None
    """Receive budget of the session (:mod:`.budget`): the window granted above ``initial_window``, summed over
    all streams, stays below this. None: no pool (each stream's window is limited only by ``max_window`` and
    ``autotune_budget``). Local: the peer sees only smaller WINDOW limits, so a version-2 peer needs nothing new."""
    session_send_buffer: int | None = None
    """Stream bytes queued for sending, summed over all streams of the session (on top of ``max_send_buffer``
    per stream). None: no session cap."""

    # --- local: streams ---
    open_timeout: float = 10.0
    """Seconds an OPEN may wait for its answer (either side) before it is timed out (CONNECT_TIMEOUT)."""
    accept_backlog: int = attrs.field(default=ACCEPT_BACKLOG, validator=_positive)
    """Peer-opened streams not yet accepted by the application; beyond it: OPEN_ERR(REFUSED)."""
    max_ctrl_body: int = attrs.field(default=64 * KiB, validator=_positive)
    """Largest msgpack body of a CTRL request or reply."""
    max_pending_requests: int = attrs.field(default=16, validator=_positive)
    """CTRL requests the peer may have outstanding towards us."""
    max_queued_control: int = attrs.field(default=1024, validator=_positive)
    """Control frames waiting to be written; a peer that makes us queue more (and never reads) is cut off."""

    # --- local: rate limits (token buckets) ---
    open_rate: RateLimit = RateLimit(burst=400, rate=200.0)
    """OPEN frames received (each may cost a dial)."""
    open_flood_grace: float = 5.0
    """Seconds of OPENs refused past ``open_rate`` without a 1 s pause, after which the peer is disconnected
    (ENHANCE_YOUR_CALM): a burst is refused in part, a flood ends the session (:mod:`.flood`)."""
    reset_rate: RateLimit = RateLimit(burst=200, rate=20.0)
    """RST and OPEN_ERR frames received (rapid reset, CVE-2023-44487)."""
    ping_rate: RateLimit = RateLimit(burst=50, rate=10.0)
    """PING frames received (ping flood, CVE-2019-9512)."""
    empty_rate: RateLimit = RateLimit(burst=200, rate=100.0)
    """Frames that change nothing: a WINDOW or MAX_STREAMS that does not raise a limit (CVE-2019-9518)."""

    def __attrs_post_init__(self) -> None:
        if self.max_frame_payload < 1 * KiB:
            raise ValueError("max_frame_payload must be at least 1 KiB")
        if self.stream_window is not None and not self.initial_window <= self.stream_window <= self.max_window:
            raise ValueError("stream_window must be between initial_window and max_window")
        for name in ("session_window", "session_send_buffer"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_window < self.initial_window:
            raise ValueError("max_window must be at least initial_window")
        if self.max_header < 128:
            raise ValueError("max_header must be at least 128 bytes")

    def declared(self) -> dict[str, int]:
        """The limits this side announces in its HELLO or WELCOME."""
        return {
            "max_frame_payload": self.max_frame_payload,
            "initial_window": self.initial_window,
            "max_streams": self.max_streams,
            "accept_backlog": self.accept_backlog,
        }
