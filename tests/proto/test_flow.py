"""Flow control: absolute WINDOW limits, credit returned on consumption, WINDOW at half the window, auto-tuning with
``now`` passed explicitly, the per-connection budget, window violations. Section 6 items 7, 8, 17 (overrun), 18.

The ConnectionPair tap checks on the wire, for every DATA frame of every test here, that the sender stayed within
the limit the receiver had granted (initial window or latest WINDOW).
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proto_helpers import (
    ConnectionPair,
    assert_pair_clean,
    assert_protocol_error,
    kinds,
    only,
)
from trio_tunnel.proto import Connection, DataReceived, ErrorCode, Limits, StreamEnded, WindowUpdated
from trio_tunnel.proto import frames as F

KiB = 1024
MiB = 1024 * KiB
SMALL = Limits(initial_window=4 * KiB, max_window=4 * KiB, max_frame_payload=1 * KiB, max_send_buffer=8 * KiB)


def windows_sent(pair: ConnectionPair, conn: Connection, sid: int) -> list[int]:
    return [f.limit for f in pair.taps[conn].frames if isinstance(f, F.Window) and f.stream_id == sid]


def received(events: list) -> int:
    return sum(len(e.data) for e in events if isinstance(e, DataReceived))


# ---------------------------------------------------------------------------------------------- credit


def test_initial_credit_is_the_peers_declared_initial_window() -> None:
    pair = ConnectionPair(client_limits=Limits(initial_window=8 * KiB, max_window=8 * KiB))
    sid = pair.open_stream()
    assert pair.server.send_credit(sid) == 8 * KiB  # what the client declared
    assert pair.client.send_credit(sid) == 256 * KiB  # the server's default
    pair.close_everything()
    assert_pair_clean(pair)


def test_send_data_takes_only_what_the_credit_allows() -> None:
    pair = ConnectionPair(client_limits=SMALL, server_limits=SMALL, auto_ack=False)
    sid = pair.open_stream()
    assert pair.client.send_data(sid, b"x" * 10_000) == 4 * KiB
    assert pair.client.send_credit(sid) == 0
    assert pair.client.send_data(sid, b"y") == 0
    assert pair.client.pop_writable() == set()  # no room yet
    _, server_events = pair.pump()
    assert received(server_events) == 4 * KiB
    pair.server.acknowledge(sid, 2 * KiB)  # half the window consumed: WINDOW
    client_events, _ = pair.pump()
    assert kinds(client_events) == ["WindowUpdated"]
    assert pair.client.pop_writable() == {sid}, "the blocked writer is told it may continue"
    assert pair.client.pop_writable() == set()
    assert pair.client.send_credit(sid) == 2 * KiB
    pair.server.acknowledge(sid, 2 * KiB)
    pair.close_everything()
    assert_pair_clean(pair)


def test_send_buffer_bounds_what_is_taken_before_it_is_written() -> None:
    limits = Limits(max_send_buffer=10 * KiB)
    pair = ConnectionPair(client_limits=limits)
    sid = pair.open_stream()
    assert pair.client.send_data(sid, b"x" * 50 * KiB) == 10 * KiB
    assert pair.client.statistics().buffered_send_bytes == 10 * KiB
    pair.client.data_to_send(4 * KiB)  # part of it goes out: room again
    assert pair.client.pop_writable() == {sid}
    pair.pump()
    assert pair.client.statistics().buffered_send_bytes == 0
    pair.close_everything()
    assert_pair_clean(pair)


def test_credit_returns_on_consumption_not_on_receipt() -> None:
    pair = ConnectionPair(client_limits=SMALL, server_limits=SMALL, auto_ack=False)
    sid = pair.open_stream()
    pair.server.send_data(sid, b"x" * 4 * KiB)
    pair.pump()
    assert windows_sent(pair, pair.client, sid) == [], "buffered is not consumed: no credit back"
    assert pair.client.statistics().receive_window_total == 4 * KiB
    pair.client.acknowledge(sid, 2 * KiB - 1)
    pair.pump()
    assert windows_sent(pair, pair.client, sid) == [], "less than half the window consumed"
    pair.client.acknowledge(sid, 1)
    pair.pump()
    assert windows_sent(pair, pair.client, sid) == [2 * KiB + 4 * KiB], "absolute: consumed + window"
    pair.client.acknowledge(sid, 2 * KiB)
    pair.close_everything()
    assert_pair_clean(pair)


def test_window_is_coalesced_to_one_frame_with_the_latest_limit() -> None:
    pair = ConnectionPair(client_limits=SMALL, server_limits=SMALL, auto_ack=False)
    sid = pair.open_stream()
    pair.server.send_data(sid, b"x" * 4 * KiB)
    pair.pump()
    for _ in range(4):
        pair.client.acknowledge(sid, 1 * KiB)  # each crosses the half-window mark again
    pair.pump()
    assert windows_sent(pair, pair.client, sid) == [8 * KiB]
    pair.close_everything()
    assert_pair_clean(pair)


def test_no_window_once_the_peer_ended_its_direction() -> None:
    pair = ConnectionPair(client_limits=SMALL, server_limits=SMALL, auto_ack=False)
    sid = pair.open_stream()
    pair.server.send_data(sid, b"x" * 4 * KiB)
    pair.server.end_stream(sid)
    pair.pump()
    pair.client.acknowledge(sid, 4 * KiB)
    pair.pump()
    assert windows_sent(pair, pair.client, sid) == []
    pair.close_everything()
    assert_pair_clean(pair)


def test_stale_window_is_ignored() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    events = pair.client.receive_data(F.encode(F.Window(sid, 1000)))  # below the initial window: changes nothing
    assert events == [] and pair.client.send_credit(sid) == 256 * KiB
    events = pair.client.receive_data(F.encode(F.Window(sid, 300 * KiB)))
    assert events == [WindowUpdated(sid)] and pair.client.send_credit(sid) == 256 * KiB  # capped by the buffer
    pair.close_everything()
    assert_pair_clean(pair)


def test_receiver_never_sends_tiny_increments() -> None:
    """Every WINDOW raises the limit by at least half the window (no silly-window updates)."""
    pair = ConnectionPair(client_limits=SMALL, server_limits=SMALL, auto_ack=False)
    sid = pair.open_stream()
    rng = random.Random(7)
    total = 0
    for _ in range(200):
        total += pair.server.send_data(sid, b"z" * rng.randint(1, 3000))
        events, _ = pair.pump()
        got = received(events)
        while got:
            step = min(got, rng.randint(1, 700))
            pair.client.acknowledge(sid, step)
            got -= step
    limits = [4 * KiB, *windows_sent(pair, pair.client, sid)]
    assert len(limits) > 10
    assert all(b - a >= 2 * KiB for a, b in itertools.pairwise(limits)), limits
    pair.close_everything()


# ---------------------------------------------------------------------------------------------- violations


def test_overrunning_the_window_by_one_byte_is_flow_control() -> None:
    pair = ConnectionPair(server_limits=SMALL)
    sid = pair.client.open_stream("web")
    pair.pump()
    events = pair.server.receive_data(F.encode(F.Data(sid, b"a" * 1024)) * 4)
    assert pair.server.is_open and received(events) == 4 * KiB
    events = pair.server.receive_data(F.encode(F.Data(sid, b"!")))
    goaway = assert_protocol_error(pair.server, events, ErrorCode.FLOW_CONTROL, fragment=f"stream {sid}")
    assert "4097 bytes, over the window of 4096" in goaway.reason


def test_overrun_in_a_single_frame_is_flow_control() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    frame = F.encode(F.Data(sid, b"a" * 64 * KiB))
    events = pair.client.receive_data(frame * 4)
    assert pair.client.is_open and received(events) == 256 * KiB
    events = pair.client.receive_data(F.encode(F.Data(sid, b"a", fin=True)))
    assert_protocol_error(pair.client, events, ErrorCode.FLOW_CONTROL)


def test_window_limit_is_absolute_so_a_repeated_window_grants_nothing() -> None:
    pair = ConnectionPair(client_limits=SMALL, server_limits=SMALL)
    sid = pair.open_stream()
    pair.check_flow = False  # the WINDOW below is injected, not seen by the tap
    window = F.encode(F.Window(sid, 6 * KiB))
    assert kinds(pair.client.receive_data(window)) == ["WindowUpdated"]
    assert pair.client.receive_data(window * 3) == []  # replayed: still 6 KiB in total, not 24
    assert pair.client.send_data(sid, b"x" * 10 * KiB) == 6 * KiB
    pair.close_everything()


# ---------------------------------------------------------------------------------------------- item 7: property


@settings(max_examples=40, deadline=None)
@given(
    writes=st.lists(st.integers(1, 9000), min_size=1, max_size=30),
    reads=st.lists(st.integers(1, 5000), min_size=1, max_size=30).filter(lambda r: sum(r) >= 100 * len(r)),
    batch=st.sampled_from([300, 4096, 65536]),
)
def test_random_reads_and_writes_never_exceed_credit_and_never_stall(
    writes: list[int], reads: list[int], batch: int
) -> None:
    pair = ConnectionPair(client_limits=SMALL, server_limits=SMALL, auto_ack=False)
    sid = pair.open_stream()
    payload = bytes(random.Random(len(writes)).randbytes(sum(writes)))
    sent = 0
    got = bytearray()
    unread = 0
    step = 0
    while len(got) < len(payload) or unread:
        step += 1
        want = writes[step % len(writes)]
        progress = 0
        if sent < len(payload):
            n = pair.client.send_data(sid, payload[sent : sent + want])
            sent += n
            progress += n
        client_events, events = pair.pump(max_bytes=batch)  # the tap checks sent <= granted on every DATA frame
        progress += len(only(client_events, WindowUpdated))
        for event in events:
            if isinstance(event, DataReceived):
                got += event.data
                unread += len(event.data)
                progress += len(event.data)
        read = min(unread, reads[step % len(reads)])
        if read:
            pair.server.acknowledge(sid, read)
            unread -= read
            progress += read
        assert progress, "stalled: nothing was sent, delivered, read or credited"
        assert pair.server.statistics().receive_window_total <= SMALL.initial_window
    assert bytes(got) == payload
    pair.close_everything()
    assert_pair_clean(pair)


def test_one_mib_duplex_in_random_chunks_of_at_most_16_kib() -> None:
    rng = random.Random(1234)
    pair = ConnectionPair(auto_ack=False)
    sid = pair.open_stream()
    up = rng.randbytes(MiB)
    down = rng.randbytes(MiB)
    sent = {pair.client: 0, pair.server: 0}
    data = {pair.client: up, pair.server: down}
    got = {pair.client: bytearray(), pair.server: bytearray()}
    unread = {pair.client: 0, pair.server: 0}
    ended = set()
    for _ in range(100_000):
        for conn in (pair.client, pair.server):
            if sent[conn] < MiB:
                sent[conn] += conn.send_data(sid, data[conn][sent[conn] : sent[conn] + rng.randint(1, 16 * KiB)])
                if sent[conn] == MiB:
                    conn.end_stream(sid)
        client_events, server_events = pair.pump(max_bytes=rng.choice([16 * KiB, 64 * KiB, 256 * KiB]))
        for conn, events in ((pair.client, client_events), (pair.server, server_events)):
            for event in events:
                if isinstance(event, DataReceived):
                    got[conn] += event.data
                    unread[conn] += len(event.data)
                elif isinstance(event, StreamEnded):
                    ended.add(conn)
            read = min(unread[conn], rng.randint(1, 16 * KiB))
            if read:
                conn.acknowledge(sid, read)
                unread[conn] -= read
        if len(ended) == 2 and not any(unread.values()):
            break
    assert bytes(got[pair.server]) == up and bytes(got[pair.client]) == down
    pair.close_everything()
    assert_pair_clean(pair)


# ---------------------------------------------------------------------------------------------- item 8: auto-tuning


def measure_rtt(pair: ConnectionPair, conn: Connection, at: float, rtt: float) -> None:
    """Give ``conn`` an RTT sample: PING at ``at``, its PONG back at ``at + rtt``."""
    conn.ping(now=at)
    pair.transfer(conn, now=at)
    events = pair.transfer(pair.other(conn), now=at + rtt)
    assert kinds(events) == ["PongReceived"] and events[0].rtt == pytest.approx(rtt)


def stream_bulk(pair: ConnectionPair, sid: int, total: int, *, start: float, per_round: float) -> float:
    """The server sends ``total`` bytes on ``sid``; the client reads everything at once (auto_ack) at ``now``
    advancing ``per_round`` per pump. Returns the time at the end."""
    now = start
    sent = 0
    chunk = b"b" * (64 * KiB)
    while sent < total:
        while sent < total and (n := pair.server.send_data(sid, chunk[: min(64 * KiB, total - sent)])):
            sent += n
        pair.pump(now=now)
        now += per_round
    pair.pump(now=now)
    return now


def window_of(pair: ConnectionPair, sid: int) -> int:
    """The client's current receive window on ``sid``: its latest WINDOW limit minus what it consumed so far."""
    limits = windows_sent(pair, pair.client, sid)
    return limits[-1] - sum(len(f.payload) for f in pair.taps[pair.server].frames if isinstance(f, F.Data))


