"""Session-level frames: CTRL request/reply, PING/PONG and RTT, GOAWAY and the end of a connection
(section 6 item 11 at the protocol level)."""

from __future__ import annotations

import pytest
from proto_helpers import (
    ConnectionPair,
    assert_pair_clean,
    decode_all,
    goaway_sent,
    kinds,
    only,
    stream_events,
    terminated,
)
from trio_tunnel.proto import (
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    Limits,
    LocalProtocolError,
    PongReceived,
    ReplyReceived,
    RequestReceived,
    StreamEnded,
    StreamRejected,
)
from trio_tunnel.proto import frames as F

# ---------------------------------------------------------------------------------------------- CTRL


def test_request_and_reply() -> None:
    pair = ConnectionPair()
    req = pair.client.send_request("bind", {"route": "web", "port": 8080})
    assert req == 1
    _, server_events = pair.pump()
    assert server_events == [RequestReceived(1, "bind", {"route": "web", "port": 8080})]
    pair.server.send_reply(1, {"bound": [8080]})
    client_events, _ = pair.pump()
    assert client_events == [ReplyReceived(1, ErrorCode.NO_ERROR, {"bound": [8080]})]
    assert pair.client.send_request("status") == 2, "ids are not reused"


def test_error_reply_carries_a_code() -> None:
    pair = ConnectionPair()
    pair.client.send_request("bind", {"route": "nope"})
    pair.pump()
    pair.server.send_reply(1, "no such route", code=ErrorCode.UNKNOWN_ROUTE)
    client_events, _ = pair.pump()
    assert client_events == [ReplyReceived(1, ErrorCode.UNKNOWN_ROUTE, "no such route")]


def test_server_may_send_requests_too() -> None:
    pair = ConnectionPair()
    req = pair.server.send_request("status")
    client_events, _ = pair.pump()
    assert client_events == [RequestReceived(req, "status", None)]
    pair.client.send_reply(req)
    _, server_events = pair.pump()
    assert server_events == [ReplyReceived(req, 0, None)]


def test_notification_has_id_zero_and_no_reply() -> None:
    pair = ConnectionPair()
    assert pair.client.send_request("log", "hello", expect_reply=False) == 0
    _, server_events = pair.pump()
    assert server_events == [RequestReceived(0, "log", "hello")]
    with pytest.raises(LocalProtocolError, match="no outstanding request 0"):
        pair.server.send_reply(0)


def test_reply_twice_is_a_local_error() -> None:
    pair = ConnectionPair()
    pair.client.send_request("status")
    pair.pump()
    pair.server.send_reply(1)
    with pytest.raises(LocalProtocolError, match="no outstanding request 1"):
        pair.server.send_reply(1)


def test_kind_longer_than_64_bytes_is_a_local_error() -> None:
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError, match="CTRL kind longer than 64 bytes"):
        pair.client.send_request("k" * 65)
    assert not pair.client.wants_write


def test_outstanding_requests_are_bounded_locally() -> None:
    pair = ConnectionPair(client_limits=Limits(max_pending_requests=2))
    pair.client.send_request("a")
    pair.client.send_request("b")
    with pytest.raises(LocalProtocolError, match="more than 2 requests outstanding"):
        pair.client.send_request("c")
    pair.client.send_request("note", expect_reply=False)  # notifications do not count
    pair.pump()
    pair.server.send_reply(1)
    pair.pump()
    assert pair.client.send_request("c") == 3


def test_oversized_body_is_a_local_error_and_does_not_use_up_a_request_id() -> None:
    pair = ConnectionPair(client_limits=Limits(max_pending_requests=2))
    for _ in range(3):
        with pytest.raises(LocalProtocolError, match="too large"):
            pair.client.send_request("bind", "x" * 100_000)
    assert not pair.client.wants_write
    pair.client.send_request("a")
    pair.client.send_request("b")  # both slots still free


@pytest.mark.parametrize(
    "body",
    [{1: "int key"}, {"deep": [[[[[[[[[[[[[[[[[["too deep"]]]]]]]]]]]]]]]]]]}, {"k" * 2000: "long key"}],
    ids=["int-key", "too-deep", "long-key"],
)
def test_body_the_peer_would_reject_is_a_local_error(body: object) -> None:
    """A body our own decoder rejects must fail here, not kill the connection at the peer with PROTOCOL."""
    pair = ConnectionPair(client_limits=Limits(max_pending_requests=1))
    with pytest.raises(LocalProtocolError, match="CTRL"):
        pair.client.send_request("bind", body)
    pair.pump()
    assert pair.server.is_open and pair.client.is_open
    assert pair.client.send_request("ok") == 1, "the failed request did not keep its id"


