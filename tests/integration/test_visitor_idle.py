"""``idle_timeout`` on a TCP service ([client.expose.NAME]): a visitor that goes quiet is closed through the link (the
server's slot is freed), a visitor of a service without it stays. The timer itself is tested with MockClock in
tests/tunnel/test_idle.py; this checks the wiring, over a real TLS link, with short real timeouts."""

from __future__ import annotations

import logging

import attrs
import trio
from tunnel_helpers import RecordWatch, client_config, start_client, start_server, start_service


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass  # (the idle visitor's connection is reset: that is the test)


async def test_a_quiet_visitor_is_closed_after_the_services_idle_timeout() -> None:
    watch = RecordWatch()
    log = logging.getLogger("trio_tunnel")
    log.addHandler(watch)
    log.setLevel(logging.INFO)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                server = await start_server(nursery)
                service = await start_service(nursery, echo)
                config = client_config(
                    server.value,
                    f"quick=127.0.0.1:0:127.0.0.1:{service.port}",
                    f"keep=127.0.0.1:0:127.0.0.1:{service.port}",
                )
                quick, keep = config.remotes
                config = attrs.evolve(config, remotes=(attrs.evolve(quick, idle_timeout=0.5), keep))
                client = await start_client(nursery, config)
                idle = await trio.open_tcp_stream("127.0.0.1", client.value["quick"].port)
                kept = await trio.open_tcp_stream("127.0.0.1", client.value["keep"].port)
                for stream in (idle, kept):
                    await stream.send_all(b"hi")
                    assert await stream.receive_some() == b"hi"
                started = trio.current_time()
                try:
                    data = await idle.receive_some()
                except trio.BrokenResourceError:
                    data = b""  # (closed abortively: a reset)
                waited = trio.current_time() - started
                assert data == b"" and 0.4 <= waited < 10, waited
                with trio.move_on_after(1.0) as quiet:
                    await kept.receive_some()
                assert quiet.cancelled_caught, "a service without idle_timeout keeps its quiet visitor"
                await kept.send_all(b"still")
                assert await kept.receive_some() == b"still"
                lines = [r.getMessage() for r in watch.records if "(idle)" in r.getMessage()]
                assert lines and lines[0].startswith("quick: "), lines
                await kept.aclose()
                await idle.aclose()
                await client.stop()
                await server.stop()
                service.scope.cancel()
    finally:
        log.removeHandler(watch)
        log.setLevel(logging.NOTSET)


async def count_then_answer(stream: trio.SocketStream) -> None:
    """Reads everything (never writes until the end), then answers with the byte count."""
    async with stream:
        total = 0
        while data := await stream.receive_some():
            total += len(data)
        await stream.send_all(b"%d" % total)


async def test_an_upload_that_never_pauses_is_not_idle() -> None:
    """Bytes only towards the service count as activity too, also when the session's reader writes them straight
    into the service's socket (one scheduler pass per hop: the splice task never sees them)."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery)
            service = await start_service(nursery, count_then_answer)
            config = client_config(server.value, f"up=127.0.0.1:0:127.0.0.1:{service.port}")
            config = attrs.evolve(config, remotes=(attrs.evolve(config.remotes[0], idle_timeout=0.5),))
            client = await start_client(nursery, config)
            visitor = await trio.open_tcp_stream("127.0.0.1", client.value["up"].port)
            for _ in range(20):  # 2 s of upload, a chunk every 0.1 s, nothing coming back
                await visitor.send_all(b"u" * 1024)
                await trio.sleep(0.1)
            await visitor.send_eof()
            answer = b""
            while data := await visitor.receive_some():
                answer += data
            assert answer == b"20480"
            await visitor.aclose()
            await client.stop()
            await server.stop()
            service.scope.cancel()