def test_window_grows_to_the_maximum_for_a_fast_reader() -> None:
    pair = ConnectionPair(now=0.0)
    sid = pair.client.open_stream("bulk", now=0.0)
    pair.pump(now=0.0)
    pair.server.accept_stream(sid)
    pair.pump(now=0.0)
    measure_rtt(pair, pair.client, at=0.0, rtt=0.05)
    stream_bulk(pair, sid, 64 * MiB, start=0.1, per_round=0.001)
    used = pair.client.statistics().autotune_budget_used
    assert used == 8 * MiB - 256 * KiB, "256 KiB doubled up to max_window (go-yamux#136 stopped at 2x)"
    limits = windows_sent(pair, pair.client, sid)
    growth = [b - a for a, b in itertools.pairwise(limits)]
    assert max(growth) >= 4 * MiB
    pair.close_everything()
    assert_pair_clean(pair)


def test_window_does_not_grow_for_a_slow_reader() -> None:
    pair = ConnectionPair(now=0.0)
    sid = pair.client.open_stream("bulk", now=0.0)
    pair.pump(now=0.0)
    pair.server.accept_stream(sid)
    pair.pump(now=0.0)
    measure_rtt(pair, pair.client, at=0.0, rtt=0.05)
    stream_bulk(pair, sid, 8 * MiB, start=1.0, per_round=1.0)  # one window a second: the reader is the limit
    assert pair.client.statistics().autotune_budget_used == 0
    limits = windows_sent(pair, pair.client, sid)
    assert {b - a for a, b in itertools.pairwise(limits)} <= {64 * KiB, 128 * KiB, 256 * KiB}
    pair.close_everything()
    assert_pair_clean(pair)


