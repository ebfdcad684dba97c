"""Logging under attack: one line per event kind and source, then summaries, never a line per attempt; scanners
(wrong magic) only at DEBUG. (Before issue 12: two lines per refused handshake, 4,000 lines for 2,000 idle
connections, a WARNING per refused stream open.)"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from trio_tunnel.config import LocalSpec
from tunnel_helpers import LOCALHOST, RecordWatch, client_config, start_client, start_server


@pytest.fixture
def watch() -> Iterator[RecordWatch]:
    watch = RecordWatch()
    log = logging.getLogger("trio_tunnel")
    log.addHandler(watch)
    log.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        log.removeHandler(watch)
        log.setLevel(logging.NOTSET)


def lines(watch: RecordWatch, text: str, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in watch.matching(text, level, logger="trio_tunnel")]


async def test_a_flood_of_refused_forwards_logs_one_line_then_a_summary(
    watch: RecordWatch, autojump_clock: trio.testing.MockClock
) -> None:
    """300 forward opens to a target the server does not allow: one WARNING, then (10 s later) one summary."""
    flood = 300
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery)
            spec = LocalSpec.parse("denied=127.0.0.1:0:127.0.0.1:9")
            client = await start_client(nursery, client_config(server.value, locals=(spec,)))
            port = int(lines(watch, "forwarding 127.0.0.1:")[0].split(":")[1].split()[0])

            async def visit() -> None:
                stream = await trio.open_tcp_stream(LOCALHOST, port)
                async with stream:
                    with trio.move_on_after(30):
                        await stream.receive_some()  # closed once the server refuses

            async with trio.open_nursery() as visitors:
                for _ in range(flood):
                    visitors.start_soon(visit)
            assert len(lines(watch, "is not allowed", logging.WARNING)) == flood  # the client saw each refusal
            assert len(lines(watch, "refused forward to 127.0.0.1:9")) == 1
            summary = await watch.wait_for("more stream opens from client 'home'", logger="trio_tunnel.server")
            assert (
                summary[0].getMessage() == f"refused {flood - 1} more stream opens from client 'home' in the last 10 s"
            )
            await client.stop()
            await server.stop()


async def test_idle_connections_from_one_address_log_one_line(watch: RecordWatch) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, max_handshakes_per_ip=4)
            socks = []
            for _ in range(200):
                sock = trio.socket.socket()
                await sock.bind(("127.0.0.2", 0))
                await sock.connect((LOCALHOST, server.value.port))
                socks.append(sock)
            for sock in socks[4:]:  # wait until the server has closed every surplus connection
                with trio.fail_after(5):
                    with contextlib.suppress(ConnectionResetError):
                        assert await sock.recv(1) == b""
            about = lines(watch, "127.0.0.2", logging.DEBUG)
            assert len(about) == 1 and "max_handshakes_per_ip" in about[0], about
            for sock in socks:
                sock.close()
            await server.stop()


@pytest.mark.parametrize("plaintext", [False, True])
async def test_a_scanner_is_logged_only_at_debug(watch: RecordWatch, plaintext: bool) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, insecure_plaintext=plaintext)
            stream = await trio.open_tcp_stream(LOCALHOST, server.value.port)
            scanner = f"127.0.0.1:{stream.socket.getsockname()[1]}"
            async with stream:
                await stream.send_all(b"GET / HTTP/1.0\r\n\r\n" + b"\x00" * 64)
                try:
                    while await stream.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass
            await server.stop()
    assert lines(watch, f"dropped a connection from {scanner}", logging.DEBUG)
    assert not [r.getMessage() for r in watch.records if r.levelno >= logging.INFO and scanner in r.getMessage()]
