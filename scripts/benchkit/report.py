"""Aggregating repeats into the results table, and the JSON document and Markdown report."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from .common import MiB
from .suite import Failed, Metric, Result


@dataclass
class SystemReport:
    name: str
    status: str = "ok"  # ok | skipped
    reason: str = ""
    version: str = ""
    repeats: list[Result] = field(default_factory=list)
    delay_status: str = ""  # "" = measured; else why not
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def aggregate(reports: Sequence[SystemReport], metrics: Sequence[Metric]) -> dict[str, dict[str, Any]]:
    """Per system, per metric: median over repeats, or FAILED with the first error, plus ratios."""
    table: dict[str, dict[str, Any]] = {}
    for rep in reports:
        if rep.status != "ok" or not rep.repeats:
            continue
        row: dict[str, Any] = {}
        for m in metrics:
            vals = [r.get(m.key) for r in rep.repeats]
            fails = [v for v in vals if isinstance(v, Failed) and not v.collateral]
            nums = [v for v in vals if isinstance(v, float | int)]
            shown = [v if isinstance(v, float | int) else None for v in vals]
            if fails:
                row[m.key] = {"status": "FAILED", "error": fails[0].error, "values": shown}
            elif not nums:
                collateral = [v for v in vals if isinstance(v, Failed)]
                why = (
                    collateral[0].error
                    if collateral
                    else rep.delay_status
                    if m.key.startswith("delay") and rep.delay_status
                    else "not measured"
                )
                row[m.key] = {"status": "n/a", "error": why}
            else:
                # median of the repeats that measured it (a repeat may have lost it to an earlier crash)
                row[m.key] = {"status": "ok", "median": statistics.median(nums), "values": shown}
        extras: dict[str, Any] = {}
        for r in rep.repeats:
            for k, v in r.items():
                if k.startswith("_"):
                    extras.setdefault(k[1:], []).append(v)
        row["_extras"] = extras
        table[rep.name] = row
    for ref in ("direct", "ssh"):
        if ref not in table:
            continue
        for row in table.values():
            for m in metrics:
                cell, refcell = row[m.key], table[ref][m.key]
                if cell.get("status") == "ok" and refcell.get("status") == "ok" and refcell["median"]:
                    cell[f"ratio_{ref}"] = cell["median"] / refcell["median"]
    return table


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{mem_kib / 1024 / 1024:.1f} GiB"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "trio": trio.__version__,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else [],
    }


def _fmt(m: Metric, cell: dict[str, Any]) -> str:
    if cell.get("status") == "FAILED":
        return "FAILED"
    if cell.get("status") != "ok":
        return "n/a"
    return m.fmt.format(cell["median"])


def render_markdown(doc: dict[str, Any]) -> str:
    mi = doc["machine"]
    names = [r["name"] for r in doc["systems"]]
    ok = [r["name"] for r in doc["systems"] if r["status"] == "ok"]
    table = doc["results"]
    metrics = [Metric(**m) for m in doc["metrics"]]
    out = ["# trio-tunnel benchmark", ""]
    out.append(f"- Command: `{doc['command']}`")
    out.append(
        f"- Date: {doc['started']} ({doc['duration_s']:.0f} s); mode: "
        f"{'quick' if doc['quick'] else 'full'}, {doc['config']['repeats']} repeat(s), medians"
    )
    out.append(
        f"- Machine: {mi['nproc']} x {mi['cpu_model']}, {mi['memory']} RAM, {mi['kernel']}, "
        f"Python {mi['python']}, Trio {mi['trio']}; load average at start {' '.join(mi['loadavg_at_start'])}"
    )
    vers = [f"{r['name']} {r['version']}" for r in doc["systems"] if r.get("version")]
    if vers:
        out.append(f"- Versions: {'; '.join(vers)}")
    c = doc["config"]
    out.append(
        f"- Sizes: bulk {c['bulk_bytes'] // MiB} MiB each way, {c['par_streams']} x "
        f"{c['par_bytes_each'] // MiB} MiB parallel, {c['rtt_n']} round trips, {c['idle_conns']} idle "
        f"connections; delay line {' and '.join(doc['delay_line'])}"
    )
    out.append("")
    if ok:
        out.append("| workload | unit | better | " + " | ".join(ok) + " |")
        out.append("|---|---|---|" + "---:|" * len(ok))
        for m in metrics:
            cells = [_fmt(m, table[n][m.key]) for n in ok]
            out.append(
                f"| {m.label} | {m.unit} | {'higher' if m.higher_is_better else 'lower'} | " + " | ".join(cells) + " |"
            )
        out.append("")
        refs = [r for r in ("direct", "ssh") if r in ok]
        if refs and len(ok) > 1:
            out.append(f"Ratios (system / {' ; system / '.join(refs)}):")
            out.append("")
            out.append("| workload | " + " | ".join(ok) + " |")
            out.append("|---|" + "---:|" * len(ok))
            for m in metrics:
                cells = []
                for n in ok:
                    cell = table[n][m.key]
                    parts = [f"{cell[f'ratio_{r}']:.2f}" if f"ratio_{r}" in cell else "-" for r in refs]
                    cells.append(" ; ".join(parts))
                out.append(f"| {m.label} | " + " | ".join(cells) + " |")
            out.append("")
    notes = []
    for r in doc["systems"]:
        if r["status"] != "ok":
            notes.append(f"- **{r['name']}**: {r['status']}: {r['reason']}")
        elif r.get("delay_status"):
            notes.append(f"- **{r['name']}**: delay line {r['delay_status']}")
        notes += [f"- **{r['name']}**: {note}" for note in r.get("notes", [])]
    for n in ok:
        for m in metrics:
            cell = table[n][m.key]
            if cell.get("status") == "FAILED":
                notes.append(f"- **{n}** {m.label}: FAILED: {cell['error']}")
    if notes:
        out += ["Skipped / failed / notes:", "", *notes, ""]
    out += ["What was measured:", "", *[f"- {line}" for line in doc["measured"]], ""]
    missing = [n for n in names if n not in ok]
    if missing:
        out.append(f"Not measured: {', '.join(missing)}.")
        out.append("")
    return "\n".join(out)


def build_document(
    *,
    started: str,
    duration_s: float,
    quick: bool,
    machine: dict[str, Any],
    config: dict[str, Any],
    delays: Sequence[Any],
    reports: Sequence[SystemReport],
    metrics: Sequence[Metric],
) -> dict[str, Any]:
    """The whole run as one JSON-able document: the Markdown report is rendered from it, so both say the same."""
    return {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "cwd": os.getcwd(),
        "started": started,
        "duration_s": duration_s,
        "quick": quick,
        "machine": machine,
        "config": config,
        "delay_line": [p.describe() for p in delays],
        "systems": [
            {
                "name": r.name,
                "status": r.status if r.status != "ok" or r.repeats else "skipped",
                "reason": r.reason or ("" if r.repeats or r.status != "ok" else "not run"),
                "version": r.version,
                "delay_status": r.delay_status,
                "repeats": len(r.repeats),
                "notes": r.notes,
                "seconds": round(r.seconds, 1),
            }
            for r in reports
        ],
        "metrics": [asdict(m) for m in metrics],
        "results": aggregate(reports, metrics),
        "measured": MEASURED,
    }


def write_outputs(doc: dict[str, Any], *, md_path: str | None, json_path: str | None) -> None:
    """The Markdown report to stdout (and to md_path); the document to json_path."""
    md = render_markdown(doc)
    print(md)
    if md_path:
        Path(md_path).write_text(md)
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


def any_failed(doc: dict[str, Any]) -> bool:
    """Whether any measured cell FAILED (skipped systems and n/a cells do not count)."""
    return any(
        cell.get("status") == "FAILED"
        for row in doc["results"].values()
        for k, cell in row.items()
        if not k.startswith("_")
    )


MEASURED = [
    "Every transfer is verified: deterministic pseudo-random data, the receiver's byte count and CRC-32 must equal "
    "the sender's; a short, long or corrupted transfer makes the cell FAILED.",
    "Throughput is timed from the service's acknowledgement (path established) to its verdict (last byte "
    "delivered). Upload = client -> exposed port -> service; download = the reverse.",
    "RTT: 64-byte messages echoed by the service, one at a time; 'beside a bulk upload' runs the ping-pong while "
    "a helper process uploads as fast as it can on another connection through the same system (for ssh and "
    "trio-tunnel the same multiplexed link: head-of-line blocking shows here).",
    "Short connections: connect, 64-byte request, 64-byte reply, close; sequential, and with 200 concurrent workers.",
    "Memory per idle connection: growth of the summed VmRSS (and PSS, which shares forked pages fairly) of the "
    "system's processes with 1,000 connections held open end to end, divided by 1,000. For direct that is the "
    "sink itself (a Trio task and socket per connection).",
    "CPU per GiB: CPU time of the system's processes (run time of their threads from /proc/PID/task/*/schedstat, "
    "plus reaped children's cutime+cstime from /proc/PID/stat) during the 1-stream and 16-stream bulk workloads, "
    "over the GiB moved. For direct it is the sink's cost, i.e. the receiving endpoint.",
    "System's processes: direct = the sink; socat = the listener and its forked children; ssh = sshd and its "
    "children plus the ssh client; trio-tunnel = server plus client.",
    "The load generator runs in the benchmark process (Trio), the sink/echo service in a separate process; on a "
    "2-core machine they compete with the system under test, so direct is this harness's ceiling, not the "
    "kernel's. The bulk upload beside the ping-pong runs in a third process at nice 10.",
    "Each repeat starts a fresh system (and sink) and runs the memory workload first; cells are medians over "
    "the repeats. A workload that fails verification or times out makes its cell FAILED; if the system died, "
    "the workloads after it in that repeat are not run.",
    "Delay line: a Trio proxy (scripts/delayline.py) that delays each direction and paces it to the line rate "
    "with a bounded queue, placed in the link (trio-tunnel client<->server, ssh<->sshd, socat->service, "
    "client->service for direct); one upload's goodput over it as a fraction of the line rate.",
    "trio-tunnel's server runs with max_connections_per_ip = 4096 (all bench connections come from 127.0.0.1; "
    "--tt-stock-limits drops it) and otherwise default settings, link_memory (4 MiB per link) included: that "
    "budget caps one stream's window, so the delay-line rows measure it (docs/CONFIG.md, link_memory).",
]
