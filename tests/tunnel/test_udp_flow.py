"""A UDP flow's two directions (trio_tunnel.udp.Flow) with fake pipes under MockClock: idle expiry, and a full
queue that drops instead of blocking anyone."""

from __future__ import annotations

import logging
import math
import socket

import attrs
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from trio_tunnel.metrics import Metrics
from trio_tunnel.proto.datagram import FlowGate
from trio_tunnel.udp import Flow, Pipe, UdpEntrance
from trio_tunnel.udpsocket import bind_udp


@attrs.define(eq=False)
class FakePipe:
    """A pipe whose sends either land in ``sent`` or (``stuck``) never return, as when the link gives no credit."""

    stuck: bool = False
    max_send: int = 65535
    sent: list[bytes] = attrs.field(factory=list)
    closed: list[float | None] = attrs.field(factory=list)
    replies: trio.MemoryReceiveChannel[bytes] | None = None

    async def send(self, datagrams: list[bytes]) -> None:
        if self.stuck:
            await trio.sleep_forever()
        self.sent += datagrams

    async def receive(self) -> list[bytes] | None:
        if self.replies is None:
            await trio.sleep_forever()
        assert self.replies is not None
        async for reply in self.replies:
            return [reply]
        return None

    def close(self, idle: float | None) -> None:
        self.closed.append(idle)


def opener(pipe: Pipe):  # type: ignore[no-untyped-def]
    async def open_pipe() -> Pipe:
        return pipe

    return open_pipe


async def test_an_idle_flow_ends_after_its_timeout_and_traffic_extends_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(1000):
        pipe = FakePipe()
        flow = Flow("198.51.100.1:5353", idle=60.0)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flow.run, opener(pipe), lambda _d: True)
            await trio.sleep(30)
            flow.offer(b"ping")
            await trio.testing.wait_all_tasks_blocked()
            assert pipe.sent == [b"ping"]
        assert flow.ending == "idle"
        assert trio.current_time() - start == 90.0
        assert pipe.closed == [60.0]


async def test_replies_count_as_activity(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(1000):
        send, receive = trio.open_memory_channel[bytes](4)
        pipe = FakePipe(replies=receive)
        delivered: list[bytes] = []
        flow = Flow("198.51.100.1:5353", idle=10.0)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flow.run, opener(pipe), lambda d: delivered.append(d) is None)
            await trio.sleep(9)
            await send.send(b"pong")
            await trio.sleep(9)
            assert flow.ending == ""
        assert delivered == [b"pong"] and flow.stats.down == 1
        assert trio.current_time() - start == 19.0
        # The far side ending the flow ends it at once.
        send2, receive2 = trio.open_memory_channel[bytes](1)
        flow2 = Flow("x", idle=10.0)
        await send2.aclose()
        assert await flow2.run(opener(FakePipe(replies=receive2)), lambda _d: True) == "ended by the far side"


async def test_a_full_queue_drops_and_counts_without_blocking_other_flows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(1000):
        stuck, moving = FakePipe(stuck=True), FakePipe()
        blocked, free = Flow("a", idle=math.inf), Flow("b", idle=math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked.run, opener(stuck), lambda _d: True)
            nursery.start_soon(free.run, opener(moving), lambda _d: True)
            await trio.testing.wait_all_tasks_blocked()
            blocked.offer(b"first")  # taken by the sender, which then waits for credit forever
            await trio.testing.wait_all_tasks_blocked()
            room = blocked.queue.max_count
            for _ in range(room + 36):
                blocked.offer(b"x" * 10)  # offer never waits: queued (max_count at most) or dropped
            for index in range(100):  # meanwhile another flow moves everything it is given
                free.offer(bytes([index]))
                if index % 10 == 9:
                    await trio.testing.wait_all_tasks_blocked()
            assert blocked.stats.dropped_full == 36 and len(blocked.queue) == room
            assert moving.sent == [bytes([index]) for index in range(100)] and free.stats.dropped == 0
            nursery.cancel_scope.cancel()


async def test_a_datagram_above_the_pipe_limit_is_dropped_and_counted(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(1000):
        pipe = FakePipe(max_send=100)
        flow = Flow("a", idle=math.inf)
        flow.offer(bytes(101))  # before the pipe is open: queued, then dropped when its limit is known
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flow.run, opener(pipe), lambda _d: True)
            await trio.testing.wait_all_tasks_blocked()
            flow.offer(bytes(100))
            flow.offer(bytes(200))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert pipe.sent == [bytes(100)]
        assert flow.stats.dropped_big == 2


async def test_an_entrance_reports_each_ended_flows_drops(autojump_clock: trio.testing.MockClock) -> None:
    """What ``trio_tunnel_udp_datagrams_dropped_total`` counts: a UDP entrance whose flow's far side never takes
    more than one datagram drops what its queue cannot hold, and says how many once the flow idles out."""
    with trio.fail_after(1000):
        udp = await bind_udp("127.0.0.1", 0)
        stuck = FakePipe(stuck=True)

        async def open_pipe(_peer: str) -> Pipe:
            return stuck

        reports: list[int] = []
        entrance = UdpEntrance(udp, "test", logging.getLogger("test"), FlowGate(4), 10.0, open_pipe)
        entrance.on_drops = reports.append
        metrics = Metrics("server")
        async with trio.open_nursery() as nursery:
            await nursery.start(entrance.serve)
            source = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            room = Flow("x", idle=1.0).queue.max_count
            with source:
                for _ in range(room + 21):  # one taken by the stuck sender, `room` queued, 20 dropped
                    await source.sendto(b"d" * 8, udp.local)
                    await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(11)  # the flow idles out
            assert reports == [20]
            metrics.udp_dropped("home", "dns", reports[0])
            text = metrics.respond("GET", "/metrics").body.decode()
            samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
            assert [(s.labels, s.value) for s in samples if s.name == "trio_tunnel_udp_datagrams_dropped_total"] == [
                ({"client": "home", "service": "dns"}, 20.0)
            ]
            nursery.cancel_scope.cancel()
