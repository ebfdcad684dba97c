"""A TCP service's visitor idle timeout (trio_tunnel.idle): a splice that moves no byte either way for ``idle`` seconds
is stopped, one that keeps moving is not, and the timer wakes once per idle period, not per chunk. MockClock only."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio_tunnel import idle as idle_module
from trio_tunnel.config import RemoteSpec
from trio_tunnel.idle import run_splice
from trio_tunnel.relay import Splice, SpliceResult


def _pair() -> tuple[trio.abc.Stream, trio.abc.Stream, Splice]:
    """visitor <-> [relay a | relay b] <-> service; the splice joins the two relay ends."""
    visitor, relay_a = trio.testing.memory_stream_pair()
    relay_b, service = trio.testing.memory_stream_pair()
    return visitor, service, Splice(relay_a, relay_b)


async def test_a_silent_connection_is_closed_after_the_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    visitor, service, splicer = _pair()
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            ended: list[tuple[float, SpliceResult]] = []

            async def run() -> None:
                result = await run_splice(splicer, 30.0)
                ended.append((trio.current_time(), result))

            nursery.start_soon(run)
            await trio.sleep(1)
            await visitor.send_all(b"hello")
            assert await service.receive_some() == b"hello"
            last = trio.current_time()
    when, result = ended[0]
    assert when == pytest.approx(last + 30.0, abs=0.01), "closed idle seconds after the last byte"
    assert (result.a_to_b, result.b_to_a) == ("idle", "idle")
    assert result.bytes_a_to_b == 5


async def test_activity_either_way_keeps_it_open_and_the_timer_wakes_once_per_period(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps = 0
    real_sleep_until = trio.sleep_until

    async def counting_sleep_until(deadline: float) -> None:
        nonlocal sleeps
        sleeps += 1
        await real_sleep_until(deadline)

    monkeypatch.setattr(idle_module.trio, "sleep_until", counting_sleep_until)
    visitor, service, splicer = _pair()
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            results: list[SpliceResult] = []

            async def run() -> None:
                results.append(await run_splice(splicer, 10.0))

            nursery.start_soon(run)
            for i in range(100):  # a byte every 2 s for 200 s, alternating directions
                await trio.sleep(2)
                sender, receiver = (visitor, service) if i % 2 else (service, visitor)
                await sender.send_all(b"x")
                assert await receiver.receive_some() == b"x"
            assert not results, "still open after 200 s of activity"
            # It sleeps until last + 10 and wakes when the last byte is up to 2 s old: every 8-10 s, not per chunk.
            assert sleeps <= 200 / 8 + 2, f"the timer woke {sleeps} times for 100 chunks: it must re-arm per period"
            await visitor.send_eof()
            await service.send_eof()
            assert await visitor.receive_some() == b""
            assert await service.receive_some() == b""
    assert (results[0].a_to_b, results[0].b_to_a) == ("eof", "eof")


async def test_without_an_idle_timeout_a_silent_connection_stays(autojump_clock: trio.testing.MockClock) -> None:
    visitor, service, splicer = _pair()
    with trio.fail_after(100_000):
        async with trio.open_nursery() as nursery:
            results: list[SpliceResult] = []

            async def run() -> None:
                results.append(await run_splice(splicer, None))

            nursery.start_soon(run)
            await trio.sleep(10_000)
            assert not results
            await visitor.send_eof()
            await service.send_eof()
    assert (results[0].a_to_b, results[0].b_to_a) == ("eof", "eof")


def test_idle_timeout_is_off_for_tcp_services_and_60_s_for_udp_unless_set() -> None:
    tcp = RemoteSpec.parse("web=8080:127.0.0.1:80")
    udp = RemoteSpec.parse("dns=5353:127.0.0.1:53/udp")
    assert (tcp.idle_timeout, udp.idle_timeout) == (None, 60.0)
    assert RemoteSpec.parse("web=8080:127.0.0.1:80", idle_timeout=300).idle_timeout == 300.0
