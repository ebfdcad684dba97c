"""trio_tunnel.testing: the faults of a test tunnel's link, under Trio's MockClock (autojump: virtual seconds, no
real waiting) where time is what is measured.

Every tunnel here is real (server, client, TLS, sockets on 127.0.0.1); only the clock is virtual. Timing asserts
compare *virtual* time, which moves only when every task waits on a deadline: loopback sockets deliver within the
``send`` call, so nothing is in flight while the clock jumps (docs/TESTING.md, "MockClock").
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing
from trio_tunnel.testing import TunnelCheckError, open_tunnel
from tunnel_helpers import read_all, read_exactly

KiB = 1024
MiB = 1024 * KiB


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def sink(stream: trio.SocketStream) -> None:
    """Reads to EOF, then answers with the number of bytes it read (8 bytes)."""
    async with stream:
        total = 0
        while data := await stream.receive_some():
            total += len(data)
        await stream.send_all(total.to_bytes(8, "big"))


async def firehose(stream: trio.SocketStream) -> None:
    """Sends forever (until the connection breaks)."""
    async with stream:
        block = b"x" * (64 * KiB)
        try:
            while True:
                await stream.send_all(block)
        except trio.BrokenResourceError:
            pass


async def serve(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def round_trip(stream: trio.SocketStream) -> float:
    started = trio.current_time()
    await stream.send_all(b"?")
    assert await read_exactly(stream, 1) == b"?"
    return trio.current_time() - started


async def test_bandwidth_256_kib_s_makes_1_mib_take_4_s(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, open_tunnel(await serve(nursery, sink)) as tunnel:
            tunnel.link.bandwidth(256 * KiB)
            stream = await trio.open_tcp_stream(*tunnel.public_address)
            started = trio.current_time()
            await stream.send_all(random.Random(1).randbytes(MiB))
            await stream.send_eof()
            assert int.from_bytes(await read_exactly(stream, 8), "big") == MiB
            took = trio.current_time() - started
            # 4 s for the payload; TLS records and frames add well under 1 %, the 8-byte answer nothing to speak of.
            assert 4.0 <= took < 4.2, took
            await stream.aclose()
            assert tunnel.link.statistics().bytes_to_client >= MiB
            nursery.cancel_scope.cancel()


async def test_unshaped_link_costs_no_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    """The baseline of the two timing tests: without faults, a transfer and a round trip take no virtual time."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, open_tunnel(await serve(nursery, sink)) as tunnel:
            stream = await trio.open_tcp_stream(*tunnel.public_address)
            started = trio.current_time()
            await stream.send_all(bytes(MiB))
            await stream.send_eof()
            assert int.from_bytes(await read_exactly(stream, 8), "big") == MiB
            assert trio.current_time() - started < 0.001
            nursery.cancel_scope.cancel()


async def test_latency_adds_twice_the_delay_to_a_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, open_tunnel(await serve(nursery, echo)) as tunnel:
            stream = await trio.open_tcp_stream(*tunnel.public_address)
            before = min([await round_trip(stream) for _ in range(5)])
            tunnel.link.latency(0.05)
            after = min([await round_trip(stream) for _ in range(5)])
            assert after - before == pytest.approx(0.100, abs=0.001), (before, after)
            tunnel.link.latency(0.05, jitter=0.02)
            jittered = [await round_trip(stream) for _ in range(20)]
            assert all(0.06 - 1e-9 <= rtt <= 0.14 + 1e-9 for rtt in jittered), jittered
            assert len(set(jittered)) > 1, "jitter must vary the delay"
            tunnel.link.reset()
            assert await round_trip(stream) == pytest.approx(before, abs=0.001)
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_cut_during_a_transfer_resets_the_external_side_and_service_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, firehose)
            async with open_tunnel(port) as tunnel:
                download = await trio.open_tcp_stream(*tunnel.public_address)
                assert len(await read_exactly(download, 256 * KiB)) == 256 * KiB  # the transfer is under way
                assert tunnel.link.cut() == 1
                with pytest.raises(trio.BrokenResourceError) as caught:  # a reset, not a clean end of the download
                    await read_all(download)
                assert isinstance(caught.value.__cause__, ConnectionResetError), repr(caught.value.__cause__)
                await download.aclose()
                await tunnel.wait_connected()
                assert tunnel.statistics().sessions == 2
                assert tunnel.link.statistics().connections == 2 and tunnel.link.statistics().cuts == 1
                again = await trio.open_tcp_stream(*tunnel.public_address)  # the same public port serves again
                assert len(await read_exactly(again, 1000)) == 1000
                await again.aclose()
            nursery.cancel_scope.cancel()


