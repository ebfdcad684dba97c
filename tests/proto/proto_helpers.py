"""Test helpers for the sans-I/O protocol (h11's ``helpers.py`` style).

:class:`ConnectionPair` holds a client and a server :class:`trio_tunnel.proto.Connection` with a fake network link in
between: :meth:`ConnectionPair.pump` moves bytes both ways until neither side has anything to write, collects the
events each side reported, and *taps* the link, decoding every frame that crosses it so flow-control invariants can
be checked on the wire (a sender never sends beyond the limit the receiver granted).

Named ``proto_helpers`` (not ``helpers``) so it cannot collide with a helper module of another test directory under
pytest's default ``prepend`` import mode.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack
from trio_tunnel.proto import (
    Connection,
    ConnectionState,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    Limits,
    Role,
    StreamCreditGranted,
)
from trio_tunnel.proto import frames as F

TOKEN = b"correct horse battery staple"
OTHER_TOKEN = b"tr0ub4dor&3"
NAME = "edge-1"


def counter_random(seed: int) -> Callable[[int], bytes]:
    """A deterministic ``random_bytes``: each call returns ``n`` copies of the next byte of a counter."""
    counter = itertools.count(seed)
    return lambda n: bytes([next(counter) % 256]) * n


def scripted_random(*chunks: bytes, then: int = 0xA0) -> Callable[[int], bytes]:
    """A ``random_bytes`` that returns ``chunks`` in order (each must have the requested length), then counts."""
    queue = list(chunks)
    fallback = counter_random(then)

    def random_bytes(n: int) -> bytes:
        if queue:
            chunk = queue.pop(0)
            assert len(chunk) == n, f"scripted chunk of {len(chunk)} bytes, {n} requested"
            return chunk
        return fallback(n)

    return random_bytes


def decode_all(data: bytes, *, preamble: bool = False) -> list[F.Frame]:
    """Every frame in ``data`` (a connection's output); ``preamble`` skips the client's 8 leading bytes."""
    decoder = F.FrameDecoder(max_header=1 << 16, max_payload=1 << 30)
    decoder.feed(data)
    if preamble:
        assert decoder.take(F.PREAMBLE_SIZE) is not None
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    assert decoder.buffered == 0, "trailing partial frame"
    return out


def raw_frame(header: bytes, payload: bytes = b"") -> bytes:
    """A frame from raw msgpack header bytes (for malformed headers the encoder would never produce)."""
    return F.PREFIX.pack(len(header), len(payload)) + header + payload


def packed(*fields: Any) -> bytes:
    """A msgpack header array from ``fields`` (may hold anything msgpack can encode)."""
    return msgpack.packb(list(fields), use_bin_type=True)


def kinds(events: Iterable[object]) -> list[str]:
    return [type(e).__name__ for e in events]


def only(events: Sequence[Event], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


class _Tap:
    """Decodes one direction of the link and checks it against the other direction's WINDOW frames."""

    def __init__(self, name: str, preamble: bool) -> None:
        self.name = name
        self.decoder = F.FrameDecoder(max_header=1 << 16, max_payload=1 << 30)
        self.preamble = preamble
        self.frames: list[F.Frame] = []
        self.sent: dict[int, int] = defaultdict(int)  # stream -> DATA bytes this direction carried
        self.fin: set[int] = set()

    def feed(self, data: bytes) -> list[F.Frame]:
        self.decoder.feed(data)
        if self.preamble:
            if self.decoder.take(F.PREAMBLE_SIZE) is None:
                return []
            self.preamble = False
        out = []
        while (frame := self.decoder.next_frame()) is not None:
            out.append(frame)
        self.frames += out
        return out


class ConnectionPair:
    """A client and a server Connection joined by a fake link; see the module docstring.

    Args:
        handshake: run the handshake at once (and check it completed).
        auto_ack: the "application" consumes every DataReceived at once (``acknowledge``), as a fast reader.
        check_flow: check on the wire that no DATA exceeds the receiver's latest WINDOW (or initial window).
    """

    def __init__(
        self,
        *,
        client_limits: Limits | None = None,
        server_limits: Limits | None = None,
        token: bytes | None = TOKEN,
        tokens: Sequence[bytes] = (TOKEN,),
        name: str = NAME,
        handshake: bool = True,
        auto_ack: bool = True,
        check_flow: bool = True,
        client_random: Callable[[int], bytes] | None = None,
        server_random: Callable[[int], bytes] | None = None,
        now: float | None = None,
    ) -> None:
        self.client = Connection(
            Role.CLIENT,
            limits=client_limits,
            name=name,
            token=token,
            random_bytes=client_random or counter_random(0x10),
        )
        self.server = Connection(
            Role.SERVER, limits=server_limits, tokens=tokens, random_bytes=server_random or counter_random(0x80)
        )
        self.auto_ack = auto_ack
        self.check_flow = check_flow
        self.now = now
        self.events: dict[Connection, list[Event]] = {self.client: [], self.server: []}
        self.taps = {self.client: _Tap("client->server", preamble=True), self.server: _Tap("server->client", False)}
        # (sender, stream) -> receive limit the other side granted, as seen on the wire
        self.limits_seen: dict[tuple[Connection, int], int] = {}
        if handshake:
            self.pump()
            assert self.client.is_open and self.server.is_open, (self.client.terminated, self.server.terminated)

    # ------------------------------------------------------------------------------------------------ helpers

    def other(self, conn: Connection) -> Connection:
        return self.server if conn is self.client else self.client

    def _granted(self, sender: Connection, sid: int) -> int:
        receiver = self.other(sender)
        return self.limits_seen.get((sender, sid), receiver.limits.initial_window)

    def _observe(self, sender: Connection, frames: list[F.Frame]) -> None:
        tap = self.taps[sender]
        for frame in frames:
            if isinstance(frame, F.Window):
                key = (self.other(sender), frame.stream_id)
                self.limits_seen[key] = max(self.limits_seen.get(key, 0), frame.limit)
            elif isinstance(frame, F.Data):
                sid = frame.stream_id
                assert sid not in tap.fin, f"{tap.name}: DATA on stream {sid} after its FIN"
                tap.sent[sid] += len(frame.payload)
                if self.check_flow:
                    assert tap.sent[sid] <= self._granted(sender, sid), (
                        f"{tap.name}: stream {sid} sent {tap.sent[sid]} bytes, granted {self._granted(sender, sid)}"
                    )
                if frame.fin:
                    tap.fin.add(sid)

    def transfer(
        self, sender: Connection, *, max_bytes: int = 256 * 1024, chunk: int | None = None, now: float | None = None
    ) -> list[Event]:
        """One ``data_to_send`` from ``sender`` delivered to the other side (in ``chunk``-sized pieces)."""
        data = sender.data_to_send(max_bytes)
        if not data:
            return []
        self._observe(sender, self.taps[sender].feed(data))
        receiver = self.other(sender)
        when = self.now if now is None else now
        events: list[Event] = []
        step = chunk or len(data)
        for i in range(0, len(data), step):
            events += receiver.receive_data(data[i : i + step], now=when)
        self.events[receiver] += events
        if self.auto_ack:
            for event in events:
                if isinstance(event, DataReceived) and receiver.stream_state(event.stream_id) is not None:
                    receiver.acknowledge(event.stream_id, len(event.data), now=when)
        return events

    def pump(
        self, *, max_bytes: int = 256 * 1024, chunk: int | None = None, now: float | None = None, limit: int = 10_000
    ) -> tuple[list[Event], list[Event]]:
        """Move bytes both ways until neither side wants to write; returns (client events, server events)."""
        client_events: list[Event] = []
        server_events: list[Event] = []
        for _ in range(limit):
            if not (self.client.wants_write or self.server.wants_write):
                break
            server_events += self.transfer(self.client, max_bytes=max_bytes, chunk=chunk, now=now)
            client_events += self.transfer(self.server, max_bytes=max_bytes, chunk=chunk, now=now)
        else:  # pragma: no cover - a livelock is a bug
            raise AssertionError("pump did not settle")
        return client_events, server_events

    # ------------------------------------------------------------------------------------------ scenarios

    def open_stream(
        self, route: str = "web", meta: dict[str, Any] | None = None, *, opener: Connection | None = None
    ) -> int:
        """Open a stream from ``opener`` (the client by default), have the other side accept it; returns its id."""
        opener = opener or self.client
        acceptor = self.other(opener)
        sid = opener.open_stream(route, meta)
        self.pump()
        acceptor.accept_stream(sid)
        self.pump()
        return sid

    def close_everything(self) -> None:
        """Both applications close every stream they still hold, then the link settles."""
        for _ in range(3):
            for conn in (self.client, self.server):
                for sid in list(self.stream_ids(conn)):
                    conn.close_stream(sid)
            self.pump()

    def stream_ids(self, conn: Connection) -> list[int]:
        """Streams in ``conn``'s table, learned from the wire taps and API (ids are small in tests)."""
        seen: set[int] = set()
        for tap in self.taps.values():
            for frame in tap.frames:
                sid = getattr(frame, "stream_id", 0)
                if sid:
                    seen.add(sid)
        return sorted(sid for sid in seen if conn.stream_state(sid) is not None)


def initial_streams_available(conn: Connection) -> int:
    """What ``streams_available`` is on a fresh connection: the peer's stream credit, capped by its accept backlog
    when it declares one (we never make the peer refuse an open for lack of backlog room)."""
    available = conn.peer_limits.get("max_streams", 1)
    if "accept_backlog" in conn.peer_limits:
        available = min(available, conn.peer_limits["accept_backlog"])
    return available


def stream_events(events: Iterable[Event]) -> list[Event]:
    """``events`` without StreamCreditGranted (which any release on the other side may add)."""
    return [e for e in events if not isinstance(e, StreamCreditGranted)]


def assert_clean(conn: Connection) -> None:
    """The stream table, budgets and credits are back where they started (the brief's after-every-scenario rule)."""
    stats = conn.statistics()
    assert stats.streams == 0, stats
    assert stats.pending_streams == 0, stats
    assert stats.autotune_budget_used == 0, stats
    assert stats.receive_window_total == 0, stats
    assert stats.buffered_send_bytes == 0, stats
    if conn.state is ConnectionState.OPEN and conn.can_open_streams:
        assert stats.local_streams_available == initial_streams_available(conn), stats
    assert not conn.wants_write


def assert_pair_clean(pair: ConnectionPair) -> None:
    assert_clean(pair.client)
    assert_clean(pair.server)


def goaway_sent(conn: Connection) -> F.GoAway:
    """The single GOAWAY a connection queued after ending itself; asserts nothing else goes out."""
    frames = decode_all(conn.data_to_send())
    goaways = [f for f in frames if isinstance(f, F.GoAway)]
    assert len(goaways) == 1, frames
    assert frames == goaways, frames
    return goaways[0]


def terminated(events: Sequence[Event]) -> ConnectionTerminated:
    found = only(events, ConnectionTerminated)
    assert len(found) == 1, events
    assert events[-1] is found[0], "ConnectionTerminated must be the last event"
    return found[0]


def assert_protocol_error(
    conn: Connection, events: Sequence[Event], code: ErrorCode = ErrorCode.PROTOCOL, *, fragment: str = ""
) -> F.GoAway:
    """``conn`` ended itself with one GOAWAY(code) whose reason is readable and mentions ``fragment``."""
    term = terminated(events)
    assert not term.by_peer and term.code == code, term
    assert term.error is not None and term.error.code == code
    goaway = goaway_sent(conn)
    assert goaway.code == code, goaway
    assert goaway.reason and goaway.reason.isprintable(), goaway
    assert fragment.lower() in goaway.reason.lower(), goaway.reason
    assert conn.closed
    assert conn.receive_data(b"\x00" * 16) == []  # nothing after the end
    stats = conn.statistics()
    assert (stats.streams, stats.pending_streams, stats.autotune_budget_used, stats.receive_window_total) == (
        0,
        0,
        0,
        0,
    )
    return goaway


# Malformed frames for the codec and connection tests: (id, header bytes, payload, fragment of the reason).
# Every variant of section 6 item 16, plus field-level ones.
MALFORMED: list[tuple[str, bytes, bytes, str]] = [
    ("0xc1", b"\xc1", b"", "not valid msgpack"),
    ("trailing-bytes", packed(6, 0, 1) + b"\x00", b"", "not valid msgpack"),
    ("truncated", packed(6, 0, 1)[:-1] + b"\x92", b"", "not valid msgpack"),
    ("huge-array-count", b"\xdd\xff\xff\xff\xff", b"", "not valid msgpack"),
    ("huge-map-count", b"\xdf\xff\xff\xff\xff", b"", "not valid msgpack"),
    ("huge-str-length", b"\x93\x06\x00\xdb\xff\xff\xff\xff", b"", "not valid msgpack"),
    ("deep-nesting", b"\x93\x06\x00" + b"\x91" * 1000 + b"\x00", b"", "malformed"),
    ("ext-type", b"\x93\x06\x00\xd6\x05\x00\x00\x00\x00", b"", "extension type 5"),
    ("timestamp", b"\x93\x06\x00\xd6\xff\x00\x00\x00\x00", b"", "timestamp"),
    ("true-for-int", b"\x93\x06\x00\xc3", b"", "boolean"),
    ("true-for-type", b"\x93\xc3\x00\x00", b"", "bad frame type"),
    ("true-for-sid", b"\x93\x01\xc3\x05", b"", "boolean"),
    ("float-for-int", packed(1, 1, 5.0), b"", "float"),
    ("str-for-int", packed(1, 1, "5"), b"", "str"),
    ("sid-negative", packed(1, -1, 5), b"", "int -1"),
    ("sid-2**62", packed(1, 1 << 62, 5), b"", "4611686018427387904"),
    ("window-2**62", packed(1, 1, 1 << 62), b"", "4611686018427387904"),
    ("code-2**16", packed(5, 1, 1 << 16, ""), b"", "65536"),
    ("too-few-fields", packed(1, 1), b"", "wrong number of fields (0)"),
    ("too-many-fields", packed(6, 0, 1, 2), b"", "wrong number of fields (2)"),
    ("not-an-array", b"\x06", b"", "expected an array"),
    ("map-header", msgpack.packb({"type": 6}), b"", "expected an array"),
    ("one-element", packed(6), b"", "expected an array"),
    ("type-256", packed(256, 0), b"", "bad frame type"),
    ("type-negative", packed(-1, 0), b"", "bad frame type"),
    ("unknown-type-31", packed(31, 0), b"", "unknown frame type 31"),
    ("unknown-type-12", packed(12, 0), b"", "unknown frame type 12"),
    ("invalid-utf8", b"\x94\x05\x01\x00\xa2\xff\xfe", b"", "not valid msgpack"),
    ("bin-for-str", packed(5, 1, 0, b"reason"), b"", "expected a string"),
    ("str-for-bin", packed(18, 0, "mac"), b"", "expected binary"),
    ("long-reason", packed(5, 1, 0, "x" * 257), b"", "longer than 256"),
    ("long-route", packed(2, 1, "r" * 256, {}), b"", "longer than 255"),
    ("long-nonce", packed(16, 0, "n", b"\x00" * 33, {}), b"", "longer than 32"),
    ("meta-not-map", packed(2, 1, "r", []), b"", "expected a map"),
    ("meta-too-many", packed(2, 1, "r", {str(i): i for i in range(17)}), b"", "more than 16"),
    ("meta-bad-value", packed(2, 1, "r", {"ip": [1]}), b"", "must be a string, integer"),
    ("meta-long-value", packed(2, 1, "r", {"ip": "x" * 257}), b"", "longer than 256"),
    ("meta-int-key", b"\x94\x02\x01\xa1r\x81\x01\x01", b"", "not valid msgpack"),
    ("limits-negative", packed(16, 0, "n", b"", {"max_streams": -1}), b"", "int -1"),
    ("data-flags", packed(0, 1, 2), b"x", "unknown DATA flags 0x2"),
    ("data-flags-256", packed(0, 1, 256), b"x", "256"),
    # DATA headers cut short, as the last bytes of the buffer (the hand-decoded DATA path must not read past them)
    ("data-header-1-byte", b"\x93", b"", "not valid msgpack"),
    ("data-header-2-bytes", b"\x93\x00", b"", "not valid msgpack"),
    ("data-header-uint16-cut", b"\x93\x00\xcd", b"", "not valid msgpack"),
    ("data-header-uint32-cut", b"\x93\x00\xce\x00", b"", "not valid msgpack"),
    ("data-header-uint8-cut", b"\x93\x00\xcc", b"", "not valid msgpack"),
    ("data-header-no-flags", b"\x93\x00\x01", b"", "not valid msgpack"),
    ("data-sid-0", b"\x93\x00\x00\x00", b"x", "stream id >= 1"),
    ("data-sid-uint16-0", b"\x93\x00\xcd\x00\x00\x01", b"x", "stream id >= 1"),
    ("ctrl-body-invalid", packed(10, 0, 1, "k"), b"\xc1", "body is not valid msgpack"),
    ("ctrl-body-trailing", packed(10, 0, 1, "k"), b"\x01\x02", "body is not valid msgpack"),
    ("ctrl-body-ext", packed(10, 0, 1, "k"), b"\xd6\x05\x00\x00\x00\x00", "extension type 5"),
    ("ctrl-body-timestamp", packed(10, 0, 1, "k"), b"\xd6\xff\x00\x00\x00\x00", "unsupported value"),
    ("ctrl-body-deep", packed(10, 0, 1, "k"), b"\x91" * 20 + b"\x00", "nested too deeply"),
    ("ctrl-body-long-key", packed(10, 0, 1, "k"), msgpack.packb({"k" * 1025: 1}), "longer than 1024"),
]
