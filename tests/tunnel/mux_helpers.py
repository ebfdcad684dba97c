"""Shared helpers for the mux tests: a connected pair of sessions over an in-memory (or any) transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import trio
import trio.testing
from trio_tunnel.mux import Role, Session, SessionConfig, open_session

TOKEN = b"mux-test-token-0123456789abcdef"


@asynccontextmanager
async def session_pair(
    make_transport: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = trio.testing.memory_stream_pair,
    config: SessionConfig | None = None,
    client_config: SessionConfig | None = None,
) -> AsyncIterator[tuple[Session, Session]]:
    """Yield (server, client) sessions talking over ``make_transport()``; both are closed on exit."""
    config = config or SessionConfig()
    left, right = make_transport()
    async with trio.open_nursery() as nursery:
        holder: list[Session] = []
        ready = trio.Event()
        done = trio.Event()

        async def run_server() -> None:
            async with open_session(left, role=Role.SERVER, config=config, tokens=[TOKEN]) as server:
                holder.append(server)
                ready.set()
                await done.wait()

        nursery.start_soon(run_server)
        async with open_session(
            right, role=Role.CLIENT, config=client_config or config, name="t", token=TOKEN
        ) as client:
            await ready.wait()
            try:
                yield holder[0], client
            finally:
                done.set()


@attrs.define(eq=False)
class ControlledStream(trio.abc.Stream):
    """Wraps a transport; a test can blackhole its writes (the peer goes silent) or delay them (a long link)."""

    inner: trio.abc.Stream
    blackhole: bool = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.blackhole:
            await trio.lowlevel.checkpoint()
            return
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def delayed_pair(delay: float) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """A memory stream pair whose bytes arrive ``delay`` seconds after they were sent (both ways).

    Implemented with two unbounded-by-count but time-released memory channels; for autojump_clock tests only.
    """
    a_to_b_send, a_to_b_recv = trio.open_memory_channel[tuple[float, bytes]](1000)
    b_to_a_send, b_to_a_recv = trio.open_memory_channel[tuple[float, bytes]](1000)
    return _Delayed(a_to_b_send, b_to_a_recv, delay), _Delayed(b_to_a_send, a_to_b_recv, delay)


@attrs.define(eq=False)
class _Delayed(trio.abc.Stream):
    out: trio.MemorySendChannel[tuple[float, bytes]]
    inp: trio.MemoryReceiveChannel[tuple[float, bytes]]
    delay: float
    pending: bytes = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.out.send((trio.current_time() + self.delay, bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self.pending:
            try:
                due, self.pending = await self.inp.receive()
            except trio.EndOfChannel:
                return b""
            await trio.sleep_until(due)
        n = len(self.pending) if max_bytes is None else max_bytes
        data, self.pending = self.pending[:n], self.pending[n:]
        return data

    async def aclose(self) -> None:
        await self.out.aclose()
        await self.inp.aclose()
