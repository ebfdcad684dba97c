"""The installed ``trio-tunnel`` command for forwards: ``server`` + ``client -L`` and ``map``, as real processes.

Everything listens on 127.0.0.1 with port 0; the tests learn the ports from the stdout lifecycle lines
(``listening HOST:PORT``, ``forwarding NAME HOST:PORT``, ``connected HOST:PORT``) and never sleep.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from tunnel_helpers import with_test_tls

LOCALHOST = "127.0.0.1"
TRIO_TUNNEL = Path(sys.executable).with_name("trio-tunnel")  # the console script installed in this venv
TOKEN = "cli-forward-token-0123456789abcdef"
_serial = itertools.count()


# ---------------------------------------------------------------------------------------------------------- helpers


class Proc:
    """A ``trio-tunnel`` process: stdout read line by line (``expect``), stderr to a file (``stderr()``)."""

    def __init__(self, process: trio.Process, stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self.eof = False
        self._cursor = 0
        self._changed = trio.Event()

    async def pump(self) -> None:
        assert self.process.stdout is not None
        buf = b""
        try:
            while data := await self.process.stdout.receive_some(1 << 16):
                buf += data
                *complete, buf = buf.split(b"\n")
                self.lines.extend(line.decode() for line in complete)
                self._changed.set()
                self._changed = trio.Event()
        finally:
            self.eof = True
            self._changed.set()

    async def expect(self, pattern: str) -> re.Match[str]:
        """The next stdout line (after those already matched) that matches ``pattern``."""
        rx = re.compile(pattern)
        while True:
            while self._cursor < len(self.lines):
                line = self.lines[self._cursor]
                self._cursor += 1
                if m := rx.search(line):
                    return m
            if self.eof:
                await self.process.wait()
                raise AssertionError(
                    f"stdout closed (exit {self.process.returncode}) before a line matching {pattern!r}; "
                    f"stdout {self.lines!r}; stderr:\n{self.stderr()}"
                )
            await self._changed.wait()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def interrupt(self) -> int:
        """SIGINT (Ctrl+C), then the exit code."""
        self.process.send_signal(signal.SIGINT)
        return await self.process.wait()


@asynccontextmanager
async def trio_tunnel(nursery: trio.Nursery, tmp_path: Path, *args: str) -> AsyncIterator[Proc]:
    """Run ``trio-tunnel ARGS``; killed on exit if still running."""
    assert TRIO_TUNNEL.exists(), f"{TRIO_TUNNEL} is missing: pip install -e . in this venv"
    env = {k: v for k, v in os.environ.items() if k != "TRIO_TUNNEL_TOKEN"}
    stderr_path = tmp_path / f"{args[0]}-{next(_serial)}.stderr"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [str(TRIO_TUNNEL), *with_test_tls(args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    proc = Proc(process, stderr_path)
    nursery.start_soon(proc.pump)
    try:
        yield proc
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def serve_target(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def echo_handler(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)
        await stream.send_eof()


async def exchange(port: int, payload: bytes) -> bytes:
    """Connect, send ``payload`` then EOF while reading everything back until EOF."""
    stream = await trio.open_tcp_stream(LOCALHOST, port)
    received = bytearray()
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(send)
        while data := await stream.receive_some(1 << 18):
            received += data
    return bytes(received)


async def assert_closed_promptly(port: int, seconds: float = 2.0) -> None:
    local = await trio.open_tcp_stream(LOCALHOST, port)
    with trio.fail_after(seconds):
        assert await local.receive_some(100) == b""
    await local.aclose()


async def closed_port() -> int:
    sock = trio.socket.socket()
    await sock.bind((LOCALHOST, 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def verified_exchanges(port: int, count: int, seed: int, size: int = 400_000) -> None:
    rng = random.Random(seed)
    payloads = [rng.randbytes(rng.randint(1, size)) for _ in range(count)]
    bad: list[int] = []

    async def one(i: int) -> None:
        echoed = await exchange(port, payloads[i])
        if hashlib.sha256(echoed).digest() != hashlib.sha256(payloads[i]).digest():
            bad.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    assert bad == []


# ------------------------------------------------------------------------------------------------ client -L


async def test_cli_client_forwards_from_flags_and_config(tmp_path: Path) -> None:
    """``trio-tunnel server`` + ``trio-tunnel client -L ... -L ... --config`` (a [client.forward] table):
    the forwarding lines name the bound ports, allowed forwards relay verified data, a forward outside
    --allow-target is closed with "not allowed" on the client and a refusal on the server, and both exit 0 on
    SIGINT."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    denied_hits: list[trio.SocketStream] = []

    async def record(stream: trio.SocketStream) -> None:
        denied_hits.append(stream)
        await stream.aclose()

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            echo = await nursery.start(serve_target, echo_handler)
            denied = await nursery.start(serve_target, record)
            (tmp_path / "client.toml").write_text(
                f'[client.forward.fromfile]\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:{echo}"\n'
            )
            server_args = ["server", "--listen", f"{LOCALHOST}:0", "--token-file", str(tmp_path / "token")]
            server_args += ["--allow-target", f"{LOCALHOST}:{echo}"]
            async with trio_tunnel(nursery, tmp_path, *server_args) as server:
                link = int((await server.expect(r"^listening 127\.0\.0\.1:(\d+)$"))[1])
                client_args = ["client", "--server", f"{LOCALHOST}:{link}", "--token-file", str(tmp_path / "token")]
                client_args += ["--name", "cli", "--config", str(tmp_path / "client.toml")]
                client_args += ["-L", f"web=127.0.0.1:0:127.0.0.1:{echo}", "-L", f"denied=0:127.0.0.1:{denied}"]
                async with trio_tunnel(nursery, tmp_path, *client_args) as client:
                    ports = {}
                    for _ in range(3):
                        m = await client.expect(r"^forwarding (\S+) 127\.0\.0\.1:(\d+)$")
                        ports[m[1]] = int(m[2])
                    assert sorted(ports) == ["denied", "fromfile", "web"]
                    assert 0 not in ports.values()
                    await client.expect(rf"^connected 127\.0\.0\.1:{link}$")

                    await verified_exchanges(ports["web"], 10, seed=1)
                    await verified_exchanges(ports["fromfile"], 3, seed=2)
                    await assert_closed_promptly(ports["denied"])

                    assert await client.interrupt() == 0
                    await client.expect(r"^disconnected ")
                assert await server.interrupt() == 0
            nursery.cancel_scope.cancel()
    assert denied_hits == []
    client_log, server_log = client.stderr(), server.stderr()
    assert "Traceback" not in client_log + server_log
    assert re.search(rf"denied: closing 127\.0\.0\.1:\d+: .*127\.0\.0\.1:{denied} is not allowed", client_log), (
        client_log
    )
    assert f"refused forward to 127.0.0.1:{denied}" in server_log, server_log
    assert len(re.findall(r"forward 127\.0\.0\.1:\d+ -> .* closed after", server_log)) == 13, server_log


