"""Client identity on the server: a name taken by another live client, and public ports kept across reconnects."""

from __future__ import annotations

import logging

import trio
from trio_tunnel.client import run_client
from trio_tunnel.config import ClientConfig, HostPort, Timeouts
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.testing import TunnelServer
from tunnel_helpers import RecordWatch

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


async def test_second_live_client_with_the_same_name_is_refused_and_gets_the_name_once_the_first_is_gone(
    tunnel_server: TunnelServer, nursery: trio.Nursery
) -> None:
    """(Before issue 12 the second client took the name and the first exited for good: a kill switch.) Now the
    live holder keeps its name and ports; the newcomer is refused with NAME_IN_USE, keeps retrying, and gets the
    name when the holder stops."""
    with trio.fail_after(30):
        service = await nursery.start(echo_service)
        first = Shutdown(drain_timeout=1)
        first_done = trio.Event()
        first_exposed = await nursery.start(_run_then_set, client_config(tunnel_server, service), first, first_done)
        second_up = trio.Event()
        second = Shutdown()
        second_done = trio.Event()

        async def run_second() -> None:
            try:
                await run_client(client_config(tunnel_server, service), second, task_status=_set_on_start(second_up))
            finally:
                second_done.set()

        watch = RecordWatch()
        log = logging.getLogger("trio_tunnel")
        log.addHandler(watch)
        log.setLevel(logging.INFO)
        try:
            nursery.start_soon(run_second)
            refusal = await watch.wait_for("in use by a live client", logger="trio_tunnel.client")
            assert await echo_once(first_exposed["web"]) == b"ping"  # the holder is untouched
            assert not second_up.is_set() and not first_done.is_set()
            first.request()
            await first_done.wait()
            await second_up.wait()  # the name is free: the newcomer's retry gets it
        finally:
            log.removeHandler(watch)
            log.setLevel(logging.NOTSET)
        message = refusal[0].getMessage()
        assert "the server refused the session: the name 'dup' is in use by a live client connected from " in message
        second.request()
        await second_done.wait()


async def _run_then_set(
    config: ClientConfig, shutdown: Shutdown, done: trio.Event, *, task_status: trio.TaskStatus[object]
) -> None:
    try:
        await run_client(config, shutdown, task_status=task_status)
    finally:
        done.set()


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
