"""Adversarial input through a Connection: sizes, malformed headers, unknown types, open storms, rate limits, floods
and queue bounds. Section 6 items 15, 16, 17, 19, 21 (and the rapid-reset rate limit of item 20 at protocol level).

Every case must end bounded: one GOAWAY with a code and a readable reason, one ConnectionTerminated as the last
event, and never an exception out of receive_data.
"""

from __future__ import annotations

import pytest
from proto_helpers import (
    MALFORMED,
    ConnectionPair,
    assert_pair_clean,
    assert_protocol_error,
    decode_all,
    kinds,
    only,
    packed,
    raw_frame,
    terminated,
)
from trio_tunnel.proto import (
    PROTOCOL_VERSION,
    Connection,
    DataReceived,
    ErrorCode,
    Limits,
    RateLimit,
    RemoteProtocolError,
    Role,
    StreamOpened,
)
from trio_tunnel.proto import frames as F

KiB = 1024


def inject(conn: Connection, *frames: F.Frame, now: float | None = None) -> list:
    return conn.receive_data(b"".join(F.encode(f) for f in frames), now=now)


# ---------------------------------------------------------------------------------------------- item 15: sizes


def test_oversized_header_is_frame_size_from_the_prefix_alone() -> None:
    pair = ConnectionPair()
    events = pair.server.receive_data(F.PREFIX.pack(1025, 0))  # the body never arrives
    goaway = assert_protocol_error(pair.server, events, ErrorCode.FRAME_SIZE, fragment="header of 1025 bytes")
    assert "limit 1024" in goaway.reason


def test_oversized_payload_is_frame_size_from_the_prefix_alone() -> None:
    pair = ConnectionPair()
    events = pair.server.receive_data(F.PREFIX.pack(4, 64 * KiB + 1))
    assert_protocol_error(pair.server, events, ErrorCode.FRAME_SIZE, fragment="payload of 65537 bytes")


def test_data_above_the_declared_max_frame_payload_is_frame_size() -> None:
    """The decoder admits CTRL bodies up to max_ctrl_body; DATA must still respect the declared max_frame_payload."""
    limits = Limits(max_frame_payload=4 * KiB, max_ctrl_body=64 * KiB)
    pair = ConnectionPair(server_limits=limits)
    sid = pair.open_stream()
    events = inject(pair.server, F.Data(sid, b"x" * (4 * KiB + 1)))
    assert_protocol_error(pair.server, events, ErrorCode.FRAME_SIZE, fragment="4097")


def test_ctrl_body_above_the_decoder_bound_is_frame_size() -> None:
    """CTRL bodies may use max(max_frame_payload, max_ctrl_body); above that the prefix alone is FRAME_SIZE."""
    limits = Limits(max_frame_payload=4 * KiB, max_ctrl_body=8 * KiB)
    pair = ConnectionPair(server_limits=limits)
    assert kinds(inject(pair.server, F.Ctrl(1, "routes", "r" * 8000))) == ["RequestReceived"]
    events = inject(pair.server, F.Ctrl(2, "routes", "r" * 8200))
    assert_protocol_error(pair.server, events, ErrorCode.FRAME_SIZE, fragment="limit 8192")


def test_frames_at_the_limits_are_accepted() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    events = inject(pair.server, F.Data(sid, b"x" * 64 * KiB))
    assert kinds(events) == ["DataReceived"] and pair.server.is_open
    header = packed(6, 0, 1)
    events = pair.server.receive_data(raw_frame(header + b"\x00" * 0))
    assert pair.server.is_open
    pair.close_everything()


def test_sender_never_exceeds_the_peers_max_frame_payload() -> None:
    pair = ConnectionPair(client_limits=Limits(max_frame_payload=2 * KiB))
    sid = pair.open_stream()
    pair.server.send_data(sid, b"y" * 100 * KiB)
    pair.pump()
    sizes = {len(f.payload) for f in pair.taps[pair.server].frames if isinstance(f, F.Data)}
    assert max(sizes) == 2 * KiB
    pair.close_everything()
    assert_pair_clean(pair)


