"""Client identity on the server: a name taken by another live client, and public ports kept across reconnects."""

from __future__ import annotations

import pytest
import trio
from trio_tunnel.client import run_client
from trio_tunnel.config import ClientConfig, HostPort, Timeouts
from trio_tunnel.errors import NameTakenError
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.testing import TunnelServer

FAST = Timeouts(reconnect_initial=0.05, reconnect_max=0.2)


async def echo_service(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def echo_once(address: HostPort, payload: bytes = b"ping") -> bytes:
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        got = b""
        while data := await stream.receive_some():
            got += data
    return got


def client_config(server: TunnelServer, service_port: int, name: str = "dup") -> ClientConfig:
    return server.client_config(f"web=127.0.0.1:0:127.0.0.1:{service_port}", name=name, timeouts=FAST)


async def test_second_live_client_with_the_same_name_wins_and_the_first_stops(
    tunnel_server: TunnelServer, nursery: trio.Nursery
) -> None:
    with trio.fail_after(20):
        service = await nursery.start(echo_service)
        first_error: list[NameTakenError] = []
        first_up = trio.Event()
        first_done = trio.Event()

        async def first() -> None:
            with pytest.raises(NameTakenError) as info:
                await run_client(client_config(tunnel_server, service), Shutdown(), task_status=_set_on_start(first_up))
            first_error.append(info.value)
            first_done.set()

        nursery.start_soon(first)
        await first_up.wait()
        second = Shutdown()
        exposed = await nursery.start(run_client, client_config(tunnel_server, service), second)
        assert await echo_once(exposed["web"]) == b"ping"
        await first_done.wait()  # the first client ends by itself; it does not fight for the name
        assert "another client named 'dup'" in first_error[0].reason
        assert "--name" in first_error[0].reason
        assert await echo_once(exposed["web"], b"still the second") == b"still the second"


def _set_on_start(event: trio.Event) -> trio.TaskStatus[object]:
    class Status:
        def started(self, value: object = None) -> None:
            event.set()

    return Status()  # type: ignore[return-value]


async def test_a_service_on_port_0_keeps_its_public_port_when_its_client_reconnects(
    tunnel_server: TunnelServer, nursery: trio.Nursery
) -> None:
    with trio.fail_after(20):
        service = await nursery.start(echo_service)
        ports = []
        for _ in range(3):
            shutdown = Shutdown(drain_timeout=1)
            async with trio.open_nursery() as client_nursery:
                exposed = await client_nursery.start(
                    run_client, client_config(tunnel_server, service, "sticky"), shutdown
                )
                assert await echo_once(exposed["web"]) == b"ping"
                ports.append(exposed["web"].port)
                shutdown.request()
        assert ports[0] == ports[1] == ports[2] != 0
