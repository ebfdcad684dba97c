"""Peak RSS of a server and a client (``trio-tunnel`` subprocesses) carrying N concurrent 1 MiB transfers each way
through one link (visitor -> public port -> server -> link -> client -> echo service and back), and the CPU time
both spend on one large single-stream transfer.

Peak RSS is the kernel's high-water mark (VmHWM) of each process, so it is what the transfers made the process
hold at its worst. CPU time (utime + stime of both processes) is reported instead of wall time: the machine may be
loaded by other work, and the CPU a transfer costs is what a change can alter.

Usage: ``.venv/bin/python scripts/bench_budget.py [--streams 500] [--size 1048576] [--single 268435456]``
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trio_tunnel.certs import fingerprint_of_pem_file, load_or_create_identity  # noqa: E402

TOKEN = "bench-budget-token-0123456789abcdef"
CLI = [sys.executable, "-m", "trio_tunnel.cli"]
TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(pid: int, key: str) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cpu(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


async def _sink(stream: trio.SocketStream) -> None:
    async with stream:
        total = 0
        while data := await stream.receive_some(1 << 18):
            total += len(data)
        await stream.send_all(str(total).encode())


async def _transfer(port: int, size: int) -> None:
    payload = os.urandom(1024) * (size // 1024)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(send)
        got = 0
        while data := await stream.receive_some(65536):
            got += len(data)
        assert got == len(payload), (got, len(payload))


async def _single(port: int, size: int) -> None:
    block = os.urandom(1 << 18)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        sent = 0
        while sent < size:
            await stream.send_all(block)
            sent += len(block)
        await stream.send_eof()
        reply = b""
        while data := await stream.receive_some():
            reply += data
        assert int(reply) == size, reply


async def _wait_line(proc: trio.Process, prefix: bytes) -> bytes:
    assert proc.stdout is not None
    buffer = b""
    with trio.fail_after(30):
        while True:
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                if line.startswith(prefix):
                    return line
            data = await proc.stdout.receive_some()
            assert data, "process ended"
            buffer += data


async def main(args: argparse.Namespace) -> None:
    state = tempfile.mkdtemp(prefix="bench-budget-")
    cert, _ = load_or_create_identity(pathlib.Path(state))
    pin = fingerprint_of_pem_file(cert)
    link = _free_port()
    env = {**os.environ, "TRIO_TUNNEL_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    async with trio.open_nursery() as nursery:
        echo = await trio.open_tcp_listeners(0, host="127.0.0.1")
        sink = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, _echo, echo)
        nursery.start_soon(trio.serve_listeners, _sink, sink)
        echo_port, sink_port = echo[0].socket.getsockname()[1], sink[0].socket.getsockname()[1]
        config = pathlib.Path(state) / "server.toml"  # all visitors come from 127.0.0.1: lift the per-address cap
        config.write_text("[server]\nmax_connections_per_ip = 1024\n")
        server = await trio.lowlevel.open_process(
            [*CLI, "server", "--listen", f"127.0.0.1:{link}", "--state-dir", state, "--config", str(config), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        await _wait_line(server, b"listening")
        client = await trio.lowlevel.open_process(
            [
                *CLI,
                *("client", "--server", f"127.0.0.1:{link}", "--server-fingerprint", pin, "-q"),
                *("-R", f"echo=127.0.0.1:0:127.0.0.1:{echo_port}", "-R", f"sink=127.0.0.1:0:127.0.0.1:{sink_port}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        ports = {}
        for _ in range(2):
            name, address = (await _wait_line(client, b"exposed")).split()[1:3]
            ports[name.decode()] = int(address.rsplit(b":", 1)[1])
        pids = {"server": server.pid, "client": client.pid}
        print("idle_rss_kib", {k: _status(p, "VmRSS") for k, p in pids.items()})
        cpu0 = {k: _cpu(p) for k, p in pids.items()}
        start = time.perf_counter()
        await _single(ports["sink"], args.single)
        wall = time.perf_counter() - start
        cpu = {k: round(_cpu(p) - cpu0[k], 2) for k, p in pids.items()}
        print(f"single_stream {args.single >> 20} MiB: wall {wall:.2f} s, cpu {cpu} s")
        print("after_single_hwm_kib", {k: _status(p, "VmHWM") for k, p in pids.items()})
        for round_ in range(args.rounds):
            start = time.perf_counter()
            cpu0 = {k: _cpu(p) for k, p in pids.items()}
            async with trio.open_nursery() as transfers:
                for _ in range(args.streams):
                    transfers.start_soon(_transfer, ports["echo"], args.size)
            print(
                f"round {round_}: {args.streams} x {args.size >> 10} KiB each way in {time.perf_counter() - start:.1f}"
                " s; peak (VmHWM) kib",
                {k: _status(p, "VmHWM") for k, p in pids.items()},
                "rss kib",
                {k: _status(p, "VmRSS") for k, p in pids.items()},
                "cpu s",
                {k: round(_cpu(p) - cpu0[k], 2) for k, p in pids.items()},
            )
        client.kill()
        server.kill()
        await client.wait()
        await server.wait()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--single", type=int, default=256 << 20)
    parser.add_argument("--rounds", type=int, default=2)
    trio.run(main, parser.parse_args())