# ---------------------------------------------------------------------------------------------- item 16: malformed


@pytest.mark.parametrize(("header", "payload", "fragment"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_frame_gives_one_goaway_protocol(header: bytes, payload: bytes, fragment: str) -> None:
    pair = ConnectionPair()
    events = pair.server.receive_data(raw_frame(header, payload))  # never raises
    goaway = assert_protocol_error(pair.server, events, ErrorCode.PROTOCOL, fragment=fragment)
    assert len(goaway.reason.encode()) <= F.REASON_MAX
    assert goaway.last_stream_id == 0
    # The client learns why, readably, and ends too.
    client_events = pair.client.receive_data(F.encode(goaway))
    assert client_events[0].code == ErrorCode.PROTOCOL and client_events[0].reason == goaway.reason


@pytest.mark.parametrize(("header", "payload", "fragment"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_frame_one_byte_at_a_time(header: bytes, payload: bytes, fragment: str) -> None:
    pair = ConnectionPair()
    data = F.encode(F.Ping(1)) + raw_frame(header, payload) + F.encode(F.Ping(2))
    events = []
    for i in range(len(data)):
        events += pair.server.receive_data(data[i : i + 1])
    assert_protocol_error(pair.server, events, ErrorCode.PROTOCOL, fragment=fragment)


def test_malformed_frame_during_the_handshake_gives_refuse_protocol() -> None:
    server = Connection(Role.SERVER, tokens=[b"t"])
    events = server.receive_data(F.encode_preamble(PROTOCOL_VERSION, PROTOCOL_VERSION) + raw_frame(b"\xc1"))
    end = terminated(events)
    assert end.code == ErrorCode.PROTOCOL and isinstance(end.error, RemoteProtocolError)
    (refuse,) = decode_all(server.data_to_send())
    assert isinstance(refuse, F.Refuse) and refuse.code == ErrorCode.PROTOCOL and "not valid msgpack" in refuse.message


def test_frames_after_a_malformed_one_are_not_processed() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    events = pair.server.receive_data(raw_frame(b"\xc1") + F.encode(F.Data(sid, b"after")))
    assert kinds(events) == ["ConnectionTerminated"]


def test_a_protocol_error_drops_queued_output_except_the_goaway() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.server.send_data(sid, b"queued")
    pair.server.ping()
    events = pair.server.receive_data(raw_frame(b"\xc1"))
    assert_protocol_error(pair.server, events)  # checks GOAWAY is the only frame that goes out


def test_goaway_names_the_highest_stream_processed() -> None:
    pair = ConnectionPair()
    for _ in range(3):
        pair.open_stream()
    events = pair.server.receive_data(raw_frame(b"\xc1"))
    assert assert_protocol_error(pair.server, events).last_stream_id == 5


def test_long_error_reasons_are_clipped() -> None:
    pair = ConnectionPair()
    pair.server.close(ErrorCode.INTERNAL, "ü" * 500)
    (goaway,) = decode_all(pair.server.data_to_send())
    assert len(goaway.reason.encode()) <= F.REASON_MAX and goaway.reason.endswith("...")


# ---------------------------------------------------------------------------------------------- item 17: types


@pytest.mark.parametrize("ftype", [12, 15, 21, 31])
def test_unknown_type_below_32_is_protocol(ftype: int) -> None:
    pair = ConnectionPair()
    events = pair.server.receive_data(raw_frame(packed(ftype, 0)))
    assert_protocol_error(pair.server, events, fragment=f"unknown frame type {ftype}")


@pytest.mark.parametrize("ftype", [32, 40, 63])
def test_extension_types_are_ignored(ftype: int) -> None:
    pair = ConnectionPair()
    events = pair.server.receive_data(raw_frame(packed(ftype, 1, "x"), b"extension payload"))
    assert events == [] and pair.server.is_open and pair.server.data_to_send() == b""


def test_extension_frames_are_ignored_during_the_handshake() -> None:
    pair = ConnectionPair(handshake=False)
    pair.server.receive_data(pair.client.data_to_send() + raw_frame(packed(40, 0)))
    pair.pump()
    assert pair.client.is_open and pair.server.is_open


@pytest.mark.parametrize(
    "frame", [F.Challenge(PROTOCOL_VERSION, b"\x00" * 32, "none"), F.Welcome("s", {}, b""), F.Auth(b"")]
)
def test_handshake_frames_after_the_handshake_are_protocol(frame: F.Frame) -> None:
    pair = ConnectionPair()
    assert_protocol_error(pair.server, inject(pair.server, frame), fragment="after the handshake")


def test_empty_data_without_fin_is_protocol() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    assert_protocol_error(pair.server, inject(pair.server, F.Data(sid, b"")), fragment="empty DATA frame without FIN")


# ---------------------------------------------------------------------------------------------- item 19: open storms


def test_opens_beyond_the_backlog_are_refused_without_stalling_a_bulk_stream() -> None:
    limits = Limits(accept_backlog=4)
    pair = ConnectionPair(server_limits=limits)
    bulk = pair.open_stream()
    storm = []
    for i in range(20):  # a storm of opens the server's application never answers, mixed with bulk data
        storm.append(F.Open(3 + 2 * i, "storm"))
        storm.append(F.Data(bulk, b"b" * 8 * KiB))
    events = inject(pair.server, *storm)
    assert len(only(events, StreamOpened)) == 4
    assert sum(len(e.data) for e in only(events, DataReceived)) == 20 * 8 * KiB, "the reader never stalled"
    assert pair.server.statistics().pending_streams == 4 == limits.accept_backlog
    frames = decode_all(pair.server.data_to_send())
    refusals = [f for f in frames if isinstance(f, F.OpenErr)]
    assert len(refusals) == 16 and {f.code for f in refusals} == {ErrorCode.REFUSED}
    assert "too many streams waiting to be accepted" in refusals[0].reason
    assert F.MaxStreams(256 + 16) in frames, "refused opens give their stream credit back at once"


def test_opener_respects_the_peers_accept_backlog() -> None:
    pair = ConnectionPair(server_limits=Limits(accept_backlog=3))
    assert pair.client.streams_available == 3
    for _ in range(3):
        pair.client.open_stream("web")
    assert pair.client.streams_available == 0
    pair.pump()
    pair.server.accept_stream(1)
    pair.pump()
    assert pair.client.streams_available == 1
    pair.close_everything()
    assert_pair_clean(pair)


def test_open_rate_limit() -> None:
    limits = Limits(open_rate=RateLimit(burst=5, rate=1.0))
    pair = ConnectionPair(server_limits=limits)
    events = inject(pair.server, *[F.Open(1 + 2 * i, "r") for i in range(5)], now=0.0)
    assert len(events) == 5
    pair.server.data_to_send()
    events = inject(pair.server, F.Open(11, "r"), now=0.5)
    # The sixth open is refused, not the session: other streams carry on.
    assert events == [] and pair.server.is_open
    refusals = [f for f in decode_all(pair.server.data_to_send()) if isinstance(f, F.OpenErr)]
    assert [(f.stream_id, f.code) for f in refusals] == [(11, ErrorCode.ENHANCE_YOUR_CALM)]
    assert "too many OPENs" in refusals[0].reason


def test_open_rate_refills_with_time() -> None:
    limits = Limits(open_rate=RateLimit(burst=2, rate=1.0))
    pair = ConnectionPair(server_limits=limits)
    for i in range(10):
        events = inject(pair.server, F.Open(1 + 2 * i, "r"), now=float(i))
        assert kinds(events) == ["StreamOpened"]
        pair.server.reject_stream(1 + 2 * i, ErrorCode.REFUSED)


# ---------------------------------------------------------------------------------------------- rapid reset


def test_rapid_reset_trips_the_reset_rate_limit() -> None:
    limits = Limits(reset_rate=RateLimit(burst=10, rate=1.0))
    pair = ConnectionPair(server_limits=limits)
    frames = []
    for i in range(10):
        sid = 1 + 2 * i
        frames += [F.Open(sid, "r"), F.Reset(sid, ErrorCode.CANCEL, "")]
    events = inject(pair.server, *frames, now=0.0)
    assert kinds(events) == ["StreamOpened", "StreamReset"] * 10
    events = inject(pair.server, F.Open(21, "r"), F.Reset(21, ErrorCode.CANCEL, ""), now=0.0)
    assert_protocol_error(pair.server, events, ErrorCode.ENHANCE_YOUR_CALM, fragment="rapid reset")


def test_reset_streams_hold_their_credit_until_the_application_lets_go() -> None:
    limits = Limits(max_streams=3, accept_backlog=3)
    pair = ConnectionPair(server_limits=limits)
    frames = []
    for i in range(3):
        sid = 1 + 2 * i
        frames += [F.Open(sid, "r"), F.Reset(sid, ErrorCode.CANCEL, "")]
    inject(pair.server, *frames)
    assert pair.server.statistics().streams == 3, "the handlers still hold them"
    events = inject(pair.server, F.Open(7, "r"))
    assert_protocol_error(pair.server, events, ErrorCode.STREAM_LIMIT)


def test_open_err_and_ordinary_resets_do_not_count_against_the_reset_rate() -> None:
    """Only resets of opens still being worked on are rapid reset; answers and ordinary closes are not."""
    limits = Limits(reset_rate=RateLimit(burst=2, rate=1.0))
    pair = ConnectionPair(client_limits=limits)
    sids = [pair.client.open_stream("r") for _ in range(3)]
    pair.client.data_to_send()
    events = inject(pair.client, *[F.OpenErr(sid, ErrorCode.REFUSED, "") for sid in sids])
    assert kinds(events) == ["StreamRejected"] * 3 and pair.client.is_open
    accepted = [pair.client.open_stream("r") for _ in range(3)]
    pair.client.data_to_send()
    events = inject(
        pair.client, *[F.OpenOk(sid) for sid in accepted], *[F.Reset(sid, ErrorCode.CONN_RESET, "") for sid in accepted]
    )
    assert kinds(events) == ["StreamAccepted"] * 3 + ["StreamReset"] * 3 and pair.client.is_open


# ---------------------------------------------------------------------------------------------- item 21: floods


def test_ping_flood_gets_one_pong_with_the_latest_opaque() -> None:
    pair = ConnectionPair()
    assert inject(pair.server, *[F.Ping(i) for i in range(1, 21)]) == []
    assert decode_all(pair.server.data_to_send()) == [F.Pong(20)]


def test_ping_flood_from_a_peer_that_never_reads_ends_with_calm() -> None:
    pair = ConnectionPair()
    events = inject(pair.server, *[F.Ping(i) for i in range(50)])
    assert events == [] and pair.server.is_open
    events = inject(pair.server, F.Ping(50))
    assert_protocol_error(pair.server, events, ErrorCode.ENHANCE_YOUR_CALM, fragment="too many PINGs")


def test_pings_at_the_allowed_rate_are_fine() -> None:
    pair = ConnectionPair()
    for i in range(500):
        inject(pair.server, F.Ping(i), now=i * 0.1)  # 10 per second
    assert pair.server.is_open


@pytest.mark.parametrize("flood", ["window", "max_streams"])
def test_floods_of_frames_that_change_nothing_end_with_calm(flood: str) -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    frame = F.Window(sid, 1) if flood == "window" else F.MaxStreams(1)
    assert inject(pair.client, *[frame] * 200) == [] and pair.client.is_open
    events = inject(pair.client, frame)
    assert_protocol_error(pair.client, events, ErrorCode.ENHANCE_YOUR_CALM, fragment="that change nothing")


def test_unsolicited_pong_is_reported_without_rtt() -> None:
    pair = ConnectionPair()
    events = inject(pair.client, F.Pong(12345))
    assert [(e.opaque, e.rtt) for e in events] == [(12345, None)]
    assert pair.client.srtt is None


# ---------------------------------------------------------------------------------------------- queue bounds


def test_control_queue_overflow_from_received_frames_ends_with_calm_and_reports_it() -> None:
    """A peer that floods refused OPENs and never reads makes us queue OPEN_ERRs: bounded by max_queued_control."""
    limits = Limits(accept_backlog=1, max_queued_control=8)
    pair = ConnectionPair(server_limits=limits)
    events = inject(pair.server, *[F.Open(1 + 2 * i, "r") for i in range(12)])
    assert_protocol_error(pair.server, events, ErrorCode.ENHANCE_YOUR_CALM, fragment="not reading")


def test_control_queue_overflow_from_local_commands_closes_cleanly() -> None:
    limits = Limits(max_queued_control=4)
    pair = ConnectionPair(client_limits=limits)
    sids = [pair.open_stream() for _ in range(4)]
    for sid in sids:
        pair.client.end_stream(sid)
    pair.pump()
    pair.client.ping()
    pair.client.ping()
    pair.client.ping()
    for sid in sids:
        pair.client.close_stream(sid)  # each queues an RST(STREAM_CLOSED); the 2nd overflows: must not raise
    assert pair.client.closed
    assert pair.client.terminated is not None and pair.client.terminated.code == ErrorCode.ENHANCE_YOUR_CALM
    (goaway,) = decode_all(pair.client.data_to_send())
    assert goaway.code == ErrorCode.ENHANCE_YOUR_CALM
    assert pair.client.statistics().streams == 0
    # No event list was at hand in close_stream: the next receive_data reports the end, exactly once.
    events = pair.client.receive_data(b"anything")
    assert kinds(events) == ["ConnectionTerminated"] and events[0] is pair.client.terminated
    assert pair.client.receive_data(b"") == [] and pair.client.expire(1e9) == []


def test_expire_overflowing_the_control_queue_closes_cleanly() -> None:
    limits = Limits(max_queued_control=3)
    pair = ConnectionPair(client_limits=limits)
    for _ in range(3):
        pair.client.open_stream("slow", now=0.0)
    pair.pump(now=0.0)
    pair.client.ping()
    pair.client.ping()
    events = pair.client.expire(100.0)
    assert kinds(events)[-1] == "ConnectionTerminated"
    assert pair.client.closed and pair.client.terminated.code == ErrorCode.ENHANCE_YOUR_CALM


# ---------------------------------------------------------------------------------------------- CTRL limits


def test_too_many_outstanding_requests_from_the_peer_is_calm() -> None:
    pair = ConnectionPair(server_limits=Limits(max_pending_requests=2))
    events = inject(pair.server, F.Ctrl(1, "a"), F.Ctrl(2, "b"))
    assert kinds(events) == ["RequestReceived", "RequestReceived"]
    events = inject(pair.server, F.Ctrl(3, "c"))
    assert_protocol_error(pair.server, events, ErrorCode.ENHANCE_YOUR_CALM, fragment="more than 2 CTRL requests")


def test_notifications_are_not_counted_as_outstanding() -> None:
    pair = ConnectionPair(server_limits=Limits(max_pending_requests=1))
    events = inject(pair.server, *[F.Ctrl(0, "note", i) for i in range(10)])
    assert len(events) == 10 and pair.server.is_open


def test_reused_request_id_is_protocol() -> None:
    pair = ConnectionPair()
    inject(pair.server, F.Ctrl(7, "a"))
    assert_protocol_error(pair.server, inject(pair.server, F.Ctrl(7, "b")), fragment="already in use")


def test_reply_to_an_unknown_request_is_protocol() -> None:
    pair = ConnectionPair()
    assert_protocol_error(pair.client, inject(pair.client, F.CtrlReply(9, 0, None)), fragment="unknown request id 9")


def test_open_flood_above_the_rate_from_a_peer_that_never_reads_is_bounded() -> None:
    """Each refused OPEN costs us an OPEN_ERR; a peer that never reads them hits the control-queue bound."""
    limits = Limits(open_rate=RateLimit(burst=1, rate=0.001), max_queued_control=8)
    pair = ConnectionPair(server_limits=limits)
    events = inject(pair.server, *[F.Open(1 + 2 * i, "r") for i in range(20)], now=0.0)
    assert_protocol_error(pair.server, events, ErrorCode.ENHANCE_YOUR_CALM, fragment="not reading")
