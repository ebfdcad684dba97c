"""System calls per 64-byte round trip through trio-tunnel, counted with strace: a deterministic latency proxy.

Timings on a shared 2-core machine move by 30% from run to run; the work a round trip costs does not. Every
``epoll_wait`` is one pass of a Trio scheduler, so "epoll_wait per round trip" counts the scheduler passes a message
needs on its way through the server and the client (two hops each way), and the other calls show the I/O done.

The script starts an echo service, then for each executable given (default: this checkout's ``trio-tunnel``) a
server and a client with ``-R`` to the echo service, warms up, attaches ``strace -c -f`` to both processes, runs
``--round-trips`` ping-pongs of 64 bytes and reports the counts per round trip. Before that, untraced, it runs five
times as many and reports the CPU time (utime+stime) of the server and client per round trip. With
``--connections N`` the unit is a short connection instead (connect, 64 bytes there and back, close). The six most
frequent calls are shown; ``BENCH_SYSCALLS_TOP=30`` shows more.

Usage::

    .venv/bin/python scripts/bench_syscalls.py [--round-trips 1000 | --connections 300] [--link tls] [EXE ...]

An ``EXE`` runs like ``trio-tunnel`` (e.g. a wrapper ``PYTHONPATH=/tmp/old exec python -P -m trio_tunnel "$@"`` to
compare with another checkout). Needs strace (``apt-get install strace``) and ptrace permission (root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-syscalls-token-0123456789"
MESSAGE = b"x" * 64
CPU_KEY = "(cpu ns)"


async def _echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


_pending: dict[int, bytes] = {}
"""Bytes read past the last line returned, per stream: two lines that arrive in one read (the server's fingerprint
and listening lines often do) must not lose the second one."""


async def _line(stream: trio.abc.ReceiveStream, pattern: str) -> re.Match[str]:
    buf = _pending.pop(id(stream), b"")
    while True:
        while b"\n" not in buf:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"process ended before printing {pattern!r}")
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        if m := re.match(pattern, line.decode()):
            _pending[id(stream)] = buf
            return m


async def _round_trips(port: int, n: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for _ in range(n):
            await stream.send_all(MESSAGE)
            got = 0
            while got < len(MESSAGE):
                chunk = await stream.receive_some(len(MESSAGE))
                if not chunk:
                    raise RuntimeError("the echo connection closed")
                got += len(chunk)


async def _short_connections(port: int, n: int) -> None:
    """``n`` short connections one after another: connect, 64 bytes there and back, close."""
    for _ in range(n):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(MESSAGE)
            got = 0
            while got < len(MESSAGE):
                chunk = await stream.receive_some(len(MESSAGE))
                if not chunk:
                    raise RuntimeError("the echo connection closed early")
                got += len(chunk)


def _parse_strace_summary(path: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1].isidentifier() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def _cpu_seconds(pids: list[int]) -> float:
    """utime+stime of the processes (/proc/PID/stat, clock ticks)."""
    total = 0
    for pid in pids:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def measure(
    exe: str, echo_port: int, n: int, link_mode: str = "tls", connections: bool = False
) -> dict[str, int]:
    """``link_mode``: ``tls`` (the default link, a throwaway key pinned by the client), ``plaintext``
    (``--insecure-plaintext`` on both), or ``none`` (no link flags: a checkout from before TLS)."""
    state_dir = tempfile.mkdtemp(prefix="bench-syscalls-")
    server_flags = {"tls": ["--state-dir", state_dir], "plaintext": ["--insecure-plaintext"]}.get(link_mode, [])
    client_flags = ["--insecure-plaintext"] if link_mode == "plaintext" else []
    server = await trio.lowlevel.open_process(
        [exe, "server", "--listen", "127.0.0.1:0", "--token", TOKEN, "--allow-ports", "1024-65535", *server_flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    client = None
    try:
        assert server.stdout is not None
        if link_mode == "tls":
            pin = await _line(server.stdout, r"fingerprint (\S+)")
            client_flags = ["--server-fingerprint", pin.group(1)]
        link = await _line(server.stdout, r"listening (\S+):(\d+)")
        client = await trio.lowlevel.open_process(
            [
                exe,
                "client",
                "--server",
                f"127.0.0.1:{link.group(2)}",
                "--token",
                TOKEN,
                "-R",
                f"127.0.0.1:0:127.0.0.1:{echo_port}",
                *client_flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert client.stdout is not None
        public = int((await _line(client.stdout, r"exposed \S+ \S+:(\d+)")).group(1))
        work = _short_connections if connections else _round_trips
        await work(public, 200)  # warm-up
        # CPU first, untraced: the tunnel's two processes' CPU time per round trip (the ptrace of strace would
        # inflate it many times over). Clock ticks are coarse: enough round trips for a few hundred of them.
        pids = [server.pid, client.pid]
        cpu0 = _cpu_seconds(pids)
        await work(public, 5 * n)
        counts_cpu = round((_cpu_seconds(pids) - cpu0) / (5 * n) * 1e9)  # ns per round trip
        with tempfile.NamedTemporaryFile(suffix=".strace") as out:
            tracer = await trio.lowlevel.open_process(
                ["strace", "-c", "-f", "-o", out.name, "-p", str(server.pid), "-p", str(client.pid)],
                stderr=subprocess.DEVNULL,
            )
            await trio.sleep(1.0)  # strace attaches asynchronously; an idle link makes no calls meanwhile
            await work(public, n)
            tracer.send_signal(signal.SIGINT)
            await tracer.wait()
            return {**_parse_strace_summary(out.name), CPU_KEY: counts_cpu}
    finally:
        for proc in (server, client):
            if proc is not None:
                proc.kill()
                await proc.wait()
        shutil.rmtree(state_dir, ignore_errors=True)


async def main(exes: list[str], n: int, link_mode: str, connections: bool) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    echo_port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _echo, listeners)
        unit = "short connection" if connections else "64-byte round trip"
        print(f"system calls per {unit}, server and client together ({n} of them):")
        for exe in exes:
            counts = await measure(exe, echo_port, n, link_mode, connections)
            cpu_ns = counts.pop(CPU_KEY)
            top = sorted(counts.items(), key=lambda kv: -kv[1])[: int(os.environ.get("BENCH_SYSCALLS_TOP", "6"))]
            print(
                f"  {exe}: CPU {cpu_ns / 1e3:.0f} µs (untraced); total {sum(counts.values()) / n:.1f}; "
                + ", ".join(f"{name} {calls / n:.1f}" for name, calls in top)
            )
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exes", nargs="*", metavar="EXE", help="trio-tunnel executables (default: this checkout's)")
    ap.add_argument("--round-trips", type=int, default=1000, help="measured round trips (default 1000)")
    ap.add_argument(
        "--connections",
        type=int,
        metavar="N",
        help="measure N short connections (connect, 64 bytes there and back, close) instead of round trips",
    )
    ap.add_argument(
        "--link",
        choices=("tls", "plaintext", "none"),
        default="tls",
        help="the link: tls (default), plaintext (--insecure-plaintext), none (no flags: a checkout from before TLS)",
    )
    args = ap.parse_args()
    if not shutil.which("strace"):
        sys.exit("bench_syscalls.py needs strace: apt-get install strace")
    default = REPO / ".venv" / "bin" / "trio-tunnel"
    exes = args.exes or [str(default) if os.access(default, os.X_OK) else "trio-tunnel"]
    trio.run(main, exes, args.connections or args.round_trips, args.link, bool(args.connections))