def test_reply_body_the_peer_would_reject_is_a_local_error() -> None:
    pair = ConnectionPair()
    pair.client.send_request("status")
    pair.pump()
    with pytest.raises(LocalProtocolError, match="CTRL"):
        pair.server.send_reply(1, {2: "int key"})
    pair.server.send_reply(1, "fine")  # the request is still open and can be answered
    client_events, _ = pair.pump()
    assert client_events == [ReplyReceived(1, 0, "fine")]


def test_binary_and_float_bodies_round_trip() -> None:
    pair = ConnectionPair()
    body = {"blob": b"\x00\xff", "ratio": 0.25, "list": [1, None, True, "x"]}
    pair.client.send_request("x", body)
    _, server_events = pair.pump()
    assert server_events == [RequestReceived(1, "x", body)]


# ---------------------------------------------------------------------------------------------- PING


def test_ping_pong_measures_rtt() -> None:
    pair = ConnectionPair()
    opaque = pair.client.ping(now=10.0)
    pair.transfer(pair.client, now=10.0)
    events = pair.transfer(pair.server, now=10.2)
    assert events == [PongReceived(opaque, pytest.approx(0.2))]
    assert pair.client.srtt == pytest.approx(0.2)
    assert pair.client.statistics().srtt == pytest.approx(0.2)
    opaque = pair.client.ping(now=20.0)
    pair.transfer(pair.client, now=20.0)
    pair.transfer(pair.server, now=20.4)
    assert pair.client.srtt == pytest.approx(0.3), "srtt = previous/2 + sample/2"


def test_a_newer_ping_replaces_the_outstanding_one() -> None:
    pair = ConnectionPair()
    first = pair.client.ping(now=0.0)
    pair.transfer(pair.client, now=0.0)
    second = pair.client.ping(now=1.0)
    assert second == first + 1
    pair.transfer(pair.client, now=1.0)
    events = pair.transfer(pair.server, now=1.5)
    assert events == [PongReceived(second, pytest.approx(0.5))], "one PONG slot: only the latest PING is answered"


def test_ping_without_time_gives_no_rtt() -> None:
    pair = ConnectionPair()
    opaque = pair.client.ping()
    client_events, _ = pair.pump()
    assert client_events == [PongReceived(opaque, None)]
    assert pair.client.srtt is None


# ---------------------------------------------------------------------------------------------- GOAWAY (item 11)


def test_goaway_lets_streams_in_flight_finish_and_refuses_new_ones() -> None:
    pair = ConnectionPair()
    a = pair.open_stream()
    pair.server.go_away(ErrorCode.SHUTTING_DOWN, "maintenance")
    raced = pair.client.open_stream("web")  # sent before the client hears of the GOAWAY
    client_events, _ = pair.pump()
    assert stream_events(client_events) == [
        GoAwayReceived(a, ErrorCode.SHUTTING_DOWN, "maintenance"),
        StreamRejected(raced, ErrorCode.REFUSED, "the peer is going away: maintenance"),
    ]
    refused = [f for f in pair.taps[pair.server].frames if isinstance(f, F.OpenErr)]
    assert refused == [F.OpenErr(raced, ErrorCode.REFUSED, "the session is going away")]
    assert pair.client.streams_available == 0 and not pair.client.can_open_streams
    assert pair.server.streams_available == 0 and not pair.server.can_open_streams
    with pytest.raises(LocalProtocolError, match="going away") as info:
        pair.client.open_stream("web")
    assert info.value.code == ErrorCode.REFUSED
    with pytest.raises(LocalProtocolError, match="going away"):
        pair.server.open_stream("web")
    # the stream opened before the GOAWAY carries on, both ways
    pair.client.send_data(a, b"request")
    pair.client.end_stream(a)
    pair.server.send_data(a, b"response")
    pair.server.end_stream(a)
    client_events, server_events = pair.pump()
    assert stream_events(client_events) == [DataReceived(a, b"response"), StreamEnded(a)]
    assert stream_events(server_events) == [DataReceived(a, b"request"), StreamEnded(a)]
    pair.close_everything()
    assert_pair_clean(pair)


def test_go_away_is_idempotent() -> None:
    pair = ConnectionPair()
    pair.server.go_away()
    pair.server.go_away(ErrorCode.INTERNAL, "again")
    frames = decode_all(pair.server.data_to_send())
    assert frames == [F.GoAway(0, ErrorCode.NO_ERROR, "")]


