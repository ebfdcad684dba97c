"""Strangers cannot exhaust the server: caps on connections in the handshake (global and per source address), the
descriptor limit raised at start, EMFILE back-off logged once per burst, and a legitimate client that keeps working
during a flood against a server with a lowered descriptor limit (a subprocess)."""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio_tunnel.config import HostPort
from trio_tunnel.guard import AcceptTrouble, Admission, HandshakeCaps, address_key, raise_nofile_limit
from tunnel_helpers import (
    CLI,
    LOCALHOST,
    TOKEN_TEXT,
    Cli,
    client_config,
    exchange,
    start_client,
    start_server,
    start_service,
    with_test_tls,
)


async def idle_connection(port: int, source: str) -> trio.socket.SocketType:
    """A TCP connection to the link port from ``source`` that never says a word (a stranger)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((LOCALHOST, port))
    return sock


async def closed_by_server(sock: trio.socket.SocketType) -> bool:
    try:
        return await sock.recv(1) == b""
    except ConnectionResetError:
        return True


async def still_open(sock: trio.socket.SocketType) -> bool:
    """True if the server has not closed ``sock`` (nothing to read, no EOF)."""
    await trio.lowlevel.checkpoint()
    with socket.socket(fileno=os.dup(sock.fileno())) as peek:
        try:
            peek.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
    return False


def test_handshake_caps_are_sized_from_the_descriptor_limit() -> None:
    assert HandshakeCaps.sized(1024) == HandshakeCaps(256, 32)
    assert HandshakeCaps.sized(128) == HandshakeCaps(32, 4)
    assert HandshakeCaps.sized(1 << 20) == HandshakeCaps(4096, 512)
    assert HandshakeCaps.sized(8) == HandshakeCaps(2, 2)
    assert HandshakeCaps.sized(1024, total=10, per_ip=50) == HandshakeCaps(10, 10)


async def test_admission_counts_per_source_and_displaces_the_oldest() -> None:
    admission = Admission(HandshakeCaps(3, 2))
    a1, a2 = admission.admit("a"), admission.admit("a")
    assert a1 is not None and a2 is not None
    assert admission.admit("a") is None  # a's share is used up
    b1 = admission.admit("b")
    assert b1 is not None and len(admission) == 3
    c1 = admission.admit("c")  # the global cap: a1, the oldest, makes room
    assert c1 is not None and a1.scope.cancel_called and not a2.scope.cancel_called
    assert admission.per_source == {"a": 1, "b": 1, "c": 1}
    a1.release()  # displaced already: nothing changes
    a2.release()
    a2.release()
    assert admission.per_source == {"b": 1, "c": 1} and len(admission) == 2
    assert admission.admit("a") is not None


def test_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    code = (
        "import resource\n"
        "from trio_tunnel.guard import raise_nofile_limit\n"
        "print(*raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200))

    out = subprocess.run(
        [CLI[0], "-c", code], preexec_fn=limit, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split() == ["100", "200", "200"]
    assert raise_nofile_limit()[1] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def test_accept_trouble_logs_once_per_burst_and_backs_off(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_tunnel.guard")
    trouble = AcceptTrouble("127.0.0.1:7835")
    emfile = OSError(errno.EMFILE, "Too many open files")
    delays = [trouble.failed(emfile) for _ in range(100)]
    assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 1.0] and max(delays) == 1.0
    await trio.sleep(sum(delays))
    trouble.accepted()
    trouble.accepted()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "EMFILE" in messages[0] and "after 100 failed attempts (EMFILE) over" in messages[1]


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_per_address_cap_closes_the_surplus_at_once() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, max_handshakes=10, max_handshakes_per_ip=2)
            port = server.value.port
            held = [await idle_connection(port, "127.0.0.2") for _ in range(2)]
            other = await idle_connection(port, "127.0.0.3")
            surplus = await idle_connection(port, "127.0.0.2")
            with trio.fail_after(5):  # the handshake timeout is 10 s: only the cap closes it this soon
                assert await closed_by_server(surplus)
            assert all([await still_open(s) for s in (*held, other)])
            for sock in (*held, other, surplus):
                sock.close()
            await server.stop()


async def test_global_cap_displaces_the_oldest_handshake() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, max_handshakes=3, max_handshakes_per_ip=3)
            port = server.value.port
            first = await idle_connection(port, "127.0.0.2")
            await trio.sleep(0.05)  # accepted in this order
            rest = [await idle_connection(port, f"127.0.0.{i}") for i in (3, 4)]
            newest = await idle_connection(port, "127.0.0.5")
            with trio.fail_after(5):
                assert await closed_by_server(first)
            assert all([await still_open(s) for s in (*rest, newest)])
            for sock in (first, *rest, newest):
                sock.close()
            await server.stop()


@asynccontextmanager
async def limited_server(nursery: trio.Nursery, nofile: int) -> AsyncIterator[tuple[Cli, HostPort]]:
    """``trio-tunnel server`` with RLIMIT_NOFILE ``nofile`` (soft and hard), logging at INFO."""
    argv = [*CLI, *with_test_tls(["server", "--listen", f"{LOCALHOST}:0", "--token", TOKEN_TEXT])]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=limit,
    )
    proc = Cli(process, argv)
    nursery.start_soon(proc._pump_stdout)
    nursery.start_soon(proc._pump_stderr)
    try:
        match = await proc.expect(r"listening 127\.0\.0\.1:(\d+)")
        yield proc, HostPort(host=LOCALHOST, port=int(match[1]))
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


async def test_legitimate_client_works_during_a_flood_at_a_low_descriptor_limit() -> None:
    """128 descriptors, 600 idle strangers from 60 addresses: the server holds at most its handshake cap (32) of
    them, never hits EMFILE, the connected client's public port keeps working and a new client gets in. (Before
    the caps: every descriptor held, visitors refused, no new client, ten EMFILE lines a second.)"""
    nofile, flood = 128, 600
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, limited_server(nursery, nofile) as (proc, address):
            await proc.expect_stderr(r"descriptor limit 128; at most 32 connections in the handshake, 4 per address")
            service = await start_service(nursery, echo)
            client = await start_client(nursery, client_config(address, f"web=127.0.0.1:0:127.0.0.1:{service.port}"))
            public = client.value["web"].port
            assert await exchange(public, b"before") == b"before"
            lines_before = len(proc.stderr.splitlines())

            strangers: list[trio.socket.SocketType] = []

            async def stranger(i: int) -> None:
                with trio.move_on_after(5):
                    strangers.append(await idle_connection(address.port, f"127.0.0.{2 + i % 60}"))

            async with trio.open_nursery() as flooding:
                for i in range(flood):
                    flooding.start_soon(stranger, i)
            assert len(strangers) > flood // 2
            fds = len(os.listdir(f"/proc/{proc.process.pid}/fd"))
            assert fds < nofile - 32, fds  # the cap, plus the client's link and ports: the reserve is intact
            for i in range(10):
                assert await exchange(public, b"during %d" % i) == b"during %d" % i
            newcomer = await start_client(
                nursery, client_config(address, f"web2=127.0.0.1:0:127.0.0.1:{service.port}", name="newcomer")
            )
            assert await exchange(newcomer.value["web2"].port, b"new") == b"new"
            log = proc.stderr.splitlines()[lines_before:]
            assert not [line for line in log if "EMFILE" in line]
            assert len(log) < 200, len(log)  # one line per source (60), not one per connection (600)
            for sock in strangers:
                sock.close()
            await newcomer.stop()
            await client.stop()
            service.scope.cancel()


def test_an_ipv6_host_counts_as_its_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"
