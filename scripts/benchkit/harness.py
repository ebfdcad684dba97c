"""Running the benchmark: the command line, one system after another within the time budget, the output."""

from __future__ import annotations

# Writing the report files inline in async code is intended (once, at the end of the run).
import argparse
import datetime as _dt
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import trio

from .common import DelayParams, KiB, MiB
from .procs import SystemUnavailable, process_group
from .report import SystemReport, any_failed, build_document, machine_info, write_outputs
from .suite import Config, Log, describe_error, metrics_for, rate_tag, run_delay, run_suite
from .systems import SYSTEMS, System, add_system_arguments, start_sink
from .udp import add_arguments as add_udp_arguments
from .udp import run_udp_bench, serve_udp_sink_main
from .wire import raise_nofile, serve_sink_main
from .workloads import bulk_helper_main


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
    return f"failed to start: {describe_error(exc)}"


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
            rep.notes.append(f"delay line at {rate_tag(params)} Mbit/s not run: time budget")
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
    doc = build_document(
        started=started.isoformat(),
        duration_s=time.monotonic() - t0,
        quick=bool(args.quick),
        machine=machine,
        config=asdict(cfg),
        delays=delays,
        reports=reports,
        metrics=metrics,
    )
    write_outputs(doc, md_path=args.md, json_path=args.json)
    return 1 if any_failed(doc) else 0


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
    add_system_arguments(ap)
    ap.add_argument("--budget", type=float, help="overall time budget in seconds (default 840, --quick 150)")
    ap.add_argument("--silent", action="store_true", help="no progress on stderr")
    add_udp_arguments(ap)
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
    if args.serve_udp_sink:
        return serve_udp_sink_main()
    if args.bulk_helper:
        host, _, port = args.bulk_helper.rpartition(":")
        return bulk_helper_main((host, int(port)), args.helper_seconds, args.helper_seed)
    raise_nofile()
    try:
        return trio.run(run_udp_bench if args.udp else amain, args)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
