"""Behaviour of the Trio multiplexer (tunnel/mux.py, tunnel/stream.py) over in-memory and loopback transports."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import trio
import trio.testing
from mux_helpers import TOKEN, ControlledStream, delayed_pair, session_pair
from trio_tunnel.errors import HandshakeError, RequestError, SessionClosedError, StreamOpenError, StreamResetError
from trio_tunnel.mux import MuxStream, Role, Session, SessionConfig, open_session
from trio_tunnel.proto import ErrorCode, Limits


async def open_pair(
    opener: Session, acceptor: Session, route: str = "r", **meta: object
) -> tuple[MuxStream, MuxStream]:
    async with trio.open_nursery() as nursery:
        got: list[MuxStream] = []

        async def accept() -> None:
            s = await acceptor.accept_stream()
            s.accept()
            got.append(s)

        nursery.start_soon(accept)
        opened = await opener.open_stream(route, meta)  # type: ignore[arg-type]
    return opened, got[0]


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks)


async def test_open_carries_route_and_meta() -> None:
    with trio.fail_after(10):
        async with session_pair() as (server, client):
            assert server.peer_name == "t"
            assert server.session_id == client.session_id != ""
            a, b = await open_pair(server, client, "web", peer="203.0.113.9:4242", port=80)
            assert (b.route, b.meta) == ("web", {"peer": "203.0.113.9:4242", "port": 80})
            assert a.stream_id % 2 == 0 and b.stream_id == a.stream_id  # server-opened ids are even
            await a.send_all(b"ping")
            await a.send_eof()
            assert await read_all(b) == b"ping"
            await b.send_all(b"pong")
            await b.aclose()
            assert await read_all(a) == b"pong"
            await a.aclose()
            assert server.statistics().streams == client.statistics().streams == 0


async def test_bulk_both_ways_with_sha256() -> None:
    data_a = os.urandom(3 * 1024 * 1024 + 17)
    data_b = os.urandom(2 * 1024 * 1024 + 5)
    with trio.fail_after(30):
        async with session_pair() as (server, client):
            a, b = await open_pair(client, server)
            results: dict[str, bytes] = {}

            async def send(s: MuxStream, data: bytes) -> None:
                view = memoryview(data)
                rng = random.Random(len(data))
                while view:
                    n = rng.randint(1, 100_000)
                    await s.send_all(view[:n])
                    view = view[n:]
                await s.send_eof()

            async def recv(s: MuxStream, key: str) -> None:
                results[key] = await read_all(s)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, a, data_a)
                nursery.start_soon(send, b, data_b)
                nursery.start_soon(recv, b, "at_b")
                nursery.start_soon(recv, a, "at_a")
            assert hashlib.sha256(results["at_b"]).digest() == hashlib.sha256(data_a).digest()
            assert hashlib.sha256(results["at_a"]).digest() == hashlib.sha256(data_b).digest()
            await a.aclose()
            await b.aclose()


async def test_stalled_reader_does_not_slow_other_streams() -> None:
    """Head-of-line isolation: stream A's reader stops; stream B still moves 8 MiB."""
    with trio.fail_after(30):
        async with session_pair() as (server, client):
            stalled_tx, stalled_rx = await open_pair(client, server)
            busy_tx, busy_rx = await open_pair(client, server)
            async with trio.open_nursery() as nursery:

                async def fill_stalled() -> None:
                    with trio.move_on_after(3600):  # blocks forever: nobody reads stalled_rx
                        while True:
                            await stalled_tx.send_all(b"s" * 65536)

                nursery.start_soon(fill_stalled)
                await trio.testing.wait_all_tasks_blocked()
                # Stream A is now stuck at its window; B must still flow at full size.
                payload = os.urandom(8 * 1024 * 1024)

                async def send_busy() -> None:
                    await busy_tx.send_all(payload)
                    await busy_tx.send_eof()

                nursery.start_soon(send_busy)
                assert await read_all(busy_rx) == payload
                # A's buffered bytes are bounded by its window, not by how much was offered.
                stats = server.statistics().connection
                assert stats.receive_window_total <= 2 * Limits().initial_window + Limits().autotune_budget
                nursery.cancel_scope.cancel()
            for s in (stalled_tx, stalled_rx, busy_tx, busy_rx):
                await s.aclose()


