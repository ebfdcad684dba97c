"""``link_memory`` over real sessions: the mux settings it makes, and relays that read from a socket only what the
link can queue (so bytes the peer cannot take yet stay in the kernel, not in our memory)."""

from __future__ import annotations

import trio
import trio.testing
from mux_helpers import session_pair
from trio_tunnel.config import Timeouts
from trio_tunnel.mux import Role
from trio_tunnel.relay import Splice
from trio_tunnel.wire import LINK_MEMORY, session_config

KiB = 1024
MiB = 1024 * KiB


class Source(trio.abc.Stream):
    """A local socket with an endless supply of bytes: whatever a read asks for, it gets (and it is counted)."""

    def __init__(self) -> None:
        self.read = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        size = max_bytes or 65536
        self.read += size
        return b"s" * size

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def test_the_default_budget_and_what_it_makes() -> None:
    limits = session_config(Timeouts(), role=Role.SERVER).limits
    assert 4 * MiB == LINK_MEMORY
    assert (limits.initial_window, limits.stream_window) == (4 * KiB, 256 * KiB)
    assert limits.session_window == limits.session_send_buffer == 2 * MiB
    bigger = session_config(Timeouts(), role=Role.CLIENT, memory=32 * MiB).limits
    assert (bigger.initial_window, bigger.session_window) == (32 * KiB, 16 * MiB)


async def test_relays_read_no_more_than_the_link_can_queue() -> None:
    config = session_config(Timeouts(), role=Role.SERVER, memory=1 * MiB)
    floor = config.limits.initial_window
    with trio.fail_after(10):
        async with session_pair(config=config) as (server, client), trio.open_nursery() as nursery:
            sources = []
            for _ in range(8):
                stream = await client.open_stream("bulk", {}, wait_accepted=False)
                source = Source()
                sources.append(source)
                nursery.start_soon(Splice(source, stream).run)
            for _ in range(8):
                (await server.accept_stream()).accept()  # accepted, never read: its peer keeps the floor credit
            await trio.testing.wait_all_tasks_blocked()
            read = sum(source.read for source in sources)
            # Each stream can queue its credit (the server's floor window) and no more; before the budget, each
            # relay read a 256 KiB chunk it then held while waiting for credit.
            assert 0 < read <= 8 * floor, (read, 8 * floor)
            nursery.cancel_scope.cancel()
