"""CPU seconds per GiB to send and to receive over loopback: trio.SSLStream, TlsStream and plain TcpStream.

Each side runs in a process of its own, so each side's CPU (``time.process_time()``: user + system of that
process, from the end of the handshake to the end of the transfer) is measured alone. The TLS runs are TLS 1.3
with the server identity of :mod:`trio_tunnel.certs` (ECDSA P-256, pinned) and the cipher suite OpenSSL prefers
(AES-GCM; the table shows which). The sender sends ``--mib`` MiB in ``--chunk``-byte ``send_all`` calls, then
closes; the receiver reads with ``receive_some(--chunk)`` until the end of the stream.

Usage::

    .venv/bin/python scripts/bench_tls.py [--mib 512] [--chunk 65536] [--kinds sslstream,tlsstream,tcp]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from trio_tunnel import certs
from trio_tunnel.tcp import TcpStream
from trio_tunnel.tls import TlsStream

KINDS = ("sslstream", "tlsstream", "tcp")
MIB = 1024 * 1024
GIB = 1024 * MIB


async def _connect(kind: str, role: str, state: Path, port: int) -> tuple[trio.abc.Stream, str]:
    """The connected stream for ``kind`` (handshake done) and the cipher suite, or "-"."""
    cert_path, key_path = certs.load_or_create_identity(state)
    if role == "recv":
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)
        sock_stream = await listeners[0].accept()
        await listeners[0].aclose()
        context = certs.server_context(cert_path, key_path)
    else:
        sock_stream = await trio.open_tcp_stream("127.0.0.1", port)
        context = certs.client_context(pins=[certs.fingerprint_of_pem_file(cert_path)])
    server_side = role == "recv"
    if kind == "tcp":
        return TcpStream.adopt(sock_stream), "-"
    if kind == "tlsstream":
        tls = await TlsStream.handshake(sock_stream, context, server_side=server_side)
        return tls, tls.cipher or "?"
    ssl_stream = trio.SSLStream(sock_stream, context, server_side=server_side)
    await ssl_stream.do_handshake()
    cipher = ssl_stream.cipher()
    return ssl_stream, cipher[0] if cipher else "?"


async def _child(kind: str, role: str, state: Path, port: int, mib: int, chunk: int) -> None:
    stream, cipher = await _connect(kind, role, state, port)
    total = mib * MIB
    cpu, wall = time.process_time(), time.perf_counter()
    moved = 0
    if role == "send":
        data = b"\xa5" * chunk
        while moved < total:
            n = min(chunk, total - moved)
            await stream.send_all(data if n == chunk else data[:n])
            moved += n
        await stream.aclose()
    else:
        while data := await stream.receive_some(chunk):
            moved += len(data)
        await stream.aclose()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(json.dumps({"cpu": cpu, "wall": wall, "bytes": moved, "cipher": cipher}), flush=True)


def _run(kind: str, state: Path, mib: int, chunk: int) -> tuple[dict[str, float | str], dict[str, float | str]]:
    base = [sys.executable, __file__, "--kind", kind, "--state", str(state), "--mib", str(mib), "--chunk", str(chunk)]
    receiver = subprocess.Popen([*base, "--role", "recv"], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None
    port = receiver.stdout.readline().strip()
    sender = subprocess.run([*base, "--role", "send", "--port", port], stdout=subprocess.PIPE, text=True, check=True)
    received = json.loads(receiver.stdout.read())
    if receiver.wait() != 0:
        raise SystemExit(f"{kind}: the receiver failed")
    sent = json.loads(sender.stdout)
    if received["bytes"] != mib * MIB:
        raise SystemExit(f"{kind}: received {received['bytes']} bytes of {mib * MIB}")
    return sent, received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB to transfer per run (default 512)")
    parser.add_argument("--chunk", type=int, default=65536, help="bytes per send_all / receive_some (default 65536)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=("send", "recv"), help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        trio.run(_child, args.kind, args.role, args.state, args.port, args.mib, args.chunk)
        return

    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    results: dict[str, tuple[dict[str, float | str], dict[str, float | str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        certs.load_or_create_identity(state)
        for kind in kinds:
            results[kind] = _run(kind, state, args.mib, args.chunk)

    gib = args.mib * MIB / GIB
    base = results.get("tcp")
    print(f"{args.mib} MiB in {args.chunk}-byte calls over 127.0.0.1, one process per side\n")
    header = (
        f"{'stream':<10} {'cipher':<24} {'send s/GiB':>10} {'recv s/GiB':>10} {'MB/s':>8} {'send/tcp':>9} "
        f"{'recv/tcp':>9}"
    )
    print(header)
    print("-" * len(header))
    for kind, (sent, received) in results.items():
        send_cpu, recv_cpu = float(sent["cpu"]) / gib, float(received["cpu"]) / gib
        rate = args.mib * MIB / 1e6 / float(received["wall"])
        ratios = ("", "")
        if base is not None:
            ratios = (
                f"{send_cpu / (float(base[0]['cpu']) / gib):.2f}",
                f"{recv_cpu / (float(base[1]['cpu']) / gib):.2f}",
            )
        print(
            f"{kind:<10} {sent['cipher']!s:<24} {send_cpu:>10.3f} {recv_cpu:>10.3f} {rate:>8.0f} "
            f"{ratios[0]:>9} {ratios[1]:>9}"
        )


if __name__ == "__main__":
    main()
