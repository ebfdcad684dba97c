"""scripts/bench_redis.py: its parsing of redis-benchmark's CSV, and (where Redis is installed) one tiny run end to end
through trio-tunnel, so the script that backs the README's Redis row keeps working."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench_redis  # noqa: E402

SAMPLE = (
    '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",'
    '"max_latency_ms"\n'
    '"PING_INLINE","90909.09","0.072","0.016","0.063","0.119","0.231","1.751"\n'
    '"GET","86956.52","0.071","0.016","0.063","0.103","0.231","3.415"\n'
)


def test_parse_csv_reads_every_test_row() -> None:
    rows = bench_redis.parse_csv(SAMPLE)
    assert set(rows) == {"PING_INLINE", "GET"}
    assert rows["GET"]["rps"] == pytest.approx(86956.52)
    assert rows["PING_INLINE"]["p99_latency_ms"] == pytest.approx(0.231)


def test_parse_csv_refuses_what_is_not_redis_benchmark_output() -> None:
    with pytest.raises(RuntimeError, match="unexpected redis-benchmark output"):
        bench_redis.parse_csv("Could not connect to Redis at 127.0.0.1:1: Connection refused\n")


def test_render_divides_by_ssh() -> None:
    opts = bench_redis.parse_args(["--requests", "10"])
    row = {"rps": 100.0, "p50_latency_ms": 1.0, "p99_latency_ms": 2.0, "cpu_us": 10.0}
    table = bench_redis.render({"ssh": {"GET": row}, "x": {"GET": {**row, "rps": 50.0, "cpu_us": 40.0}}}, opts)
    assert "| x | GET | 50 | 0.50 | 1.000 | 2.000 | 40.0 | 4.00 |" in table


@pytest.mark.skipif(not shutil.which("redis-benchmark") or not shutil.which("redis-server"), reason="no Redis here")
def test_a_tiny_run_through_trio_tunnel_prints_its_row() -> None:
    cmd = [sys.executable, str(SCRIPTS / "bench_redis.py"), "--systems", "direct,trio-tunnel-plain"]
    cmd += ["--requests", "300", "--clients", "4", "--tests", "get", "--repeats", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| trio-tunnel-plain | GET |")]
    assert len(rows) == 1, out
    assert float(rows[0].split("|")[3]) > 0
