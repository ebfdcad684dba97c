#!/usr/bin/env python3
"""Benchmark trio-tunnel beside direct TCP, socat and OpenSSH ``ssh -R``, on loopback, in one run.

Usage::

    .venv/bin/python scripts/bench.py                      # full run: 3 repeats, 256 MiB bulk, ~10 min
    .venv/bin/python scripts/bench.py --quick              # smoke run: 1 repeat, small sizes, ~1 min
    .venv/bin/python scripts/bench.py --systems direct,socat,ssh,trio-tunnel --json out.json --md out.md

Systems (each started and stopped by this script on 127.0.0.1 with free ports; every process it starts is killed
in a ``finally``):

* ``direct``      no relay: the load generator talks to the sink itself (the physical limit of this harness).
* ``socat``       ``socat TCP-LISTEN:P,bind=127.0.0.1,reuseaddr,fork,backlog=1024 TCP:127.0.0.1:Q`` (a C relay,
                  one forked process per connection).
* ``ssh``         ``ssh -R 127.0.0.1:P:127.0.0.1:Q`` against a throwaway sshd (own host key, client key and
                  sshd_config in a temp dir, on a loopback port); OpenSSH's default cipher unless --ssh-cipher.
* ``trio-tunnel`` ``trio-tunnel server --listen 127.0.0.1:0 --token T --allow-ports 1024-65535`` (its stdout line
                  ``listening HOST:PORT`` gives the link address) and ``trio-tunnel client --server HOST:PORT
                  --token T -R 127.0.0.1:0:127.0.0.1:Q`` (its stdout line ``exposed NAME HOST:PORT`` gives the
                  public port).

A system whose tool is missing, or that does not come up within a bounded time, is reported as skipped with the
reason. Install the peers with ``apt-get install socat openssh-server openssh-client``; trio-tunnel with
``pip install -e .`` in the repository (or point ``--trio-tunnel`` at the executable).

Workloads (every byte verified: the data is a deterministic pseudo-random pattern and the receiver's CRC-32 and
byte count must match the sender's; a corrupted, short or long transfer raises and the cell reads FAILED):

* 1-stream bulk upload and download (client -> service, service -> client), MiB/s.
* 16 parallel uploads, aggregate MiB/s.
* 64-byte ping-pong round-trip time, p50 and p99, on an idle system.
* The same RTT while a bulk upload runs on another connection through the same system (head-of-line blocking
  shows here), and the ratio of loaded to idle p99. The bulk upload runs in a helper process.
* Sequential short connections per second, and with 200 concurrent workers (connect, 64-byte request, reply,
  close).
* Memory per idle connection with 1,000 connections held open end to end: the growth of the summed VmRSS (and
  PSS, from smaps_rollup) of the system's processes, divided by 1,000.
* CPU seconds per GiB: CPU time of the system's processes from /proc (thread run time from schedstat, plus
  reaped children's cutime+cstime) during the three bulk workloads, divided by the GiB moved.
* Delay line (scripts/delayline.py: 25 ms each way, paced to the line rate, one-BDP queue) placed in the system's
  link (trio-tunnel client<->server, ssh<->sshd; socat->service and client->service for the relay-less ones):
  one upload's goodput as a fraction of the line rate, at 200 and at 1000 Mbit/s (--rate-mbit). At 200 Mbit/s
  the bandwidth-delay product (1.25 MB) fits in OpenSSH's fixed 2 MiB channel window; at 1000 Mbit/s (6.25 MB)
  it does not, which is where a multiplexer's window auto-tuning shows.

What is measured where: the load generator runs in this process (Trio), the sink/echo service in a separate helper
process (``--serve-sink``), the loaded-RTT bulk upload in another helper (``--bulk-helper``, at nice 10). Each
repeat starts a fresh system and sink and runs the memory workload first. The machine may have
only 2 cores: the load generator and the sink compete with the system under test for them, which is why ``direct``
is reported as the harness's own ceiling and every other system also as a ratio to it. "The system's processes"
are: direct -> the sink; socat -> the socat listener and its forked children; ssh -> sshd and its children plus the
ssh client; trio-tunnel -> server plus client. Cells show medians over the repeats (3 full, 1 with --quick).
Each system's values are also given as ratios to ``direct`` and to ``ssh``.

Exit status: 0 when every measured cell passed verification (skipped systems are fine), 1 when any cell FAILED.
"""

from __future__ import annotations

# A benchmark harness: reading a few small /proc files and log files inline in async code is intended.
# ruff: noqa: ASYNC109, ASYNC230, ASYNC240
import argparse
import contextlib
import datetime as _dt
import functools
import getpass
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH_PATH = Path(__file__).resolve()
DELAYLINE_PATH = HERE / "delayline.py"

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * MiB


def _load_delayline() -> Any:
    spec = importlib.util.spec_from_file_location("trio_tunnel_bench_delayline", DELAYLINE_PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


delayline = _load_delayline()
DelayParams = delayline.DelayParams


# ---------------------------------------------------------------------------------------------------------------
# The data pattern and the wire protocol between load generator and sink
# ---------------------------------------------------------------------------------------------------------------

# A fixed pseudo-random string of prime length, repeated: no read or write size lines up with its period, so a
# dropped, duplicated or misplaced chunk changes the CRC. Stream `seed` starts at its own offset.
PATTERN_LEN = 1_048_573  # largest prime below 2**20


@functools.cache
def _pattern_view() -> memoryview:
    import hashlib

    r = hashlib.shake_256(b"trio-tunnel bench pattern v1").digest(PATTERN_LEN)
    return memoryview(r + r)


def pattern_offset(seed: int) -> int:
    return (seed * 2_654_435_761 + 12345) % PATTERN_LEN


def pattern_slice(pos: int, n: int) -> memoryview:
    """n <= PATTERN_LEN bytes of the infinite pattern from absolute position pos."""
    o = pos % PATTERN_LEN
    return _pattern_view()[o : o + n]


def pattern_bytes(seed: int, start: int, n: int) -> bytes:
    base = pattern_offset(seed) + start
    return b"".join(pattern_slice(base + i, min(PATTERN_LEN, n - i)) for i in range(0, n, PATTERN_LEN))


@functools.lru_cache(maxsize=256)
def expected_crc(seed: int, n: int) -> int:
    """CRC-32 of the first n bytes of stream `seed` (computed outside the timed region)."""
    crc = 0
    base = pattern_offset(seed)
    for i in range(0, n, PATTERN_LEN):
        crc = zlib.crc32(pattern_slice(base + i, min(PATTERN_LEN, n - i)), crc)
    return crc


MAGIC = b"TTB1"
HDR = struct.Struct("!4sc3xQQ")  # magic, op, size, seed
REPLY = struct.Struct("!QI")  # byte count, crc32
UNTIL_EOF = 2**64 - 1
ACK = b"+"
SEND_CHUNK = 1 * MiB  # <= PATTERN_LEN
RECV_CHUNK = 256 * KiB
MSG = 64
OP_UPLOAD, OP_DOWNLOAD, OP_ECHO, OP_REQUEST, OP_HOLD = b"U", b"D", b"E", b"R", b"H"


class VerifyError(Exception):
    """Data did not arrive intact: wrong bytes, short or long transfer, protocol violation."""


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int, what: str = "data") -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise VerifyError(f"connection closed after {len(buf)} of {n} bytes of {what}")
        buf += chunk
    return bytes(buf)


