"""Table fuzzing (section 6 item 27): random sequences of API calls and of raw frames, invariants at every step.

* :class:`PairMachine` drives two well-behaved applications over a ConnectionPair with random commands (open,
  accept, reject, send, read, end, close, reset, ping, CTRL, time passing, open timeouts). Two correct peers must
  never end the connection; no DATA may exceed the granted limit (checked on the wire by the pair's tap); the
  receive memory, the accept backlog and the stream table stay bounded; and after closing everything, the table,
  budgets and credits are back to their initial values.
* :func:`test_random_frames_against_a_server` throws random (mostly well-formed) frames at a server: it never
  raises, either stays open or ends with exactly one GOAWAY carrying a known code, and stays bounded throughout.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from proto_helpers import ConnectionPair, assert_clean, decode_all, initial_streams_available
from trio_tunnel.proto import (
    PROTOCOL_VERSION,
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    Limits,
    LocalProtocolError,
    ReplyReceived,
    RequestReceived,
    StreamOpened,
    StreamReset,
    StreamState,
)
from trio_tunnel.proto import frames as F
from trio_tunnel.proto.stream import TRANSITIONS, StreamInput

KiB = 1024
LIMITS = Limits(
    max_streams=4,
    accept_backlog=3,
    initial_window=4 * KiB,
    max_window=32 * KiB,
    autotune_budget=16 * KiB,
    max_frame_payload=1 * KiB,
    send_quantum=1 * KiB,
    solo_quantum=2 * KiB,
    max_send_buffer=8 * KiB,
    open_timeout=5.0,
)


class PairMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.pair = ConnectionPair(client_limits=LIMITS, server_limits=LIMITS, auto_ack=False, now=self.now)
        self.sides = {"client": self.pair.client, "server": self.pair.server}
        self.unread: dict[Connection, dict[int, int]] = {c: defaultdict(int) for c in self.sides.values()}
        self.pending: dict[Connection, set[int]] = {c: set() for c in self.sides.values()}
        self.requests: dict[Connection, set[int]] = {c: set() for c in self.sides.values()}
        self.seen: dict[Connection, set[int]] = {c: set() for c in self.sides.values()}

    # ---------------------------------------------------------------------------------------------- helpers

    def conn(self, side: str) -> Connection:
        return self.sides[side]

    def streams(self, conn: Connection) -> list[int]:
        return sorted(sid for sid in self.seen[conn] if conn.stream_state(sid) is not None)

    def handle(self, conn: Connection, events: list[Event]) -> None:
        for event in events:
            assert not isinstance(event, ConnectionTerminated), f"two correct peers ended the connection: {event}"
            match event:
                case StreamOpened(sid):
                    self.pending[conn].add(sid)
                    self.seen[conn].add(sid)
                case DataReceived(sid, data):
                    self.unread[conn][sid] += len(data)
                case StreamReset(sid):  # the peer's RST, or our open timeout: nothing left to answer
                    self.pending[conn].discard(sid)
                case RequestReceived(req) if req:
                    self.requests[conn].add(req)
                case ReplyReceived():
                    pass

    def pick(self, data: st.DataObject, items: list[int]) -> int | None:
        return data.draw(st.sampled_from(items)) if items else None

    # ---------------------------------------------------------------------------------------------- rules

    @rule(side=st.sampled_from(["client", "server"]), route=st.sampled_from(["web", "ssh", "db"]))
    def open_stream(self, side: str, route: str) -> None:
        conn = self.conn(side)
        if conn.streams_available > 0:
            sid = conn.open_stream(route, {"port": 1}, now=self.now)
            self.seen[conn].add(sid)

    @rule(side=st.sampled_from(["client", "server"]), data=st.data(), accept=st.booleans())
    def answer(self, side: str, data: st.DataObject, accept: bool) -> None:
        conn = self.conn(side)
        sid = self.pick(data, sorted(s for s in self.pending[conn] if conn.stream_state(s) is not None))
        if sid is None:
            return
        self.pending[conn].discard(sid)
        if accept:
            conn.accept_stream(sid)
        else:
            conn.reject_stream(sid, ErrorCode.UNKNOWN_ROUTE, "no")

    @rule(side=st.sampled_from(["client", "server"]), data=st.data(), size=st.integers(1, 6000))
    def send(self, side: str, data: st.DataObject, size: int) -> None:
        conn = self.conn(side)
        sid = self.pick(data, self.streams(conn))
        if sid is not None and conn.send_credit(sid) > 0:
            credit = conn.send_credit(sid)
            taken = conn.send_data(sid, b"d" * size)
            assert taken == min(size, credit)

    @rule(side=st.sampled_from(["client", "server"]), data=st.data(), size=st.integers(1, 6000))
    def read(self, side: str, data: st.DataObject, size: int) -> None:
        conn = self.conn(side)
        sid = self.pick(data, [s for s, n in self.unread[conn].items() if n])
        if sid is not None:
            n = min(size, self.unread[conn][sid])
            self.unread[conn][sid] -= n
            conn.acknowledge(sid, n, now=self.now)

    @rule(side=st.sampled_from(["client", "server"]), data=st.data(), how=st.sampled_from(["end", "close", "reset"]))
    def finish(self, side: str, data: st.DataObject, how: str) -> None:
        conn = self.conn(side)
        sid = self.pick(data, self.streams(conn))
        if sid is None:
            return
        if how == "end":
            state = conn.stream_state(sid)
            try:
                conn.end_stream(sid)
            except LocalProtocolError:
                assert (state, StreamInput.SEND_FIN) not in TRANSITIONS
        elif how == "close":
            conn.close_stream(sid)
            self.unread[conn].pop(sid, None)
        else:
            conn.reset_stream(sid, ErrorCode.CANCEL, "fuzz")
            self.unread[conn].pop(sid, None)
        self.pending[conn].discard(sid)

    @rule(side=st.sampled_from(["client", "server"]))
    def ping(self, side: str) -> None:
        self.conn(side).ping(now=self.now)

    @rule(side=st.sampled_from(["client", "server"]), reply=st.booleans())
    def ctrl(self, side: str, reply: bool) -> None:
        conn = self.conn(side)
        if reply and self.requests[conn]:
            conn.send_reply(self.requests[conn].pop(), {"ok": True})
        else:
            try:
                conn.send_request("status", {"n": 1})
            except LocalProtocolError as exc:  # the local bound on outstanding requests
                assert "requests outstanding" in exc.reason

    @rule(
        max_bytes=st.sampled_from([200, 1500, 16 * KiB, 256 * KiB]),
        chunk=st.sampled_from([None, 1, 7, 1000]),
        dt=st.sampled_from([0.0, 0.001, 0.05, 1.0]),
    )
    def pump(self, max_bytes: int, chunk: int | None, dt: float) -> None:
        self.now += dt
        for _ in range(3):
            client_events = self.pair.transfer(self.pair.server, max_bytes=max_bytes, chunk=chunk, now=self.now)
            self.handle(self.pair.client, client_events)
            server_events = self.pair.transfer(self.pair.client, max_bytes=max_bytes, chunk=chunk, now=self.now)
            self.handle(self.pair.server, server_events)

    @rule(dt=st.sampled_from([1.0, 6.0]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        for conn in self.sides.values():
            self.handle(conn, conn.expire(self.now))

    # ---------------------------------------------------------------------------------------------- invariants

    @invariant()
    def bounded(self) -> None:
        for conn in self.sides.values():
            assert conn.is_open, conn.terminated
            stats = conn.statistics()
            lim = conn.limits
            assert stats.pending_streams <= lim.accept_backlog
            peer_opened = [s for s in self.streams(conn) if (s % 2 == 1) == (conn is self.pair.server)]
            assert len(peer_opened) <= lim.max_streams, "the peer cannot make us hold more than max_streams"
            assert 0 <= stats.autotune_budget_used <= lim.autotune_budget
            assert stats.receive_window_total <= stats.streams * lim.initial_window + stats.autotune_budget_used
            for sid in self.streams(conn):
                assert conn.send_credit(sid) >= 0
            assert stats.buffered_send_bytes <= stats.streams * lim.max_send_buffer
            assert 0 <= stats.local_streams_available <= initial_streams_available(conn)

    def teardown(self) -> None:
        pair = self.pair
        if not (pair.client.is_open and pair.server.is_open):
            return  # the invariant already failed
        for conn in self.sides.values():
            for sid in list(self.pending[conn]):
                if conn.stream_state(sid) is not None:
                    conn.reject_stream(sid, ErrorCode.REFUSED, "teardown")
        pair.now = self.now
        pair.auto_ack = True
        for conn in self.sides.values():
            for sid, n in self.unread[conn].items():
                if n:
                    conn.acknowledge(sid, n)
        pair.close_everything()
        for conn in self.sides.values():
            for sid in list(self.seen[conn]):
                conn.close_stream(sid)
        pair.pump()
        assert_clean(pair.client)
        assert_clean(pair.server)


PairMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_api_sequences_keep_invariants = PairMachine.TestCase


# ---------------------------------------------------------------------------------------------- raw frames

SID = st.integers(1, 9)
CODE = st.sampled_from([0, 1, 5, 6, 12, 999])
FRAME = st.one_of(
    st.builds(F.Data, SID, st.binary(max_size=3000), st.booleans()).filter(lambda f: f.payload or f.fin),
    st.builds(F.Window, SID, st.integers(0, 1 << 20)),
    st.builds(F.Open, st.integers(1, 12), st.sampled_from(["web", "x"]), st.just({})),
    st.builds(F.OpenOk, SID),
    st.builds(F.OpenErr, SID, CODE, st.just("no")),
    st.builds(F.Reset, SID, CODE, st.just("rst")),
    st.builds(F.Ping, st.integers(0, 99)),
    st.builds(F.Pong, st.integers(0, 99)),
    st.builds(F.GoAway, st.integers(0, 12), CODE, st.just("bye")),
    st.builds(F.MaxStreams, st.integers(0, 10)),
    st.builds(F.Ctrl, st.integers(0, 5), st.just("k"), st.none()),
    st.builds(F.CtrlReply, st.integers(0, 5), CODE, st.none()),
)
KNOWN_CODES = {int(c) for c in ErrorCode}
PENDING = (StreamState.PENDING, StreamState.PENDING_REMOTE_CLOSED)


@settings(max_examples=300, deadline=None)
@given(batches=st.lists(st.lists(FRAME, min_size=1, max_size=6), max_size=12), answer=st.booleans())
def test_random_frames_against_a_server(batches: list[list[F.Frame]], answer: bool) -> None:
    pair = ConnectionPair(server_limits=LIMITS)
    server = pair.server
    ended = False
    for i, batch in enumerate(batches):
        events = server.receive_data(b"".join(F.encode(f) for f in batch), now=float(i))
        out = decode_all(server.data_to_send())
        terminations = [e for e in events if isinstance(e, ConnectionTerminated)]
        if ended:
            assert events == [] and out == []
            continue
        if terminations:
            ended = True
            (term,) = terminations
            assert events[-1] is term and not term.by_peer
            assert term.code in KNOWN_CODES and term.reason
            goaways = [f for f in out if isinstance(f, F.GoAway)]
            assert out == goaways and len(goaways) == 1 and goaways[0].code == term.code
            assert server.statistics().streams == 0
            continue
        if answer:  # a well-behaved application answers and releases what the peer opened
            for event in events:
                if isinstance(event, StreamOpened) and server.stream_state(event.stream_id) in PENDING:
                    server.accept_stream(event.stream_id)
                if isinstance(event, DataReceived) and server.stream_state(event.stream_id) is not None:
                    server.acknowledge(event.stream_id, len(event.data))
        stats = server.statistics()
        assert stats.pending_streams <= LIMITS.accept_backlog
        assert stats.streams <= LIMITS.max_streams + 8  # peer streams, plus whatever the server opened (none)
        assert stats.receive_window_total <= stats.streams * LIMITS.initial_window + stats.autotune_budget_used
    if not ended:
        for sid in range(1, 13):
            server.close_stream(sid)
        server.data_to_send()
        assert server.statistics().streams == 0
        assert server.statistics().pending_streams == 0


# ---------------------------------------------------------------------------------------------- split invariance


def _recorded_client_stream() -> bytes:
    """Everything a client sends in a busy scenario (handshake included): opens with optimistic data, FINs, resets,
    CTRL requests and pings; the server never answers the opens, so its events depend on its input alone."""
    pair = ConnectionPair(server_limits=LIMITS, client_limits=LIMITS)
    for i in range(3):
        sid = pair.client.open_stream("web", {"n": i})
        pair.client.send_data(sid, bytes(range(256)) * (i + 1))
        if i == 1:
            pair.client.end_stream(sid)
        if i == 2:
            pair.client.reset_stream(sid, ErrorCode.CANCEL, "changed my mind")
        pair.client.send_request("status", {"i": i})
        pair.client.ping()
        pair.pump()
    return b"".join(F.encode(f) for f in pair.taps[pair.client].frames)


RECORDED = F.encode_preamble(PROTOCOL_VERSION, PROTOCOL_VERSION) + _recorded_client_stream()


def _server_events(chunks: list[bytes]) -> list[Event]:
    server = ConnectionPair(server_limits=LIMITS, handshake=False).server
    events: list[Event] = []
    for chunk in chunks:
        events += server.receive_data(chunk)
    return events


EXPECTED_EVENTS = _server_events([RECORDED])


def test_the_recorded_scenario_is_busy() -> None:
    kinds = {type(e).__name__ for e in EXPECTED_EVENTS}
    assert {
        "HandshakeComplete",
        "StreamOpened",
        "DataReceived",
        "StreamEnded",
        "StreamReset",
        "RequestReceived",
    } <= kinds


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, len(RECORDED)), max_size=40))
def test_same_events_however_the_bytes_are_split(cuts: list[int]) -> None:
    points = [0, *sorted(set(cuts)), len(RECORDED)]
    chunks = [RECORDED[a:b] for a, b in itertools.pairwise(points) if b > a]  # b"" would mean EOF
    assert _server_events(chunks) == EXPECTED_EVENTS


def test_same_events_one_byte_at_a_time() -> None:
    assert _server_events([RECORDED[i : i + 1] for i in range(len(RECORDED))]) == EXPECTED_EVENTS
