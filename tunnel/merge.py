"""``server --workers N``: one ``/metrics`` and one ``/status`` made of every worker's (tunnel/workers.py).

Why merge rather than label by worker: a client's link lives in one worker at a time, but it moves when it
reconnects (the kernel picks the worker), and its counters then continue in another process. A dashboard or an
alert wants "bytes of client X", not "bytes of client X in worker 1", so samples with equal names and labels are
summed: counters of ended sessions (kept by the worker they ended in) plus the live ones give the same totals as one
process would. The one family where a sum is wrong is ``trio_tunnel_info`` (always 1): it takes the largest value.
Gauges of a client (streams open, RTT) come from the one worker that holds its link, so summing changes nothing.
The parent adds its own families about the workers (:func:`worker_families`).

``/status`` is the union of the workers' sessions and services (each row says its ``worker``); ``trio-tunnel
status`` reads it unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families
from trio_tunnel import __version__

__all__ = ["merge_metrics", "merge_status", "worker_families"]

MAXIMUM: Final = frozenset({"trio_tunnel_info"})
"""Families whose samples are not summed across workers but take the largest value."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    """As the Prometheus text format writes a value (``1.0``, ``0.25``, ``+Inf``, ``NaN``)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _sample(name: str, labels: tuple[tuple[str, str], ...], value: float) -> str:
    inner = ",".join(f'{key}="{_escape(text)}"' for key, text in labels)
    return f"{name}{{{inner}}} {_number(value)}" if inner else f"{name} {_number(value)}"


def merge_metrics(texts: Iterable[str]) -> str:
    """One Prometheus text exposition from several (see the module docstring). Families keep the order in which
    they are first seen; samples within a family too."""
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            entry = families.setdefault(family.name, (family.type, family.documentation, {}))
            samples = entry[2]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif family.name in MAXIMUM:
                    samples[key] = max(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    lines = []
    for name, (kind, doc, samples) in families.items():
        lines.append(f"# HELP {name} {doc.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(_sample(sample, labels, value) for (sample, labels), value in samples.items())
    return "\n".join(lines) + "\n"


def worker_families(running: int, configured: int, restarts: int) -> str:
    """The parent's own families: workers running, configured, and restarted after an unexpected exit."""
    return (
        "# HELP trio_tunnel_workers Server worker processes running now (--workers).\n"
        "# TYPE trio_tunnel_workers gauge\n"
        f"trio_tunnel_workers {running}.0\n"
        "# HELP trio_tunnel_workers_configured Server worker processes configured (--workers).\n"
        "# TYPE trio_tunnel_workers_configured gauge\n"
        f"trio_tunnel_workers_configured {configured}.0\n"
        "# HELP trio_tunnel_worker_restarts Worker processes restarted after an unexpected exit.\n"
        "# TYPE trio_tunnel_worker_restarts counter\n"
        f"trio_tunnel_worker_restarts_total {restarts}.0\n"
    )


def merge_status(documents: Sequence[dict[str, Any]], started: float, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``/status`` document from the workers' (each row of theirs already says its ``worker``)."""
    failures: dict[str, int] = {}
    for document in documents:
        for reason, count in document.get("auth_failures", {}).items():
            failures[reason] = failures.get(reason, 0) + int(count)
    return {
        "trio_tunnel": __version__,
        "role": "server",
        "name": "",
        "now": time.time(),
        "started": started,
        "sessions": [row for document in documents for row in document.get("sessions", [])],
        "services": [row for document in documents for row in document.get("services", [])],
        "auth_failures": failures,
        "reconnects": 0,
        "workers": workers,
    }