async def test_cli_client_target_down(tmp_path: Path) -> None:
    """An allowed target that is down: the local connection closes at once, "connection refused" in the log."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    dead = await closed_port()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server_args = ["server", "--listen", f"{LOCALHOST}:0", "--token-file", str(tmp_path / "token")]
            async with trio_tunnel(nursery, tmp_path, *server_args, "--allow-target", "127.0.0.0/8:*") as server:
                link = int((await server.expect(r"^listening 127\.0\.0\.1:(\d+)$"))[1])
                client_args = ["client", "--server", f"{LOCALHOST}:{link}", "--token-file", str(tmp_path / "token")]
                async with trio_tunnel(nursery, tmp_path, *client_args, "-L", f"down=0:127.0.0.1:{dead}") as client:
                    port = int((await client.expect(r"^forwarding down 127\.0\.0\.1:(\d+)$"))[1])
                    await client.expect(r"^connected ")
                    await assert_closed_promptly(port)
                    assert await client.interrupt() == 0
                assert await server.interrupt() == 0
            nursery.cancel_scope.cancel()
    assert f"cannot connect to 127.0.0.1:{dead}: connection refused" in client.stderr(), client.stderr()


# ------------------------------------------------------------------------------------------------------- map


async def test_cli_map_relays_and_exits_0_on_sigint(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            echo = await nursery.start(serve_target, echo_handler)
            async with trio_tunnel(nursery, tmp_path, "map", f"{LOCALHOST}:0", f"{LOCALHOST}:{echo}") as mapper:
                port = int((await mapper.expect(r"^listening 127\.0\.0\.1:(\d+)$"))[1])
                assert port != 0
                await verified_exchanges(port, 20, seed=3)
                assert await mapper.interrupt() == 0
            nursery.cancel_scope.cancel()
    assert mapper.lines == [f"listening 127.0.0.1:{port}"]  # stdout: the one lifecycle line
    log = mapper.stderr()
    # one log line per connection: peer, target, duration, bytes each way
    closed = re.findall(rf"map #\d+ 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{echo}: closed after [\d.]+s: up \d+ bytes", log)
    assert len(closed) == 20, log
    assert "Traceback" not in log


async def test_cli_map_target_down(tmp_path: Path) -> None:
    dead = await closed_port()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with trio_tunnel(nursery, tmp_path, "map", f"{LOCALHOST}:0", f"{LOCALHOST}:{dead}") as mapper:
                port = int((await mapper.expect(r"^listening 127\.0\.0\.1:(\d+)$"))[1])
                await assert_closed_promptly(port)
                assert await mapper.interrupt() == 0
            nursery.cancel_scope.cancel()
    log = mapper.stderr()
    assert re.search(rf"-> 127\.0\.0\.1:{dead}: cannot connect to target: connection refused", log), log


async def test_cli_map_carries_resets_both_ways(tmp_path: Path) -> None:
    """A reset on either side reaches the other as a reset, not as a clean EOF (a cut stream must not look
    complete)."""
    target_saw: list[BaseException | None] = []
    target_got_data = trio.Event()
    target_done = trio.Event()

    async def target(stream: trio.SocketStream) -> None:
        first = await stream.receive_some(100)
        if first == b"abort please":  # the target resets
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            return
        target_got_data.set()
        try:  # the client resets: record how the stream ends here
            while await stream.receive_some(1 << 16):
                pass
            target_saw.append(None)
        except trio.BrokenResourceError as exc:
            target_saw.append(exc.__cause__)
        finally:
            await stream.aclose()
            target_done.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            target_port = await nursery.start(serve_target, target)
            argv = ["map", f"{LOCALHOST}:0", f"{LOCALHOST}:{target_port}"]
            async with trio_tunnel(nursery, tmp_path, *argv) as mapper:
                port = int((await mapper.expect(r"^listening 127\.0\.0\.1:(\d+)$"))[1])

                one = await trio.open_tcp_stream(LOCALHOST, port)
                await one.send_all(b"abort please")
                with pytest.raises(trio.BrokenResourceError) as info:
                    await one.receive_some(100)
                assert isinstance(info.value.__cause__, ConnectionResetError)
                await one.aclose()

                two = await trio.open_tcp_stream(LOCALHOST, port)
                await two.send_all(b"then I reset")
                await target_got_data.wait()
                two.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await two.aclose()
                await target_done.wait()

                assert await mapper.interrupt() == 0
            nursery.cancel_scope.cancel()
    (cause,) = target_saw
    assert isinstance(cause, ConnectionResetError), cause
    log = mapper.stderr()
    assert len(re.findall(r"map #\d+ .*: closed after .*reset", log)) == 2, log


@pytest.mark.parametrize("argv", [["map", "127.0.0.1:0"], ["map", "127.0.0.1:0", "127.0.0.1:0"]])
async def test_cli_map_usage_errors(tmp_path: Path, argv: list[str]) -> None:
    """A missing TARGET or a target port 0 is a usage error (exit 2, one line), not a listener that relays nowhere."""
    with trio.fail_after(20):
        result = await trio.run_process(
            [str(TRIO_TUNNEL), *argv], capture_stdout=True, capture_stderr=True, check=False, stdin=subprocess.DEVNULL
        )
    assert result.returncode == 2, result
    assert result.stdout == b""
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("trio-tunnel: error: ") and "TARGET" in line, line
