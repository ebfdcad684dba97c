"""What data_to_send puts on the wire, and in which order: priority classes, deficit round robin over streams in
small quanta, batching (section 6 item 24; latency numbers belong to scripts/ benchmarks, not to tests)."""

from __future__ import annotations

from proto_helpers import ConnectionPair, assert_pair_clean, decode_all
from trio_tunnel.proto import Limits
from trio_tunnel.proto import frames as F

KiB = 1024


def data_frames(frames: list[F.Frame]) -> list[F.Data]:
    return [f for f in frames if isinstance(f, F.Data)]


def test_priority_classes_pong_goaway_window_control_then_data() -> None:
    pair = ConnectionPair(auto_ack=False)
    bulk = pair.open_stream()
    peer_opened = pair.server.open_stream("reverse")
    pair.server.send_data(bulk, b"w" * 200 * KiB)
    pair.pump()
    pair.client.acknowledge(bulk, 200 * KiB)  # WINDOW due
    pair.client.send_data(bulk, b"d" * 1000)  # stream data queued first...
    opened = pair.client.open_stream("web")  # ...then control frames
    pair.client.accept_stream(peer_opened)
    pair.client.send_request("status")
    pair.client.ping()
    pair.client.receive_data(F.encode(F.Ping(77)))  # a PONG is owed
    pair.client.go_away()
    frames = decode_all(pair.client.data_to_send())
    assert [type(f).__name__ for f in frames] == [
        "Pong",  # P0: liveness must never wait behind data (rust-libp2p#5387)
        "GoAway",
        "Window",
        "Open",  # P1, in the order the application queued them
        "OpenOk",
        "Ctrl",
        "Ping",
        "Data",  # P2
    ]
    assert frames[0] == F.Pong(77)
    assert frames[3].stream_id == opened


def test_control_frames_are_never_split_and_go_before_any_data() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.send_data(sid, b"x" * 10_000)
    for _ in range(20):
        pair.client.send_request("status", expect_reply=False)
    first = pair.client.data_to_send(100)  # not even room for all control frames: no data yet
    frames = decode_all(first)
    assert frames and all(isinstance(f, F.Ctrl) for f in frames)
    rest = decode_all(pair.client.data_to_send())
    assert [type(f) for f in rest] == [F.Ctrl] * (20 - len(frames)) + [F.Data]


def test_batches_are_large_and_bounded_by_max_bytes() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.send_data(sid, b"x" * 200 * KiB)
    chunk = pair.client.data_to_send(64 * KiB)
    assert 64 * KiB <= len(chunk) <= 64 * KiB + 16, "one big write, cut at about max_bytes"
    assert pair.client.wants_write
    rest = pair.client.data_to_send(1 << 20)
    assert sum(len(f.payload) for f in data_frames(decode_all(chunk + rest))) == 200 * KiB
    assert not pair.client.wants_write and pair.client.data_to_send() == b""
    pair.pump()
    pair.close_everything()
    assert_pair_clean(pair)


def test_a_stream_alone_uses_solo_quantum_frames_capped_by_the_peers_max_frame_payload() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.client.send_data(sid, b"x" * 200 * KiB)
    sizes = [len(f.payload) for f in data_frames(decode_all(pair.client.data_to_send(1 << 20)))]
    assert sizes == [64 * KiB, 64 * KiB, 64 * KiB, 8 * KiB]
    pair = ConnectionPair(server_limits=Limits(max_frame_payload=4 * KiB))
    sid = pair.open_stream()
    pair.client.send_data(sid, b"x" * 20 * KiB)
    sizes = [len(f.payload) for f in data_frames(decode_all(pair.client.data_to_send(1 << 20)))]
    assert sizes == [4 * KiB] * 5


def test_interactive_stream_leaves_within_one_round_behind_bulk_streams() -> None:
    pair = ConnectionPair()
    bulk = [pair.open_stream() for _ in range(3)]
    for sid in bulk:
        pair.client.send_data(sid, b"B" * 256 * KiB)
    interactive = pair.open_stream()
    pair.client.send_data(interactive, b"ls\n")
    frames = data_frames(decode_all(pair.client.data_to_send(1 << 20)))
    position = next(i for i, f in enumerate(frames) if f.stream_id == interactive)
    before = sum(len(f.payload) for f in frames[:position])
    assert before <= 3 * 16 * KiB, "at most one quantum per bulk stream goes first"
    pair.pump()
    pair.close_everything()
    assert_pair_clean(pair)


def test_round_robin_shares_the_link_equally_in_quanta() -> None:
    pair = ConnectionPair()
    sids = [pair.open_stream() for _ in range(3)]
    for sid in sids:
        pair.client.send_data(sid, b"x" * 100 * KiB)
    frames = data_frames(decode_all(pair.client.data_to_send(1 << 20)))
    assert [f.stream_id for f in frames[:18]] == sids * 6
    assert {len(f.payload) for f in frames[:18]} == {16 * KiB}
    assert [len(f.payload) for f in frames[18:]] == [4 * KiB] * 3
    pair.pump()
    pair.close_everything()
    assert_pair_clean(pair)


def test_a_stream_without_credit_does_not_block_the_others() -> None:
    limits = Limits(initial_window=4 * KiB, max_window=4 * KiB)
    pair = ConnectionPair(server_limits=limits, auto_ack=False)
    stalled = pair.open_stream()
    pair.client.send_data(stalled, b"s" * 4 * KiB)  # its whole window; the server never reads it
    pair.pump()
    assert pair.client.send_credit(stalled) == 0
    other = pair.open_stream()
    assert pair.client.send_data(other, b"o" * 4 * KiB) == 4 * KiB
    _, server_events = pair.pump()
    assert sum(len(e.data) for e in server_events if getattr(e, "stream_id", 0) == other) == 4 * KiB


def test_wants_write_tracks_pending_output() -> None:
    pair = ConnectionPair()
    assert not pair.client.wants_write and not pair.server.wants_write
    sid = pair.client.open_stream("web")
    assert pair.client.wants_write
    pair.pump()
    assert not pair.client.wants_write
    pair.server.accept_stream(sid)
    pair.pump()
    pair.client.send_data(sid, b"x")
    assert pair.client.wants_write
    pair.client.data_to_send()
    assert not pair.client.wants_write
    pair.pump()
    pair.close_everything()


def test_statistics_count_frames_and_bytes() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    before = pair.client.statistics()
    pair.client.send_data(sid, b"x" * 1000)
    sent = pair.client.data_to_send()
    after = pair.client.statistics()
    assert after.frames_sent - before.frames_sent == 1
    assert after.bytes_sent - before.bytes_sent == len(sent)
    assert after.data_bytes_sent - before.data_bytes_sent == 1000
    server_before = pair.server.statistics()
    pair.server.receive_data(sent)
    server_after = pair.server.statistics()
    assert server_after.frames_received - server_before.frames_received == 1
    assert server_after.bytes_received - server_before.bytes_received == len(sent)
    assert server_after.data_bytes_received - server_before.data_bytes_received == 1000