async def test_8mib_echo_each_way_over_lockstep_transport() -> None:
    """No mutual write deadlock when both sides write more than any buffer holds (rust-yamux#102)."""
    size = 8 * 1024 * 1024
    with trio.fail_after(60):
        async with session_pair(trio.testing.lockstep_stream_pair) as (server, client):
            a, b = await open_pair(client, server)
            payload = os.urandom(size)
            received = bytearray()

            async def echo() -> None:
                while chunk := await b.receive_some(65536):
                    await b.send_all(chunk)
                await b.send_eof()

            async def send() -> None:
                await a.send_all(payload)
                await a.send_eof()

            async def collect() -> None:
                while chunk := await a.receive_some():
                    received.extend(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo)
                nursery.start_soon(send)
                nursery.start_soon(collect)
            assert bytes(received) == payload


async def test_cancelled_send_all_leaves_link_and_other_streams_intact() -> None:
    with trio.fail_after(20):
        async with session_pair() as (server, client):
            a_tx, a_rx = await open_pair(client, server)
            b_tx, b_rx = await open_pair(client, server)
            big = os.urandom(4 * 1024 * 1024)
            with trio.move_on_after(1) as scope:
                await a_tx.send_all(big)  # blocks: nobody reads a_rx yet
            assert scope.cancelled_caught
            # The link still works for another stream...
            await b_tx.send_all(b"hello")
            await b_tx.send_eof()
            assert await read_all(b_rx) == b"hello"
            # ...and the cancelled stream delivered an exact prefix of what was offered, then goes on.
            got_parts: list[bytes] = []

            async def drain() -> None:
                got_parts.append(await read_all(a_rx))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await a_tx.send_all(b"tail")
                await a_tx.send_eof()
            got = got_parts[0]
            assert got.endswith(b"tail")
            prefix = got[: -len(b"tail")]
            assert 0 < len(prefix) < len(big) and big.startswith(prefix)
            for s in (a_tx, a_rx, b_tx, b_rx):
                await s.aclose()


async def test_silent_peer_is_declared_dead_on_time(autojump_clock: trio.testing.MockClock) -> None:
    config = SessionConfig(keepalive_idle=15, keepalive_timeout=45)
    left, right = trio.testing.memory_stream_pair()
    controlled = ControlledStream(right)
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:

            async def client() -> None:
                async with open_session(controlled, role=Role.CLIENT, config=config, name="c", token=TOKEN) as c:
                    await c.wait_closed()

            nursery.start_soon(client)
            async with open_session(left, role=Role.SERVER, config=config, tokens=[TOKEN]) as server:
                await trio.testing.wait_all_tasks_blocked()  # handshake and first PING/PONG done
                controlled.blackhole = True  # the client's bytes stop arriving; nothing else changes
                start = trio.current_time()
                with pytest.raises(SessionClosedError, match="keepalive"):
                    await server.accept_stream()
                elapsed = trio.current_time() - start
                assert 45 <= elapsed <= 46, elapsed
                assert server.closed
            nursery.cancel_scope.cancel()


async def test_busy_peer_with_late_pong_is_not_declared_dead(autojump_clock: trio.testing.MockClock) -> None:
    """Any inbound byte is life. Over a link with 10 s of one-way latency each PONG comes 20 s after its PING,
    later than the 24 s keepalive allows after 5 s of idleness; data every 6 s keeps both sessions alive. (Every
    6 s, not 5: at exactly the idle period, whether the idle timer or the byte comes first at the same mock
    instant is up to the scheduler, and a run with no PING at all proves nothing about late PONGs.)"""
    config = SessionConfig(
        keepalive_idle=5, keepalive_timeout=24, handshake_timeout=100, limits=Limits(open_timeout=100)
    )
    with trio.fail_after(1000):
        async with session_pair(lambda: delayed_pair(10.0), config=config) as (server, client):
            a, b = await open_pair(client, server)
            async with trio.open_nursery() as nursery:

                async def echo() -> None:
                    while chunk := await b.receive_some():
                        await b.send_all(chunk)
                    await b.send_eof()

                async def tick() -> None:
                    for i in range(20):  # two minutes of a byte every 6 s
                        await a.send_all(bytes([i]))
                        await trio.sleep(6)
                    await a.send_eof()

                nursery.start_soon(echo)
                nursery.start_soon(tick)
                assert await read_all(a) == bytes(range(20))
            assert not server.closed and not client.closed
            rtt = server.statistics().rtt
            assert rtt is not None and rtt >= 19  # the PONGs really were late
            await a.aclose()
            await b.aclose()


