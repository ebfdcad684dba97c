"""A replaced client never exits on its own: a ``trio-tunnel client`` frozen with SIGSTOP loses its name to a
newcomer (its link is stale), and once thawed it logs who replaced it, reconnects, is refused with NAME_IN_USE
(the newcomer is alive) and keeps retrying with backoff. (Before issue 12 it exited with status 1.)"""

from __future__ import annotations

import re
import signal

import trio
from trio_tunnel.config import Timeouts
from tunnel_helpers import (
    FAST,
    TOKEN_TEXT,
    cli,
    client_config,
    exchange,
    start_client,
    start_server,
    start_service,
)


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


async def test_a_frozen_client_is_replaced_then_reconnects_and_is_refused_without_exiting() -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, timeouts=Timeouts(takeover_probe=0.5))
            address = server.value
            service = await start_service(nursery, echo)
            spec = f"web=127.0.0.1:0:127.0.0.1:{service.port}"
            async with cli(
                nursery,
                "client",
                "--server",
                f"127.0.0.1:{address.port}",
                "--token",
                TOKEN_TEXT,
                "--name",
                "dup",
                "-R",
                spec,
            ) as first:
                await first.expect(r"exposed web 127\.0\.0\.1:\d+")
                first.process.send_signal(signal.SIGSTOP)
                try:
                    second = await start_client(nursery, client_config(address, spec, name="dup", timeouts=FAST))
                    assert await exchange(second.value["web"].port, b"second") == b"second"
                finally:
                    first.process.send_signal(signal.SIGCONT)
                replaced = await first.expect_stderr(r"replaced on the server: .*")
                assert "another client named 'dup' connected from 127.0.0.1:" in replaced[0]
                refused = await first.expect_stderr(r"the server refused the session: .*")
                assert "in use by a live client connected from 127.0.0.1:" in refused[0]
                while len(delays := re.findall(r"reconnecting to \S+ in (\d+\.\d) s", first.stderr)) < 3:
                    await first._err_changed.wait()
                assert float(delays[0]) < float(delays[1]) < float(delays[2]), first.stderr  # refusals grow the backoff
                assert first.process.returncode is None  # still running, still trying
                assert await exchange(second.value["web"].port, b"still") == b"still"
                await second.stop()
            await server.stop()
            service.scope.cancel()
