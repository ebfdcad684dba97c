"""CPU seconds per GiB through trio-tunnel with and without ``--metrics``, in one run (issue #18's cost check).

For each repeat, every variant in turn (interleaved, so a change in the machine's load hits all of them alike)
gets a fresh server and client (TLS, one ``-R`` to a service in this process) and carries ``--mib`` MiB up and the
same down over one connection each. The CPU time (utime + stime from ``/proc/PID/stat``, all threads) of the server
and the client over the transfer, divided by the GiB moved, is the measurement; medians over the repeats are
reported, and each variant's ratio to the first.

Variants: ``plain`` (no endpoint), ``metrics`` (``--metrics 127.0.0.1:0`` on both, and a scraper in this process
fetching ``/metrics`` from both every ``--scrape-interval`` seconds during the transfer: Prometheus usually scrapes
every 15 s, so this is the expensive end), and ``--exe LABEL=EXE`` for others (e.g. a wrapper running another
checkout: ``PYTHONPATH=/tmp/old exec python -P -m trio_tunnel "$@"``), run without ``--metrics``.

Usage::

    .venv/bin/python scripts/bench_metrics.py [--repeats 7] [--mib 256] [--exe base=/tmp/base-trio-tunnel]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-metrics-token-0123456789"
CHUNK = 256 * 1024
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of the whole line)


async def service(stream: trio.SocketStream) -> None:
    """``U`` + data until EOF: discard it, answer ``ok``. ``D`` + 8-byte size: send that many bytes."""
    async with stream:
        kind = await stream.receive_some(9)
        if kind[:1] == b"U":
            while await stream.receive_some(CHUNK):
                pass
            await stream.send_all(b"ok")
        else:
            left = int.from_bytes(kind[1:9], "big")
            block = b"d" * CHUNK
            while left > 0:
                await stream.send_all(block[: min(left, CHUNK)])
                left -= CHUNK


async def line(stream: trio.abc.ReceiveStream, pattern: str, buf: bytearray) -> re.Match[str]:
    while True:
        while b"\n" not in buf:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"process ended before printing {pattern!r}")
            buf += chunk
        end = buf.index(b"\n")
        text = buf[:end].decode()
        del buf[: end + 1]
        if m := re.fullmatch(pattern, text):
            return m


async def scraper(ports: list[int], interval: float, counter: list[int]) -> None:
    while True:
        for port in ports:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                while await stream.receive_some(65536):
                    pass
            counter[0] += 1
        await trio.sleep(interval)


async def one_run(exe: str, metrics: bool, service_port: int, mib: int, interval: float) -> tuple[float, int]:
    """CPU seconds of server + client for ``mib`` MiB up and down, and the number of scrapes made."""
    state = tempfile.mkdtemp(prefix="bench-metrics-")
    extra = ["--metrics", "127.0.0.1:0"] if metrics else []
    server_argv = [exe, "server", "--listen", "127.0.0.1:0", "--token", TOKEN, "--state-dir", state, *extra]
    async with trio.open_nursery() as nursery:
        server = await trio.lowlevel.open_process(server_argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        client = None
        try:
            assert server.stdout is not None
            out = bytearray()
            pin = (await line(server.stdout, r"fingerprint (\S+)", out))[1]
            link = (await line(server.stdout, r"listening (\S+)", out))[1]
            ports = [int((await line(server.stdout, r"metrics \S+:(\d+)", out))[1])] if metrics else []
            client_argv = [exe, "client", "--server", link, "--token", TOKEN, "--server-fingerprint", pin, *extra]
            client_argv += ["-R", f"127.0.0.1:0:127.0.0.1:{service_port}"]
            client = await trio.lowlevel.open_process(client_argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert client.stdout is not None
            cout = bytearray()
            if metrics:
                ports.append(int((await line(client.stdout, r"metrics \S+:(\d+)", cout))[1]))
            public = int((await line(client.stdout, r"exposed \S+ \S+:(\d+)", cout))[1])
            scrapes = [0]
            if metrics:
                nursery.start_soon(scraper, ports, interval, scrapes)
            size = mib * 1024 * 1024
            before = cpu_seconds(server.pid) + cpu_seconds(client.pid)
            up = await trio.open_tcp_stream("127.0.0.1", public)
            async with up:
                await up.send_all(b"U" + bytes(8))
                block = b"u" * CHUNK
                for _ in range(size // CHUNK):
                    await up.send_all(block)
                await up.send_eof()
                assert await up.receive_some(2) == b"ok"
            down = await trio.open_tcp_stream("127.0.0.1", public)
            async with down:
                await down.send_all(b"D" + size.to_bytes(8, "big"))
                got = 0
                while got < size and (data := await down.receive_some(CHUNK)):
                    got += len(data)
                assert got == size, got
            used = cpu_seconds(server.pid) + cpu_seconds(client.pid) - before
            nursery.cancel_scope.cancel()
            return used, scrapes[0]
        finally:
            for process in (client, server):
                if process is not None:
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()


async def main_async(args: argparse.Namespace) -> None:
    exe = str(Path(sys.executable).parent / "trio-tunnel")
    variants: list[tuple[str, str, bool]] = [("plain", exe, False), ("metrics", exe, True)]
    for item in args.exe:
        label, _, path = item.partition("=")
        variants.append((label, path, False))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    results: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    gib = 2 * args.mib / 1024
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, service, listeners)
        for repeat in range(args.repeats):
            for label, path, metrics in variants:
                used, scrapes = await one_run(path, metrics, port, args.mib, args.scrape_interval)
                results[label].append(used / gib)
                extra = f", {scrapes} scrapes" if metrics else ""
                print(f"repeat {repeat + 1} {label}: {used / gib:.3f} CPU s/GiB{extra}", file=sys.stderr, flush=True)
        nursery.cancel_scope.cancel()
    base = statistics.median(results[variants[0][0]])
    print(f"{'variant':<10} {'median CPU s/GiB':>17} {'ratio':>7}   runs")
    for label, values in results.items():
        median = statistics.median(values)
        runs = " ".join(f"{v:.3f}" for v in values)
        print(f"{label:<10} {median:>17.3f} {median / base:>7.3f}   {runs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mib", type=int, default=256, help="MiB each way per run (default 256)")
    ap.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes (default 1)")
    ap.add_argument("--exe", action="append", default=[], metavar="LABEL=EXE", help="another variant")
    trio.run(main_async, ap.parse_args())


if __name__ == "__main__":
    main()
