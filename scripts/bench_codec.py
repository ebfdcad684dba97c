#!/usr/bin/env python3
"""Frame codec micro-benchmark: header encode/decode cost per frame, and the bytes of overhead per DATA frame.

    python scripts/bench_codec.py            # from the repository root (or with proto installed)
    python scripts/bench_codec.py --repeat 9

Each figure is the best of ``--repeat`` timeit runs (each run lasting at least 0.2 s), divided by the number
of frames it handled: the least-disturbed estimate on a shared machine. The decode figures go through
``proto.frames.FrameDecoder`` (``feed`` + ``next_frame``), as ``Connection.receive_data`` does, including the
one copy of the payload out of the receive buffer.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import timeit
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import msgpack
from trio_tunnel.proto import ErrorCode
from trio_tunnel.proto import frames as F

KiB = 1024


def per_call(fn: Callable[[], object], repeat: int, frames_per_call: int = 1) -> float:
    """Best-of-``repeat`` seconds per frame."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()  # also the warm-up: at least 0.2 s
    return min(timer.repeat(repeat=repeat, number=number)) / number / frames_per_call


def decode_stream(stream: bytes, count: int) -> Callable[[], object]:
    def run() -> object:
        decoder = F.FrameDecoder(max_header=1024, max_payload=64 * KiB)
        decoder.feed(stream)
        n = 0
        while decoder.next_frame() is not None:
            n += 1
        assert n == count
        return n

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timeit repeats; the best is reported (default 5)")
    args = parser.parse_args()
    r = args.repeat

    payload = os.urandom(16 * KiB)
    data16k = F.encode(F.Data(1, payload))
    controls = {
        "WINDOW": F.Window(1, 1 << 20),
        "PING": F.Ping(123456789),
        "RST": F.Reset(5, ErrorCode.STREAM_CLOSED, "stream closed"),
        "OPEN": F.Open(7, "web", {"peer": "203.0.113.7:51234"}),
    }
    batch = 64  # frames per decode run: one large receive_some() worth of frames

    print(f"# bench_codec: Python {platform.python_version()}, msgpack {msgpack.version}, {platform.machine()}")
    print(f"# best of {r} runs; times per frame\n")
    rows: list[tuple[str, float]] = [
        ("encode_data_header(sid=1, 16 KiB)", per_call(lambda: F.encode_data_header(1, 16 * KiB, False), r)),
        ("encode_data_header(sid=300, 16 KiB, FIN)", per_call(lambda: F.encode_data_header(300, 16 * KiB, True), r)),
        ("encode(Data) 16 KiB, header + payload join", per_call(lambda: F.encode(F.Data(1, payload)), r)),
        ("FrameDecoder: one 16 KiB DATA frame per feed", per_call(decode_stream(data16k, 1), r)),
        (
            f"FrameDecoder: 16 KiB DATA, {batch} frames per feed",
            per_call(decode_stream(data16k * batch, batch), r, batch),
        ),
    ]
    small = F.encode(F.Data(3, b"x" * 100))
    rows.append(
        (f"FrameDecoder: 100 B DATA, {batch} frames per feed", per_call(decode_stream(small * batch, batch), r, batch))
    )
    for name, frame in controls.items():
        raw = F.encode(frame)
        rows.append((f"encode({name}) ({len(raw)} B)", per_call(lambda frame=frame: F.encode(frame), r)))
        rows.append(
            (f"FrameDecoder: {name}, {batch} frames per feed", per_call(decode_stream(raw * batch, batch), r, batch))
        )
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds * 1e6:7.2f} us")

    print("\n# bytes of overhead per DATA frame (6-byte prefix + msgpack header [0, sid, flags])")
    for label, sid in [
        ("sid < 128", 127),
        ("128 <= sid < 256", 255),
        ("256 <= sid < 65536", 65535),
        ("65536 <= sid < 2**32", 2**32 - 1),
        ("sid >= 2**32", 2**32),
    ]:
        overhead = len(F.encode_data_header(sid, 16 * KiB, False))
        print(
            f"{label:<22} {overhead:3d} bytes  ({overhead / (16 * KiB) * 100:.3f}% of a 16 KiB frame,"
            f" {overhead / (64 * KiB) * 100:.3f}% of 64 KiB)"
        )


if __name__ == "__main__":
    main()
