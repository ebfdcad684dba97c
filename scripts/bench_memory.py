"""Python heap per idle tunnelled connection, both ends together, measured with tracemalloc.

bench.py measures what users see (the growth of the tunnel processes' RSS with 1,000 idle connections); this
script measures where that memory goes, deterministically, so a change can be judged in one run on a noisy
machine. Server, client, the load side and a sink service all run in this one process:

1. ``N`` connections straight to the sink (no tunnel) give the cost of the load side and the sink;
2. ``N`` connections through the tunnel (server ``-R`` to the same sink) give that plus the tunnel's;
3. the difference, divided by ``N``, is the tunnel's Python heap per idle connection, both ends.

The top allocation sites of step 2 (by line, or by traceback with ``--traceback``) show what to cut.

Usage: ``.venv/bin/python scripts/bench_memory.py [--conns 1000] [--top 25] [--traceback FRAMES] [--exchange]``
"""

from __future__ import annotations

import argparse
import gc
import logging
import pathlib
import resource
import shutil
import sys
import tempfile
import tracemalloc

import trio
import trio.testing

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from trio_tunnel.certs import fingerprint_of_pem_file, load_or_create_identity
from trio_tunnel.client import run_client
from trio_tunnel.config import ClientConfig, HostPort, RemoteSpec, ServerConfig
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.server import run_server

TOKEN = b"bench-memory-token-0123456789"
WARMUP = 20


async def _hold(stream: trio.SocketStream) -> None:
    """The sink: acknowledge each message with one byte; keep the connection open until the peer closes it."""
    while await stream.receive_some():
        await stream.send_all(b"!")


async def _measure(
    host: str, port: int, n: int, conns: list[trio.SocketStream], frames: int, exchange: bool
) -> list[tracemalloc.StatisticDiff]:
    """Open ``n`` connections to host:port and keep them; what the heap grew by, per allocation site."""
    gc.collect()
    before = tracemalloc.take_snapshot()
    for _ in range(n):
        conn = await trio.open_tcp_stream(host, port)
        conns.append(conn)
        if exchange:  # as bench.py does: a request through, an acknowledgement back
            await conn.send_all(b"hold this open..")
            got = await conn.receive_some(1)
            assert got == b"!", (len(conns), got)
    # Every connection is idle at both ends once all tasks are blocked: the tunnel has dialled the sink and
    # each splice waits for bytes.
    await trio.testing.wait_all_tasks_blocked(0.2)
    gc.collect()
    after = tracemalloc.take_snapshot()
    return after.compare_to(before, "traceback" if frames > 1 else "lineno")


async def main(n: int, top: int, frames: int, exchange: bool = False) -> None:
    # Four descriptors per tunnelled connection live in this process (load side, public, local, sink).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 6 * n + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
        if hard < need:
            sys.exit(f"need {need} file descriptors, the hard limit is {hard}: use fewer --conns")
    logging.basicConfig(level=logging.ERROR)
    shutdown = Shutdown()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        sink_port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, _hold, listeners)
        # Room for every connection: one refused (beyond max_connections_per_service, 1024 by default) would be
        # counted as an idle connection that costs nothing.
        # Over TLS, the link's default: a throwaway identity in a temporary state directory, pinned by the client.
        state_dir = tempfile.mkdtemp(prefix="bench-memory-")
        cert, _key = load_or_create_identity(pathlib.Path(state_dir))
        server_cfg = ServerConfig(
            listen=HostPort(host="127.0.0.1", port=0),
            tokens=(TOKEN,),
            max_connections_per_service=n + 2 * WARMUP,
            max_connections_per_ip=4 * n,  # every connection comes from 127.0.0.1
            state_dir=state_dir,
        )
        link = await nursery.start(run_server, server_cfg, shutdown)
        remote = RemoteSpec.parse(f"sink=127.0.0.1:0:127.0.0.1:{sink_port}")
        client_cfg = ClientConfig(
            server=link,
            token=TOKEN,
            name="bench",
            remotes=(remote,),
            server_fingerprint=(fingerprint_of_pem_file(cert),),
        )
        exposed = await nursery.start(run_client, client_cfg, shutdown)
        public = exposed["sink"]

        conns: list[trio.SocketStream] = []
        # Warm up both paths (first-use allocations, free lists) before measuring.
        for host, port in (("127.0.0.1", sink_port), (public.host, public.port)):
            for _ in range(WARMUP):
                conns.append(await trio.open_tcp_stream(host, port))
        await trio.testing.wait_all_tasks_blocked(0.2)

        tracemalloc.start(frames)
        direct = sum(s.size_diff for s in await _measure("127.0.0.1", sink_port, n, conns, frames, exchange))
        stats = await _measure(public.host, public.port, n, conns, frames, exchange)
        tracemalloc.stop()
        tunnelled = sum(s.size_diff for s in stats)

        print(f"connections: {n} direct, then {n} tunnelled (server and client in this process)")
        print(f"direct (load side + sink):      {direct / n / 1024:6.2f} KiB per connection")
        print(f"tunnelled (same + both ends):   {tunnelled / n / 1024:6.2f} KiB per connection")
        print(f"tunnel, both ends:              {(tunnelled - direct) / n / 1024:6.2f} KiB per connection")
        print(f"\ntop {top} allocation sites of the tunnelled connections (bytes per connection):")
        for s in stats[:top]:
            frames_text = " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in s.traceback[:frames])
            print(f"{s.size_diff / n:8.0f}  {s.count_diff / n:5.1f} blocks  {frames_text}")

        for c in conns:
            await c.aclose()
        nursery.cancel_scope.cancel()
        shutil.rmtree(state_dir, ignore_errors=True)


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=1000, help="connections per step (default 1000)")
    ap.add_argument("--top", type=int, default=25, help="allocation sites to list (default 25)")
    ap.add_argument(
        "--traceback",
        type=int,
        default=1,
        metavar="FRAMES",
        help="group by this many frames of traceback instead of by line (default 1)",
    )
    ap.add_argument(
        "--exchange",
        action="store_true",
        help="send 16 bytes through each connection and wait for the sink's 1-byte answer first "
        "(as bench.py's memory workload does)",
    )
    args = ap.parse_args()
    if args.conns < 1:
        ap.error("--conns must be at least 1")
    trio.run(main, args.conns, args.top, args.traceback, args.exchange)
