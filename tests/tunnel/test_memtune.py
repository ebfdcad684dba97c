"""trio_tunnel.memtune: glibc's malloc thresholds are set once per process, unless the operator set them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

PROBE = "from trio_tunnel.memtune import tune_malloc; print(tune_malloc(), tune_malloc())"


def _run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | env_extra
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_sets_the_thresholds_once() -> None:
    assert _run({}) == "True True"


def test_leaves_an_operators_malloc_tunables_alone() -> None:
    assert _run({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}) == "False False"