async def test_pause_longer_than_the_keepalive_dead_time_ends_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery, open_tunnel(await serve(nursery, echo)) as tunnel:
            assert tunnel.client.config.timeouts.keepalive_dead == 45
            stream = await trio.open_tcp_stream(*tunnel.public_address)
            await round_trip(stream)  # both ends have just heard from each other
            session = tunnel.client.session
            assert session is not None
            tunnel.link.pause()
            paused = trio.current_time()
            with trio.move_on_after(44):
                await session.wait_closed()
            assert not session.closed, "ended before the keepalive dead time"
            await session.wait_closed()
            assert 45 <= trio.current_time() - paused <= 46
            assert "keepalive" in session.close_reason or "silent" in session.close_reason, session.close_reason
            with pytest.raises(trio.BrokenResourceError):  # its connection went with it
                await round_trip(stream)
            await stream.aclose()
            assert tunnel.statistics().sessions == 1  # a stalled link stalls the reconnects too
            tunnel.link.resume()
            await tunnel.wait_connected()
            assert tunnel.statistics().sessions == 2
            again = await trio.open_tcp_stream(*tunnel.public_address)
            assert await round_trip(again) == 0
            await again.aclose()
            nursery.cancel_scope.cancel()


async def test_pause_of_existing_connections_lets_the_client_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``pause(existing_only=True)`` is a NAT box forgetting the link: the client's keepalive notices (here 1.5 s)
    and its reconnect goes through at once."""
    with trio.fail_after(60):
        async with (
            trio.open_nursery() as nursery,
            open_tunnel(await serve(nursery, echo), keepalive_idle=0.3, keepalive_dead=1.5) as tunnel,
        ):
            session = tunnel.client.session
            assert session is not None
            tunnel.link.pause(existing_only=True)
            await tunnel.wait_connected()  # still the old session: nothing noticed yet
            await session.wait_closed()
            await tunnel.client.changed.wait()
            await tunnel.wait_connected()
            assert tunnel.client.session is not session
            stream = await trio.open_tcp_stream(*tunnel.public_address)
            assert await round_trip(stream) == 0
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_reset_streams_resets_both_ends_and_keeps_the_session() -> None:
    ended_send, ended = trio.open_memory_channel[BaseException | bytes](3)

    async def held(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello")
            try:
                await ended_send.send(await read_all(stream))
            except trio.BrokenResourceError as exc:
                await ended_send.send(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, open_tunnel(await serve(nursery, held)) as tunnel:
            streams = [await trio.open_tcp_stream(*tunnel.public_address) for _ in range(3)]
            for stream in streams:
                assert await read_exactly(stream, 5) == b"hello"
            session = tunnel.client.session
            assert tunnel.reset_streams() == 3
            for stream in streams:
                with pytest.raises(trio.BrokenResourceError) as caught:
                    await read_all(stream)
                assert isinstance(caught.value.__cause__, ConnectionResetError)
                await stream.aclose()
            ends = [await ended.receive() for _ in range(3)]
            assert all(isinstance(end, trio.BrokenResourceError) for end in ends), ends  # the service: resets too
            assert tunnel.client.session is session and not session.closed
            assert tunnel.reset_streams() == 0
            nursery.cancel_scope.cancel()


async def test_a_stream_factory_is_exposed_too() -> None:
    async def connect() -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(echo, theirs)
        return ours

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with open_tunnel(connect, name="memory", tls=False) as tunnel:
                assert tunnel.server.fingerprint is None and tunnel.server.config.insecure_plaintext
                stream = await trio.open_tcp_stream(*tunnel.public_address)
                await stream.send_all(b"through memory")
                await stream.send_eof()
                assert await read_all(stream) == b"through memory"
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_leaving_the_block_fails_on_a_logged_error() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, echo)
            with pytest.raises(TunnelCheckError, match=r"error logged: trio_tunnel\.client: something went wrong"):
                async with open_tunnel(port):
                    logging.getLogger("trio_tunnel.client").error("something went wrong")
            nursery.cancel_scope.cancel()


async def test_the_block_raises_the_test_s_own_error_unwrapped() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, echo)
            with pytest.raises(KeyError):
                async with open_tunnel(port):
                    raise KeyError("mine")
            nursery.cancel_scope.cancel()


async def test_options_go_to_the_right_end_and_unknown_ones_are_refused() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, echo)
            async with open_tunnel(port, keepalive_idle=7, keepalive_dead=20, max_connections_per_service=3) as t:
                assert t.server.config.timeouts.keepalive_idle == t.client.config.timeouts.keepalive_idle == 7
                assert t.server.config.max_connections_per_service == 3
                assert t.client.config.server_fingerprint == (t.server.fingerprint,)
                assert t.client.config.server.port == t.link.address[1] != t.server.address[1]
            with pytest.raises(TypeError, match=r"unknown option.*no_such_thing"):
                async with open_tunnel(port, no_such_thing=1):
                    pass
            nursery.cancel_scope.cancel()


async def test_an_end_that_does_not_stop_is_reported(autojump_clock: trio.testing.MockClock) -> None:
    """The leak check itself: an end whose task never ends after its shutdown request is named, after its drain
    time and the margin (virtual seconds here), instead of hanging the test."""
    from trio_tunnel.lifecycle import Shutdown
    from trio_tunnel.testing.harness import STOP_MARGIN, _stop

    problems: list[str] = []
    shutdown = Shutdown(drain_timeout=2)
    with trio.fail_after(60):
        started = trio.current_time()
        await _stop("client", shutdown, trio.Event(), problems)
    assert shutdown.requested.is_set()
    assert trio.current_time() - started == 2 + STOP_MARGIN
    assert problems == [f"the client did not stop within {2 + STOP_MARGIN:g} s of its shutdown"]
