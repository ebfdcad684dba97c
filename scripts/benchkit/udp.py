"""The UDP workload (``bench.py --udp``): trio-tunnel ``-R .../udp`` beside ``direct`` and ``socat UDP`` in one run.

Measured for each system, against a UDP echo service in a helper process (``--serve-udp-sink``):

* **request/response latency**: 64-byte datagrams, one at a time (the next once the answer came), p50 and p99;
  a datagram without an answer within 1 s counts as lost and is sent again.
* **rate and loss at a fixed offered load**: ``--udp-rate`` datagrams/s (default 10,000) of ``--udp-size`` bytes
  (default 64) for ``--udp-seconds`` (default 3), paced every millisecond and spread over 4 sources (4 flows);
  every datagram is echoed, so the system carries the load both ways. Loss = 1 - echoes received / sent, counted
  after a 1 s drain; the achieved rates (sent/s, and echoes per second of sending) are reported too, since a
  loaded generator may fall short of the offered rate.
* for trio-tunnel also its **TCP** 64-byte round trip through a second ``-R`` on the same link (and ``direct``'s),
  the reference of the target "UDP p50 within 1.5x of trio-tunnel's TCP round trip".

Systems: ``direct`` (the echo itself), ``socat`` (``socat UDP4-LISTEN:P,bind=127.0.0.1,reuseaddr,fork
UDP4:127.0.0.1:Q``, one forked child per source), ``trio-tunnel`` (TLS link; server ``--allow-ports
1024-65535,1024-65535/udp``, client ``-R 127.0.0.1:0:127.0.0.1:Q/udp``). The load generator is this process
(Trio); on a 2-core machine it competes with the system under test, as in the TCP benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from .common import BENCH_PATH
from .procs import Child, ProcessGroup, SystemUnavailable, process_group
from .systems import SYSTEMS, TrioTunnel, start_sink
from .wire import Addr
from .workloads import percentile, rtt_idle

MSG = 64
SOURCES = 4
RCVBUF = 4 * 1024 * 1024


# ------------------------------------------------------------------------------------------------ the echo helper


def serve_udp_sink_main() -> int:
    """Helper process: a UDP echo on 127.0.0.1 (prints ``listening udp HOST:PORT``)."""

    async def serve() -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        await sock.bind(("127.0.0.1", 0))
        host, port = sock.getsockname()
        print(f"listening udp {host}:{port}", flush=True)
        while True:
            data, peer = await sock.recvfrom(65536)
            with contextlib.suppress(OSError):  # a full buffer: UDP drops it
                await sock.sendto(data, peer)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve)
    return 0


async def start_udp_sink(group: ProcessGroup) -> Addr:
    child = await group.start("udp-sink", [sys.executable, str(BENCH_PATH), "--serve-udp-sink"])
    m = await child.wait_line(r"listening udp (\S+):(\d+)", 20)
    return m.group(1), int(m.group(2))


# ---------------------------------------------------------------------------------------------------- systems


async def start_system(
    name: str, group: ProcessGroup, udp_sink: Addr, tcp_sink: Addr, opts: argparse.Namespace
) -> tuple[Addr, Addr | None]:
    """Start ``name``; (its UDP address, its TCP echo address or None)."""
    if name == "direct":
        return udp_sink, tcp_sink
    if name == "socat":
        if not shutil.which("socat"):
            raise SystemUnavailable("socat not installed (apt-get install socat)")
        port = _free_udp_port()
        child = await group.start(
            "socat-udp",
            ["socat", f"UDP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"UDP4:{udp_sink[0]}:{udp_sink[1]}"],
        )
        await _wait_udp_echo(("127.0.0.1", port), child)
        return ("127.0.0.1", port), None
    if name == "trio-tunnel":
        return await _start_trio_tunnel(group, udp_sink, tcp_sink, opts)
    raise SystemUnavailable(f"unknown system {name!r}")


async def _start_trio_tunnel(
    group: ProcessGroup, udp_sink: Addr, tcp_sink: Addr, opts: argparse.Namespace
) -> tuple[Addr, Addr]:
    system = SYSTEMS["trio-tunnel"]
    assert isinstance(system, TrioTunnel)
    exe = system._exe(opts)
    if not exe:
        raise SystemUnavailable("trio-tunnel not installed")
    state = tempfile.mkdtemp(prefix="bench-trio-tunnel-udp-")
    server = await group.start(
        "trio-tunnel-server",
        [exe, "server", "--listen", "127.0.0.1:0", "--token", system.token, "--state-dir", state, "--allow-ports",
         "1024-65535,1024-65535/udp"],
    )  # fmt: skip
    pin = (await server.wait_line(r"fingerprint (\S+)", opts.start_timeout)).group(1)
    link = await server.wait_line(r"listening (\S+):(\d+)", opts.start_timeout)
    client = await group.start(
        "trio-tunnel-client",
        [exe, "client", "--server", f"{link.group(1)}:{link.group(2)}", "--token", system.token,
         "--server-fingerprint", pin, "-R", f"dns=127.0.0.1:0:{udp_sink[0]}:{udp_sink[1]}/udp",
         "-R", f"tcp=127.0.0.1:0:{tcp_sink[0]}:{tcp_sink[1]}"],
    )  # fmt: skip
    udp = await client.wait_line(r"exposed dns (\S+):(\d+)/udp", opts.start_timeout)
    tcp = await client.wait_line(r"exposed tcp (\S+):(\d+)", opts.start_timeout)
    return (udp.group(1), int(udp.group(2))), (tcp.group(1), int(tcp.group(2)))


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_udp_echo(addr: Addr, child: Child) -> None:
    """Until a datagram to ``addr`` is echoed (socat binds a moment after it starts), at most 10 s."""
    timeout = 10.0
    with trio.move_on_after(timeout):
        sock = await _client(addr)
        with sock:
            while True:
                with trio.move_on_after(0.2), contextlib.suppress(ConnectionRefusedError):  # not bound yet
                    await sock.send(b"ready?")
                    if await sock.recv(100) == b"ready?":
                        return
                    await trio.sleep_forever()
    raise SystemUnavailable(f"{child.name}: no echo within {timeout:g} s")


async def _client(addr: Addr) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    await sock.connect(addr)
    return sock


# -------------------------------------------------------------------------------------------------- workloads


async def udp_rtt(addr: Addr, n: int, seconds: float) -> tuple[list[float], int]:
    """``n`` (at most ``seconds`` worth) 64-byte request/response round trips; (RTTs in s, datagrams lost)."""
    sock = await _client(addr)
    rtts: list[float] = []
    lost = 0
    deadline = time.perf_counter() + seconds
    with sock:
        for i in range(10 + n):  # the first 10 warm the flow up (its stream opens on the first)
            msg = i.to_bytes(8, "big") * (MSG // 8)
            while True:
                t = time.perf_counter_ns()
                await sock.send(msg)
                with trio.move_on_after(1.0):
                    while await sock.recv(65536) != msg:
                        pass
                    break
                lost += 1
            if i >= 10:
                rtts.append((time.perf_counter_ns() - t) / 1e9)
                if time.perf_counter() > deadline:
                    break
    return rtts, lost


async def udp_rate(addr: Addr, rate: float, seconds: float, size: int) -> dict[str, float]:
    """Offer ``rate`` datagrams/s for ``seconds`` over :data:`SOURCES` flows; count the echoes."""
    socks = [await _client(addr) for _ in range(SOURCES)]
    for sock in socks:  # open each flow first, so the measurement is of the steady state
        await sock.send(b"x" * size)
        with trio.move_on_after(2.0):
            await sock.recv(65536)
    received = 0
    sent = 0
    send_errors = 0

    async def receive(sock: trio.socket.SocketType) -> None:
        nonlocal received
        while True:
            await sock.recv(65536)
            received += 1

    payload = b"r" * size
    async with trio.open_nursery() as nursery:
        for sock in socks:
            nursery.start_soon(receive, sock)
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            due = int(elapsed * rate)
            while sent < due:
                try:
                    await socks[sent % SOURCES].send(payload)
                except OSError:
                    send_errors += 1
                sent += 1
            await trio.sleep(0.001)
        send_time = time.perf_counter() - t0
        await trio.sleep(1.0)  # drain: echoes still on their way count
        nursery.cancel_scope.cancel()
    for sock in socks:
        sock.close()
    return {
        "offered_per_s": rate,
        "sent": sent,
        "sent_per_s": sent / send_time,
        "received": received,
        "received_per_s": received / send_time,
        "loss_pct": 100.0 * (1 - received / sent) if sent else float("nan"),
        "send_errors": send_errors,
    }


# ------------------------------------------------------------------------------------------------------- run


async def run_udp_bench(args: argparse.Namespace) -> int:
    names = [s.strip() for s in (args.systems or "direct,socat,trio-tunnel").split(",") if s.strip()]
    names = [n for n in names if n in ("direct", "socat", "trio-tunnel")] or ["direct", "socat", "trio-tunnel"]
    results: dict[str, dict[str, Any]] = {}

    def log(text: str) -> None:
        if not args.silent:
            print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="trio-tunnel-bench-udp-") as tmp:
        for name in names:
            try:
                async with process_group(Path(tmp)) as group:
                    _sink, tcp_sink = await start_sink(group)
                    udp_sink = await start_udp_sink(group)
                    with trio.fail_after(args.start_timeout * 3 + 10):
                        udp, tcp = await start_system(name, group, udp_sink, tcp_sink, args)
                    log(f"[udp {name}] datagrams to {udp[0]}:{udp[1]}")
                    rtts, lost = await udp_rtt(udp, args.udp_rtt_n, 20.0)
                    row: dict[str, Any] = {
                        "udp_p50_us": percentile(rtts, 0.5) * 1e6,
                        "udp_p99_us": percentile(rtts, 0.99) * 1e6,
                        "rtt_lost": lost,
                    }
                    row.update(await udp_rate(udp, args.udp_rate, args.udp_seconds, args.udp_size))
                    if tcp is not None:
                        tcp_rtts = await rtt_idle(tcp, args.udp_rtt_n, 20.0)
                        row["tcp_p50_us"] = percentile(tcp_rtts, 0.5) * 1e6
                        row["tcp_p99_us"] = percentile(tcp_rtts, 0.99) * 1e6
                    results[name] = row
                    log(f"[udp {name}] {row}")
            except SystemUnavailable as exc:
                results[name] = {"skipped": str(exc)}
                log(f"[udp {name}] skipped: {exc}")
    text = _markdown(results, args)
    print(text)
    if args.md:
        await trio.Path(args.md).write_text(text + "\n")
    if args.json:
        await trio.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    head = (
        f"UDP on loopback: request/response with {MSG}-byte datagrams ({args.udp_rtt_n} round trips); "
        f"offered load {args.udp_rate:g} datagrams/s of {args.udp_size} bytes for {args.udp_seconds:g} s over "
        f"{SOURCES} flows, echoed.\n\n"
        "| system | UDP p50 | UDP p99 | sent/s | echoed/s | loss | TCP p50 | TCP p99 |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for name, row in results.items():
        if "skipped" in row:
            rows.append(f"| {name} | skipped: {row['skipped']} |||||||")
            continue
        tcp = f"{row['tcp_p50_us']:.0f} µs | {row['tcp_p99_us']:.0f} µs" if "tcp_p50_us" in row else "- | -"
        rows.append(
            f"| {name} | {row['udp_p50_us']:.0f} µs | {row['udp_p99_us']:.0f} µs | {row['sent_per_s']:.0f} | "
            f"{row['received_per_s']:.0f} | {row['loss_pct']:.2f}% | {tcp} |"
        )
    return "\n".join(rows)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--udp", action="store_true", help="run the UDP workload (direct, socat, trio-tunnel) instead")
    ap.add_argument("--udp-rate", type=float, default=10000.0, help="UDP offered load, datagrams/s (default 10000)")
    ap.add_argument("--udp-seconds", type=float, default=3.0, help="UDP offered-load duration (default 3)")
    ap.add_argument("--udp-size", type=int, default=64, help="UDP datagram size for the load (default 64)")
    ap.add_argument("--udp-rtt-n", type=int, default=2000, help="UDP request/response round trips (default 2000)")
    ap.add_argument("--serve-udp-sink", action="store_true", help=argparse.SUPPRESS)
