"""Streams: the transition table for every (state, input) pair, half-close, close and reset, IDs and stream credit,
open timeouts. Section 6 items 3, 4, 5, 6, 9, 10, 28.

Every scenario ends by closing what the applications hold and checking that the stream table, budgets and credits
are back to their initial values (item 10).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from proto_helpers import (
    ConnectionPair,
    assert_clean,
    assert_pair_clean,
    assert_protocol_error,
    decode_all,
    initial_streams_available,
    kinds,
    only,
    stream_events,
)
from trio_tunnel.proto import (
    Connection,
    DataReceived,
    ErrorCode,
    Limits,
    LocalProtocolError,
    StreamAccepted,
    StreamCreditGranted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    StreamState,
)
from trio_tunnel.proto import frames as F
from trio_tunnel.proto.stream import TRANSITIONS, StreamInput

S = StreamState
I = StreamInput  # noqa: E741


def inject(conn: Connection, *frames: F.Frame) -> list:
    """Deliver frames to ``conn`` as if its peer had sent them."""
    return conn.receive_data(b"".join(F.encode(f) for f in frames))


# ---------------------------------------------------------------------------------------------- the table

# Build a stream in each state on the *client* of a fresh pair; the "peer" is simulated by injecting frames into
# the client (so any frame can be sent, legal or not). Local streams are odd (1), peer streams even (2).


def _local(conn: Connection) -> int:
    return conn.open_stream("web")


def _opening(c: Connection) -> int:
    return _local(c)


def _opening_local_closed(c: Connection) -> int:
    sid = _local(c)
    c.end_stream(sid)
    return sid


def _pending(c: Connection) -> int:
    inject(c, F.Open(2, "web"))
    return 2


def _pending_remote_closed(c: Connection) -> int:
    inject(c, F.Open(2, "web"), F.Data(2, b"x", fin=True))
    return 2


def _open(c: Connection) -> int:
    sid = _local(c)
    inject(c, F.OpenOk(sid))
    return sid


def _half_closed_local(c: Connection) -> int:
    sid = _open(c)
    c.end_stream(sid)
    return sid


def _half_closed_remote(c: Connection) -> int:
    sid = _open(c)
    inject(c, F.Data(sid, b"x", fin=True))
    return sid


def _closed(c: Connection) -> int:
    sid = _half_closed_local(c)
    inject(c, F.Data(sid, b"x", fin=True))
    return sid


BUILDERS: dict[StreamState, Callable[[Connection], int]] = {
    S.OPENING: _opening,
    S.OPENING_LOCAL_CLOSED: _opening_local_closed,
    S.PENDING: _pending,
    S.PENDING_REMOTE_CLOSED: _pending_remote_closed,
    S.OPEN: _open,
    S.HALF_CLOSED_LOCAL: _half_closed_local,
    S.HALF_CLOSED_REMOTE: _half_closed_remote,
    S.CLOSED: _closed,
}

RECEIVED: dict[StreamInput, Callable[[int], F.Frame]] = {
    I.RECV_DATA: lambda sid: F.Data(sid, b"data"),
    I.RECV_FIN: lambda sid: F.Data(sid, b"", fin=True),
    I.RECV_OPEN_OK: lambda sid: F.OpenOk(sid),
    I.RECV_OPEN_ERR: lambda sid: F.OpenErr(sid, ErrorCode.UNKNOWN_ROUTE, "no such route"),
    I.RECV_RST: lambda sid: F.Reset(sid, ErrorCode.CANCEL, "bye"),
}

EXPECTED_EVENT = {
    I.RECV_DATA: DataReceived,
    I.RECV_FIN: StreamEnded,
    I.RECV_OPEN_OK: StreamAccepted,
    I.RECV_OPEN_ERR: StreamRejected,
    I.RECV_RST: StreamReset,
}


def subject(state: StreamState) -> tuple[Connection, int]:
    pair = ConnectionPair()
    conn = pair.client
    sid = BUILDERS[state](conn)
    assert conn.stream_state(sid) is state
    conn.data_to_send()  # whatever the setup queued
    return conn, sid


def test_every_state_can_be_built() -> None:
    assert set(BUILDERS) == set(StreamState)


def test_the_table_has_no_exits_from_closed() -> None:
    assert not [key for key in TRANSITIONS if key[0] is S.CLOSED]
    assert all(key[0] is not value or key[1] in (I.SEND_DATA, I.RECV_DATA) for key, value in TRANSITIONS.items())


@pytest.mark.parametrize("state", list(StreamState), ids=lambda s: s.name)
@pytest.mark.parametrize("received", list(RECEIVED), ids=lambda i: i.name)
def test_received_input_in_every_state(state: StreamState, received: StreamInput) -> None:
    conn, sid = subject(state)
    discarded = conn.statistics().discarded_data_bytes
    events = inject(conn, RECEIVED[received](sid))
    legal = (state, received) in TRANSITIONS
    if received is I.RECV_FIN:  # FIN rides on a DATA frame: both inputs apply
        legal = legal and (state, I.RECV_DATA) in TRANSITIONS
    if state is S.CLOSED:
        # Frames for a closed stream are ignored (DATA counted and discarded), never an error.
        assert events == []
        assert conn.is_open
        if received is I.RECV_DATA:
            assert conn.statistics().discarded_data_bytes == discarded + 4
        assert conn.data_to_send() == b"", "an RST is never answered with an RST, nor anything else"
    elif legal:
        assert conn.is_open
        assert isinstance(events[-1], EXPECTED_EVENT[received]), events
        if received is I.RECV_FIN:
            expected = TRANSITIONS[TRANSITIONS[state, I.RECV_DATA], I.RECV_FIN]
        else:
            expected = TRANSITIONS[state, received]
        assert conn.stream_state(sid) is expected
        assert not [f for f in decode_all(conn.data_to_send()) if isinstance(f, F.Reset)], "no RST in answer"
    else:
        assert_protocol_error(conn, events, ErrorCode.PROTOCOL, fragment=f"stream {sid}")


def _send(conn: Connection, sid: int, command: StreamInput) -> None:
    match command:
        case I.SEND_DATA:
            assert conn.send_data(sid, b"data") == 4
        case I.SEND_FIN:
            conn.end_stream(sid)
        case I.SEND_OPEN_OK:
            conn.accept_stream(sid)
        case I.SEND_OPEN_ERR:
            conn.reject_stream(sid, ErrorCode.UNKNOWN_ROUTE, "no such route")
        case I.SEND_RST:
            conn.reset_stream(sid, ErrorCode.CANCEL, "bye")


SENT = [I.SEND_DATA, I.SEND_FIN, I.SEND_OPEN_OK, I.SEND_OPEN_ERR, I.SEND_RST]
# States where FIN is already queued or sent: end_stream is idempotent there.
FIN_QUEUED = {S.OPENING_LOCAL_CLOSED, S.HALF_CLOSED_LOCAL, S.CLOSED}


@pytest.mark.parametrize("state", list(StreamState), ids=lambda s: s.name)
@pytest.mark.parametrize("command", SENT, ids=lambda i: i.name)
def test_sent_input_in_every_state(state: StreamState, command: StreamInput) -> None:
    conn, sid = subject(state)
    legal = (state, command) in TRANSITIONS
    if command is I.SEND_RST or (command is I.SEND_FIN and state in FIN_QUEUED):
        legal = True  # reset_stream and a repeated end_stream are idempotent
    if not legal:
        with pytest.raises(LocalProtocolError, match=f"stream {sid}"):
            _send(conn, sid, command)
        assert conn.stream_state(sid) is state, "a refused command changes nothing"
        assert conn.is_open
        return
    _send(conn, sid, command)
    frames = decode_all(conn.data_to_send())
    if command is I.SEND_RST:
        assert conn.stream_state(sid) is None, "reset_stream releases the stream"
        resets = [f for f in frames if isinstance(f, F.Reset)]
        assert len(resets) == (0 if state is S.CLOSED else 1)
    elif command is I.SEND_FIN and state in FIN_QUEUED:
        assert conn.stream_state(sid) is state
    elif command is I.SEND_OPEN_ERR:
        assert conn.stream_state(sid) is None, "reject_stream releases the stream"
        assert [f for f in frames if not isinstance(f, F.MaxStreams)] == [
            F.OpenErr(sid, ErrorCode.UNKNOWN_ROUTE, "no such route")
        ]
    else:
        assert conn.stream_state(sid) is TRANSITIONS[state, command]


# ---------------------------------------------------------------------------------------------- half-close (item 3)


def test_half_close_client_first() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.send_data(sid, b"request")
    pair.client.end_stream(sid)
    _, server_events = pair.pump()
    assert stream_events(server_events) == [DataReceived(sid, b"request"), StreamEnded(sid)]
    assert pair.server.stream_state(sid) is S.HALF_CLOSED_REMOTE
    assert pair.client.stream_state(sid) is S.HALF_CLOSED_LOCAL
    pair.server.send_data(sid, b"response")
    pair.server.end_stream(sid)
    client_events, _ = pair.pump()
    assert stream_events(client_events) == [DataReceived(sid, b"response"), StreamEnded(sid)]
    assert pair.client.stream_state(sid) is pair.server.stream_state(sid) is S.CLOSED
    pair.close_everything()
    assert_pair_clean(pair)


def test_half_close_server_first() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.server.send_data(sid, b"banner")
    pair.server.end_stream(sid)
    client_events, _ = pair.pump()
    assert stream_events(client_events) == [DataReceived(sid, b"banner"), StreamEnded(sid)]
    pair.client.send_data(sid, b"still talking")  # our direction is still open
    pair.client.end_stream(sid)
    _, server_events = pair.pump()
    assert stream_events(server_events) == [DataReceived(sid, b"still talking"), StreamEnded(sid)]
    pair.close_everything()
    assert_pair_clean(pair)


def test_simultaneous_fin() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.end_stream(sid)
    pair.server.end_stream(sid)
    client_events, server_events = pair.pump()
    assert stream_events(client_events) == stream_events(server_events) == [StreamEnded(sid)]
    assert pair.client.stream_state(sid) is pair.server.stream_state(sid) is S.CLOSED
    pair.close_everything()
    assert_pair_clean(pair)


def test_fin_racing_rst_ends_with_one_rst_and_no_answer() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.send_data(sid, b"last words")
    pair.client.end_stream(sid)
    pair.server.reset_stream(sid, ErrorCode.CANCEL, "not interested")
    client_events, server_events = pair.pump()
    assert stream_events(client_events) == [StreamReset(sid, ErrorCode.CANCEL, "not interested")]
    assert stream_events(server_events) == [], "DATA and FIN for a stream the server reset are discarded"
    assert pair.server.statistics().discarded_data_bytes == len(b"last words")
    resets = [f for tap in pair.taps.values() for f in tap.frames if isinstance(f, F.Reset)]
    assert resets == [F.Reset(sid, ErrorCode.CANCEL, "not interested")], "an RST is never answered with an RST"
    pair.close_everything()
    assert_pair_clean(pair)


def test_fin_never_overtakes_queued_data() -> None:
    limits = Limits(initial_window=4096, max_window=4096, max_frame_payload=1024, max_send_buffer=4096)
    pair = ConnectionPair(client_limits=limits, server_limits=limits)
    sid = pair.open_stream()
    payload = bytes(range(256)) * 16  # 4096 bytes: a whole window
    assert pair.client.send_data(sid, payload) == 4096
    pair.client.end_stream(sid)
    received = b""
    ended = False
    while pair.client.wants_write or pair.server.wants_write:
        _, server_events = pair.pump(max_bytes=700)  # many small batches
        for event in server_events:
            if isinstance(event, DataReceived):
                assert not ended, "data after FIN"
                received += event.data
            elif isinstance(event, StreamEnded):
                ended = True
    assert received == payload and ended
    data_frames = [f for f in pair.taps[pair.client].frames if isinstance(f, F.Data)]
    assert [f.fin for f in data_frames] == [False] * (len(data_frames) - 1) + [True]
    assert data_frames[-1].payload, "FIN rides on the last DATA frame, not on its own"
    pair.close_everything()
    assert_pair_clean(pair)


def test_empty_fin_goes_out_alone_when_nothing_is_queued() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.end_stream(sid)
    pair.pump()
    assert [f for f in pair.taps[pair.client].frames if isinstance(f, F.Data)] == [F.Data(sid, b"", True)]
    pair.close_everything()
    assert_pair_clean(pair)


# ---------------------------------------------------------------------------------------------- item 4


def test_window_on_half_closed_local_stream_is_still_applied() -> None:
    conn, sid = subject(S.HALF_CLOSED_LOCAL)
    assert kinds(inject(conn, F.Window(sid, 1 << 20))) == ["WindowUpdated"]
    assert conn.is_open


def test_window_rst_and_fin_on_a_closed_stream_are_ignored() -> None:
    conn, sid = subject(S.CLOSED)
    assert inject(conn, F.Window(sid, 1 << 20), F.Data(sid, b"", fin=True), F.Reset(sid, 0, "")) == []
    assert conn.is_open and conn.data_to_send() == b""


def test_frames_for_a_released_stream_are_ignored() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.reset_stream(sid)
    pair.pump()
    pair.close_everything()
    assert pair.server.stream_state(sid) is None
    events = inject(pair.server, F.Window(sid, 1 << 30), F.Reset(sid, 0, ""), F.Data(sid, b"late", fin=True))
    assert events == [] and pair.server.is_open
    assert pair.server.statistics().discarded_data_bytes == 4
    assert_pair_clean(pair)


def test_data_after_the_peers_fin_is_a_protocol_error() -> None:
    conn, sid = subject(S.HALF_CLOSED_REMOTE)
    assert_protocol_error(conn, inject(conn, F.Data(sid, b"more")), fragment="receive DATA in state half-closed")


# ---------------------------------------------------------------------------------------------- close (item 5)


def test_data_after_close_gets_exactly_one_rst() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.send_data(sid, b"hello")
    pair.pump()
    pair.server.close_stream(sid)  # the application is done; the client's direction is still open
    client_events, _ = pair.pump()
    assert stream_events(client_events) == [
        StreamEnded(sid),
        StreamReset(sid, ErrorCode.STREAM_CLOSED, "stream closed"),
    ]
    server_frames = [f for f in pair.taps[pair.server].frames if getattr(f, "stream_id", 0) == sid]
    assert server_frames[-2:] == [F.Data(sid, b"", True), F.Reset(sid, ErrorCode.STREAM_CLOSED, "stream closed")]
    # The client's writer now fails, as a TCP send after the peer closed.
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.client.send_data(sid, b"more")
    assert pair.client.send_credit(sid) == 0
    # Data already in flight when the RST went out is discarded and counted, and answered with nothing.
    inject(pair.server, F.Data(sid, b"in flight"))
    assert pair.server.data_to_send() == b""
    resets = [f for f in pair.taps[pair.server].frames if isinstance(f, F.Reset)]
    assert len(resets) == 1
    pair.close_everything()
    assert_pair_clean(pair)


def test_close_after_fin_sent_puts_rst_in_the_control_queue() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.server.end_stream(sid)
    pair.pump()
    pair.server.close_stream(sid)
    client_events, _ = pair.pump()
    assert stream_events(client_events) == [StreamReset(sid, ErrorCode.STREAM_CLOSED, "stream closed")]
    pair.close_everything()
    assert_pair_clean(pair)


def test_close_when_both_directions_ended_sends_nothing() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.end_stream(sid)
    pair.server.end_stream(sid)
    pair.pump()
    pair.client.close_stream(sid)
    pair.client.close_stream(sid)  # idempotent
    assert pair.client.data_to_send() == b""
    assert pair.client.stream_state(sid) is None
    pair.close_everything()
    assert_pair_clean(pair)


def test_rst_after_fin_keeps_received_data_readable() -> None:
    """Events come in wire order: the data and the FIN before the RST, so the reader keeps them."""
    pair = ConnectionPair(auto_ack=False)
    sid = pair.open_stream()
    pair.server.send_data(sid, b"complete response")
    pair.server.close_stream(sid)
    client_events, _ = pair.pump()
    assert stream_events(client_events) == [
        DataReceived(sid, b"complete response"),
        StreamEnded(sid),
        StreamReset(sid, ErrorCode.STREAM_CLOSED, "stream closed"),
    ]
    pair.client.acknowledge(sid, 17)  # the reader consumes what it had, after the reset
    pair.close_everything()
    assert_pair_clean(pair)


def test_queued_data_is_flushed_before_a_closed_stream_is_released() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.send_data(sid, b"x" * 100_000)
    pair.client.close_stream(sid)
    assert pair.client.stream_state(sid) is S.CLOSED, "held until its data is written"
    _, server_events = pair.pump()
    assert sum(len(e.data) for e in only(server_events, DataReceived)) == 100_000
    assert pair.client.stream_state(sid) is None
    pair.close_everything()
    assert_pair_clean(pair)


def test_reset_drops_queued_data() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.send_data(sid, b"x" * 1000)
    pair.client.reset_stream(sid, ErrorCode.CONN_RESET, "tcp reset")
    pair.client.reset_stream(sid)  # idempotent
    _, server_events = pair.pump()
    assert stream_events(server_events) == [StreamReset(sid, ErrorCode.CONN_RESET, "tcp reset")]
    assert not [f for f in pair.taps[pair.client].frames if isinstance(f, F.Data)]
    pair.close_everything()
    assert_pair_clean(pair)


def test_close_of_an_unanswered_stream() -> None:
    pair = ConnectionPair()
    sid = pair.client.open_stream("web")
    pair.pump()
    pair.server.close_stream(sid)  # closed before accepting: refused
    client_events, _ = pair.pump()
    assert stream_events(client_events) == [StreamRejected(sid, ErrorCode.REFUSED, "closed before it was accepted")]
    sid2 = pair.client.open_stream("web")
    pair.client.close_stream(sid2)  # we give up on our own open: RST(CANCEL)
    _, server_events = pair.pump()
    assert kinds(server_events) == ["StreamOpened", "StreamReset"]
    assert server_events[-1].code == ErrorCode.CANCEL
    pair.close_everything()
    assert_pair_clean(pair)


def test_long_reasons_are_clipped_to_the_wire_limit() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.reset_stream(sid, ErrorCode.CANCEL, "é" * 300)
    _, server_events = pair.pump()
    (reset,) = only(server_events, StreamReset)
    assert len(reset.reason.encode()) <= F.REASON_MAX and reset.reason.endswith("...")
    pair.close_everything()
    assert_pair_clean(pair)


# ---------------------------------------------------------------------------------------------- OPEN_ERR (item 6)


def test_optimistic_data_then_open_err() -> None:
    pair = ConnectionPair()
    sid = pair.client.open_stream("nowhere", {"ip": "192.0.2.1", "port": 40000})
    assert pair.client.send_data(sid, b"optimistic") == 10
    _, server_events = pair.pump()
    assert stream_events(server_events) == [
        StreamOpened(sid, "nowhere", {"ip": "192.0.2.1", "port": 40000}),
        DataReceived(sid, b"optimistic"),
    ]
    pair.client.send_data(sid, b"more, in flight")
    in_flight = pair.client.data_to_send()
    pair.server.reject_stream(sid, ErrorCode.UNKNOWN_ROUTE, "no route 'nowhere'")
    assert pair.server.stream_state(sid) is None, "released at once"
    assert pair.server.receive_data(in_flight) == []
    assert pair.server.statistics().discarded_data_bytes == len(b"more, in flight")
    client_events, _ = pair.pump()
    assert stream_events(client_events) == [StreamRejected(sid, ErrorCode.UNKNOWN_ROUTE, "no route 'nowhere'")]
    assert pair.client.stream_state(sid) is S.CLOSED
    assert pair.client.send_credit(sid) == 0
    with pytest.raises(LocalProtocolError):
        pair.client.send_data(sid, b"x")
    pair.client.close_stream(sid)
    pair.pump()
    assert_pair_clean(pair)


# ---------------------------------------------------------------------------------------------- IDs (item 9)


def test_stream_ids_have_parity_per_side() -> None:
    pair = ConnectionPair()
    assert [pair.client.open_stream("a") for _ in range(3)] == [1, 3, 5]
    assert [pair.server.open_stream("b") for _ in range(3)] == [2, 4, 6]
    pair.pump()
    for sid in (1, 3, 5):
        pair.server.accept_stream(sid)
    for sid in (2, 4, 6):
        pair.client.accept_stream(sid)
    pair.pump()
    pair.close_everything()
    assert_pair_clean(pair)


def test_open_with_the_wrong_parity_is_protocol() -> None:
    pair = ConnectionPair()
    assert_protocol_error(pair.server, inject(pair.server, F.Open(2, "web")), fragment="wrong parity")


def test_open_not_above_the_highest_is_protocol() -> None:
    pair = ConnectionPair()
    inject(pair.server, F.Open(5, "web"))
    assert_protocol_error(pair.server, inject(pair.server, F.Open(3, "web")), fragment="not above the highest")


def test_duplicate_open_is_protocol() -> None:
    pair = ConnectionPair()
    inject(pair.server, F.Open(1, "web"))
    assert_protocol_error(pair.server, inject(pair.server, F.Open(1, "web")), fragment="not above the highest")


def test_skipped_ids_count_as_closed() -> None:
    pair = ConnectionPair()
    assert kinds(inject(pair.server, F.Open(7, "web"))) == ["StreamOpened"]
    # 1, 3 and 5 were skipped: closed, so their frames are ignored rather than errors.
    assert inject(pair.server, F.Data(3, b"stale"), F.Reset(5, 0, ""), F.Window(1, 99999)) == []
    assert pair.server.is_open
    assert pair.server.statistics().discarded_data_bytes == 5


def test_frames_for_idle_streams_are_protocol() -> None:
    pair = ConnectionPair()
    assert_protocol_error(pair.server, inject(pair.server, F.Data(9, b"x")), fragment="never opened")
    pair = ConnectionPair()
    # a stream id of the server's own parity that it never opened
    assert_protocol_error(pair.server, inject(pair.server, F.Window(4, 10)), fragment="never opened")
    pair = ConnectionPair()
    assert_protocol_error(pair.client, inject(pair.client, F.OpenOk(1)), fragment="never opened")


def test_open_ok_for_a_stream_the_peer_opened_is_protocol() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    assert_protocol_error(pair.server, inject(pair.server, F.OpenOk(sid)), fragment="which the peer opened")
    pair = ConnectionPair()
    inject(pair.server, F.Open(1, "web"))
    assert_protocol_error(pair.server, inject(pair.server, F.OpenOk(1)), fragment="which the peer opened")


def test_open_beyond_max_streams_is_stream_limit() -> None:
    pair = ConnectionPair(server_limits=Limits(max_streams=2))
    inject(pair.server, F.Open(1, "a"), F.Open(3, "b"))
    events = inject(pair.server, F.Open(5, "c"))
    assert_protocol_error(pair.server, events, ErrorCode.STREAM_LIMIT, fragment="beyond the 2 streams")


def test_skipping_ids_uses_up_stream_credit() -> None:
    pair = ConnectionPair(server_limits=Limits(max_streams=2))
    events = inject(pair.server, F.Open(5, "skips two"))  # the third stream: 1 and 3 were skipped
    assert_protocol_error(pair.server, events, ErrorCode.STREAM_LIMIT)


# ---------------------------------------------------------------------------------------------- stream credit


def test_stream_credit_is_returned_only_when_the_acceptor_releases() -> None:
    pair = ConnectionPair(server_limits=Limits(max_streams=2))
    a = pair.open_stream()
    b = pair.open_stream()
    assert pair.client.streams_available == 0
    with pytest.raises(LocalProtocolError, match="no stream credit") as info:
        pair.client.open_stream("c")
    assert info.value.code == ErrorCode.STREAM_LIMIT
    pair.client.reset_stream(a)  # rapid reset: the server's handler still holds its end
    client_events, _ = pair.pump()
    assert pair.client.streams_available == 0 and not only(client_events, StreamCreditGranted)
    pair.server.close_stream(a)  # the handler exited
    client_events, _ = pair.pump()
    assert client_events == [StreamCreditGranted(1)]
    assert [f for f in pair.taps[pair.server].frames if isinstance(f, F.MaxStreams)] == [F.MaxStreams(3)]
    c = pair.open_stream()
    assert c == 5
    for sid in (b, c):
        pair.client.close_stream(sid)
    pair.close_everything()
    assert_pair_clean(pair)


def test_max_streams_is_coalesced() -> None:
    pair = ConnectionPair()
    sids = [pair.open_stream() for _ in range(5)]
    for sid in sids:
        pair.client.close_stream(sid)
        pair.server.close_stream(sid)
    pair.pump()
    assert [f for f in pair.taps[pair.server].frames if isinstance(f, F.MaxStreams)] == [F.MaxStreams(256 + 5)]
    assert_pair_clean(pair)


def test_stale_max_streams_is_counted_not_applied() -> None:
    pair = ConnectionPair()
    assert inject(pair.client, F.MaxStreams(10)) == []
    assert pair.client.streams_available == initial_streams_available(pair.client)


# ---------------------------------------------------------------------------------------------- open timeouts (28)


def test_unanswered_open_times_out_with_connect_timeout() -> None:
    pair = ConnectionPair()
    sid = pair.client.open_stream("slow", now=100.0)
    pair.pump(now=100.0)
    assert pair.client.next_deadline() == 110.0
    assert pair.server.next_deadline() == 110.0
    assert pair.client.expire(109.9) == [] and pair.server.expire(109.9) == []
    client_events = pair.client.expire(110.0)
    assert stream_events(client_events) == [StreamRejected(sid, ErrorCode.CONNECT_TIMEOUT, "no answer within 10 s")]
    server_events = pair.server.expire(110.0)
    assert stream_events(server_events) == [
        StreamReset(sid, ErrorCode.CONNECT_TIMEOUT, "no answer within 10 s", local=True)
    ]
    assert pair.client.next_deadline() is None and pair.server.next_deadline() is None
    pair.pump(now=110.0)
    frames = pair.taps[pair.client].frames + pair.taps[pair.server].frames
    assert F.Reset(sid, ErrorCode.CONNECT_TIMEOUT, "no answer within 10 s") in frames
    assert F.OpenErr(sid, ErrorCode.CONNECT_TIMEOUT, "no answer within 10 s") in frames
    pair.close_everything()
    assert_pair_clean(pair)


def test_answered_open_does_not_time_out() -> None:
    pair = ConnectionPair()
    sid = pair.client.open_stream("fast", now=0.0)
    pair.pump(now=0.0)
    pair.server.accept_stream(sid)
    pair.pump(now=1.0)
    assert pair.client.next_deadline() is None and pair.server.next_deadline() is None
    assert pair.client.expire(1000.0) == [] and pair.server.expire(1000.0) == []
    pair.close_everything()
    assert_pair_clean(pair)


def test_without_time_no_deadline_is_armed() -> None:
    pair = ConnectionPair()
    pair.client.open_stream("web")
    pair.pump()
    assert pair.client.next_deadline() is None and pair.server.next_deadline() is None
    pair.close_everything()
    assert_pair_clean(pair)


def test_expire_after_the_application_closed_does_nothing() -> None:
    pair = ConnectionPair()
    sid = pair.client.open_stream("web", now=0.0)
    pair.pump(now=0.0)
    pair.client.close_stream(sid)
    pair.pump(now=1.0)
    assert pair.client.expire(20.0) == []
    assert pair.server.expire(20.0) == []  # the server's pending entry went with the RST
    pair.close_everything()
    assert_pair_clean(pair)


# ---------------------------------------------------------------------------------------------- misuse


def test_commands_on_unknown_streams_are_local_errors() -> None:
    pair = ConnectionPair()
    for call in (
        lambda: pair.client.send_data(99, b"x"),
        lambda: pair.client.end_stream(99),
        lambda: pair.client.accept_stream(99),
        lambda: pair.client.reject_stream(99, ErrorCode.REFUSED),
    ):
        with pytest.raises(LocalProtocolError, match="not open"):
            call()
    # these are idempotent on unknown streams
    pair.client.close_stream(99)
    pair.client.reset_stream(99)
    pair.client.acknowledge(99, 10)
    assert pair.client.send_credit(99) == 0
    assert pair.client.stream_state(99) is None
    assert_clean(pair.client)


def test_acknowledging_more_than_received_is_a_local_error() -> None:
    pair = ConnectionPair(auto_ack=False)
    sid = pair.open_stream()
    pair.server.send_data(sid, b"abc")
    pair.pump()
    with pytest.raises(LocalProtocolError, match="acknowledged more bytes than were received"):
        pair.client.acknowledge(sid, 4)
    pair.client.acknowledge(sid, 0)  # nothing
    pair.client.acknowledge(sid, 3)
    pair.close_everything()
    assert_pair_clean(pair)


def test_open_with_invalid_route_or_meta_is_a_local_error() -> None:
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError, match="cannot open stream"):
        pair.client.open_stream("r" * 300)
    with pytest.raises(LocalProtocolError, match="cannot open stream"):
        pair.client.open_stream("web", {"nested": {"not": "allowed"}})
    assert pair.client.streams_available == initial_streams_available(pair.client)
    assert not pair.client.wants_write


# ---------------------------------------------------------------------------------------------- blocked writers


def _blocked_writer(pair: ConnectionPair) -> int:
    sid = pair.open_stream()
    assert pair.client.send_data(sid, b"x" * (300 * 1024)) == 256 * 1024  # the whole window, then blocked
    pair.client.data_to_send()  # on the wire, never delivered: the server does not read
    assert pair.client.pop_writable() == set()
    return sid


def test_peer_reset_wakes_a_blocked_writer() -> None:
    pair = ConnectionPair()
    sid = _blocked_writer(pair)
    assert kinds(inject(pair.client, F.Reset(sid, ErrorCode.CANCEL, ""))) == ["StreamReset"]
    assert pair.client.pop_writable() == {sid}, "the writer must wake up to see the reset"
    assert pair.client.send_credit(sid) == 0


def test_local_reset_wakes_a_blocked_writer() -> None:
    pair = ConnectionPair()
    sid = _blocked_writer(pair)
    pair.client.reset_stream(sid)
    assert pair.client.pop_writable() == {sid}


def test_expire_ignores_a_stream_that_was_closed_while_its_data_is_still_queued() -> None:
    pair = ConnectionPair(now=0.0)
    sid = pair.client.open_stream("web", now=0.0)
    pair.client.send_data(sid, b"optimistic")
    pair.client.close_stream(sid)  # FIN then RST after the queued data; the entry waits for the writer
    assert pair.client.stream_state(sid) is S.CLOSED
    assert pair.client.expire(60.0) == []
    pair.pump(now=60.0)
    assert pair.client.stream_state(sid) is None
    pair.close_everything()
    assert_pair_clean(pair)


def test_is_local_input_matches_the_input_names() -> None:
    from trio_tunnel.proto.stream import is_local_input

    assert {i for i in StreamInput if is_local_input(i)} == set(SENT)


def test_open_whose_header_exceeds_max_header_is_a_local_error() -> None:
    """Route and meta are each within their limits, but together above the 1 KiB header the peer accepts: the
    opener must refuse locally instead of making the peer end the whole connection with FRAME_SIZE."""
    pair = ConnectionPair()
    meta = {f"key-{i:02d}": "v" * 250 for i in range(16)}
    with pytest.raises(LocalProtocolError, match=r"OPEN header of \d+ bytes"):
        pair.client.open_stream("web", meta)
    assert not pair.client.wants_write
    sid = pair.client.open_stream("web", {"peer": "203.0.113.7:51234"})
    pair.pump()
    assert pair.server.is_open and pair.server.stream_state(sid) is S.PENDING
