"""Frames a short connection costs the link (proto/streams.py, proto/connection.py): no WINDOW for a stream that
reads a few bytes of its floor window, and raised stream credit (MAX_STREAMS) that rides with the next write until
the peer has used half of what it was sent. docs/PROTOCOL.md sections 6.2 and 7."""

from __future__ import annotations

from proto_helpers import ConnectionPair, assert_pair_clean, only
from trio_tunnel.proto import DataReceived, Limits
from trio_tunnel.proto import frames as F

KiB = 1024
FLOOR = 4 * KiB
# trio-tunnel's link settings (tunnel/wire.py): a small floor, a larger target window out of a session pool.
BUDGETED = Limits(initial_window=FLOOR, stream_window=256 * KiB, session_window=2048 * KiB)


def frames_from(pair: ConnectionPair, sender: object, kind: type) -> list[F.Frame]:
    return [f for f in pair.taps[sender].frames if isinstance(f, kind)]  # type: ignore[index]


def test_a_few_bytes_read_send_no_window_and_half_the_floor_does() -> None:
    pair = ConnectionPair(client_limits=BUDGETED)
    sid = pair.open_stream(opener=pair.server)  # the client receives, as for an exposed service
    pair.server.send_data(sid, b"r" * 64)
    pair.pump()  # (auto_ack: the client's application reads at once)
    assert frames_from(pair, pair.client, F.Window) == [], "64 bytes of a 4 KiB floor need no WINDOW"
    pair.server.send_data(sid, b"r" * (FLOOR // 2 - 64))
    pair.pump()
    (window,) = frames_from(pair, pair.client, F.Window)
    assert window == F.Window(sid, FLOOR // 2 + 256 * KiB), "at half the floor: the whole target window"
    pair.close_everything()
    assert_pair_clean(pair)


def test_a_bulk_stream_gets_its_target_window_after_its_first_read() -> None:
    pair = ConnectionPair(client_limits=BUDGETED, auto_ack=False)
    sid = pair.open_stream(opener=pair.server)
    pair.server.send_data(sid, b"b" * FLOOR)  # the whole floor at once, as a bulk sender does
    events, _ = pair.pump()
    pair.client.acknowledge(sid, sum(len(e.data) for e in only(events, DataReceived)))
    pair.pump()
    assert frames_from(pair, pair.client, F.Window) == [F.Window(sid, FLOOR + 256 * KiB)]
    pair.close_everything()
    assert_pair_clean(pair)


def test_released_stream_credit_waits_for_the_next_write_until_half_is_used() -> None:
    pair = ConnectionPair(server_limits=Limits(max_streams=8))
    sid = pair.open_stream()
    pair.client.close_stream(sid)
    pair.pump()
    pair.server.close_stream(sid)  # (the client's close reset the server's direction: released at once)
    assert not pair.server.write_due, "credit the client does not need yet: no write of its own"
    assert pair.server.wants_write, "but the next data_to_send carries it"
    assert frames_from(pair, pair.server, F.MaxStreams) == []
    pair.pump()
    assert frames_from(pair, pair.server, F.MaxStreams) == [F.MaxStreams(9)], "it went with the next write"
    assert_pair_clean(pair)


def released_with_streams_held(held: int) -> ConnectionPair:
    """A pair whose client holds ``held`` streams of its 8 and then closes the last: its credit is released."""
    pair = ConnectionPair(server_limits=Limits(max_streams=8))
    sids = [pair.open_stream() for _ in range(held)]
    pair.client.close_stream(sids[-1])
    pair.pump()
    pair.server.close_stream(sids[-1])
    return pair


def test_credit_is_due_once_the_peer_has_used_half() -> None:
    assert not released_with_streams_held(3).server.write_due, "5 of 8 left: it waits"
    assert released_with_streams_held(4).server.write_due, "4 of 8 left: due now"


def test_credit_is_due_at_once_when_the_peer_has_none_left() -> None:
    pair = ConnectionPair(server_limits=Limits(max_streams=1))
    sid = pair.open_stream()
    assert pair.client.streams_available == 0
    pair.client.close_stream(sid)
    pair.server.close_stream(sid)
    assert pair.server.write_due
    pair.pump()
    assert pair.client.streams_available == 1
    assert_pair_clean(pair)
