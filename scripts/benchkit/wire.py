"""The data pattern, the wire protocol between load generator and sink, and the sink/echo service.

Every byte the harness moves is a slice of one pseudo-random pattern, so the receiver can check count and CRC-32
without the sender shipping a checksum of its own; the sink normally runs in its own process (--serve-sink).
"""

from __future__ import annotations

import contextlib
import functools
import resource
import socket
import struct
import sys
import zlib

import trio

from .common import KiB, MiB

Addr = tuple[str, int]

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


async def connect(addr: Addr) -> trio.SocketStream:
    """One socket and one connect to a numeric address: no resolver call, no happy-eyeballs tasks in the timing."""
    sock = trio.socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


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
            request = await _receive_or_none(stream, size)
            if request is not None:
                await stream.send_all(request)
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


def raise_nofile() -> None:
    """Thousands of connections held at once (and their relays' sockets) need more than the usual soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    want = min(want, 65536)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def serve_sink_main() -> int:
    raise_nofile()

    async def amain() -> None:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(run_sink)
            print(f"listening {host}:{port}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(amain)
    return 0
