"""``trio-tunnel map``: the standalone relay, in process over 127.0.0.1 and once through the real CLI."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_tunnel.config import HostPort, MapConfig
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.mapper import run_map, serve_map
from tunnel_helpers import RecordWatch, exchange

REPO = Path(__file__).resolve().parents[2]
LOCALHOST = "127.0.0.1"


# ---------------------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def logwatch() -> Iterator[RecordWatch]:
    watch = RecordWatch()
    loggers = [logging.getLogger("trio_tunnel"), logging.getLogger("trio.serve_listeners")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(watch)
        lg.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(watch)
            lg.setLevel(level)


async def echo_handler(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close back (so the client sees exactly what it sent, then EOF)."""
    async with stream:
        try:
            while data := await stream.receive_some(1 << 16):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # the mapper reset us (drain timeout tests)


async def hash_handler(stream: trio.SocketStream) -> None:
    """Read until EOF, then answer with the SHA-256 of what was read and close."""
    async with stream:
        digest = hashlib.sha256()
        while data := await stream.receive_some(1 << 16):
            digest.update(data)
        await stream.send_all(digest.digest())


async def serve_target(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def serve_echo(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo_handler, listeners)


async def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    sock = trio.socket.socket()
    await sock.bind((LOCALHOST, 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def map_config(target_port: int, **kwargs: Any) -> MapConfig:
    return MapConfig(
        listen=HostPort(host=LOCALHOST, port=0), target=HostPort(host=LOCALHOST, port=target_port), **kwargs
    )


async def echo_once(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(data)
    got = bytearray()
    while len(got) < len(data):
        chunk = await stream.receive_some(len(data) - len(got))
        assert chunk, "the relay closed the connection"
        got += chunk
    assert got == data


def closed_lines(watch: RecordWatch) -> list[logging.LogRecord]:
    return watch.matching(": closed after ", logging.INFO)


# -------------------------------------------------------------------------------------------------------- relaying


async def test_hundred_concurrent_connections_verified_by_sha256(logwatch: RecordWatch) -> None:
    rng = random.Random(100)
    payloads = [rng.randbytes(rng.randint(1, 1 << 20)) for _ in range(100)]
    mismatches: list[int] = []

    async def client(port: int, i: int) -> None:
        echoed = await exchange(port, payloads[i])
        if hashlib.sha256(echoed).digest() != hashlib.sha256(payloads[i]).digest():
            mismatches.append(i)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(serve_echo)
            shutdown = Shutdown(drain_timeout=5)
            _, port = await nursery.start(run_map, map_config(echo_port, max_connections=100), shutdown)
            async with trio.open_nursery() as clients:
                for i in range(len(payloads)):
                    clients.start_soon(client, port, i)
            await logwatch.wait_for(": closed after ", count=len(payloads))
            shutdown.request()
            await logwatch.wait_for("map: stopped")
            nursery.cancel_scope.cancel()
    assert mismatches == []
    # One INFO line per connection, with the right byte counts each way and a clean end.
    counts = sorted((r.args[4], r.args[6], r.args[5], r.args[7]) for r in closed_lines(logwatch))
    assert counts == sorted((len(p), len(p), "eof", "eof") for p in payloads)
    assert not logwatch.matching("", logging.WARNING)


async def test_half_close_to_a_hash_target(logwatch: RecordWatch) -> None:
    """The client sends, half-closes, then reads the target's reply (a digest of everything it got)."""
    payload = random.Random(8).randbytes(3_000_000)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target_port = await nursery.start(serve_target, hash_handler)
            shutdown = Shutdown(drain_timeout=1)
            _, port = await nursery.start(run_map, map_config(target_port), shutdown)
            reply = await exchange(port, payload)
            await logwatch.wait_for(": closed after ")
            shutdown.request()
            await logwatch.wait_for("map: stopped")
            nursery.cancel_scope.cancel()
    assert reply == hashlib.sha256(payload).digest()
    (line,) = closed_lines(logwatch)
    assert line.args[4:8] == (len(payload), "eof", 32, "eof")
    assert line.getMessage().startswith("map #1 127.0.0.1:")
    assert f"-> {LOCALHOST}:{target_port}: closed after " in line.getMessage()


async def test_announces_listening_line(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            shutdown = Shutdown(drain_timeout=1)
            host, port = await nursery.start(run_map, map_config(await closed_port()), shutdown)
            shutdown.request()
    assert host == LOCALHOST and port != 0
    assert capsys.readouterr().out == f"listening {LOCALHOST}:{port}\n"


# --------------------------------------------------------------------------------------------------- target down


async def test_target_down_closes_promptly_with_a_reason(
    logwatch: RecordWatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_tunnel")
    dead = await closed_port()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            shutdown = Shutdown(drain_timeout=1)
            _, port = await nursery.start(run_map, map_config(dead), shutdown)
            client = await trio.open_tcp_stream(LOCALHOST, port)
            peer = "{}:{}".format(*client.socket.getsockname())
            with trio.fail_after(2):  # prompt: no waiting for the 10 s connect timeout
                assert await client.receive_some(100) == b""
            await client.aclose()
            shutdown.request()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert "connection refused" in message
    assert f"{LOCALHOST}:{dead}" in message and peer in message
    assert closed_lines(logwatch) == []  # the warning is that connection's one line


@asynccontextmanager
async def blackhole() -> AsyncIterator[int]:
    """A loopback port that never answers a SYN: a listener whose (one-entry) accept queue is full drops further
    SYNs on Linux, so dialling it hangs until the dialler gives up."""
    listener = trio.socket.socket()
    filler = trio.socket.socket()
    try:
        await listener.bind((LOCALHOST, 0))
        listener.listen(0)
        await filler.connect(listener.getsockname())  # fills the queue; never accepted
        yield listener.getsockname()[1]
    finally:
        filler.close()
        listener.close()


async def test_target_timeout_is_bounded_by_connect_timeout(logwatch: RecordWatch) -> None:
    with trio.fail_after(10):
        async with blackhole() as target_port, trio.open_nursery() as nursery:
            shutdown = Shutdown(drain_timeout=1)
            _, port = await nursery.start(run_map, map_config(target_port, connect_timeout=0.3), shutdown)
            client = await trio.open_tcp_stream(LOCALHOST, port)
            start = trio.current_time()
            assert await client.receive_some(100) == b""
            waited = trio.current_time() - start
            await client.aclose()
            shutdown.request()
    assert 0.25 <= waited < 3
    (warning,) = logwatch.matching("cannot connect", logging.WARNING)
    assert "timed out after 0.3s" in warning.getMessage()


async def test_drain_timeout_cuts_a_connection_still_dialling(logwatch: RecordWatch) -> None:
    with trio.fail_after(10):
        async with blackhole() as target_port, trio.open_nursery() as nursery:
            shutdown = Shutdown(drain_timeout=0.2)
            async with trio.open_nursery() as map_nursery:
                _, port = await map_nursery.start(run_map, map_config(target_port, connect_timeout=30), shutdown)
                client = await trio.open_tcp_stream(LOCALHOST, port)
                await logwatch.wait_for(": accepted")  # the mapper is now dialling the silent target
                shutdown.request()
            with pytest.raises(ConnectionResetError):  # cut: a reset, not an EOF that looks like an answer
                await client.socket.recv(1)
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert logwatch.matching("cancelled while connecting", logging.INFO)
    assert not logwatch.matching("cannot connect", logging.WARNING)


# ---------------------------------------------------------------------------------------------- connection cap


async def test_connection_cap_refuses_extra_connections_at_once(logwatch: RecordWatch) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(serve_echo)
            shutdown = Shutdown(drain_timeout=1)
            _, port = await nursery.start(run_map, map_config(echo_port, max_connections=2), shutdown)
            first = await trio.open_tcp_stream(LOCALHOST, port)
            second = await trio.open_tcp_stream(LOCALHOST, port)
            await echo_once(first, b"one")  # both relayed: both hold a slot
            await echo_once(second, b"two")

            third = await trio.open_tcp_stream(LOCALHOST, port)
            assert await third.receive_some(10) == b""  # closed at once, not queued
            (warning,) = logwatch.matching("max_connections", logging.WARNING)
            assert "refused: 2 connections already open" in warning.getMessage()

            await first.send_eof()  # finish one relayed connection: its slot frees up
            assert await first.receive_some(10) == b""
            await logwatch.wait_for(": closed after ")
            fourth = await trio.open_tcp_stream(LOCALHOST, port)
            await echo_once(fourth, b"four")
            await echo_once(second, b"still fine")
            for stream in (first, second, third, fourth):
                await stream.aclose()
            shutdown.request()
            await logwatch.wait_for("map: stopped")
            nursery.cancel_scope.cancel()
    assert len(logwatch.matching("max_connections", logging.WARNING)) == 1


# ----------------------------------------------------------------------------------------------------- shutdown


async def test_graceful_shutdown_lets_a_connection_in_flight_finish(logwatch: RecordWatch) -> None:
    payload = random.Random(7).randbytes(600_000)
    # fail_after(10) with drain_timeout 30: this passes only if run_map returns as soon as the connection is done,
    # not at the drain deadline.
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(serve_echo)
            shutdown = Shutdown(drain_timeout=30)
            async with trio.open_nursery() as map_nursery:
                _, port = await map_nursery.start(run_map, map_config(echo_port), shutdown)
                client = await trio.open_tcp_stream(LOCALHOST, port)
                await echo_once(client, payload[:1000])

                shutdown.request()
                await logwatch.wait_for("stopped accepting")
                with pytest.raises(OSError):
                    await trio.open_tcp_stream(LOCALHOST, port)  # the listener is closed

                async def send_rest() -> None:
                    await client.send_all(payload[1000:])
                    await client.send_eof()

                received = bytearray()
                async with trio.open_nursery() as io:
                    io.start_soon(send_rest)
                    while data := await client.receive_some(1 << 16):
                        received += data
                await client.aclose()
            # map_nursery exited: run_map returned, and returned normally (an exception would propagate here)
            nursery.cancel_scope.cancel()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload[1000:]).digest()
    (line,) = closed_lines(logwatch)
    assert line.args[4] == line.args[6] == len(payload)
    assert logwatch.matching("map: stopped", logging.INFO)
    assert not logwatch.matching("drain timeout", logging.WARNING)


async def test_drain_timeout_resets_what_is_left_and_returns(logwatch: RecordWatch) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(serve_echo)
            shutdown = Shutdown(drain_timeout=0.2)
            async with trio.open_nursery() as map_nursery:
                _, port = await map_nursery.start(run_map, map_config(echo_port), shutdown)
                client = await trio.open_tcp_stream(LOCALHOST, port)
                await echo_once(client, b"idle after this")
                shutdown.request()
            # run_map returned (normally: no exception) once the drain deadline cut the idle connection
            with pytest.raises(ConnectionResetError):
                await client.socket.recv(1)
            await client.aclose()
            nursery.cancel_scope.cancel()
    (line,) = closed_lines(logwatch)
    assert line.getMessage().endswith("cut by shutdown")
    assert logwatch.matching("drain timeout (0.2s) expired", logging.WARNING)


# ------------------------------------------------------------------------------------------------ listener survival


class FlakyListener(trio.abc.Listener[trio.SocketStream]):
    """accept() fails with EMFILE while a connection is waiting, as when the process is out of descriptors."""

    def __init__(self, inner: trio.SocketListener, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def accept(self) -> trio.SocketStream:
        if self.failures:
            await trio.lowlevel.wait_readable(self.inner.socket)  # a connection is pending in the kernel's queue
            self.failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_listener_survives_emfile(logwatch: RecordWatch) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(serve_echo)
            (listener,) = await trio.open_tcp_listeners(0, host=LOCALHOST)
            port = listener.socket.getsockname()[1]
            shutdown = Shutdown(drain_timeout=1)
            await nursery.start(serve_map, [FlakyListener(listener, failures=2)], map_config(echo_port), shutdown)
            assert await exchange(port, b"served despite EMFILE") == b"served despite EMFILE"
            shutdown.request()
            await logwatch.wait_for("map: stopped")
            nursery.cancel_scope.cancel()
    errors = [r for r in logwatch.records if r.name == "trio_tunnel.tcp"]
    assert len(errors) == 2 and all("EMFILE" in r.getMessage() for r in errors)


# --------------------------------------------------------------------------------------------------- the real CLI


async def test_cli_map_subprocess() -> None:
    """``python -m trio_tunnel map 127.0.0.1:0 127.0.0.1:PORT``: the stdout line, a relayed echo, and exit 0 on
    SIGINT."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(serve_echo)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "trio_tunnel.cli", "map", f"{LOCALHOST}:0", f"{LOCALHOST}:{echo_port}"],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert proc.stdout is not None and proc.stderr is not None
            try:
                line = await read_line(proc.stdout)
                assert line.startswith(f"listening {LOCALHOST}:"), (line, await proc.stderr.receive_some(1 << 16))
                port = int(line.rsplit(":", 1)[1])
                assert await exchange(port, b"through the CLI") == b"through the CLI"
                proc.send_signal(signal.SIGINT)
                assert await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            nursery.cancel_scope.cancel()


async def read_line(stream: trio.abc.ReceiveStream) -> str:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()