def test_window_does_not_grow_without_an_rtt_sample() -> None:
    pair = ConnectionPair(now=0.0)
    sid = pair.client.open_stream("bulk", now=0.0)
    pair.pump(now=0.0)
    pair.server.accept_stream(sid)
    stream_bulk(pair, sid, 8 * MiB, start=0.1, per_round=0.0001)
    assert pair.client.srtt is None
    assert pair.client.statistics().autotune_budget_used == 0
    pair.close_everything()
    assert_pair_clean(pair)


def test_window_does_not_grow_without_time() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    stream_bulk(pair, sid, 4 * MiB, start=0.0, per_round=0.0)  # pair.now is None: no time is ever passed
    assert pair.client.statistics().autotune_budget_used == 0
    pair.close_everything()
    assert_pair_clean(pair)


def test_growth_stops_at_the_connection_budget_and_the_budget_returns_on_close() -> None:
    limits = Limits(autotune_budget=1 * MiB)
    pair = ConnectionPair(client_limits=limits, now=0.0)
    sids = []
    for _ in range(3):
        sid = pair.client.open_stream("bulk", now=0.0)
        pair.pump(now=0.0)
        pair.server.accept_stream(sid)
        sids.append(sid)
    pair.pump(now=0.0)
    measure_rtt(pair, pair.client, at=0.0, rtt=0.05)
    now = 0.1
    for sid in sids:
        now = stream_bulk(pair, sid, 16 * MiB, start=now, per_round=0.001)
        stats = pair.client.statistics()
        assert stats.autotune_budget_used <= 1 * MiB
        assert stats.receive_window_total <= 3 * 256 * KiB + 1 * MiB
    assert pair.client.statistics().autotune_budget_used == 1 * MiB, "the budget was used up"
    pair.client.close_stream(sids[0])
    pair.server.close_stream(sids[0])
    pair.pump(now=now)
    assert pair.client.statistics().autotune_budget_used < 1 * MiB, "a released stream returns its growth"
    pair.close_everything()
    assert_pair_clean(pair)