def test_eof_after_goaway_is_a_clean_end() -> None:
    pair = ConnectionPair()
    pair.server.go_away()
    pair.pump()
    end = terminated(pair.client.receive_data(b""))
    assert end.by_peer and end.code == ErrorCode.NO_ERROR


def test_eof_without_goaway_is_an_abrupt_end() -> None:
    pair = ConnectionPair()
    end = terminated(pair.client.receive_data(b""))
    assert end.by_peer and end.code == ErrorCode.INTERNAL and end.reason == "the peer closed the connection"
    assert pair.client.receive_data(b"") == []


def test_close_sends_goaway_with_the_reason_and_the_peer_learns_it() -> None:
    pair = ConnectionPair()
    pair.server.close(ErrorCode.PROHIBITED, "edge-1 may not bind port 22")
    assert pair.server.closed and pair.server.terminated is not None and not pair.server.terminated.by_peer
    client_events, _ = pair.pump()
    assert client_events == [GoAwayReceived(0, ErrorCode.PROHIBITED, "edge-1 may not bind port 22")]
    end = terminated(pair.client.receive_data(b""))  # the server then closes the transport
    assert end.code == ErrorCode.PROHIBITED and end.reason == "edge-1 may not bind port 22"


def test_goaway_after_goaway_is_still_reported() -> None:
    """Graceful GOAWAY first, then an error GOAWAY: the error and its reason must not be lost."""
    pair = ConnectionPair()
    pair.server.go_away(ErrorCode.NO_ERROR, "draining")
    pair.pump()
    pair.server.close(ErrorCode.INTERNAL, "drain deadline passed")
    client_events, _ = pair.pump()
    assert client_events == [GoAwayReceived(0, ErrorCode.INTERNAL, "drain deadline passed")]
    end = terminated(pair.client.receive_data(b""))
    assert end.code == ErrorCode.INTERNAL and end.reason == "drain deadline passed"


def test_goaway_last_stream_id_never_increases() -> None:
    pair = ConnectionPair()
    a = pair.open_stream()
    pair.server.go_away()
    late = pair.client.open_stream("web")  # refused: above the GOAWAY's last stream id
    pair.pump()
    assert late > a
    pair.server.close(ErrorCode.NO_ERROR, "done")
    goaways = [f for f in pair.taps[pair.server].frames if isinstance(f, F.GoAway)]
    goaways += decode_all(pair.server.data_to_send())
    assert [g.last_stream_id for g in goaways] == [a, a]


def test_goaway_from_the_client_refuses_server_streams_above_it() -> None:
    pair = ConnectionPair()
    sid = pair.server.open_stream("reverse")
    pair.client.go_away()
    server_events, _ = pair.pump()[::-1]
    assert kinds(stream_events(server_events)) == ["GoAwayReceived", "StreamRejected"]
    assert only(server_events, StreamRejected)[0].stream_id == sid
    pair.close_everything()
    assert_pair_clean(pair)


def test_commands_after_close_are_local_errors() -> None:
    pair = ConnectionPair()
    pair.client.close()
    pair.client.close()  # idempotent
    with pytest.raises(LocalProtocolError, match="the connection is closed"):
        pair.client.open_stream("web")
    with pytest.raises(LocalProtocolError):
        pair.client.ping()
    pair.client.go_away()  # does nothing
    assert decode_all(pair.client.data_to_send()) == [F.GoAway(0, 0, "")]


def test_nothing_is_written_after_the_final_goaway() -> None:
    """Control frames queued before close() (a request, a reply, a WINDOW, MAX_STREAMS) are dropped: the GOAWAY
    that ends the connection is the last frame on the wire."""
    pair = ConnectionPair(auto_ack=False)
    sid = pair.client.open_stream("r", {})
    pair.pump()
    pair.server.accept_stream(sid)
    sent = pair.client.send_data(sid, b"x" * 200_000)
    pair.pump()
    pair.server.acknowledge(sid, sent)  # more than half the window consumed: a WINDOW is due
    assert pair.server.wants_write
    pair.server.send_request("status", {"n": 1})
    pair.server.send_request("note", None, expect_reply=False)
    pair.server.close(ErrorCode.SHUTTING_DOWN, "bye")
    assert goaway_sent(pair.server).code == ErrorCode.SHUTTING_DOWN
    assert pair.server.data_to_send() == b""