async def _receive_or_none(stream: trio.abc.ReceiveStream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


async def _drain_until_eof(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(RECV_CHUNK):
        pass


async def send_pattern(stream: trio.abc.SendStream, seed: int, start: int, n: int) -> None:
    base = pattern_offset(seed) + start
    sent = 0
    while sent < n:
        k = min(SEND_CHUNK, n - sent)
        await stream.send_all(pattern_slice(base + sent, k))
        sent += k


# ---------------------------------------------------------------------------------------------------------------
# Sink / echo service (normally in its own process: --serve-sink)
# ---------------------------------------------------------------------------------------------------------------


async def sink_handler(stream: trio.SocketStream) -> None:
    try:
        hdr = await _receive_or_none(stream, HDR.size)
        if hdr is None:
            return  # a readiness probe
        magic, op, size, seed = HDR.unpack(hdr)
        if magic != MAGIC:
            return
        if op == OP_UPLOAD:
            await stream.send_all(ACK)
            count = crc = 0
            while count < size:
                data = await stream.receive_some(min(RECV_CHUNK, size - count))
                if not data:
                    break
                crc = zlib.crc32(data, crc)
                count += len(data)
            await stream.send_all(REPLY.pack(count, crc))
            with trio.move_on_after(60):
                await _drain_until_eof(stream)
        elif op == OP_DOWNLOAD:
            await stream.send_all(ACK)
            await send_pattern(stream, seed, 0, size)
            await stream.send_eof()
            with trio.move_on_after(60):
                await _drain_until_eof(stream)
        elif op == OP_ECHO:
            while data := await stream.receive_some(RECV_CHUNK):
                await stream.send_all(data)
        elif op == OP_REQUEST:
            data = await _receive_or_none(stream, size)
            if data is not None:
                await stream.send_all(data)
                with trio.move_on_after(30):
                    await _drain_until_eof(stream)
        elif op == OP_HOLD:
            await stream.send_all(ACK)
            await _drain_until_eof(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception as exc:  # never let one connection take the service down
        print(f"sink: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        await trio.aclose_forcefully(stream)


async def run_sink(
    host: str = "127.0.0.1", port: int = 0, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    """The sink/echo service, in-process; started((host, port))."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, sink_handler, port, host=host, backlog=4096))
        task_status.started(tuple(listeners[0].socket.getsockname()[:2]))


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    want = min(want, 65536)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def serve_sink_main() -> int:
    _raise_nofile()

    async def amain() -> None:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(run_sink)
            print(f"listening {host}:{port}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(amain)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Load generator: the workload functions (usable on their own, e.g. from tests)
# ---------------------------------------------------------------------------------------------------------------

Addr = tuple[str, int]


async def connect(addr: Addr) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


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


async def connections_sequential(addr: Addr, n: int, seconds: float, per_conn_timeout: float = 10) -> float:
    t0 = time.perf_counter()
    deadline = t0 + seconds
    done = 0
    while done < n and time.perf_counter() < deadline:
        with trio.fail_after(per_conn_timeout):
            await short_connection(addr, done)
        done += 1
    return done / (time.perf_counter() - t0)


async def connections_concurrent(
    addr: Addr, n: int, workers: int, seconds: float, per_conn_timeout: float = 10
) -> float:
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


# ---------------------------------------------------------------------------------------------------------------
# /proc accounting
# ---------------------------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def process_tree(roots: Sequence[int]) -> list[int]:
    """roots and all their live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [p for p in roots if Path(f"/proc/{p}").exists()]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time of the processes: run time of their live threads from /proc/PID/task/*/schedstat (nanoseconds;
    utime+stime from /proc/PID/stat when schedstat is missing) plus the reaped children they account for
    (cutime+cstime, clock ticks)."""
    total = 0.0
    for p in pids:
        f = _stat_fields(p)
        if f is None:
            continue
        ns = 0
        try:
            for task in os.scandir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task.name}/schedstat") as fh:
                    ns += int(fh.read().split()[0])
            total += ns / 1e9
        except (OSError, ValueError, IndexError):
            total += (int(f[11]) + int(f[12])) / CLK_TCK
        total += (int(f[13]) + int(f[14])) / CLK_TCK
    return total


def memory_of(pids: Sequence[int]) -> tuple[int, int]:
    """(sum of VmRSS, sum of Pss) in KiB."""
    rss = pss = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss, pss


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------------------------


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.eof = False

    async def readline(self) -> str:
        """Next line without its newline; "" at EOF."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return line.decode(errors="replace").rstrip("\r")
            if self.eof:
                line = bytes(self.buf)
                self.buf.clear()
                return line.decode(errors="replace")
            data = await self.stream.receive_some(65536)
            if not data:
                self.eof = True
            self.buf += data


def _session_members(sids: Sequence[int]) -> list[int]:
    """Processes in the sessions we created (sid = the pid of a child we started with start_new_session),
    excluding a process that merely reuses such a number as its own pid."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f is not None and int(f[4]) in sids and int(entry.name) not in sids:
                out.append(int(entry.name))
    return out


async def kill_process(proc: trio.Process, grace: float = 2.0) -> None:
    """Stop a child we started (in its own session) and everything it started: by pid while it is not reaped
    (so the pid cannot belong to anyone else), and by session membership for what it left behind."""
    roots = [proc.pid] if proc.returncode is None else []
    await kill_tree(roots, grace, extra=_session_members([proc.pid]))
    with trio.move_on_after(grace):
        await proc.wait()


async def kill_tree(roots: Sequence[int], grace: float = 2.0, extra: Sequence[int] = ()) -> None:
    """SIGTERM the given live processes we started and their descendants (by pid), then SIGKILL what is left."""
    pids = process_tree(roots)
    pids += [p for p in process_tree(extra) if p not in pids]
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return
        await trio.sleep(0.05)
    for p in pids:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


class SystemUnavailable(Exception):
    """The system cannot be measured here (tool missing, failed to start): reported as skipped."""


class Child:
    """A process we started: stdout lines collected by a task, stderr to a log file."""

    def __init__(self, name: str, proc: trio.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.lines: list[str] = []
        self._changed = trio.Event()
        self.stdout_closed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _pump(self) -> None:
        assert self.proc.stdout is not None
        reader = LineReader(self.proc.stdout)
        try:
            while True:
                line = await reader.readline()
                if not line and reader.eof:
                    break
                self.lines.append(line)
                del self.lines[:-200]
                self._changed.set()
                self._changed = trio.Event()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self.stdout_closed = True
            self._changed.set()

    def log_tail(self, n: int = 3, limit: int = 400) -> str:
        """The last few log lines that look like errors (else the last few lines), shortened."""
        try:
            lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        rx = re.compile(r"error|warn|exception|traceback|fatal|refus|denied|fail", re.IGNORECASE)
        text = " | ".join(([ln for ln in lines if rx.search(ln)] or lines)[-n:])
        return text if len(text) <= limit else "..." + text[-limit:]

    def describe_exit(self) -> str:
        rc = self.proc.returncode
        tail = self.log_tail()
        return f"{self.name} exited with status {rc}" + (f": {tail}" if tail else "")

    async def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        rx = re.compile(pattern)
        seen = 0
        with trio.move_on_after(timeout):
            while True:
                for line in self.lines[seen:]:
                    m = rx.fullmatch(line.strip())
                    if m:
                        return m
                seen = len(self.lines)
                if self.stdout_closed:
                    with trio.move_on_after(1):
                        await self.proc.wait()
                    raise SystemUnavailable(
                        self.describe_exit()
                        if self.proc.returncode is not None
                        else f"{self.name} closed its stdout without printing '{pattern}'"
                    )
                await self._changed.wait()
        tail = self.log_tail()
        raise SystemUnavailable(
            f"{self.name} did not print a line matching '{pattern}' within {timeout:g} s"
            + (f" (stdout: {self.lines[-3:]}; stderr: {tail})" if self.lines or tail else "")
        )


class ProcessGroup:
    """Starts children; kills all of them (and their descendants) when the block ends."""

    def __init__(self, nursery: trio.Nursery, tmp: Path) -> None:
        self.nursery = nursery
        self.tmp = tmp
        self.children: list[Child] = []

    async def start(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> Child:
        log = self.tmp / f"{name}.{len(self.children)}.log"
        with open(log, "wb") as errf:
            try:
                proc = await trio.lowlevel.open_process(
                    list(cmd),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=errf,
                    start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                )
            except OSError as exc:
                raise SystemUnavailable(f"cannot run {cmd[0]}: {exc}") from exc
        child = Child(name, proc, log)
        self.children.append(child)
        self.nursery.start_soon(child._pump)
        return child

    async def stop_all(self) -> None:
        with trio.CancelScope(shield=True):
            for child in reversed(self.children):
                await kill_process(child.proc)
            self.children.clear()


@contextlib.asynccontextmanager
async def process_group(tmp: Path) -> AsyncIterator[ProcessGroup]:
    async with trio.open_nursery() as nursery:
        group = ProcessGroup(nursery, tmp)
        try:
            yield group
        finally:
            await group.stop_all()
            nursery.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_accepting(addr: Addr, timeout: float, alive: Callable[[], str | None]) -> None:
    """Poll until addr accepts a TCP connection (bounded); `alive` returns a reason when the owner died."""
    deadline = trio.current_time() + timeout
    last: Exception | None = None
    while trio.current_time() < deadline:
        reason = alive()
        if reason:
            raise SystemUnavailable(reason)
        try:
            with trio.fail_after(1):
                s = await connect(addr)
            await trio.aclose_forcefully(s)
            return
        except (OSError, trio.TooSlowError) as exc:
            last = exc
        await trio.sleep(0.05)
    raise SystemUnavailable(f"{addr[0]}:{addr[1]} did not accept within {timeout:g} s ({last})")


def _exited(child: Child) -> str | None:
    if child.proc.poll() is not None:
        return child.describe_exit()
    return None


# ---------------------------------------------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """A running system: where clients connect and which processes are the system."""

    name: str
    addr: Addr
    roots: list[int]
    check: Callable[[], str | None] = lambda: None

    def pids(self) -> list[int]:
        return process_tree(self.roots)


async def start_sink(group: ProcessGroup) -> tuple[Child, Addr]:
    child = await group.start("sink", [sys.executable, str(BENCH_PATH), "--serve-sink"])
    m = await child.wait_line(r"listening (\S+):(\d+)", 20)
    return child, (m.group(1), int(m.group(2)))


async def start_delayline(group: ProcessGroup, upstream: Addr, params: Any) -> Addr:
    cmd = [
        sys.executable,
        str(DELAYLINE_PATH),
        "--listen",
        "127.0.0.1:0",
        "--connect",
        f"{upstream[0]}:{upstream[1]}",
        "--delay-ms",
        repr(params.delay_s * 1e3),
        "--rate-mbit",
        repr(params.rate_bps / 1e6),
    ]
    if params.buffer_bytes is not None:
        cmd += ["--buffer-kib", str(params.buffer_bytes // 1024)]
    child = await group.start("delayline", cmd)
    m = await child.wait_line(r"listening (\S+):(\d+)", 20)
    return m.group(1), int(m.group(2))


class System:
    name = ""
    relay_description = ""

    def unavailable(self, opts: argparse.Namespace) -> str | None:
        return None

    def version(self, opts: argparse.Namespace) -> str:
        return ""

    async def start(
        self, group: ProcessGroup, sink: Child, sink_addr: Addr, opts: argparse.Namespace, delay: Any | None
    ) -> Target:
        raise NotImplementedError


class Direct(System):
    name = "direct"

    async def start(
        self, group: ProcessGroup, sink: Child, sink_addr: Addr, opts: argparse.Namespace, delay: Any | None
    ) -> Target:
        addr = sink_addr if delay is None else await start_delayline(group, sink_addr, delay)
        return Target(self.name, addr, [sink.pid], lambda: _exited(sink))


class Socat(System):
    name = "socat"

    def unavailable(self, opts: argparse.Namespace) -> str | None:
        if not shutil.which("socat"):
            return "socat not installed (apt-get install socat)"
        return None

    def version(self, opts: argparse.Namespace) -> str:
        return _first_line(["socat", "-V"], r"socat version (\S+)")

    async def start(
        self, group: ProcessGroup, sink: Child, sink_addr: Addr, opts: argparse.Namespace, delay: Any | None
    ) -> Target:
        upstream = sink_addr if delay is None else await start_delayline(group, sink_addr, delay)
        last = ""
        for _ in range(3):
            port = free_port()
            child = await group.start(
                "socat",
                [
                    "socat",
                    f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog={opts.socat_backlog}",
                    f"TCP:{upstream[0]}:{upstream[1]}",
                ],
            )
            try:
                await wait_accepting(("127.0.0.1", port), 10, lambda c=child: _exited(c))  # type: ignore[misc]
            except SystemUnavailable as exc:
                last = str(exc)
                continue
            return Target(self.name, ("127.0.0.1", port), [child.pid], lambda c=child: _exited(c))  # type: ignore[misc]
        raise SystemUnavailable(f"socat did not start: {last}")


class Ssh(System):
    name = "ssh"

    def unavailable(self, opts: argparse.Namespace) -> str | None:
        missing = [t for t in ("ssh", "ssh-keygen") if not shutil.which(t)]
        if missing:
            return f"{', '.join(missing)} not installed (apt-get install openssh-client)"
        if not self._sshd():
            return "sshd not installed (apt-get install openssh-server)"
        return None

    @staticmethod
    def _sshd() -> str | None:
        for cand in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
            if cand and os.access(cand, os.X_OK):
                return os.path.abspath(cand)  # sshd re-execs itself: it needs an absolute path
        return None

    def version(self, opts: argparse.Namespace) -> str:
        try:
            out = run_capture(["ssh", "-V"])
            v = (out.stderr or out.stdout).strip().split(",")[0]
        except (OSError, subprocess.SubprocessError):
            return ""
        cipher = opts.ssh_cipher or _ssh_default_cipher()
        return f"{v}, cipher {cipher}" if cipher else v

    async def start(
        self, group: ProcessGroup, sink: Child, sink_addr: Addr, opts: argparse.Namespace, delay: Any | None
    ) -> Target:
        d = Path(tempfile.mkdtemp(prefix="ssh-", dir=group.tmp))
        for key in ("host_key", "client_key"):
            try:
                r = run_capture(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(d / key)], timeout=30
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise SystemUnavailable(f"ssh-keygen failed: {exc}") from exc
            if r.returncode != 0:
                raise SystemUnavailable(f"ssh-keygen failed: {r.stderr.strip()}")
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            # sshd (as root) insists on its privilege-separation directory; Debian's service unit creates it.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        user = getpass.getuser()
        last = ""
        for _ in range(3):
            sshd_port = free_port()
            cfg = d / "sshd_config"
            cfg.write_text(
                "\n".join(
                    [
                        f"Port {sshd_port}",
                        "ListenAddress 127.0.0.1",
                        f"HostKey {d / 'host_key'}",
                        "PidFile none",
                        f"AuthorizedKeysFile {d / 'authorized_keys'}",
                        "PubkeyAuthentication yes",
                        "PasswordAuthentication no",
                        "KbdInteractiveAuthentication no",
                        "PermitRootLogin prohibit-password",
                        "StrictModes no",
                        "UsePAM no",
                        "AllowTcpForwarding yes",
                        "GatewayPorts no",
                        "X11Forwarding no",
                        "PrintMotd no",
                        "UseDNS no",
                        "LogLevel ERROR",
                        "",
                    ]
                )
            )
            sshd = await group.start("sshd", [self._sshd() or "sshd", "-D", "-e", "-f", str(cfg)])
            try:
                await wait_accepting(("127.0.0.1", sshd_port), 10, lambda c=sshd: _exited(c))  # type: ignore[misc]
            except SystemUnavailable as exc:
                last = str(exc)
                continue
            link = (
                ("127.0.0.1", sshd_port)
                if delay is None
                else await start_delayline(group, ("127.0.0.1", sshd_port), delay)
            )
            for _ in range(3):
                port = free_port()
                cmd = [
                    "ssh",
                    "-N",
                    "-F",
                    "/dev/null",
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "IdentitiesOnly=yes",
                    "-o",
                    "LogLevel=ERROR",
                    "-i",
                    str(d / "client_key"),
                    "-p",
                    str(link[1]),
                    "-R",
                    f"127.0.0.1:{port}:{sink_addr[0]}:{sink_addr[1]}",
                ]
                if opts.ssh_cipher:
                    cmd += ["-c", opts.ssh_cipher]
                cmd.append(f"{user}@{link[0]}")
                ssh = await group.start("ssh", cmd)

                def check(s: Child = ssh, sd: Child = sshd) -> str | None:
                    return _exited(s) or _exited(sd)

                try:
                    await wait_accepting(("127.0.0.1", port), 15, check)
                except SystemUnavailable as exc:
                    last = str(exc)
                    continue
                return Target(self.name, ("127.0.0.1", port), [sshd.pid, ssh.pid], check)
            break
        raise SystemUnavailable(f"ssh -R did not come up: {last}")


def run_capture(cmd: Sequence[str], timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
    """subprocess.run in its own session; on timeout the whole group is killed (not just the direct child)."""
    proc = subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


@functools.cache
def _ssh_default_cipher() -> str:
    try:
        out = run_capture(["ssh", "-F", "/dev/null", "-G", "localhost"]).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in out.splitlines():
        if line.startswith("ciphers "):
            return line.split()[1].split(",")[0]
    return ""


def _first_line(cmd: list[str], rx: str) -> str:
    try:
        out = run_capture(cmd)
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(rx, out.stdout + out.stderr)
    return m.group(1) if m else ""


class TrioTunnel(System):
    name = "trio-tunnel"
    token = "bench-token-0123456789abcdef"

    def _exe(self, opts: argparse.Namespace) -> str | None:
        if opts.trio_tunnel:
            return opts.trio_tunnel if shutil.which(opts.trio_tunnel) else None
        for cand in (Path(sys.executable).parent / "trio-tunnel", REPO / ".venv" / "bin" / "trio-tunnel"):
            if cand.exists() and os.access(cand, os.X_OK):
                return str(cand)
        return shutil.which("trio-tunnel")

    def unavailable(self, opts: argparse.Namespace) -> str | None:
        if not self._exe(opts):
            return "trio-tunnel not installed (pip install -e . in the repository, or --trio-tunnel PATH)"
        return None

    def version(self, opts: argparse.Namespace) -> str:
        exe = self._exe(opts)
        if not exe:
            return ""
        try:
            out = run_capture([exe, "--version"])
        except (OSError, subprocess.SubprocessError):
            return ""
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if out.returncode == 0 and text else ""

    async def start(
        self, group: ProcessGroup, sink: Child, sink_addr: Addr, opts: argparse.Namespace, delay: Any | None
    ) -> Target:
        exe = self._exe(opts)
        if not exe:
            raise SystemUnavailable(self.unavailable(opts) or "trio-tunnel not found")
        server = await group.start(
            "trio-tunnel-server",
            [
                exe,
                "server",
                "--listen",
                "127.0.0.1:0",
                "--token",
                self.token,
                "--allow-ports",
                "1024-65535",
                *opts.tt_server_arg,
            ],
        )
        m = await server.wait_line(r"listening (\S+):(\d+)", opts.start_timeout)
        link: Addr = (m.group(1).strip("[]"), int(m.group(2)))
        if delay is not None:
            link = await start_delayline(group, link, delay)
        client = await group.start(
            "trio-tunnel-client",
            [
                exe,
                "client",
                "--server",
                f"{link[0]}:{link[1]}",
                "--token",
                self.token,
                "-R",
                f"127.0.0.1:0:{sink_addr[0]}:{sink_addr[1]}",
                *opts.tt_client_arg,
            ],
        )
        m = await client.wait_line(r"exposed (\S+) (\S+):(\d+)", opts.start_timeout)
        public = (m.group(2).strip("[]"), int(m.group(3)))

        def check() -> str | None:
            return _exited(server) or _exited(client)

        await wait_accepting(public, opts.start_timeout, check)
        return Target(self.name, public, [server.pid, client.pid], check)


SYSTEMS: dict[str, System] = {s.name: s for s in (Direct(), Socat(), Ssh(), TrioTunnel())}


# ---------------------------------------------------------------------------------------------------------------
# Configuration, metrics, suite
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    repeats: int = 3
    bulk_bytes: int = 256 * MiB
    par_streams: int = 16
    par_bytes_each: int = 16 * MiB
    rtt_n: int = 2000
    rtt_seconds: float = 8.0
    loaded_rtt_n: int = 1000
    loaded_rtt_seconds: float = 8.0
    loaded_warmup_s: float = 0.5
    seq_conns: int = 1000
    seq_seconds: float = 6.0
    conc_conns: int = 4000
    conc_workers: int = 200
    conc_seconds: float = 8.0
    idle_conns: int = 1000
    delay_seconds: float = 5.0
    bulk_max_seconds: float = 30.0  # a slow system moves less than bulk_bytes rather than failing
    transfer_timeout: float = 120.0
    workload_timeout: float = 60.0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            repeats=1,
            bulk_bytes=32 * MiB,
            par_bytes_each=2 * MiB,
            rtt_n=300,
            rtt_seconds=2.0,
            loaded_rtt_n=300,
            loaded_rtt_seconds=2.0,
            loaded_warmup_s=0.3,
            seq_conns=200,
            seq_seconds=2.0,
            conc_conns=1000,
            conc_seconds=3.0,
            idle_conns=1000,
            delay_seconds=2.0,
            bulk_max_seconds=8.0,
            transfer_timeout=45.0,
            workload_timeout=30.0,
        )


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    fmt: str = "{:.0f}"


METRICS = [
    Metric("bulk_up", "1-stream upload", "MiB/s", True),
    Metric("bulk_down", "1-stream download", "MiB/s", True),
    Metric("par16", "16-stream upload, aggregate", "MiB/s", True),
    Metric("rtt_p50", "64 B RTT p50, idle", "µs", False),
    Metric("rtt_p99", "64 B RTT p99, idle", "µs", False),
    Metric("loaded_rtt_p50", "64 B RTT p50, beside a bulk upload", "µs", False),
    Metric("loaded_rtt_p99", "64 B RTT p99, beside a bulk upload", "µs", False),
    Metric("loaded_p99_ratio", "RTT p99 loaded / idle", "x", False, "{:.1f}"),
    Metric("loaded_bulk", "bulk upload beside the ping-pong", "MiB/s", True),
    Metric("seq_cps", "sequential short connections", "conn/s", True),
    Metric("conc_cps", "short connections, 200 concurrent", "conn/s", True),
    Metric("rss_per_conn", "memory per idle connection (VmRSS)", "KiB", False, "{:.1f}"),
    Metric("pss_per_conn", "memory per idle connection (PSS)", "KiB", False, "{:.1f}"),
    Metric("cpu_per_gib", "CPU per GiB moved (system's processes)", "s/GiB", False, "{:.2f}"),
    Metric("delay_mib_s", "1 stream over the delay line", "MiB/s", True, "{:.1f}"),
    Metric("delay_pct", "1 stream over the delay line, of line rate", "%", True, "{:.0f}"),
]  # the two delay metrics are templates: one pair per configured line rate (see metrics_for)


def _rate_tag(params: Any) -> str:
    return f"{params.rate_bps / 1e6:g}"


def delay_keys(params: Any) -> tuple[str, str]:
    """The metric keys (MiB/s, % of line rate) of the delay-line measurement at this line rate."""
    tag = _rate_tag(params)
    return f"delay{tag}_mib_s", f"delay{tag}_pct"


def metrics_for(delays: Sequence[Any]) -> list[Metric]:
    out = [m for m in METRICS if not m.key.startswith("delay")]
    for p in delays:
        k_mib, k_pct = delay_keys(p)
        rtt = f"{2 * p.delay_s * 1e3:g} ms RTT"
        out.append(Metric(k_mib, f"1 stream over a {rtt}, {_rate_tag(p)} Mbit/s line", "MiB/s", True, "{:.1f}"))
        out.append(
            Metric(k_pct, f"1 stream over a {rtt}, {_rate_tag(p)} Mbit/s line, of line rate", "%", True, "{:.0f}")
        )
    return out


@dataclass
class Failed:
    error: str
    collateral: bool = False  # not run because the system had already died


Result = dict[str, float | Failed]
Log = Callable[[str], None]


def _err(exc: BaseException, timeout: float | None = None) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"timed out after {timeout:g} s" if timeout else "timed out"
    if isinstance(exc, BaseExceptionGroup):
        leaves = []

        def walk(e: BaseException) -> None:
            if isinstance(e, BaseExceptionGroup):
                for sub in e.exceptions:
                    walk(sub)
            else:
                leaves.append(e)

        walk(exc)
        verify = [e for e in leaves if isinstance(e, VerifyError)]
        first = (verify or leaves)[0]
        return _err(first, timeout) + (f" (+{len(leaves) - 1} more)" if len(leaves) > 1 else "")
    return f"{type(exc).__name__}: {exc}"


async def _guard(
    res: Result, keys: Sequence[str], timeout: float, log: Log, label: str, fn: Callable[[], Any], target: Target
) -> Any:
    """Run one workload bounded by `timeout`; on any failure mark its metrics FAILED (loudly)."""
    dead = target.check()
    if dead:
        for k in keys:
            res[k] = Failed(f"{label}: not run, the system had died", collateral=True)
        return None
    try:
        with trio.fail_after(timeout):
            return await fn()
    except Exception as exc:
        msg = _err(exc, timeout)
        dead = target.check()
        if dead:
            msg += f" [system died: {dead}]"
        log(f"  !! {label}: FAILED: {msg}")
        for k in keys:
            res[k] = Failed(f"{label}: {msg}")
        return None


async def settle(target: Target, quiet: float = 0.005, interval: float = 0.1, limit: float = 5.0) -> None:
    """Wait (bounded) until the system's processes use less than `quiet` CPU seconds per `interval`, so work left
    over from the previous workload (e.g. 1,000 connections closing) is not billed to the next one."""
    deadline = trio.current_time() + limit
    prev = cpu_seconds(target.pids())
    while trio.current_time() < deadline:
        await trio.sleep(interval)
        cur = cpu_seconds(target.pids())
        if cur - prev < quiet:
            return
        prev = cur


async def run_suite(target: Target, cfg: Config, log: Log = lambda s: None, rep: int = 0) -> Result:
    """All workloads except the delay line against one freshly started system; returns metric -> value | Failed.
    A workload that fails marks its cells FAILED; once the system has died, later workloads are not run."""
    res: Result = {}
    seed = 1 + rep * 10_000
    cpu_work = [0.0, 0, 0.0, 0.0]  # system cpu, bytes, generator cpu, "sink" cpu placeholder

    async def cpu_bracket(fn: Callable[[], Any]) -> Any:
        await settle(target)
        pids0 = target.pids()
        c0, g0 = cpu_seconds(pids0), self_cpu()
        out = await fn()
        await trio.sleep(0.05)  # let relays reap exited children
        c1, g1 = cpu_seconds(process_tree(target.roots)), self_cpu()
        cpu_work[0] += c1 - c0
        cpu_work[1] += out.nbytes
        cpu_work[2] += g1 - g0
        return out

    # First, on the freshly started system: memory the allocator already holds from earlier work would hide the
    # cost of new connections.
    mem = await _guard(
        res,
        ["rss_per_conn", "pss_per_conn"],
        cfg.workload_timeout,
        log,
        "idle connections",
        lambda: idle_connections_memory(target.addr, cfg.idle_conns, target.pids),
        target,
    )
    if mem:
        res["rss_per_conn"] = mem.rss_kib_per_conn
        res["pss_per_conn"] = mem.pss_kib_per_conn
        res["_rss_before_kib"] = mem.rss_before_kib
        res["_rss_after_kib"] = mem.rss_after_kib
        res["_processes_with_idle_conns"] = mem.processes
        log(
            f"  {cfg.idle_conns} idle connections: {mem.rss_kib_per_conn:.1f} KiB RSS, "
            f"{mem.pss_kib_per_conn:.1f} KiB PSS per connection ({mem.processes} processes)"
        )

    t = await _guard(
        res,
        ["bulk_up"],
        cfg.transfer_timeout,
        log,
        "1-stream upload",
        lambda: cpu_bracket(lambda: bulk_upload(target.addr, cfg.bulk_bytes, seed, cfg.bulk_max_seconds)),
        target,
    )
    if t:
        res["bulk_up"] = t.mib_s
        res["_bulk_up_mib"] = t.nbytes / MiB
        log(f"  1-stream upload: {t.mib_s:.0f} MiB/s ({t.nbytes / MiB:.0f} MiB)")
    t = await _guard(
        res,
        ["bulk_down"],
        cfg.transfer_timeout,
        log,
        "1-stream download",
        lambda: cpu_bracket(lambda: bulk_download(target.addr, cfg.bulk_bytes, seed + 1, cfg.bulk_max_seconds)),
        target,
    )
    if t:
        res["bulk_down"] = t.mib_s
        res["_bulk_down_mib"] = t.nbytes / MiB
        log(f"  1-stream download: {t.mib_s:.0f} MiB/s ({t.nbytes / MiB:.0f} MiB)")
    t = await _guard(
        res,
        ["par16"],
        cfg.transfer_timeout,
        log,
        f"{cfg.par_streams}-stream upload",
        lambda: cpu_bracket(
            lambda: parallel_upload(target.addr, cfg.par_streams, cfg.par_bytes_each, seed + 100, cfg.bulk_max_seconds)
        ),
        target,
    )
    if t:
        res["par16"] = t.mib_s
        res["_par_mib"] = t.nbytes / MiB
        log(f"  {cfg.par_streams}-stream upload: {t.mib_s:.0f} MiB/s ({t.nbytes / MiB:.0f} MiB)")
    if all(k in res and not isinstance(res[k], Failed) for k in ("bulk_up", "bulk_down", "par16")):
        res["cpu_per_gib"] = cpu_work[0] / (cpu_work[1] / GiB)
        res["_generator_cpu_per_gib"] = cpu_work[2] / (cpu_work[1] / GiB)
        log(f"  CPU: {res['cpu_per_gib']:.2f} s/GiB (system), load generator {res['_generator_cpu_per_gib']:.2f}")
    else:
        res["cpu_per_gib"] = Failed(
            "a bulk workload failed",
            collateral=all(
                isinstance(res.get(k), Failed) and res[k].collateral for k in ("bulk_up", "bulk_down", "par16")
            ),
        )

    rtts = await _guard(
        res,
        ["rtt_p50", "rtt_p99"],
        cfg.workload_timeout,
        log,
        "idle RTT",
        lambda: rtt_idle(target.addr, cfg.rtt_n, cfg.rtt_seconds, seed + 3),
        target,
    )
    if rtts:
        res["rtt_p50"] = percentile(rtts, 0.5) * 1e6
        res["rtt_p99"] = percentile(rtts, 0.99) * 1e6
        res["_rtt_n"] = len(rtts)
        log(f"  idle RTT: p50 {res['rtt_p50']:.0f} µs, p99 {res['rtt_p99']:.0f} µs ({len(rtts)} round trips)")

    lr = await _guard(
        res,
        ["loaded_rtt_p50", "loaded_rtt_p99", "loaded_bulk"],
        cfg.workload_timeout + 30,
        log,
        "RTT beside a bulk upload",
        lambda: rtt_loaded(
            target.addr,
            cfg.loaded_rtt_n,
            cfg.loaded_rtt_seconds,
            warmup_s=cfg.loaded_warmup_s,
            bulk_seconds=cfg.loaded_rtt_seconds + cfg.loaded_warmup_s + 20,
            seed=seed + 4,
        ),
        target,
    )
    if lr:
        res["loaded_rtt_p50"] = percentile(lr.rtts, 0.5) * 1e6
        res["loaded_rtt_p99"] = percentile(lr.rtts, 0.99) * 1e6
        res["loaded_bulk"] = lr.bulk.mib_s
        res["_loaded_rtt_n"] = len(lr.rtts)
        log(
            f"  RTT beside a bulk upload: p50 {res['loaded_rtt_p50']:.0f} µs, p99 {res['loaded_rtt_p99']:.0f} µs "
            f"({len(lr.rtts)} round trips; bulk {lr.bulk.mib_s:.0f} MiB/s)"
        )
    if isinstance(res.get("loaded_rtt_p99"), float) and isinstance(res.get("rtt_p99"), float):
        res["loaded_p99_ratio"] = res["loaded_rtt_p99"] / res["rtt_p99"]  # type: ignore[operator]
    else:
        res["loaded_p99_ratio"] = Failed(
            "an RTT workload failed",
            collateral=any(isinstance(res.get(k), Failed) and res[k].collateral for k in ("rtt_p99", "loaded_rtt_p99")),
        )

    v = await _guard(
        res,
        ["seq_cps"],
        cfg.seq_seconds + 30,
        log,
        "sequential connections",
        lambda: connections_sequential(target.addr, cfg.seq_conns, cfg.seq_seconds),
        target,
    )
    if v:
        res["seq_cps"] = v
        log(f"  sequential connections: {v:.0f}/s")
    v = await _guard(
        res,
        ["conc_cps"],
        cfg.conc_seconds + 30,
        log,
        "concurrent connections",
        lambda: connections_concurrent(target.addr, cfg.conc_conns, cfg.conc_workers, cfg.conc_seconds),
        target,
    )
    if v:
        res["conc_cps"] = v
        log(f"  {cfg.conc_workers}-concurrent connections: {v:.0f}/s")

    return res


async def run_delay(target: Target, cfg: Config, params: Any, log: Log, rep: int = 0) -> Result:
    res: Result = {}
    line = params.rate_Bps
    k_mib, k_pct = delay_keys(params)
    t = await _guard(
        res,
        [k_mib, k_pct],
        cfg.delay_seconds + 60,
        log,
        "delay line upload",
        lambda: timed_upload(target.addr, cfg.delay_seconds, int(line * cfg.delay_seconds * 4), seed=9 + rep * 10_000),
        target,
    )
    if t:
        res[k_mib] = t.mib_s
        res[k_pct] = 100 * t.nbytes / t.seconds / line
        log(
            f"  over the delay line: {t.mib_s:.1f} MiB/s = {res[k_pct]:.0f}% of the line rate "
            f"({t.nbytes / MiB:.0f} MiB in {t.seconds:.1f} s)"
        )
    return res


# ---------------------------------------------------------------------------------------------------------------
# Running systems, aggregating, reporting
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SystemReport:
    name: str
    status: str = "ok"  # ok | skipped
    reason: str = ""
    version: str = ""
    repeats: list[Result] = field(default_factory=list)
    delay_status: str = ""  # "" = measured; else why not
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _start_failure(exc: BaseException, log: Log) -> str:
    inner = _unwrap(exc)
    if isinstance(inner, SystemUnavailable):
        return str(inner)
    if isinstance(inner, trio.TooSlowError):
        return "did not start in time"
    log("".join(traceback.format_exception(exc)))
    return f"failed to start: {_err(exc)}"


async def bench_system(
    rep: SystemReport,
    system: System,
    opts: argparse.Namespace,
    cfg: Config,
    delays: Sequence[Any],
    log: Log,
    tmp: Path,
    deadline: float,
) -> None:
    """Measure one system into `rep` (filled as it goes, so a run cut by the time budget keeps what it has).
    A repeat is only started when the previous one suggests it fits before `deadline` (time.monotonic())."""
    t0 = time.monotonic()
    reason = system.unavailable(opts)
    if reason:
        rep.status, rep.reason = "skipped", reason
        log(f"[{system.name}] skipped: {reason}")
        return
    rep.version = system.version(opts)
    log(f"[{system.name}] starting{(' (' + rep.version + ')') if rep.version else ''}")

    def fits(last_duration: float) -> bool:
        if time.monotonic() + last_duration * 1.2 < deadline:
            return True
        rep.notes.append(f"time budget: {len(rep.repeats)} of {cfg.repeats} repeats")
        log(f"[{system.name}] stopping after {len(rep.repeats)} repeat(s): time budget")
        return False

    last = 0.0
    for r in range(cfg.repeats):
        if r and not fits(last):
            break
        t_rep = time.monotonic()
        try:
            # a fresh system (and sink) per repeat: repeats are independent, and the memory workload sees new
            # processes, not an allocator that still holds the previous repeat's memory
            async with process_group(tmp) as group:
                sink, sink_addr = await start_sink(group)
                with trio.fail_after(opts.start_timeout * 3 + 10):
                    target = await system.start(group, sink, sink_addr, opts, None)
                log(
                    f"[{system.name}] repeat {r + 1}/{cfg.repeats}: clients connect to "
                    f"{target.addr[0]}:{target.addr[1]}"
                )
                rep.repeats.append(await run_suite(target, cfg, log, r))
                dead = target.check()
                if dead:
                    rep.notes.append(f"repeat {r + 1}: the system died: {dead}")
        except Exception as exc:
            if not rep.repeats:
                rep.status, rep.reason = "skipped", _start_failure(exc, log)
                log(f"[{system.name}] skipped: {rep.reason}")
                return
            rep.notes.append(f"repeat {r + 1}: {_start_failure(exc, log)}")
            log(f"[{system.name}] repeat {r + 1}: {rep.notes[-1]}")
            break
        last = time.monotonic() - t_rep
    if opts.no_delay:
        rep.delay_status = "not run (--no-delay)"
    for params in [] if opts.no_delay else delays:
        if time.monotonic() > deadline:
            rep.notes.append(f"delay line at {_rate_tag(params)} Mbit/s not run: time budget")
            continue
        try:
            async with process_group(tmp) as group:
                sink, sink_addr = await start_sink(group)
                with trio.fail_after(opts.start_timeout * 3 + 10):
                    target = await system.start(group, sink, sink_addr, opts, params)
                log(f"[{system.name}] with the delay line in its link ({params.describe()})")
                for r in range(len(rep.repeats)):
                    rep.repeats[r].update(await run_delay(target, cfg, params, log, r))
        except Exception as exc:
            why = f"did not start with the delay line: {_start_failure(exc, log)}"
            rep.delay_status = why
            log(f"[{system.name}] delay line: {why}")
    rep.seconds = time.monotonic() - t0


def aggregate(reports: Sequence[SystemReport], metrics: Sequence[Metric]) -> dict[str, dict[str, Any]]:
    """Per system, per metric: median over repeats, or FAILED with the first error, plus ratios."""
    table: dict[str, dict[str, Any]] = {}
    for rep in reports:
        if rep.status != "ok" or not rep.repeats:
            continue
        row: dict[str, Any] = {}
        for m in metrics:
            vals = [r.get(m.key) for r in rep.repeats]
            fails = [v for v in vals if isinstance(v, Failed) and not v.collateral]
            nums = [v for v in vals if isinstance(v, float | int)]
            shown = [v if isinstance(v, float | int) else None for v in vals]
            if fails:
                row[m.key] = {"status": "FAILED", "error": fails[0].error, "values": shown}
            elif not nums:
                collateral = [v for v in vals if isinstance(v, Failed)]
                why = (
                    collateral[0].error
                    if collateral
                    else rep.delay_status
                    if m.key.startswith("delay") and rep.delay_status
                    else "not measured"
                )
                row[m.key] = {"status": "n/a", "error": why}
            else:
                # median of the repeats that measured it (a repeat may have lost it to an earlier crash)
                row[m.key] = {"status": "ok", "median": statistics.median(nums), "values": shown}
        extras: dict[str, Any] = {}
        for r in rep.repeats:
            for k, v in r.items():
                if k.startswith("_"):
                    extras.setdefault(k[1:], []).append(v)
        row["_extras"] = extras
        table[rep.name] = row
    for ref in ("direct", "ssh"):
        if ref not in table:
            continue
        for row in table.values():
            for m in metrics:
                cell, refcell = row[m.key], table[ref][m.key]
                if cell.get("status") == "ok" and refcell.get("status") == "ok" and refcell["median"]:
                    cell[f"ratio_{ref}"] = cell["median"] / refcell["median"]
    return table


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{mem_kib / 1024 / 1024:.1f} GiB"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "trio": trio.__version__,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else [],
    }


def _fmt(m: Metric, cell: dict[str, Any]) -> str:
    if cell.get("status") == "FAILED":
        return "FAILED"
    if cell.get("status") != "ok":
        return "n/a"
    return m.fmt.format(cell["median"])


def render_markdown(doc: dict[str, Any]) -> str:
    mi = doc["machine"]
    names = [r["name"] for r in doc["systems"]]
    ok = [r["name"] for r in doc["systems"] if r["status"] == "ok"]
    table = doc["results"]
    metrics = [Metric(**m) for m in doc["metrics"]]
    out = ["# trio-tunnel benchmark", ""]
    out.append(f"- Command: `{doc['command']}`")
    out.append(
        f"- Date: {doc['started']} ({doc['duration_s']:.0f} s); mode: "
        f"{'quick' if doc['quick'] else 'full'}, {doc['config']['repeats']} repeat(s), medians"
    )
    out.append(
        f"- Machine: {mi['nproc']} x {mi['cpu_model']}, {mi['memory']} RAM, {mi['kernel']}, "
        f"Python {mi['python']}, Trio {mi['trio']}; load average at start {' '.join(mi['loadavg_at_start'])}"
    )
    vers = [f"{r['name']} {r['version']}" for r in doc["systems"] if r.get("version")]
    if vers:
        out.append(f"- Versions: {'; '.join(vers)}")
    c = doc["config"]
    out.append(
        f"- Sizes: bulk {c['bulk_bytes'] // MiB} MiB each way, {c['par_streams']} x "
        f"{c['par_bytes_each'] // MiB} MiB parallel, {c['rtt_n']} round trips, {c['idle_conns']} idle "
        f"connections; delay line {' and '.join(doc['delay_line'])}"
    )
    out.append("")
    if ok:
        out.append("| workload | unit | better | " + " | ".join(ok) + " |")
        out.append("|---|---|---|" + "---:|" * len(ok))
        for m in metrics:
            cells = [_fmt(m, table[n][m.key]) for n in ok]
            out.append(
                f"| {m.label} | {m.unit} | {'higher' if m.higher_is_better else 'lower'} | " + " | ".join(cells) + " |"
            )
        out.append("")
        refs = [r for r in ("direct", "ssh") if r in ok]
        if refs and len(ok) > 1:
            out.append(f"Ratios (system / {' ; system / '.join(refs)}):")
            out.append("")
            out.append("| workload | " + " | ".join(ok) + " |")
            out.append("|---|" + "---:|" * len(ok))
            for m in metrics:
                cells = []
                for n in ok:
                    cell = table[n][m.key]
                    parts = [f"{cell[f'ratio_{r}']:.2f}" if f"ratio_{r}" in cell else "-" for r in refs]
                    cells.append(" ; ".join(parts))
                out.append(f"| {m.label} | " + " | ".join(cells) + " |")
            out.append("")
    notes = []
    for r in doc["systems"]:
        if r["status"] != "ok":
            notes.append(f"- **{r['name']}**: {r['status']}: {r['reason']}")
        elif r.get("delay_status"):
            notes.append(f"- **{r['name']}**: delay line {r['delay_status']}")
        notes += [f"- **{r['name']}**: {note}" for note in r.get("notes", [])]
    for n in ok:
        for m in metrics:
            cell = table[n][m.key]
            if cell.get("status") == "FAILED":
                notes.append(f"- **{n}** {m.label}: FAILED: {cell['error']}")
    if notes:
        out += ["Skipped / failed / notes:", "", *notes, ""]
    out += ["What was measured:", "", *[f"- {line}" for line in doc["measured"]], ""]
    missing = [n for n in names if n not in ok]
    if missing:
        out.append(f"Not measured: {', '.join(missing)}.")
        out.append("")
    return "\n".join(out)


MEASURED = [
    "Every transfer is verified: deterministic pseudo-random data, the receiver's byte count and CRC-32 must equal "
    "the sender's; a short, long or corrupted transfer makes the cell FAILED.",
    "Throughput is timed from the service's acknowledgement (path established) to its verdict (last byte "
    "delivered). Upload = client -> exposed port -> service; download = the reverse.",
    "RTT: 64-byte messages echoed by the service, one at a time; 'beside a bulk upload' runs the ping-pong while "
    "a helper process uploads as fast as it can on another connection through the same system (for ssh and "
    "trio-tunnel the same multiplexed link: head-of-line blocking shows here).",
    "Short connections: connect, 64-byte request, 64-byte reply, close; sequential, and with 200 concurrent workers.",
    "Memory per idle connection: growth of the summed VmRSS (and PSS, which shares forked pages fairly) of the "
    "system's processes with 1,000 connections held open end to end, divided by 1,000. For direct that is the "
    "sink itself (a Trio task and socket per connection).",
    "CPU per GiB: CPU time of the system's processes (run time of their threads from /proc/PID/task/*/schedstat, "
    "plus reaped children's cutime+cstime from /proc/PID/stat) during the 1-stream and 16-stream bulk workloads, "
    "over the GiB moved. For direct it is the sink's cost, i.e. the receiving endpoint.",
    "System's processes: direct = the sink; socat = the listener and its forked children; ssh = sshd and its "
    "children plus the ssh client; trio-tunnel = server plus client.",
    "The load generator runs in the benchmark process (Trio), the sink/echo service in a separate process; on a "
    "2-core machine they compete with the system under test, so direct is this harness's ceiling, not the "
    "kernel's. The bulk upload beside the ping-pong runs in a third process at nice 10.",
    "Each repeat starts a fresh system (and sink) and runs the memory workload first; cells are medians over "
    "the repeats. A workload that fails verification or times out makes its cell FAILED; if the system died, "
    "the workloads after it in that repeat are not run.",
    "Delay line: a Trio proxy (scripts/delayline.py) that delays each direction and paces it to the line rate "
    "with a bounded queue, placed in the link (trio-tunnel client<->server, ssh<->sshd, socat->service, "
    "client->service for direct); one upload's goodput over it as a fraction of the line rate.",
]


def build_config(args: argparse.Namespace) -> Config:
    cfg = Config.quick() if args.quick else Config()
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    if args.bulk_mib:
        cfg = replace(cfg, bulk_bytes=args.bulk_mib * MiB)
    return cfg


async def amain(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    try:
        rates = [float(r) for r in args.rate_mbit.split(",") if r.strip()]
    except ValueError:
        print(f"bench: --rate-mbit wants numbers, got {args.rate_mbit!r}", file=sys.stderr)
        return 2
    delays = [
        DelayParams(args.delay_ms / 1e3, rate * 1e6, None if args.buffer_kib is None else args.buffer_kib * KiB)
        for rate in rates
    ]
    metrics = metrics_for(delays)
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    for n in names:
        if n not in SYSTEMS:
            print(f"bench: unknown system {n!r} (choose from {', '.join(SYSTEMS)})", file=sys.stderr)
            return 2

    def log(s: str) -> None:
        if not args.silent:
            print(s, file=sys.stderr, flush=True)

    started = _dt.datetime.now(_dt.UTC).replace(microsecond=0)
    t0 = time.monotonic()
    machine = machine_info()
    reports: list[SystemReport] = []
    with tempfile.TemporaryDirectory(prefix="trio-tunnel-bench-") as tmpd:
        deadline = time.monotonic() + args.budget
        with trio.move_on_at(trio.current_time() + args.budget + 30) as budget:  # last resort
            for n in names:
                reports.append(SystemReport(n))
                await bench_system(reports[-1], SYSTEMS[n], args, cfg, delays, log, Path(tmpd), deadline)
        if budget.cancelled_caught:
            log(f"bench: time budget of {args.budget:g} s exhausted")
            reports[-1].notes.append("cut short by the time budget")
            for n in names[len(reports) :]:
                reports.append(SystemReport(n, "skipped", f"time budget of {args.budget:g} s exhausted"))
    table = aggregate(reports, metrics)
    doc = {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "cwd": os.getcwd(),
        "started": started.isoformat(),
        "duration_s": time.monotonic() - t0,
        "quick": bool(args.quick),
        "machine": machine,
        "config": asdict(cfg),
        "delay_line": [p.describe() for p in delays],
        "systems": [
            {
                "name": r.name,
                "status": r.status if r.status != "ok" or r.repeats else "skipped",
                "reason": r.reason or ("" if r.repeats or r.status != "ok" else "not run"),
                "version": r.version,
                "delay_status": r.delay_status,
                "repeats": len(r.repeats),
                "notes": r.notes,
                "seconds": round(r.seconds, 1),
            }
            for r in reports
        ],
        "metrics": [asdict(m) for m in metrics],
        "results": table,
        "measured": MEASURED,
    }
    md = render_markdown(doc)
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    failed = any(
        cell.get("status") == "FAILED" for row in table.values() for k, cell in row.items() if not k.startswith("_")
    )
    return 1 if failed else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark trio-tunnel beside direct TCP, socat and ssh -R on loopback "
        "(throughput, RTT under load, connections/s, memory per connection, CPU per GiB, delay line).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  .venv/bin/python scripts/bench.py --quick\n"
        "  .venv/bin/python scripts/bench.py --systems direct,ssh,trio-tunnel --json out.json --md out.md\n"
        "\nInstall the peers with: apt-get install socat openssh-server openssh-client\n"
        "Full description of systems and workloads: the module docstring (head -60 scripts/bench.py).",
    )
    ap.add_argument("--quick", action="store_true", help="1 repeat, small sizes: about a minute")
    ap.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)"
    )
    ap.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    ap.add_argument("--md", metavar="PATH", help="write the markdown report")
    ap.add_argument("--repeats", type=int, help="override the number of repeats (default 3, --quick 1)")
    ap.add_argument("--bulk-mib", type=int, help="override the 1-stream bulk size (default 256, --quick 32)")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="delay line: one-way delay (default 25)")
    ap.add_argument(
        "--rate-mbit",
        default="200,1000",
        help="delay line: line rate(s) in Mbit/s, comma-separated, one measurement each "
        "(default 200,1000: at 50 ms RTT a fixed 2 MiB window caps near 40 MiB/s = 335 Mbit/s)",
    )
    ap.add_argument("--buffer-kib", type=int, help="delay line: queue per direction (default one BDP)")
    ap.add_argument("--no-delay", action="store_true", help="skip the delay-line measurement")
    ap.add_argument("--ssh-cipher", help="cipher for ssh (default: OpenSSH's default)")
    ap.add_argument(
        "--socat-backlog",
        type=int,
        default=1024,
        help="listen backlog for socat (its own default is 5; default here 1024)",
    )
    ap.add_argument("--trio-tunnel", metavar="EXE", help="trio-tunnel executable (default: next to python)")
    ap.add_argument(
        "--tt-server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for 'trio-tunnel server' (repeatable), e.g. --tt-server-arg=--config=x.toml",
    )
    ap.add_argument(
        "--tt-client-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for 'trio-tunnel client' (repeatable)",
    )
    ap.add_argument(
        "--start-timeout",
        type=float,
        default=15.0,
        help="seconds a system may take to print its ready lines (default 15)",
    )
    ap.add_argument("--budget", type=float, help="overall time budget in seconds (default 840, --quick 150)")
    ap.add_argument("--silent", action="store_true", help="no progress on stderr")
    # internal helper modes
    ap.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bulk-helper", metavar="HOST:PORT", help=argparse.SUPPRESS)
    ap.add_argument("--helper-seconds", type=float, default=30.0, help=argparse.SUPPRESS)
    ap.add_argument("--helper-seed", type=int, default=7, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 150.0 if args.quick else 840.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_sink:
        return serve_sink_main()
    if args.bulk_helper:
        host, _, port = args.bulk_helper.rpartition(":")
        return bulk_helper_main((host, int(port)), args.helper_seconds, args.helper_seed)
    _raise_nofile()
    try:
        return trio.run(amain, args)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