async def test_session_death_wakes_every_waiter_and_leaves_nothing() -> None:
    left, right = trio.testing.memory_stream_pair()
    config = SessionConfig(limits=Limits(initial_window=4096, max_window=4096, max_send_buffer=4096))
    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            client_cancel = trio.CancelScope()
            client_ready = trio.Event()
            holder: list[Session] = []

            async def client() -> None:
                with client_cancel:
                    async with open_session(right, role=Role.CLIENT, config=config, name="c", token=TOKEN) as c:
                        holder.append(c)
                        client_ready.set()
                        await trio.sleep_forever()

            outer.start_soon(client)
            async with open_session(left, role=Role.SERVER, config=config, tokens=[TOKEN]) as server:
                await client_ready.wait()
                rx_stream, _ = await open_pair(server, holder[0])
                clogged, _peer = await open_pair(server, holder[0])
                await clogged.send_all(b"x" * 4096)  # uses all credit: the next send blocks
                wait_stream, _peer2 = await open_pair(server, holder[0])
                await wait_stream.send_all(b"y" * 4096)
                outcomes: dict[str, type[BaseException]] = {}

                async def expect(name: str, fn, *args) -> None:  # type: ignore[no-untyped-def]
                    try:
                        await fn(*args)
                    except (trio.BrokenResourceError, SessionClosedError) as exc:
                        outcomes[name] = type(exc)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(expect, "accept", server.accept_stream)
                    nursery.start_soon(expect, "receive", rx_stream.receive_some)
                    nursery.start_soon(expect, "send", clogged.send_all, b"more")
                    nursery.start_soon(expect, "wait_send", wait_stream.wait_send_all_might_not_block)
                    nursery.start_soon(expect, "request", server.request, "status", None)
                    await trio.testing.wait_all_tasks_blocked()
                    client_cancel.cancel()  # the client goes away abruptly
                assert outcomes == {
                    "accept": SessionClosedError,
                    "receive": trio.BrokenResourceError,
                    "send": trio.BrokenResourceError,
                    "wait_send": trio.BrokenResourceError,
                    "request": SessionClosedError,
                }
                stats = server.statistics()
                assert stats.streams == 0 and stats.pending_accept == 0
                assert stats.connection.streams == 0 and stats.connection.buffered_send_bytes == 0
                with pytest.raises(SessionClosedError):
                    await server.open_stream("r")


async def test_goaway_lets_streams_finish_and_refuses_new_ones() -> None:
    with trio.fail_after(20):
        async with session_pair() as (server, client):
            a, b = await open_pair(client, server)
            server.go_away(reason="maintenance")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(StreamOpenError) as info:
                await client.open_stream("r")
            assert info.value.retryable
            # The stream opened before GOAWAY still works both ways.
            await a.send_all(b"request")
            await a.send_eof()
            assert await read_all(b) == b"request"
            await b.send_all(b"reply")
            await b.send_eof()
            assert await read_all(a) == b"reply"
            await a.aclose()
            await b.aclose()


async def test_closing_a_session_flushes_queued_bytes() -> None:
    payload = os.urandom(1024 * 1024)
    left, right = trio.testing.memory_stream_pair()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def server() -> None:
                async with open_session(left, role=Role.SERVER, tokens=[TOKEN]) as srv:
                    s = await srv.accept_stream()
                    got.append(await read_all(s))

            nursery.start_soon(server)
            async with open_session(right, role=Role.CLIENT, name="c", token=TOKEN) as client:
                s = await client.open_stream("r", wait_accepted=False)
                with trio.move_on_after(0.5):
                    await s.send_all(payload)  # partly queued when the window runs out
                await s.send_eof()
                await s.aclose()
                # Leave the block at once: what was queued must still arrive, then EOF.
        assert got and payload.startswith(got[0]) and len(got[0]) > 0


async def test_wrong_token_is_refused_with_a_readable_reason() -> None:
    left, right = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server_errors: list[HandshakeError] = []

            async def server() -> None:
                with pytest.raises(HandshakeError) as info:
                    async with open_session(left, role=Role.SERVER, tokens=[TOKEN]):
                        pass  # pragma: no cover
                server_errors.append(info.value)

            nursery.start_soon(server)
            with pytest.raises(HandshakeError) as info:
                async with open_session(right, role=Role.CLIENT, name="c", token=b"not-the-token-at-all"):
                    pass  # pragma: no cover
        assert info.value.code == ErrorCode.AUTH
        assert "token" in str(info.value)
        assert server_errors[0].code == ErrorCode.AUTH


