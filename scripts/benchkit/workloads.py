"""Load generator: the workload functions (usable on their own, e.g. from tests).

Each one measures one thing against an address and verifies every byte; the suite (suite.py) decides the sizes
and turns results into metric cells.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .common import BENCH_PATH, KiB, MiB
from .procs import LineReader, kill_process, memory_of
from .wire import (
    ACK,
    HDR,
    MAGIC,
    MSG,
    OP_DOWNLOAD,
    OP_ECHO,
    OP_HOLD,
    OP_REQUEST,
    OP_UPLOAD,
    RECV_CHUNK,
    REPLY,
    SEND_CHUNK,
    UNTIL_EOF,
    Addr,
    VerifyError,
    connect,
    expected_crc,
    pattern_offset,
    pattern_slice,
    receive_exactly,
)


@dataclass
class Transfer:
    nbytes: int
    seconds: float

    @property
    def mib_s(self) -> float:
        return self.nbytes / MiB / self.seconds if self.seconds > 0 else math.inf


def _check_reply(reply: bytes, sent: int, crc: int, what: str) -> None:
    count, got_crc = REPLY.unpack(reply)
    if count != sent:
        raise VerifyError(f"{what}: receiver got {count} bytes, sender sent {sent}")
    if got_crc != crc:
        raise VerifyError(
            f"{what}: CRC mismatch after {sent} bytes (receiver {got_crc:#010x}, "
            f"sender {crc:#010x}): data corrupted in transit"
        )


async def bulk_upload(addr: Addr, nbytes: int, seed: int = 1, max_seconds: float | None = None) -> Transfer:
    """One stream, client -> service, every byte checked by the service's count and CRC. Timed from the
    service's ack (path established) to its verdict (all bytes delivered). With `max_seconds`, a slow system
    stops early (EOF after what was sent, which is then what gets verified and counted)."""
    want = expected_crc(seed, nbytes)
    stream = await connect(addr)
    async with stream:
        await stream.send_all(HDR.pack(MAGIC, OP_UPLOAD, nbytes, seed))
        if await receive_exactly(stream, 1, "ack") != ACK:
            raise VerifyError("upload: bad ack")
        t0 = time.perf_counter()
        deadline = math.inf if max_seconds is None else t0 + max_seconds
        base = pattern_offset(seed)
        sent = 0
        while sent < nbytes and time.perf_counter() < deadline:
            k = min(SEND_CHUNK, nbytes - sent)
            await stream.send_all(pattern_slice(base + sent, k))
            sent += k
        if sent < nbytes:
            await stream.send_eof()
        reply = await receive_exactly(stream, REPLY.size, "upload verdict")
        t1 = time.perf_counter()
    _check_reply(reply, sent, want if sent == nbytes else expected_crc(seed, sent), "upload")
    return Transfer(sent, t1 - t0)


async def bulk_download(addr: Addr, nbytes: int, seed: int = 2, max_seconds: float | None = None) -> Transfer:
    """One stream, service -> client; the client checks count, CRC and the EOF after the last byte (or, when
    `max_seconds` cut it short, the CRC of the prefix it received)."""
    want = expected_crc(seed, nbytes)
    stream = await connect(addr)
    async with stream:
        await stream.send_all(HDR.pack(MAGIC, OP_DOWNLOAD, nbytes, seed))
        if await receive_exactly(stream, 1, "ack") != ACK:
            raise VerifyError("download: bad ack")
        t0 = time.perf_counter()
        deadline = math.inf if max_seconds is None else t0 + max_seconds
        count = crc = 0
        while count < nbytes:
            data = await stream.receive_some(min(RECV_CHUNK, nbytes - count))
            if not data:
                raise VerifyError(f"download: connection closed after {count} of {nbytes} bytes")
            crc = zlib.crc32(data, crc)
            count += len(data)
            if time.perf_counter() > deadline:
                break
        t1 = time.perf_counter()
        if count == nbytes:
            with trio.fail_after(10):
                extra = await stream.receive_some(RECV_CHUNK)
            if extra:
                raise VerifyError(f"download: {len(extra)}+ unexpected bytes after the {nbytes} sent")
        else:
            want = expected_crc(seed, count)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if crc != want:
        raise VerifyError(
            f"download: CRC mismatch after {count} bytes (got {crc:#010x}, want {want:#010x}): "
            "data corrupted in transit"
        )
    return Transfer(count, t1 - t0)


async def parallel_upload(
    addr: Addr, streams: int, nbytes_each: int, seed0: int = 100, max_seconds: float | None = None
) -> Transfer:
    """`streams` uploads at once; aggregate bytes over the wall time of the whole batch."""
    for i in range(streams):
        expected_crc(seed0 + i, nbytes_each)
    results: list[Transfer] = []
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(streams):

            async def one(i: int = i) -> None:
                results.append(await bulk_upload(addr, nbytes_each, seed0 + i, max_seconds))

            nursery.start_soon(one)
    t1 = time.perf_counter()
    return Transfer(sum(r.nbytes for r in results), t1 - t0)


async def timed_upload(
    addr: Addr,
    seconds: float,
    max_bytes: int,
    seed: int = 7,
    stop: trio.Event | None = None,
    started: Callable[[], None] | None = None,
) -> Transfer:
    """Upload until `seconds` pass, `max_bytes` are sent or `stop` is set; then EOF and verify what was sent."""
    stream = await connect(addr)
    sent = 0
    async with stream:
        await stream.send_all(HDR.pack(MAGIC, OP_UPLOAD, UNTIL_EOF, seed))
        if await receive_exactly(stream, 1, "ack") != ACK:
            raise VerifyError("upload: bad ack")
        if started is not None:
            started()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        base = pattern_offset(seed)
        chunk = 256 * KiB
        while sent < max_bytes and time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
            k = min(chunk, max_bytes - sent)
            await stream.send_all(pattern_slice(base + sent, k))
            sent += k
        await stream.send_eof()
        reply = await receive_exactly(stream, REPLY.size, "upload verdict")
        t1 = time.perf_counter()
    _check_reply(reply, sent, expected_crc(seed, sent), "timed upload")
    return Transfer(sent, t1 - t0)


async def ping_pong(stream: trio.SocketStream, n: int, seconds: float, seed: int, warmup: int = 10) -> list[float]:
    """n (at most `seconds` worth) 64-byte round trips on an echo connection; returns RTTs in seconds."""
    base = pattern_offset(seed)
    rtts: list[float] = []
    deadline = time.perf_counter() + seconds
    for i in range(warmup + n):
        msg = bytes(pattern_slice(base + i * MSG, MSG))
        t = time.perf_counter_ns()
        await stream.send_all(msg)
        got = await receive_exactly(stream, MSG, "echo")
        dt = time.perf_counter_ns() - t
        if got != msg:
            raise VerifyError(f"echo: round trip {i} came back altered")
        if i >= warmup:
            rtts.append(dt / 1e9)
            if time.perf_counter() > deadline:
                break
    return rtts


async def open_echo(addr: Addr) -> trio.SocketStream:
    stream = await connect(addr)
    await stream.send_all(HDR.pack(MAGIC, OP_ECHO, 0, 0))
    return stream


async def rtt_idle(addr: Addr, n: int, seconds: float, seed: int = 3) -> list[float]:
    stream = await open_echo(addr)
    async with stream:
        return await ping_pong(stream, n, seconds, seed)


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class LoadedRtt:
    rtts: list[float]
    bulk: Transfer


async def rtt_loaded(
    addr: Addr, n: int, seconds: float, *, warmup_s: float, bulk_seconds: float, seed: int = 4
) -> LoadedRtt:
    """Ping-pong while a helper process uploads on another connection through the same system."""
    echo = await open_echo(addr)
    async with echo:
        await ping_pong(echo, 0, seconds, seed, warmup=10)
        cmd = [
            sys.executable,
            str(BENCH_PATH),
            "--bulk-helper",
            f"{addr[0]}:{addr[1]}",
            "--helper-seconds",
            str(bulk_seconds),
            "--helper-seed",
            str(seed + 1000),
        ]
        proc = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            out = LineReader(proc.stdout)
            with trio.fail_after(15):
                line = await out.readline()
            if line != "started":
                raise VerifyError(f"bulk helper did not start: {line!r}")
            await trio.sleep(warmup_s)
            rtts = await ping_pong(echo, n, seconds, seed, warmup=0)
            await proc.stdin.send_all(b"stop\n")
            with trio.fail_after(60):
                result = json.loads(await out.readline() or "{}")
                await proc.wait()
        finally:
            with trio.CancelScope(shield=True):
                await kill_process(proc, grace=1.0)
    if "error" in result or "nbytes" not in result:
        raise VerifyError(f"bulk upload beside the ping-pong failed: {result.get('error', result)}")
    return LoadedRtt(rtts, Transfer(result["nbytes"], result["seconds"]))


# The helper saturates the link but yields the CPU to the system under test, the echo service and the
# ping-pong when the 2 cores are contended, so the loaded RTT shows queueing in the system, not the scheduler.
HELPER_NICE = 10


def bulk_helper_main(addr: Addr, seconds: float, seed: int) -> int:
    """--bulk-helper: upload to addr until 'stop' on stdin (or `seconds`); print one JSON result line."""

    with contextlib.suppress(OSError):
        os.nice(HELPER_NICE)

    async def amain() -> dict[str, Any]:
        stop = trio.Event()

        async def watch_stdin() -> None:
            stdin = trio.lowlevel.FdStream(os.dup(0))
            reader = LineReader(stdin)
            with contextlib.suppress(Exception):
                await reader.readline()
            stop.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_stdin)
            try:
                res = await timed_upload(
                    addr, seconds, 2**62, seed, stop=stop, started=lambda: print("started", flush=True)
                )
                out: dict[str, Any] = {"nbytes": res.nbytes, "seconds": res.seconds}
            except Exception as exc:
                print("started", flush=True)
                out = {"error": f"{type(exc).__name__}: {exc}"}
            nursery.cancel_scope.cancel()
        return out

    print(json.dumps(trio.run(amain)), flush=True)
    return 0


async def short_connection(addr: Addr, i: int) -> None:
    payload = bytes(pattern_slice(pattern_offset(5) + i * MSG, MSG))
    stream = await connect(addr)
    try:
        await stream.send_all(HDR.pack(MAGIC, OP_REQUEST, MSG, 0) + payload)
        got = await receive_exactly(stream, MSG, "reply")
        if got != payload:
            raise VerifyError(f"short connection {i}: reply altered")
    finally:
        await trio.aclose_forcefully(stream)


async def connections_sequential(
    addr: Addr, n: int, seconds: float, per_conn_timeout: float = 10, count: list[int] | None = None
) -> float:
    """Connections per second; ``count`` (if given) gets how many were made, for the CPU per connection."""
    t0 = time.perf_counter()
    deadline = t0 + seconds
    done = 0
    while done < n and time.perf_counter() < deadline:
        with trio.fail_after(per_conn_timeout):
            await short_connection(addr, done)
        done += 1
    if count is not None:
        count.append(done)
    return done / (time.perf_counter() - t0)


async def connections_concurrent(
    addr: Addr, n: int, workers: int, seconds: float, per_conn_timeout: float = 10, count: list[int] | None = None
) -> float:
    """Connections per second with ``workers`` at a time; ``count`` as for :func:`connections_sequential`."""
    t0 = time.perf_counter()
    deadline = t0 + seconds
    issued = done = 0

    async def worker() -> None:
        nonlocal issued, done
        while issued < n and time.perf_counter() < deadline:
            i = issued
            issued += 1
            with trio.fail_after(per_conn_timeout):
                await short_connection(addr, i)
            done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    if count is not None:
        count.append(done)
    return done / (time.perf_counter() - t0)


@dataclass
class IdleMemory:
    rss_kib_per_conn: float
    pss_kib_per_conn: float
    rss_before_kib: int
    rss_after_kib: int
    processes: int


async def idle_connections_memory(
    addr: Addr, n: int, pids: Callable[[], list[int]], batch: int = 50, settle: float = 0.5, ack_timeout: float = 10.0
) -> IdleMemory:
    """Hold n connections open end to end (each acknowledged by the service) and report the growth of the
    system's processes' memory per connection."""
    await trio.sleep(settle)
    before = memory_of(pids())
    streams: list[trio.SocketStream] = []
    established = 0
    try:

        async def open_one() -> None:
            nonlocal established
            s = await connect(addr)
            streams.append(s)
            await s.send_all(HDR.pack(MAGIC, OP_HOLD, 0, 0))
            with trio.move_on_after(ack_timeout) as cs:
                ack = await receive_exactly(s, 1, "hold ack")
            if cs.cancelled_caught:
                raise VerifyError(
                    f"{established} of {n} connections reached the service; the next got no "
                    f"answer within {ack_timeout:g} s (a connection or stream limit?)"
                )
            if ack != ACK:
                raise VerifyError("hold: bad ack")
            established += 1

        for start in range(0, n, batch):
            async with trio.open_nursery() as nursery:
                for _ in range(min(batch, n - start)):
                    nursery.start_soon(open_one)
        await trio.sleep(settle)
        after_pids = pids()
        after = memory_of(after_pids)
    finally:
        for s in streams:
            s.socket.close()
    return IdleMemory((after[0] - before[0]) / n, (after[1] - before[1]) / n, before[0], after[0], len(after_pids))
