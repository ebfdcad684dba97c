#!/usr/bin/env python3
"""A TCP delay line on loopback: a proxy that behaves like a long fat link.

Every connection accepted on ``--listen`` is relayed to ``--connect``; each direction independently

* delays every chunk by a fixed one-way delay (``--delay-ms``, default 25 ms, so 50 ms round trip),
* serializes chunks at a fixed line rate (``--rate-mbit``, default 200 Mbit/s), and
* holds at most ``--buffer-kib`` bytes waiting for the line (default: one bandwidth-delay product); when that
  queue is full the proxy stops reading, so the sender sees TCP backpressure instead of infinite memory.

Bytes already "on the wire" (serialized, not yet delivered) are bounded by rate x delay, so the whole pipe holds at
most buffer + rate x delay bytes per direction. A chunk read at time ``t`` departs at
``max(t, previous departure) + len / rate`` and is written to the other side at ``departure + delay``. EOF is
forwarded in order (half-close); a reset or error on either side closes both.

The proxy terminates TCP on both sides (so the kernels see a ~0 RTT); what the delay exposes is the *application's*
flow control: a multiplexer with a fixed per-stream window W cannot exceed W / RTT over it.

Standalone use (loopback addresses only; this is a test tool)::

    .venv/bin/python scripts/delayline.py --listen 127.0.0.1:9000 --connect 127.0.0.1:8000 \\
        --delay-ms 25 --rate-mbit 200

It prints ``listening HOST:PORT`` on stdout once bound (port 0 picks a free port) and runs until SIGINT/SIGTERM.
From Python (Trio): ``await nursery.start(run_delayline, DelayParams(...), listen, connect)``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import ipaddress
import math
import signal
import sys
from dataclasses import dataclass

import trio

READ_CHUNK = 64 * 1024
_EOF = object()


@dataclass(frozen=True)
class DelayParams:
    delay_s: float = 0.025  # one way
    rate_bps: float = 200e6  # bits per second
    buffer_bytes: int | None = None  # queue waiting for the line; None = one bandwidth-delay product

    @property
    def rate_Bps(self) -> float:  # bytes per second
        return self.rate_bps / 8.0

    @property
    def bdp_bytes(self) -> int:
        return math.ceil(self.rate_Bps * self.delay_s)

    @property
    def queue_bytes(self) -> int:
        if self.buffer_bytes is not None:
            return max(READ_CHUNK, self.buffer_bytes)
        return max(READ_CHUNK, self.bdp_bytes)

    def describe(self) -> str:
        return (
            f"{self.delay_s * 1e3:g} ms one way ({2 * self.delay_s * 1e3:g} ms RTT), "
            f"{self.rate_bps / 1e6:g} Mbit/s, queue {self.queue_bytes // 1024} KiB per direction"
        )


class _Direction:
    """One direction of one connection: reader -> timed queue -> paced writer."""

    def __init__(self, params: DelayParams) -> None:
        self.p = params
        self.queue: collections.deque[tuple[float, object]] = collections.deque()
        self.queued = 0  # bytes read and not yet written
        self.last_depart = 0.0
        self.changed = trio.Event()  # set whenever queue content changes
        # hard cap on memory: the queue plus what is on the wire plus one chunk
        self.hard_cap = self.p.queue_bytes + self.p.bdp_bytes + 2 * READ_CHUNK

    def _kick(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def reader(self, src: trio.abc.ReceiveStream) -> None:
        rate = self.p.rate_Bps
        queue_s = self.p.queue_bytes / rate
        chunk_s = READ_CHUNK / rate
        while True:
            data = await src.receive_some(READ_CHUNK)
            now = trio.current_time()
            if not data:
                self.queue.append((max(now, self.last_depart) + self.p.delay_s, _EOF))
                self._kick()
                return
            depart = max(now, self.last_depart) + len(data) / rate
            self.last_depart = depart
            self.queue.append((depart + self.p.delay_s, data))
            self.queued += len(data)
            self._kick()
            # Backpressure 1: the bytes still waiting for the line (backlog) must fit in the queue, leaving room
            # for the next read.
            resume = self.last_depart - (queue_s - chunk_s)
            if resume > trio.current_time():
                await trio.sleep_until(resume)
            # Backpressure 2: a slow receiver must not make us buffer without bound.
            while self.queued > self.hard_cap:
                await self.changed.wait()

    async def writer(self, dst: trio.abc.HalfCloseableStream) -> None:
        while True:
            while not self.queue:
                await self.changed.wait()
            due, item = self.queue[0]
            await trio.sleep_until(due)
            if item is _EOF:
                self.queue.popleft()
                with contextlib.suppress(trio.ClosedResourceError):
                    await dst.send_eof()
                return
            # coalesce everything that is due now into one write
            now = trio.current_time()
            parts: list[bytes] = []
            while self.queue and self.queue[0][0] <= now and self.queue[0][1] is not _EOF:
                parts.append(self.queue.popleft()[1])  # type: ignore[arg-type]
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            await dst.send_all(data)
            self.queued -= len(data)
            self._kick()


async def _pipe(params: DelayParams, src: trio.SocketStream, dst: trio.SocketStream) -> None:
    d = _Direction(params)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(d.reader, src)
        nursery.start_soon(d.writer, dst)


async def _handle(params: DelayParams, connect: tuple[str, int], inbound: trio.SocketStream) -> None:
    try:
        with trio.fail_after(10):
            outbound = await trio.open_tcp_stream(*connect)
    except (OSError, trio.TooSlowError) as exc:
        print(f"delayline: connect {connect[0]}:{connect[1]} failed: {exc}", file=sys.stderr)
        await trio.aclose_forcefully(inbound)
        return
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, params, inbound, outbound)
            nursery.start_soon(_pipe, params, outbound, inbound)
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # one side went away: close both (below)
    finally:
        await trio.aclose_forcefully(inbound)
        await trio.aclose_forcefully(outbound)


def _check_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"delayline: {host} is not a loopback address (this tool is loopback-only)")


async def run_delayline(
    params: DelayParams,
    listen: tuple[str, int],
    connect: tuple[str, int],
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started((host, port))`` once bound."""
    _check_loopback(listen[0])
    _check_loopback(connect[0])

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(params, connect, stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, listen[1], host=listen[0]))
        host, port = listeners[0].socket.getsockname()[:2]
        task_status.started((host, port))


def parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: delayline.py --listen 127.0.0.1:9000 --connect 127.0.0.1:8000 --delay-ms 25 --rate-mbit 200",
    )
    ap.add_argument("--listen", required=True, type=parse_hostport, help="HOST:PORT to accept on (port 0: pick)")
    ap.add_argument("--connect", required=True, type=parse_hostport, help="HOST:PORT to relay to")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay per direction (default 25)")
    ap.add_argument("--rate-mbit", type=float, default=200.0, help="line rate per direction (default 200)")
    ap.add_argument(
        "--buffer-kib",
        type=int,
        default=None,
        help="queue waiting for the line, per direction (default: one bandwidth-delay product)",
    )
    args = ap.parse_args(argv)
    params = DelayParams(
        args.delay_ms / 1e3, args.rate_mbit * 1e6, None if args.buffer_kib is None else args.buffer_kib * 1024
    )

    async def amain() -> None:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(run_delayline, params, args.listen, args.connect)
            print(f"listening {host}:{port}", flush=True)
            print(f"delayline: {params.describe()} -> {args.connect[0]}:{args.connect[1]}", file=sys.stderr)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(amain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
