"""What a handshake flood does to a real server: descriptors held, RSS, log lines, and whether a legitimate client
(already connected, and a new one) still gets through, and how fast.

The server and the clients run as ``trio-tunnel`` subprocesses (the server with a lowered descriptor limit, as a
small VPS has); the flood and the visitors run here. The flood opens idle TCP connections to the link port from
several loopback source addresses (127.0.0.2 ...) and holds them; nothing else is sent (a stranger who never
finishes the handshake).

Usage: ``.venv/bin/python scripts/flood_probe.py [--nofile 256] [--flood 2000] [--sources 8] [--hold 3]``

Figures are printed as ``key value`` lines. The machine may be loaded: latencies are indicative only.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trio_tunnel.certs import fingerprint_of_pem_file, load_or_create_identity  # noqa: E402

TOKEN = "flood-probe-token-0123456789abcdef"
CLI = [sys.executable, "-m", "trio_tunnel.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


async def _visit(port: int, limit_s: float) -> float | None:
    """One visitor through the public port: connect, 4 bytes there and back; seconds, or None on failure."""
    start = time.perf_counter()
    with trio.move_on_after(limit_s):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"ping")
                got = b""
                while len(got) < 4:
                    data = await stream.receive_some()
                    if not data:
                        return None
                    got += data
                return time.perf_counter() - start
        except OSError:
            return None
    return None


async def _latencies(port: int, n: int, limit_s: float) -> tuple[float | None, int]:
    """Median latency of the visits that worked (ms) and how many failed."""
    results = [await _visit(port, limit_s) for _ in range(n)]
    ok = [r for r in results if r is not None]
    return (statistics.median(ok) * 1e3 if ok else None), len(results) - len(ok)


async def _wait_line(proc: trio.Process, prefix: bytes, limit_s: float) -> bytes | None:
    assert proc.stdout is not None
    buffer = b""
    with trio.move_on_after(limit_s):
        while True:
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                if line.startswith(prefix):
                    return line
            data = await proc.stdout.receive_some()
            if not data:
                return None
            buffer += data
    return None


async def _drain_stderr(proc: trio.Process, sink: list[bytes]) -> None:
    assert proc.stderr is not None
    pending = b""
    while data := await proc.stderr.receive_some():
        pending += data
        *lines, pending = pending.split(b"\n")
        sink.extend(lines)


async def _flood(port: int, n: int, sources: int, held: list[socket.socket]) -> None:
    """Open ``n`` idle connections (from 127.0.0.2 ... 127.0.0.(sources+1)), at most 200 connecting at once."""
    limiter = trio.CapacityLimiter(200)

    async def one(i: int) -> None:
        async with limiter:
            sock = trio.socket.socket()
            try:
                await sock.bind((f"127.0.0.{2 + i % sources}", 0))
                with trio.move_on_after(2):
                    await sock.connect(("127.0.0.1", port))
                    held.append(socket.socket(fileno=sock.detach()))
                    return
            except OSError:
                pass
            sock.close()

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)


async def main(args: argparse.Namespace) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    state = tempfile.mkdtemp(prefix="flood-probe-")
    cert, _ = load_or_create_identity(pathlib.Path(state))
    pin = fingerprint_of_pem_file(cert)
    link_port, public_port = _free_port(), _free_port()
    env = {**os.environ, "TRIO_TUNNEL_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    nofile = args.nofile

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    server_err: list[bytes] = []
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        service_port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, _echo, listeners)
        server = await trio.lowlevel.open_process(
            [*CLI, "server", "--listen", f"127.0.0.1:{link_port}", "--state-dir", state],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            preexec_fn=limit,
        )
        assert await _wait_line(server, b"listening", 20), "server did not start"
        nursery.start_soon(_drain_stderr, server, server_err)
        client_args = ["client", "--server", f"127.0.0.1:{link_port}", "--server-fingerprint", pin]
        client = await trio.lowlevel.open_process(
            [*CLI, *client_args, "--name", "legit", "-R", f"web=127.0.0.1:{public_port}:127.0.0.1:{service_port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert await _wait_line(client, b"exposed", 20), "client did not connect"
        await trio.sleep(0.5)
        print(f"nofile {nofile}")
        print(f"idle_fds {_fds(server.pid)}")
        print(f"idle_rss_kib {_rss_kib(server.pid)}")
        median, failed = await _latencies(public_port, 20, 2)
        print(f"idle_visit_ms {median and round(median, 2)} failed {failed}/20")

        held: list[socket.socket] = []
        lines_before = len(server_err)
        started = time.perf_counter()
        await _flood(link_port, args.flood, args.sources, held)
        print(f"flood_connected {len(held)} of {args.flood} in {time.perf_counter() - started:.1f} s")
        await trio.sleep(args.hold)
        print(f"flood_fds {_fds(server.pid)}")
        print(f"flood_rss_kib {_rss_kib(server.pid)}")
        median, failed = await _latencies(public_port, 20, 2)
        print(f"flood_visit_ms {median and round(median, 2)} failed {failed}/20")
        newcomer = await trio.lowlevel.open_process(
            [*CLI, *client_args, "--name", "newcomer", "-R", f"web2=127.0.0.1:0:127.0.0.1:{service_port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        t0 = time.perf_counter()
        line = await _wait_line(newcomer, b"exposed", 10)
        print(f"flood_new_client {'ok in %.2f s' % (time.perf_counter() - t0) if line else 'FAILED within 10 s'}")
        newcomer.kill()
        print(f"flood_log_lines {len(server_err) - lines_before} in {time.perf_counter() - started:.1f} s")
        for sock in held:
            sock.close()
        await trio.sleep(args.hold)
        print(f"after_fds {_fds(server.pid)}")
        print(f"after_rss_kib {_rss_kib(server.pid)}")
        if args.show_log:
            for raw in server_err[lines_before:][: args.show_log]:
                print("  log:", raw.decode(errors="replace"))
        client.kill()
        server.kill()
        await server.wait()
        await client.wait()
        await newcomer.wait()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nofile", type=int, default=256, help="the server's RLIMIT_NOFILE (soft = hard)")
    parser.add_argument("--flood", type=int, default=2000, help="idle connections to open")
    parser.add_argument("--sources", type=int, default=8, help="loopback source addresses to spread them over")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds to hold the flood before measuring")
    parser.add_argument("--show-log", type=int, default=0, help="print this many of the server's log lines")
    trio.run(main, parser.parse_args())
