"""Keep glibc's allocator from handing the data path's buffers back to the kernel after every use.

A bulk transfer allocates and frees buffers of about 256 KiB many times a second: a socket read, a TLS batch, the
records a receive joins. glibc serves an allocation that large from ``mmap`` once its adaptive threshold says so,
or trims the top of the heap when more than twice that threshold is free there, and either way the next buffer
of the same size faults in fresh zeroed pages: ``perf`` showed page faults and the zeroing behind them at 15-17% of
the tunnel's CPU during a one-stream upload. Fixing both thresholds (``mallopt``) makes such buffers come from
the heap and stay there, which took a fifth off the CPU per GiB of a one-stream upload over TLS.

The cost is memory the process keeps after a burst: at most :data:`TRIM_THRESHOLD` of free heap (its own buffers,
reused by the next burst); allocations above :data:`MMAP_THRESHOLD` still use ``mmap``. Nothing is done on a
C library other than glibc, nor when ``GLIBC_TUNABLES`` already sets malloc tunables (the operator's choice wins).

Only the ``trio-tunnel`` command (and its ``--workers`` processes) calls it: the allocator is the whole process's,
so a program that uses trio-tunnel as a library (``trio_tunnel.testing`` in someone's test suite) keeps its own.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Final

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

MMAP_THRESHOLD: Final = 1024 * 1024
"""Allocations up to this size come from the heap (glibc's adaptive default starts at 128 KiB)."""

TRIM_THRESHOLD: Final = 8 * 1024 * 1024
"""Free memory at the top of the heap kept for reuse before glibc gives it back to the kernel."""

_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

_done: bool | None = None


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds once per process; True if they are set (by this call or an earlier one)."""
    global _done
    if _done is None:
        _done = _tune()
    return _done


def _tune() -> bool:
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