async def test_scanner_gets_silent_close(autojump_clock: trio.testing.MockClock) -> None:
    left, right = trio.testing.memory_stream_pair()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def scanner() -> None:
                await right.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await right.receive_some() == b""  # nothing but a close

            nursery.start_soon(scanner)
            with pytest.raises(HandshakeError) as info:
                async with open_session(left, role=Role.SERVER, tokens=[TOKEN]):
                    pass  # pragma: no cover
            assert info.value.silent


async def test_handshake_deadline(autojump_clock: trio.testing.MockClock) -> None:
    left, _right = trio.testing.memory_stream_pair()
    with trio.fail_after(30):
        start = trio.current_time()
        with pytest.raises(HandshakeError, match="no handshake within 10 s"):
            async with open_session(left, role=Role.SERVER, config=SessionConfig(handshake_timeout=10), tokens=[TOKEN]):
                pass  # pragma: no cover
        assert 10 <= trio.current_time() - start < 12


async def test_unanswered_open_times_out_and_frees_everything(autojump_clock: trio.testing.MockClock) -> None:
    config = SessionConfig(limits=Limits(open_timeout=10))
    with trio.fail_after(60):
        async with session_pair(config=config) as (server, client):
            start = trio.current_time()
            with pytest.raises(StreamOpenError) as info:
                await client.open_stream("r")  # the server never accepts it
            assert info.value.code == ErrorCode.CONNECT_TIMEOUT
            assert 10 <= trio.current_time() - start < 11
            await trio.testing.wait_all_tasks_blocked()
            assert client.statistics().connection.streams == 0
            assert server.statistics().connection.streams == 0
            assert server.statistics().connection.pending_streams == 0


async def test_reset_reaches_the_peer_with_its_code() -> None:
    with trio.fail_after(10):
        async with session_pair() as (server, client):
            a, b = await open_pair(client, server)
            await a.send_all(b"partial")
            a.reset(ErrorCode.CONN_RESET, "tcp peer reset")
            with pytest.raises(trio.BrokenResourceError) as info:
                while True:
                    await b.receive_some()
            cause = info.value.__cause__
            assert isinstance(cause, StreamResetError) and cause.code == ErrorCode.CONN_RESET
            with pytest.raises(trio.BrokenResourceError):
                await b.send_all(b"x")
            await b.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await a.send_all(b"x")


async def test_requests_round_trip_and_errors() -> None:
    with trio.fail_after(10):
        async with session_pair() as (server, client), trio.open_nursery() as nursery:

            async def serve() -> None:
                for _ in range(2):
                    req = await server.receive_request()
                    if req.kind == "bind":
                        req.reply({"port": req.body["port"] + 1})
                    else:
                        req.reply_error(ErrorCode.PROHIBITED, {"message": "no such thing"})

            nursery.start_soon(serve)
            assert await client.request("bind", {"port": 41}) == {"port": 42}
            with pytest.raises(RequestError, match="no such thing") as info:
                await client.request("other", None)
            assert info.value.code == ErrorCode.PROHIBITED


