"""The session memory budget (proto/budget.py): a receive pool shared fairly by the streams above a floor window that
no stream can take from another, and a session-wide cap on queued send bytes. docs/PROTOCOL.md section 7.

The receiving side here is always the client; the server opens the streams and writes as fast as credit allows.
The ConnectionPair tap checks on the wire that no DATA exceeds what the receiver granted.
"""

from __future__ import annotations

from proto_helpers import ConnectionPair, assert_pair_clean
from trio_tunnel.proto import Connection, DataReceived, Limits

KiB = 1024
MiB = 1024 * KiB
FLOOR = 16 * KiB
POOL = 512 * KiB
BUDGETED = Limits(
    initial_window=FLOOR, stream_window=256 * KiB, session_window=POOL, max_frame_payload=16 * KiB, max_streams=1024
)
SENDER = Limits(max_frame_payload=16 * KiB, session_send_buffer=256 * KiB)


def unread(events: list, sid: int) -> int:
    return sum(len(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


class Reader:
    """The receiving application: it reads (acknowledges) the streams it is told to, and lets the others pile up."""

    def __init__(self, pair: ConnectionPair) -> None:
        self.pair = pair
        self.read: dict[int, int] = {}
        self.arrived: dict[int, int] = {}
        self.reading: set[int] = set()

    def step(self, rounds: int = 1) -> None:
        pair, client = self.pair, self.pair.client
        for _ in range(rounds):
            events = pair.transfer(pair.server, max_bytes=64 * KiB)
            pair.transfer(pair.client)
            for event in events:
                if isinstance(event, DataReceived):
                    self.arrived[event.stream_id] = self.arrived.get(event.stream_id, 0) + len(event.data)
            for sid in self.reading:
                backlog = self.arrived.get(sid, 0) - self.read.get(sid, 0)
                if backlog:
                    client.acknowledge(sid, backlog)
                    self.read[sid] = self.read.get(sid, 0) + backlog


def open_from_server(pair: ConnectionPair, count: int) -> list[int]:
    sids = []
    for _ in range(count):
        sid = pair.server.open_stream("bulk")
        pair.pump()
        pair.client.accept_stream(sid)
        sids.append(sid)
    pair.pump()
    return sids


def write(conn: Connection, sid: int, block: bytes, total: dict[int, int], goal: int) -> None:
    """The sending application: keep the stream's send buffer topped up until ``goal`` bytes were queued."""
    while total.get(sid, 0) < goal:
        taken = conn.send_data(sid, block[: goal - total.get(sid, 0)])
        if not taken:
            return
        total[sid] = total.get(sid, 0) + taken


def held(conn: Connection) -> int:
    """What the peer may have sent us that the application has not read: the memory the receiver risks."""
    return conn.statistics().receive_window_total


def test_one_stream_alone_gets_the_full_stream_window_after_its_first_read() -> None:
    pair = ConnectionPair(client_limits=BUDGETED, server_limits=SENDER, auto_ack=False)
    (sid,) = open_from_server(pair, 1)
    assert held(pair.client) == FLOOR, "a new stream is granted the declared (floor) window"
    pair.server.send_data(sid, b"x" * FLOOR)
    events = pair.pump()[0]
    pair.client.acknowledge(sid, unread(events, sid))
    pair.pump()
    assert held(pair.client) == 256 * KiB, "alone, its share of the pool is the whole stream window"


def test_a_stalled_stream_cannot_take_the_pool_and_the_others_keep_moving() -> None:
    """HTTP/2's failure (golang/go#16510): bytes sent on a stream nobody reads spend the connection window, and every
    stream stops. Here the hog got the whole stream window while it was alone, then stopped reading; streams opened
    afterwards, and 20 more that never read, must not stop one reader from moving megabytes."""
    pair = ConnectionPair(client_limits=BUDGETED, server_limits=SENDER, auto_ack=False)
    reader = Reader(pair)
    block = b"y" * (64 * KiB)
    queued: dict[int, int] = {}
    (hog,) = open_from_server(pair, 1)
    reader.reading.add(hog)
    for _ in range(20):
        write(pair.server, hog, block, queued, 8 * MiB)
        reader.step()
    reader.reading.clear()  # the hog's reader stops, holding the whole window it was given
    stalled = open_from_server(pair, 20)
    (mover,) = open_from_server(pair, 1)
    reader.reading.add(mover)
    bound = (1 + 20 + 1) * FLOOR + POOL
    for _ in range(400):
        for sid in (hog, *stalled, mover):
            write(pair.server, sid, block, queued, 64 * MiB)
        reader.step()
        assert held(pair.client) <= bound, (held(pair.client), bound)
        assert pair.client._table.pool is not None and pair.client._table.pool.held <= POOL
    assert reader.read[mover] >= 4 * MiB, reader.read.get(mover)
    for sid in stalled:
        assert reader.arrived[sid] <= FLOOR + POOL // 22, "a stalled stream holds its floor and at most a share"


def test_the_budget_bounds_buffered_bytes_under_many_streams() -> None:
    """300 streams, none read: the receiver holds at most streams x floor + pool, whatever the sender writes; the
    sender's queue stays within its session_send_buffer; once they read, every stream finishes."""
    pair = ConnectionPair(client_limits=BUDGETED, server_limits=SENDER, auto_ack=False)
    reader = Reader(pair)
    sids = open_from_server(pair, 300)
    block = b"z" * (64 * KiB)
    queued: dict[int, int] = {}
    goal = 256 * KiB
    for _ in range(50):
        for sid in sids:
            write(pair.server, sid, block, queued, goal)
        assert pair.server.statistics().buffered_send_bytes <= SENDER.session_send_buffer  # type: ignore[operator]
        reader.step()
        assert held(pair.client) <= 300 * FLOOR + POOL
        assert sum(reader.arrived.values()) <= 300 * FLOOR + POOL
    reader.reading.update(sids)
    for _ in range(3000):
        for sid in pair.server.pop_writable() | set(sids):
            write(pair.server, sid, block, queued, goal)
        reader.step()
        if all(reader.read.get(sid, 0) == goal for sid in sids):
            break
    assert all(reader.read.get(sid, 0) == goal for sid in sids), "every stream finished"
    assert pair.client._table.pool is not None and pair.client._table.pool.held <= POOL
    pair.close_everything()
    assert_pair_clean(pair)
    assert pair.client._table.pool.held == 0, "released streams return their part of the pool"


def test_writers_held_by_the_session_send_cap_are_woken_when_it_drains() -> None:
    pair = ConnectionPair(client_limits=BUDGETED, server_limits=SENDER)
    sids = open_from_server(pair, 8)
    taken = {sid: pair.server.send_data(sid, b"w" * (256 * KiB)) for sid in sids}
    assert sum(taken.values()) <= 256 * KiB, "the session's send queue is capped"
    blocked = {sid for sid, n in taken.items() if n < 256 * KiB}
    assert blocked, "some writers found the session's queue full"
    assert all(pair.server.send_credit(sid) == 0 for sid in blocked)
    pair.pump()
    assert blocked <= pair.server.pop_writable(), "each was told when room appeared"


def test_without_a_session_window_nothing_changes() -> None:
    pair = ConnectionPair(auto_ack=False)
    open_from_server(pair, 1)
    assert held(pair.client) == 256 * KiB
    assert pair.client._table.pool is None


def test_each_grant_is_at_most_a_fair_share_so_a_reader_that_stalls_later_holds_little() -> None:
    """Four streams read together: none is granted more than floor + pool / 4, so whichever stops reading later
    holds at most that (first come must not take the whole pool while the others ask for it)."""
    pair = ConnectionPair(client_limits=BUDGETED, server_limits=SENDER, auto_ack=False)
    reader = Reader(pair)
    sids = open_from_server(pair, 4)
    reader.reading.update(sids)
    block = b"f" * (64 * KiB)
    queued: dict[int, int] = {}
    for _ in range(100):
        for sid in sids:
            write(pair.server, sid, block, queued, 16 * MiB)
        reader.step()
        table = pair.client._table
        for sid in sids:
            stream = table.streams[sid]
            assert stream.recv_limit - stream.consumed <= FLOOR + POOL // 4, "a grant above the fair share"
    assert all(reader.read[sid] >= 1 * MiB for sid in sids), reader.read