def test_per_connection_receive_memory_is_bounded_by_streams_and_budget() -> None:
    """Peer-opened streams: sum of (granted - consumed) <= max_streams * initial_window + autotune_budget."""
    limits = Limits(
        max_streams=4, accept_backlog=4, initial_window=64 * KiB, max_window=1 * MiB, autotune_budget=512 * KiB
    )
    pair = ConnectionPair(server_limits=limits, now=0.0)
    bound = limits.max_streams * limits.initial_window + limits.autotune_budget
    sids = []
    for _ in range(4):
        sid = pair.client.open_stream("up", now=0.0)
        pair.pump(now=0.0)
        pair.server.accept_stream(sid)
        sids.append(sid)
    measure_rtt(pair, pair.server, at=0.0, rtt=0.05)
    now = 0.1
    for _ in range(60):
        for sid in sids:
            pair.client.send_data(sid, b"u" * (128 * KiB))
        pair.pump(now=now)
        now += 0.001
        assert pair.server.statistics().receive_window_total <= bound
    assert pair.server.statistics().autotune_budget_used == 512 * KiB
    pair.close_everything()
    assert_pair_clean(pair)


# ---------------------------------------------------------------------------------------------- item 18


def test_data_for_closed_streams_is_counted_and_memory_stays_flat() -> None:
    pair = ConnectionPair()
    sid = pair.open_stream()
    pair.server.close_stream(sid)
    pair.pump()
    before = pair.server.statistics()
    for _ in range(100):
        assert pair.server.receive_data(F.encode(F.Data(sid, b"d" * 60_000))) == []
    after = pair.server.statistics()
    assert after.discarded_data_bytes - before.discarded_data_bytes == 6_000_000
    assert after.receive_window_total == before.receive_window_total == 0
    assert after.streams == 0 and pair.server.is_open
    assert pair.server.data_to_send() == b"", "no RST storm in answer"
    pair.close_everything()
    assert_pair_clean(pair)
