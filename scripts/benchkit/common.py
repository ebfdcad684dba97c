"""Paths, units and the delay line module, shared by the benchmark modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent.parent
REPO = SCRIPTS.parent
# The helper processes (--serve-sink, --bulk-helper) are started through the entry point, like the benchmark.
BENCH_PATH = SCRIPTS / "bench.py"
DELAYLINE_PATH = SCRIPTS / "delayline.py"

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * MiB


def _load_delayline() -> Any:
    """scripts/delayline.py is also a standalone tool, not part of this package: load it by path, once."""
    name = "trio_tunnel_bench_delayline"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DELAYLINE_PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


delayline = _load_delayline()
DelayParams = delayline.DelayParams
