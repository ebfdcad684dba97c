"""A client refused because the server is full is told so ("too many clients"), not "unexpected GOAWAY frame during
the handshake", and its reconnect backoff grows."""

from __future__ import annotations

import logging
import re

import trio
from trio_tunnel.config import Timeouts
from tunnel_helpers import RecordWatch, client_config, start_client, start_server


async def test_a_full_server_says_so_and_the_refused_client_backs_off() -> None:
    watch = RecordWatch()
    log = logging.getLogger("trio_tunnel")
    log.addHandler(watch)
    log.setLevel(logging.INFO)
    slow = Timeouts(reconnect_initial=0.1, reconnect_max=5, reconnect_jitter=0)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                server = await start_server(nursery, max_clients=1)
                first = await start_client(nursery, client_config(server.value, name="first"))
                nursery.start_soon(start_client, nursery, client_config(server.value, name="second", timeouts=slow))
                await watch.wait_for("reconnecting to", logger="trio_tunnel.client", count=3)
                refusals = watch.matching(
                    "the server refused the session", logging.WARNING, logger="trio_tunnel.client"
                )
                assert refusals and refusals[0].getMessage().endswith("the server has too many clients")
                assert not watch.matching("unexpected", logger="trio_tunnel")
                delays = [
                    float(re.findall(r"in (\d+\.\d+) s", r.getMessage())[0])
                    for r in watch.matching("reconnecting to", logger="trio_tunnel.client")
                ]
                assert delays[:3] == [0.1, 0.2, 0.4]
                await first.stop()
                nursery.cancel_scope.cancel()
    finally:
        log.removeHandler(watch)
        log.setLevel(logging.NOTSET)
