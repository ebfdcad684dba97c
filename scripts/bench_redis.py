#!/usr/bin/env python3
"""Redis through each tunnel, measured as a user would: ``redis-benchmark`` against the tunnel's public port.

Latency-bound work (a database's request/reply) is what people run through tunnels, and it is where a per-round-trip
cost shows: redis-benchmark keeps ``--clients`` connections busy with one request in flight each (or ``--pipeline``
requests), so its requests per second are bounded by the round trip through the tunnel. Every system of
``scripts/bench.py`` (direct, socat, ``ssh -R``, trio-tunnel over TLS and plaintext) is started on loopback with the
redis-server as its target, one at a time, and the same redis-benchmark run goes through each.

Reported per system and test (medians of ``--repeats``): requests/s, p50 and p99 latency (redis-benchmark's own
figures), and the CPU time of the system's processes per request (from /proc, like bench.py's CPU rows; the
redis-server and redis-benchmark are not counted). The ratio column divides by ssh's figure of the same run.

Usage::

    .venv/bin/python scripts/bench_redis.py                           # ~2 min
    .venv/bin/python scripts/bench_redis.py --systems ssh,trio-tunnel --requests 20000 --md out.md

Needs ``redis-server`` and ``redis-benchmark`` (``apt-get install redis-server redis-tools``); a missing system is
reported as skipped with its reason.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from benchkit.procs import ProcessGroup, SystemUnavailable, cpu_seconds, free_port, process_group, wait_accepting
from benchkit.systems import SYSTEMS, Target, add_system_arguments

DEFAULT_SYSTEMS = "direct,socat,ssh,trio-tunnel,trio-tunnel-plain"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench_redis.py",
        description="redis-benchmark through direct TCP, socat, ssh -R and trio-tunnel on loopback: requests/s, "
        "latency and the tunnel's CPU per request.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  .venv/bin/python scripts/bench_redis.py\n"
        "  .venv/bin/python scripts/bench_redis.py --systems ssh,trio-tunnel --pipeline 16 --md out.md\n",
    )
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"comma-separated (default {DEFAULT_SYSTEMS})")
    ap.add_argument("--requests", type=int, default=100_000, help="requests per test and repeat (default 100000)")
    ap.add_argument("--clients", type=int, default=50, help="redis-benchmark connections (default 50)")
    ap.add_argument("--pipeline", type=int, default=1, help="requests in flight per connection (default 1)")
    ap.add_argument("--tests", default="ping_inline,set,get", help="redis-benchmark -t (default ping_inline,set,get)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per system, medians reported (default 3)")
    ap.add_argument("--md", metavar="PATH", help="also write the markdown table here")
    add_system_arguments(ap)  # what benchkit.systems reads from the options (as bench.py has them)
    return ap.parse_args(argv)


def parse_csv(text: str) -> dict[str, dict[str, float]]:
    """redis-benchmark --csv: a header row, then one row per test (``"GET","86956.52","0.071",...``)."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0][:2] != ["test", "rps"]:
        raise RuntimeError(f"unexpected redis-benchmark output: {text[:200]!r}")
    header = rows[0]
    out: dict[str, dict[str, float]] = {}
    for row in rows[1:]:
        if len(row) == len(header):
            out[row[0]] = {key: float(value) for key, value in zip(header[1:], row[1:], strict=True)}
    return out


async def start_redis(group: ProcessGroup) -> tuple[Any, tuple[str, int]]:
    port = free_port()
    child = await group.start(
        "redis-server",
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    )
    await wait_accepting(("127.0.0.1", port), 10, lambda: None)
    return child, ("127.0.0.1", port)


async def one_run(target: Target, opts: argparse.Namespace) -> dict[str, dict[str, float]]:
    cmd = ["redis-benchmark", "-h", target.addr[0], "-p", str(target.addr[1]), "-n", str(opts.requests)]
    cmd += ["-c", str(opts.clients), "-P", str(opts.pipeline), "-t", opts.tests, "--csv"]
    before = cpu_seconds(target.pids())
    result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    spent = cpu_seconds(target.pids()) - before
    if result.returncode != 0 or (reason := target.check()):
        raise RuntimeError(f"redis-benchmark failed: {result.stderr.decode()[-300:] or reason}")
    tests = parse_csv(result.stdout.decode())
    # The tests run one after another: the CPU is shared out in proportion to each test's time.
    total_time = sum(opts.requests / row["rps"] for row in tests.values())
    for row in tests.values():
        row["cpu_us"] = spent * ((opts.requests / row["rps"]) / total_time) / opts.requests * 1e6
    return tests


async def amain(opts: argparse.Namespace) -> int:
    missing = [tool for tool in ("redis-server", "redis-benchmark") if not shutil.which(tool)]
    if missing:
        print(f"bench_redis: {', '.join(missing)} not installed (apt-get install redis-server redis-tools)")
        return 2
    results: dict[str, dict[str, dict[str, float]] | str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        for name in opts.systems.split(","):
            system = SYSTEMS.get(name)
            if system is None:
                print(f"bench_redis: unknown system {name!r} (known: {', '.join(SYSTEMS)})")
                return 2
            if reason := system.unavailable(opts):
                results[name] = f"skipped: {reason}"
                continue
            async with process_group(Path(tmp)) as group:
                try:
                    redis, addr = await start_redis(group)
                    target = await system.start(group, redis, addr, opts, None)
                except SystemUnavailable as exc:
                    results[name] = f"skipped: {exc}"
                    continue
                runs = [await one_run(target, opts) for _ in range(opts.repeats)]
            results[name] = {
                test: {key: statistics.median(run[test][key] for run in runs) for key in runs[0][test]}
                for test in runs[0]
            }
            print(f"bench_redis: {name} done", file=sys.stderr)
    print(table := render(results, opts))
    if opts.md:
        await trio.Path(opts.md).write_text(table + "\n")
    return 0


def render(results: dict[str, dict[str, dict[str, float]] | str], opts: argparse.Namespace) -> str:
    lines = [
        f"redis-benchmark -n {opts.requests} -c {opts.clients} -P {opts.pipeline} -t {opts.tests}, "
        f"medians of {opts.repeats}; x ssh = this system's figure / ssh's (CPU: lower is better)",
        "",
        "| system | test | requests/s | x ssh | p50 ms | p99 ms | CPU µs/request | x ssh |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    ssh = results.get("ssh")
    for name, tests in results.items():
        if isinstance(tests, str):
            lines.append(f"| {name} | {tests} | | | | | | |")
            continue
        for test, row in tests.items():
            base = ssh.get(test) if isinstance(ssh, dict) else None
            rps_x = f"{row['rps'] / base['rps']:.2f}" if base else ""
            cpu_x = f"{row['cpu_us'] / base['cpu_us']:.2f}" if base and base["cpu_us"] else ""
            lines.append(
                f"| {name} | {test} | {row['rps']:.0f} | {rps_x} | {row['p50_latency_ms']:.3f} | "
                f"{row['p99_latency_ms']:.3f} | {row['cpu_us']:.1f} | {cpu_x} |"
            )
    return "\n".join(lines)


def main() -> int:
    try:
        return trio.run(amain, parse_args())
    except KeyboardInterrupt:
        return 130
    except subprocess.SubprocessError as exc:
        print(f"bench_redis: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
