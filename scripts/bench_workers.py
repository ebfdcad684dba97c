"""``server --workers N``: aggregate throughput and connection rate with several clients, 1 vs N workers.

For each round and each worker count (interleaved, so both see the same machine load), the script starts the
bench sink (``bench.py --serve-sink``), a ``trio-tunnel server --workers N --metrics 0`` over TLS, and ``--clients``
clients, each exposing the sink on its own public port. Then it measures, against all the clients at once:

* **throughput**: one upload of ``--bulk-mib`` MiB through every client at the same time (bytes verified by CRC);
  aggregate MiB/s over the wall time, and CPU seconds per GiB of the server (parent and workers), of the clients,
  and of this load generator;
* **connection rate**: ``--concurrency`` short connections at a time (connect, 64 bytes there and back, close),
  spread over the clients' ports, for ``--seconds``; connections per second, and CPU milliseconds per connection
  of the server, of the clients, and of the load generator.

Where the links landed (the server's ``/status``, each session's ``worker``) is printed: ``SO_REUSEPORT`` picks a
worker by a hash of each link's addresses, so 8 links are rarely split 4/4.

Read the figures for what they are: the load generator, the sink, the clients and the server all share this
machine's cores, so N workers can only be as fast as the cores left to them; CPU per unit of work is the figure that
does not depend on that.

Usage::

    .venv/bin/python scripts/bench_workers.py [--workers 1,2] [--clients 8] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import GiB, MiB
from benchkit.procs import cpu_seconds, process_group, process_tree, self_cpu, wait_accepting
from benchkit.systems import start_sink
from benchkit.wire import Addr
from benchkit.workloads import bulk_upload, short_connection

TOKEN = "bench-token-0123456789abcdef"


async def _start(
    group: Any, exe: str, workers: int, clients: int, sink: Addr
) -> tuple[list[Addr], Any, list[Any], str]:
    state = tempfile.mkdtemp(prefix="bench-workers-")
    config = Path(state) / "server.toml"
    config.write_text("[server]\nmax_connections_per_ip = 4096\n")
    server = await group.start(
        f"server-w{workers}",
        [exe, "server", "--listen", "127.0.0.1:0", "--token", TOKEN, "--state-dir", state, "--config", str(config),
         "--workers", str(workers), "--metrics", "0"],
    )  # fmt: skip
    pin = (await server.wait_line(r"fingerprint (\S+)", 60)).group(1)
    link = (await server.wait_line(r"listening (\S+):(\d+)", 60)).group(2)
    metrics = (await server.wait_line(r"metrics (\S+)", 60)).group(1)
    children, ports = [], []
    for i in range(clients):
        child = await group.start(
            f"client{i}",
            [exe, "client", "--server", f"127.0.0.1:{link}", "--token", TOKEN, "--server-fingerprint", pin,
             "--name", f"c{i}", "-R", f"127.0.0.1:0:{sink[0]}:{sink[1]}"],
        )  # fmt: skip
        children.append(child)
    for child in children:
        m = await child.wait_line(r"exposed (\S+) (\S+):(\d+)", 60)
        ports.append((m.group(2), int(m.group(3))))
    for port in ports:
        await wait_accepting(port, 30, lambda: None)
    return ports, server, children, metrics


def _spread(metrics: str) -> dict[int, int]:
    with urllib.request.urlopen(f"http://{metrics}/status", timeout=10) as answer:
        document = json.load(answer)
    held: dict[int, int] = {}
    for session in document["sessions"]:
        held[session.get("worker", 0)] = held.get(session.get("worker", 0), 0) + 1
    return dict(sorted(held.items()))


async def _throughput(ports: list[Addr], mib: int) -> float:
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i, port in enumerate(ports):
            nursery.start_soon(bulk_upload, port, mib * MiB, 100 + i)
    return len(ports) * mib * MiB / MiB / (time.perf_counter() - t0)


async def _connections(ports: list[Addr], concurrency: int, seconds: float) -> tuple[int, float]:
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker(k: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            with trio.fail_after(10):
                await short_connection(ports[(k + done) % len(ports)], done)
            done += 1

    async with trio.open_nursery() as nursery:
        for k in range(concurrency):
            nursery.start_soon(worker, k)
    return done, time.perf_counter() - t0


def _cpu(roots: list[int]) -> float:
    return cpu_seconds(process_tree(roots))


async def _one(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        async with process_group(Path(tmp)) as group:
            _sink, sink = await start_sink(group)
            ports, server, clients, metrics = await _start(group, args.trio_tunnel, workers, args.clients, sink)
            spread = _spread(metrics)
            server_roots, client_roots = [server.pid], [c.pid for c in clients]
            await _throughput(ports, 2)  # warm-up
            p0, s0, c0, g0 = cpu_seconds(server_roots), _cpu(server_roots), _cpu(client_roots), self_cpu()
            t0 = time.perf_counter()
            mib_s = await _throughput(ports, args.bulk_mib)
            bulk_wall = time.perf_counter() - t0
            s1, c1, g1 = _cpu(server_roots), _cpu(client_roots), self_cpu()
            gib = len(ports) * args.bulk_mib * MiB / GiB
            count, wall = await _connections(ports, args.concurrency, args.seconds)
            s2, c2, g2 = _cpu(server_roots), _cpu(client_roots), self_cpu()
            p2 = cpu_seconds(server_roots)  # the parent alone: it is not in the data path
            return {
                "workers": workers,
                "spread": spread,
                "mib_s": mib_s,
                "server_cpu_s_per_gib": (s1 - s0) / gib,
                "clients_cpu_s_per_gib": (c1 - c0) / gib,
                "loadgen_cpu_s_per_gib": (g1 - g0) / gib,
                "conn_s": count / wall,
                "connections": count,
                "server_cpu_ms_per_conn": (s2 - s1) * 1e3 / max(count, 1),
                "clients_cpu_ms_per_conn": (c2 - c1) * 1e3 / max(count, 1),
                "loadgen_cpu_ms_per_conn": (g2 - g1) * 1e3 / max(count, 1),
                "server_cores_bulk": (s1 - s0) / bulk_wall,
                "server_cores_conn": (s2 - s1) / wall,
                "parent_cpu_s": max(0.0, p2 - p0) if workers > 1 else 0.0,
            }


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for round_ in range(args.rounds):
        for workers in args.workers:
            result = await _one(args, workers)
            result["round"] = round_
            results.append(result)
            print(
                f"round {round_} workers {workers}: links per worker {result['spread']}; "
                f"{result['mib_s']:.0f} MiB/s (server {result['server_cpu_s_per_gib']:.2f} CPU-s/GiB); "
                f"{result['conn_s']:.0f} conn/s (server {result['server_cpu_ms_per_conn']:.2f} CPU-ms/conn, "
                f"clients {result['clients_cpu_ms_per_conn']:.2f}, load generator "
                f"{result['loadgen_cpu_ms_per_conn']:.2f}); "
                f"server busy {result['server_cores_bulk']:.2f} cores (bulk), "
                f"{result['server_cores_conn']:.2f} (connections); parent CPU {result['parent_cpu_s']:.3f} s",
                file=sys.stderr,
                flush=True,
            )
    return results


def _median(results: list[dict[str, Any]], workers: int, key: str) -> float:
    values = [r[key] for r in results if r["workers"] == workers]
    return statistics.median(values) if values else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated (default 1,2)")
    parser.add_argument("--clients", type=int, default=8, help="clients, each with its own public port (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--bulk-mib", type=int, default=32, help="MiB uploaded through each client (default 32)")
    parser.add_argument("--concurrency", type=int, default=64, help="short connections at a time (default 64)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of short connections (default 8)")
    parser.add_argument("--trio-tunnel", default=str(Path(sys.executable).parent / "trio-tunnel"), help="executable")
    parser.add_argument("--json", help="write every round's figures here")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    results = trio.run(amain, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    base = args.workers[0]
    print(f"medians of {args.rounds} rounds, {args.clients} clients, TLS; ratio to {base} worker(s):")
    header = ["workers", "MiB/s", "ratio", "srv CPU-s/GiB", "conn/s", "ratio", "srv CPU-ms/conn", "clients ms/conn"]
    header += ["loadgen ms/conn", "srv cores (bulk/conn)"]
    print(" | ".join(header))
    for workers in args.workers:
        mib = _median(results, workers, "mib_s")
        conn = _median(results, workers, "conn_s")
        row = [
            str(workers),
            f"{mib:.0f}",
            f"{mib / _median(results, base, 'mib_s'):.2f}x",
            f"{_median(results, workers, 'server_cpu_s_per_gib'):.2f}",
            f"{conn:.0f}",
            f"{conn / _median(results, base, 'conn_s'):.2f}x",
            f"{_median(results, workers, 'server_cpu_ms_per_conn'):.2f}",
            f"{_median(results, workers, 'clients_cpu_ms_per_conn'):.2f}",
            f"{_median(results, workers, 'loadgen_cpu_ms_per_conn'):.2f}",
            f"{_median(results, workers, 'server_cores_bulk'):.2f}/"
            f"{_median(results, workers, 'server_cores_conn'):.2f}",
        ]
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
