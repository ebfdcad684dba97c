"""Interleaved A/B of trio-tunnel builds on the bench's workloads, with system calls and frames per MiB.

scripts/bench.py measures every row for one build; this runs a few rows for several builds in turn, repeated, so
that a noisy shared machine hits all of them alike: the loaded RTT (a ping-pong beside a bulk upload helper at
nice 10), 1-stream and 16-stream uploads with the tunnel's CPU per GiB, the idle RTT with CPU per round trip.
``--strace`` adds system calls per MiB (strace -c on the server and client: CPU figures are then inflated),
``--metrics PORT`` the server's frames per MiB (from its Prometheus endpoint).

Usage::

    .venv/bin/python scripts/bench_ab.py --workloads loaded,bulk,par16 --repeats 3 OLD_EXE NEW_EXE
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_syscalls import _parse_strace_summary
from benchkit.procs import cpu_seconds, process_group
from benchkit.systems import TrioTunnel, start_sink
from benchkit.workloads import bulk_upload, parallel_upload, percentile, rtt_idle, rtt_loaded

MiB = 1 << 20


def _frames(port: int) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}_total{{[^}}]*}} (\S+)", text, re.M))

    return total("trio_tunnel_frames_sent"), total("trio_tunnel_frames_received")


async def one(exe: str, args: argparse.Namespace) -> list[str]:
    server_args = [f"--metrics=127.0.0.1:{args.metrics}"] if args.metrics else []
    opts = argparse.Namespace(
        trio_tunnel=exe, tt_stock_limits=True, tt_server_arg=server_args, tt_client_arg=[], start_timeout=15
    )
    plain = ("--insecure-plaintext",)
    system = TrioTunnel("tt", server_args=plain, client_args=plain) if args.plaintext else TrioTunnel()
    out = []
    async with process_group(Path(tempfile.mkdtemp())) as group:
        sink, sink_addr = await start_sink(group)
        target = await system.start(group, sink, sink_addr, opts, None)
        for work in args.workloads.split(","):
            pids = target.pids()
            tracer = None
            if args.strace and work in ("bulk", "par16"):
                trace_file = str(Path(tempfile.mkdtemp()) / "strace.txt")
                cmd = ["strace", "-c", "-f", "-o", trace_file]
                for pid in target.roots:
                    cmd += ["-p", str(pid)]
                tracer = await trio.lowlevel.open_process(cmd, stderr=subprocess.DEVNULL)
                await trio.sleep(1.0)
            frames0 = _frames(args.metrics) if args.metrics else None
            cpu0 = cpu_seconds(pids)
            if work == "idle":
                rtts = await rtt_idle(target.addr, args.round_trips, 20.0)
                cpu = (cpu_seconds(pids) - cpu0) / len(rtts) * 1e6
                out.append(f"idle p50 {percentile(rtts, 0.5) * 1e6:.0f} µs, CPU {cpu:.0f} µs/round trip")
                continue
            if work == "loaded":
                lr = await rtt_loaded(target.addr, 1000, 8.0, warmup_s=0.5, bulk_seconds=30)
                p50, p99 = percentile(lr.rtts, 0.5) * 1e6, percentile(lr.rtts, 0.99) * 1e6
                out.append(f"loaded p50 {p50:.0f} p99 {p99:.0f} µs, bulk {lr.bulk.mib_s:.0f} MiB/s")
                continue
            if work == "bulk":
                tr = await bulk_upload(target.addr, args.bulk_mib * MiB, 1, 30)
            else:
                tr = await parallel_upload(target.addr, 16, args.par_mib * MiB, 100, 30)
            mib = tr.nbytes / MiB
            out.append(f"{work} {tr.mib_s:.0f} MiB/s, CPU {(cpu_seconds(pids) - cpu0) / (mib / 1024):.2f} s/GiB")
            if frames0 is not None:
                sent, received = _frames(args.metrics)
                out.append(
                    f"server frames/MiB {(sent - frames0[0]) / mib:.1f} out, {(received - frames0[1]) / mib:.1f} in"
                )
            if tracer is not None:
                tracer.send_signal(signal.SIGINT)
                await tracer.wait()
                counts = _parse_strace_summary(trace_file)
                top = sorted(counts.items(), key=lambda kv: -kv[1])[:7]
                calls = ", ".join(f"{k} {v / mib:.1f}" for k, v in top)
                out.append(f"syscalls/MiB {sum(counts.values()) / mib:.1f} ({calls})")
    return out


async def main(args: argparse.Namespace) -> None:
    for _ in range(args.repeats):
        for exe in args.exes:
            print(f"{exe}: " + " | ".join(await one(exe, args)), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exes", nargs="+", metavar="EXE", help="trio-tunnel executables, measured in turn")
    ap.add_argument("--workloads", default="loaded,bulk,par16", help="comma-separated: idle, loaded, bulk, par16")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--bulk-mib", type=int, default=256, help="1-stream upload size (default 256)")
    ap.add_argument("--par-mib", type=int, default=16, help="bytes per stream of the 16-stream upload (default 16)")
    ap.add_argument("--round-trips", type=int, default=3000, help="idle round trips (default 3000)")
    ap.add_argument("--plaintext", action="store_true", help="--insecure-plaintext link")
    ap.add_argument("--strace", action="store_true", help="system calls per MiB for bulk and par16")
    ap.add_argument("--metrics", type=int, metavar="PORT", help="server frames per MiB from its metrics endpoint")
    trio.run(main, ap.parse_args())
