"""Configuration, metrics and the suite: all workloads against one running system, each bounded and guarded."""

from __future__ import annotations

# _guard takes the timeout of the workload it bounds (each workload has its own).
# ruff: noqa: ASYNC109
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .common import GiB, MiB
from .procs import cpu_seconds, process_tree, self_cpu
from .systems import Target
from .wire import VerifyError
from .workloads import (
    bulk_download,
    bulk_upload,
    connections_concurrent,
    connections_sequential,
    idle_connections_memory,
    parallel_upload,
    percentile,
    rtt_idle,
    rtt_loaded,
    timed_upload,
)


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
    Metric("cpu_per_rtt", "CPU per 64 B round trip, idle (system's processes)", "µs", False),
    Metric("cpu_per_kconn_seq", "CPU per 1,000 sequential short connections", "ms", False),
    Metric("cpu_per_kconn_conc", "CPU per 1,000 short connections, 200 concurrent", "ms", False),
    Metric("delay_mib_s", "1 stream over the delay line", "MiB/s", True, "{:.1f}"),
    Metric("delay_pct", "1 stream over the delay line, of line rate", "%", True, "{:.0f}"),
]  # the two delay metrics are templates: one pair per configured line rate (see metrics_for)


def rate_tag(params: Any) -> str:
    return f"{params.rate_bps / 1e6:g}"


def delay_keys(params: Any) -> tuple[str, str]:
    """The metric keys (MiB/s, % of line rate) of the delay-line measurement at this line rate."""
    tag = rate_tag(params)
    return f"delay{tag}_mib_s", f"delay{tag}_pct"


def metrics_for(delays: Sequence[Any]) -> list[Metric]:
    out = [m for m in METRICS if not m.key.startswith("delay")]
    for p in delays:
        k_mib, k_pct = delay_keys(p)
        rtt = f"{2 * p.delay_s * 1e3:g} ms RTT"
        out.append(Metric(k_mib, f"1 stream over a {rtt}, {rate_tag(p)} Mbit/s line", "MiB/s", True, "{:.1f}"))
        out.append(
            Metric(k_pct, f"1 stream over a {rtt}, {rate_tag(p)} Mbit/s line, of line rate", "%", True, "{:.0f}")
        )
    return out


@dataclass
class Failed:
    error: str
    collateral: bool = False  # not run because the system had already died


Result = dict[str, float | Failed]


def _collateral(value: float | Failed | None) -> bool:
    """Whether a cell was lost only because the system had already died."""
    return isinstance(value, Failed) and value.collateral


Log = Callable[[str], None]


def describe_error(exc: BaseException, timeout: float | None = None) -> str:
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
        return describe_error(first, timeout) + (f" (+{len(leaves) - 1} more)" if len(leaves) > 1 else "")
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
        msg = describe_error(exc, timeout)
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

    async def cpu_of(fn: Callable[[], Any], spent: list[float]) -> Any:
        """Run ``fn`` with the system's CPU time measured around it (appended to ``spent``, seconds)."""
        await settle(target)
        c0 = cpu_seconds(target.pids())
        out = await fn()
        await trio.sleep(0.05)  # let relays reap exited children
        spent.append(cpu_seconds(process_tree(target.roots)) - c0)
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
            collateral=all(_collateral(res.get(k)) for k in ("bulk_up", "bulk_down", "par16")),
        )

    spent: list[float] = []
    rtts = await _guard(
        res,
        ["rtt_p50", "rtt_p99", "cpu_per_rtt"],
        cfg.workload_timeout,
        log,
        "idle RTT",
        lambda: cpu_of(lambda: rtt_idle(target.addr, cfg.rtt_n, cfg.rtt_seconds, seed + 3), spent),
        target,
    )
    if rtts:
        res["rtt_p50"] = percentile(rtts, 0.5) * 1e6
        res["rtt_p99"] = percentile(rtts, 0.99) * 1e6
        res["_rtt_n"] = len(rtts)
        res["cpu_per_rtt"] = spent[0] / len(rtts) * 1e6
        log(
            f"  idle RTT: p50 {res['rtt_p50']:.0f} µs, p99 {res['rtt_p99']:.0f} µs ({len(rtts)} round trips; "
            f"CPU {res['cpu_per_rtt']:.0f} µs each)"
        )

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
            collateral=any(_collateral(res.get(k)) for k in ("rtt_p99", "loaded_rtt_p99")),
        )

    spent, made = [], []
    v = await _guard(
        res,
        ["seq_cps", "cpu_per_kconn_seq"],
        cfg.seq_seconds + 30,
        log,
        "sequential connections",
        lambda: cpu_of(lambda: connections_sequential(target.addr, cfg.seq_conns, cfg.seq_seconds, count=made), spent),
        target,
    )
    if v:
        res["seq_cps"] = v
        res["cpu_per_kconn_seq"] = spent[0] / max(made[0], 1) * 1e6  # ms per 1,000
        log(f"  sequential connections: {v:.0f}/s (CPU {res['cpu_per_kconn_seq']:.0f} ms per 1,000)")
    spent, made = [], []
    v = await _guard(
        res,
        ["conc_cps", "cpu_per_kconn_conc"],
        cfg.conc_seconds + 30,
        log,
        "concurrent connections",
        lambda: cpu_of(
            lambda: connections_concurrent(target.addr, cfg.conc_conns, cfg.conc_workers, cfg.conc_seconds, count=made),
            spent,
        ),
        target,
    )
    if v:
        res["conc_cps"] = v
        res["cpu_per_kconn_conc"] = spent[0] / max(made[0], 1) * 1e6
        log(
            f"  {cfg.conc_workers}-concurrent connections: {v:.0f}/s (CPU {res['cpu_per_kconn_conc']:.0f} ms per 1,000)"
        )

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
