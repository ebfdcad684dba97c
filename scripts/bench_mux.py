"""Benchmark of the multiplexer alone (issue 3): two mux sessions over one loopback TCP connection.

Measures, in one process and one run, each beside a plain Trio relay over the same loopback:

* bulk throughput of 1 stream and of 16 concurrent streams (MB/s, every byte checked by length and a checksum);
* the round-trip time of a 64-byte echo, idle and while another stream moves bulk data (p50 / p99).

The plain relay is the baseline a mux cannot beat: the same bytes, copied by the same number of Trio tasks over
loopback TCP with 256 KiB reads, without framing or flow control. Ratios (mux / relay) are what to compare across
runs, since this machine is shared and noisy.

Usage: .venv/bin/python scripts/bench_mux.py [--mib 256] [--pings 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trio_tunnel.mux import Role, Session, open_session

TOKEN = b"bench-token-0123456789abcdef"
CHUNK = 256 * 1024
BLOCK = bytes(range(256)) * (CHUNK // 256)

Maker = Callable[[], Awaitable[tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]]]


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def _sender(stream: trio.abc.HalfCloseableStream, total: int) -> None:
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        await stream.send_all(BLOCK[:n] if n < CHUNK else BLOCK)
        sent += n
    await stream.send_eof()


async def _receiver(stream: trio.abc.ReceiveStream, total: int) -> None:
    got = 0
    crc = 0
    while chunk := await stream.receive_some(CHUNK):
        got += len(chunk)
        crc = zlib.crc32(chunk, crc)
    expected = zlib.crc32(BLOCK * (total // CHUNK) + BLOCK[: total % CHUNK])
    if got != total or crc != expected:
        raise RuntimeError(f"corrupt transfer: {got} of {total} bytes, crc {crc:#x} != {expected:#x}")


async def bulk(make: Maker, streams: int, total: int) -> float:
    """MB/s for ``streams`` concurrent streams moving ``total`` bytes altogether, one direction."""
    pairs = [await make() for _ in range(streams)]
    per = total // streams
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for a, b in pairs:
            nursery.start_soon(_sender, a, per)
            nursery.start_soon(_receiver, b, per)
    elapsed = time.perf_counter() - start
    for a, b in pairs:
        await a.aclose()
        await b.aclose()
    return per * streams / elapsed / 1e6


async def rtt(make: Maker, count: int, *, under_load: int) -> tuple[float, float]:
    """p50 and p99 (ms) of a 64-byte echo round trip, optionally while a bulk stream moves ``under_load`` bytes."""
    a, b = await make()
    samples: list[float] = []

    async def echo() -> None:
        while data := await b.receive_some(64):
            await b.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        if under_load:
            x, y = await make()
            nursery.start_soon(_sender, x, under_load)
            nursery.start_soon(_receiver, y, under_load)
            await trio.sleep(0.05)  # let the bulk transfer reach full speed before sampling
        msg = b"p" * 64
        for _ in range(count):
            t0 = time.perf_counter()
            await a.send_all(msg)
            got = 0
            while got < 64:
                got += len(await a.receive_some(64 - got))
            samples.append((time.perf_counter() - t0) * 1e3)
        await a.send_eof()
        if under_load:
            nursery.cancel_scope.cancel()
    await a.aclose()
    await b.aclose()
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


class MuxSetup:
    """Two sessions over one loopback TCP connection; ``make`` opens a stream and accepts it on the far side."""

    def __init__(self, server: Session, client: Session) -> None:
        self.server, self.client = server, client

    async def make(self) -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        async with trio.open_nursery() as nursery:
            got: list[trio.abc.HalfCloseableStream] = []

            async def accept() -> None:
                s = await self.server.accept_stream()
                s.accept()
                got.append(s)

            nursery.start_soon(accept)
            opened = await self.client.open_stream("bench")
        return opened, got[0]


async def relay_make() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
    """A plain relay path: a loopback TCP pair per stream (no mux, no framing)."""
    return await _tcp_pair()


async def main(args: argparse.Namespace) -> dict[str, float]:
    total = args.mib * 1024 * 1024
    results: dict[str, float] = {}
    left, right = await _tcp_pair()
    async with trio.open_nursery() as nursery:
        ready = trio.Event()
        box: list[Session] = []
        done = trio.Event()

        async def server() -> None:
            async with open_session(left, role=Role.SERVER, tokens=[TOKEN]) as s:
                box.append(s)
                ready.set()
                await done.wait()

        nursery.start_soon(server)
        async with open_session(right, role=Role.CLIENT, name="bench", token=TOKEN) as client:
            await ready.wait()
            mux = MuxSetup(box[0], client)
            for name, make in (("relay", relay_make), ("mux", mux.make)):
                results[f"{name}_1_stream_MBps"] = await bulk(make, 1, total)
                results[f"{name}_16_streams_MBps"] = await bulk(make, 16, total)
                p50, p99 = await rtt(make, args.pings, under_load=0)
                results[f"{name}_rtt_idle_p50_ms"], results[f"{name}_rtt_idle_p99_ms"] = p50, p99
                p50, p99 = await rtt(make, args.pings, under_load=total)
                results[f"{name}_rtt_loaded_p50_ms"], results[f"{name}_rtt_loaded_p99_ms"] = p50, p99
            done.set()
    for key in ("1_stream_MBps", "16_streams_MBps"):
        results[f"ratio_{key}"] = results[f"mux_{key}"] / results[f"relay_{key}"]
    results["mux_loaded_over_idle_p99"] = results["mux_rtt_loaded_p99_ms"] / results["mux_rtt_idle_p99_ms"]
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="MiB per bulk measurement (default 256)")
    parser.add_argument("--pings", type=int, default=2000, help="round trips per RTT measurement (default 2000)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    results = trio.run(main, args)
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:10.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    cli()
