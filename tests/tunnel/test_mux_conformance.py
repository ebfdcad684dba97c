"""The mux stream is a trio.abc.HalfCloseableStream: trio's own conformance checker, over two transports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio_tunnel.mux import MuxStream, Role, Session, SessionConfig, open_session
from trio_tunnel.proto import Limits

TOKEN = b"conformance-token-0123456789"
SMALL = SessionConfig(limits=Limits(initial_window=4096, max_window=4096, max_frame_payload=1024, max_send_buffer=4096))


@asynccontextmanager
async def session_pair(
    make_transport: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]], config: SessionConfig = SMALL
) -> AsyncIterator[tuple[Session, Session]]:
    left, right = make_transport()
    async with trio.open_nursery() as nursery:
        server_ready: trio.Event = trio.Event()
        holder: list[Session] = []
        done = trio.Event()

        async def run_server() -> None:
            async with open_session(left, role=Role.SERVER, config=config, tokens=[TOKEN]) as server:
                holder.append(server)
                server_ready.set()
                await done.wait()

        nursery.start_soon(run_server)
        async with open_session(right, role=Role.CLIENT, config=config, name="t", token=TOKEN) as client:
            await server_ready.wait()
            yield holder[0], client
            done.set()


TRANSPORTS = {
    "memory": trio.testing.memory_stream_pair,
    "lockstep": trio.testing.lockstep_stream_pair,
}


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
async def test_check_half_closeable_stream(transport: str) -> None:
    with trio.fail_after(60):
        async with session_pair(TRANSPORTS[transport]) as (server, client):

            async def stream_maker() -> tuple[MuxStream, MuxStream]:
                async with trio.open_nursery() as nursery:
                    accepted: list[MuxStream] = []

                    async def accept() -> None:
                        accepted.append(await client.accept_stream())

                    nursery.start_soon(accept)
                    opened = await server.open_stream("t", wait_accepted=False)
                accepted[0].accept()
                await opened.wait_accepted()
                return opened, accepted[0]

            async def clogged_stream_maker() -> tuple[MuxStream, MuxStream]:
                a, b = await stream_maker()
                # Use up each direction's credit (4 KiB window) so the next send_all blocks until the peer reads.
                await a.send_all(b"x" * 4096)
                await b.send_all(b"y" * 4096)
                return a, b

            await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)