async def test_a_reply_after_the_session_ended_is_dropped() -> None:
    """Request.reply goes through the session, which drops it once the session is over (no frame, no error)."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with session_pair() as (server, client):

                async def ask() -> None:
                    with pytest.raises(SessionClosedError):
                        await client.request("slow", None)

                nursery.start_soon(ask)
                req = await server.receive_request()
            assert server.closed
            req.reply({"late": True})


async def test_a_stream_reset_before_it_is_accepted_leaves_the_accept_queue() -> None:
    """The peer gives up on an open the application never took: the session withdraws and releases it."""
    with trio.fail_after(10):
        async with session_pair() as (server, client):
            stream = await client.open_stream("r", wait_accepted=False)
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().pending_accept == 1
            stream.reset(ErrorCode.CANCEL, "changed my mind")
            await trio.testing.wait_all_tasks_blocked()
            stats = server.statistics()
            assert (stats.pending_accept, stats.streams) == (0, 0)
            assert stats.connection.streams == 0


async def test_many_streams_over_real_tcp() -> None:
    """A session over a loopback TCP connection: 64 concurrent streams, each verified end to end."""
    with trio.fail_after(60):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:

            async def server_side(transport: trio.SocketStream) -> None:
                async with (
                    open_session(transport, role=Role.SERVER, tokens=[TOKEN]) as srv,
                    trio.open_nursery() as handlers,
                ):
                    for _ in range(64):
                        s = await srv.accept_stream()
                        handlers.start_soon(echo_hash, s)

            async def echo_hash(s: MuxStream) -> None:
                s.accept()
                digest = hashlib.sha256(await read_all(s)).digest()
                await s.send_all(digest)
                await s.aclose()

            nursery.start_soon(trio.serve_listeners, server_side, listeners)
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            async with open_session(transport, role=Role.CLIENT, name="c", token=TOKEN) as client:

                async def one(i: int) -> None:
                    data = random.Random(i).randbytes(random.Random(i).randint(0, 300_000))
                    s = await client.open_stream("echo")
                    await s.send_all(data)
                    await s.send_eof()
                    assert await read_all(s) == hashlib.sha256(data).digest()
                    await s.aclose()

                async with trio.open_nursery() as streams:
                    for i in range(64):
                        streams.start_soon(one, i)
                assert client.statistics().streams == 0
            nursery.cancel_scope.cancel()


async def _empty_acceptor(session: Session) -> None:
    """Accept every stream the peer opens, answer with an immediate EOF, expect one, and close it."""
    while True:
        s = await session.accept_stream()
        s.accept()
        await s.send_eof()
        assert await read_all(s) == b""
        await s.aclose()


async def test_many_openers_waiting_for_stream_credit_all_proceed() -> None:
    """Regression (bench.py, 200 concurrent short connections): openers blocked on MAX_STREAMS credit shared one
    wakeup event, each replacing it, so all but the last waited forever once credit came back."""
    config = SessionConfig(limits=Limits(max_streams=2, accept_backlog=2))
    with trio.fail_after(20):
        async with session_pair(config=config) as (server, client):
            done: list[int] = []

            async def opener(i: int) -> None:
                s = await server.open_stream("r")
                await s.send_eof()
                assert await read_all(s) == b""
                await s.aclose()
                done.append(i)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_empty_acceptor, client)
                async with trio.open_nursery() as openers:
                    for i in range(20):
                        openers.start_soon(opener, i)
                nursery.cancel_scope.cancel()
            assert sorted(done) == list(range(20))


async def test_openers_waiting_for_credit_proceed_in_order_and_a_cancelled_one_strands_nobody() -> None:
    """Openers waiting for stream credit are woken first come, first served, only as many as there is room for (a
    shared event woke every one of hundreds per returned credit), and one cancelled while waiting leaves the rest
    to proceed."""
    config = SessionConfig(limits=Limits(max_streams=1, accept_backlog=1))
    with trio.fail_after(20):
        async with session_pair(config=config) as (server, client):
            finish: dict[str, trio.Event] = {name: trio.Event() for name in "abcde"}
            opened_send, opened = trio.open_memory_channel[str](8)

            async def opener(name: str) -> None:
                s = await server.open_stream("r")
                await opened_send.send(name)
                await finish[name].wait()
                await s.send_eof()
                assert await read_all(s) == b""
                await s.aclose()

            cancel_c = trio.CancelScope()

            async def cancellable(name: str) -> None:
                with cancel_c:
                    await opener(name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_empty_acceptor, client)
                nursery.start_soon(opener, "a")
                assert await opened.receive() == "a"  # it holds the only credit
                for name in "bcde":
                    nursery.start_soon(cancellable if name == "c" else opener, name)
                    await trio.testing.wait_all_tasks_blocked()  # parked in this order
                assert len(server._openers) == 4
                cancel_c.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert len(server._openers) == 3
                for done, following in ("ab", "bd", "de"):
                    finish[done].set()  # its stream closes: one credit comes back
                    assert await opened.receive() == following
                finish["e"].set()
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()


async def test_an_opener_waiting_for_credit_gives_up_after_the_open_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No credit comes back (the only stream stays open): the second opener fails with STREAM_LIMIT after
    open_timeout instead of waiting forever, and the session carries on."""
    config = SessionConfig(limits=Limits(max_streams=1, accept_backlog=1, open_timeout=10))
    with trio.fail_after(60):
        async with session_pair(config=config) as (server, client):
            holder_ready = trio.Event()

            async def hold_the_only_stream() -> None:
                s = await client.accept_stream()
                s.accept()
                holder_ready.set()
                await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold_the_only_stream)
                first = await server.open_stream("r")
                await holder_ready.wait()
                started = trio.current_time()
                with pytest.raises(StreamOpenError) as info:
                    await server.open_stream("r")
                assert info.value.code == ErrorCode.STREAM_LIMIT
                assert "within 10 s" in str(info.value)
                assert trio.current_time() - started == pytest.approx(10, abs=0.5)
                assert len(server._openers) == 0
                await first.send_all(b"still fine")  # the session and the open stream are unaffected
                nursery.cancel_scope.cancel()
