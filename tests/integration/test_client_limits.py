"""Per-client and per-visitor limits: max_ports_per_client, and max_connections_per_ip on each exposed service and
each group's port."""

from __future__ import annotations

import logging

import trio
from tunnel_helpers import LOCALHOST, RecordWatch, client_config, exchange, start_client, start_server, start_service


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


async def test_a_client_cannot_expose_more_than_max_ports_per_client() -> None:
    watch = RecordWatch()
    log = logging.getLogger("trio_tunnel")
    log.addHandler(watch)
    log.setLevel(logging.INFO)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                server = await start_server(nursery, max_ports_per_client=2)
                service = await start_service(nursery, echo)
                specs = [f"s{i}=127.0.0.1:0:127.0.0.1:{service.port}" for i in range(3)]
                client = await start_client(nursery, client_config(server.value, *specs))
                assert sorted(client.value) == ["s0", "s1"]
                refused = watch.matching("the server refused to expose s2", logger="trio_tunnel.client")
                assert refused and "already exposes 2 services" in refused[0].getMessage()
                assert "max_ports_per_client" in refused[0].getMessage()
                assert await exchange(client.value["s1"].port, b"ok") == b"ok"
                await client.stop()
                await server.stop()
                service.scope.cancel()
    finally:
        log.removeHandler(watch)
        log.setLevel(logging.NOTSET)


async def visitor(port: int, source: str) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((LOCALHOST, port))
    return trio.SocketStream(sock)


async def closed(stream: trio.SocketStream) -> bool:
    try:
        return await stream.receive_some() == b""
    except trio.BrokenResourceError:  # reset
        return True


async def test_one_address_cannot_hold_every_slot_of_a_service() -> None:
    watch = RecordWatch()
    logging.getLogger("trio_tunnel").addHandler(watch)
    logging.getLogger("trio_tunnel").setLevel(logging.INFO)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, max_connections_per_service=100, max_connections_per_ip=2)
            service = await start_service(nursery, echo)
            client = await start_client(
                nursery, client_config(server.value, f"web=127.0.0.1:0:127.0.0.1:{service.port}")
            )
            port = client.value["web"].port
            held = [await visitor(port, "127.0.0.2") for _ in range(2)]
            for i, stream in enumerate(held):  # both carried end to end
                await stream.send_all(b"held %d" % i)
                assert await stream.receive_some() == b"held %d" % i
            surplus = await visitor(port, "127.0.0.2")
            with trio.fail_after(5):
                assert await closed(surplus)  # closed at once, nothing carried
            other = await visitor(port, "127.0.0.3")
            await other.send_all(b"other")
            assert await other.receive_some() == b"other"
            for stream in (*held, surplus, other):
                await stream.aclose()
            await watch.wait_for("home/web: 127.0.0.2:", logger="trio_tunnel.server", count=2)  # both closed
            again = await visitor(port, "127.0.0.2")  # the slots were given back
            await again.send_all(b"again")
            assert await again.receive_some() == b"again"
            await again.aclose()
            await client.stop()
            await server.stop()
            service.scope.cancel()
    logging.getLogger("trio_tunnel").removeHandler(watch)
    logging.getLogger("trio_tunnel").setLevel(logging.NOTSET)


async def test_one_address_cannot_hold_every_slot_of_a_group() -> None:
    """max_connections_per_ip counts a group's port as one service's, across its members."""
    watch = RecordWatch()
    logging.getLogger("trio_tunnel").addHandler(watch)
    logging.getLogger("trio_tunnel").setLevel(logging.INFO)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                server = await start_server(nursery, max_connections_per_service=100, max_connections_per_ip=2)
                service = await start_service(nursery, echo)
                ports: list[int] = []
                for name in ("a", "b"):
                    spec = f"web@pool={LOCALHOST}:{ports[0] if ports else 0}:{LOCALHOST}:{service.port}"
                    client = await start_client(nursery, client_config(server.value, spec, name=name))
                    ports.append(client.value["web"].port)
                port = ports[0]
                assert ports == [port, port]  # both members share the group's port
                held = [await visitor(port, "127.0.0.2") for _ in range(2)]  # one on each member (round robin)
                for i, stream in enumerate(held):
                    await stream.send_all(b"held %d" % i)
                    assert await stream.receive_some() == b"held %d" % i
                surplus = await visitor(port, "127.0.0.2")
                with trio.fail_after(5):
                    assert await closed(surplus)  # the members have 99 free slots each: only the per-address cap
                assert watch.matching("group pool: refused 127.0.0.2", logger="trio_tunnel.server")
                other = await visitor(port, "127.0.0.3")
                await other.send_all(b"other")
                assert await other.receive_some() == b"other"
                await held[0].aclose()
                await watch.wait_for("@pool: 127.0.0.2:", logger="trio_tunnel.server")  # its close was seen
                again = await visitor(port, "127.0.0.2")  # and its slot given back
                await again.send_all(b"again")
                assert await again.receive_some() == b"again"
                for stream in (*held, surplus, other, again):
                    await stream.aclose()
                nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("trio_tunnel").removeHandler(watch)
        logging.getLogger("trio_tunnel").setLevel(logging.NOTSET)
