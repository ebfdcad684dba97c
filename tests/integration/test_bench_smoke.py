"""Smoke test of the benchmark harness itself (scripts/bench.py, package scripts/benchkit) on `direct`, tiny sizes.

Checks that every workload produces a number against an honest service, that a relay which flips one byte or
cuts a transfer short is caught (the cells read FAILED), and that the command line runs end to end.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
BENCH = SCRIPTS / "bench.py"
# The harness is the package scripts/benchkit, importable with scripts/ on sys.path (as `python scripts/bench.py`
# has it).
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from benchkit.common import DelayParams, KiB, MiB, delayline  # noqa: E402
from benchkit.suite import METRICS, Config, Failed, delay_keys, run_delay, run_suite  # noqa: E402
from benchkit.systems import Target  # noqa: E402
from benchkit.wire import VerifyError, run_sink  # noqa: E402
from benchkit.workloads import bulk_download, bulk_upload, rtt_idle  # noqa: E402

TINY = Config(
    repeats=1,
    bulk_bytes=3 * MiB + 17,
    par_streams=4,
    par_bytes_each=256 * KiB,
    rtt_n=50,
    rtt_seconds=1.0,
    loaded_rtt_n=50,
    loaded_rtt_seconds=1.0,
    loaded_warmup_s=0.1,
    seq_conns=20,
    seq_seconds=1.0,
    conc_conns=60,
    conc_workers=20,
    conc_seconds=1.0,
    idle_conns=50,
    delay_seconds=0.5,
    transfer_timeout=10.0,
    workload_timeout=10.0,
)
NUMERIC = [m.key for m in METRICS if not m.key.startswith("delay")]


async def _corrupting_relay(
    upstream, *, flip_at: int | None = 2000, cut_at: int | None = None, task_status=trio.TASK_STATUS_IGNORED
):
    """A loopback relay that flips one byte at offset `flip_at` of each direction, or closes everything once
    `cut_at` bytes went upstream."""

    async def pump(src, dst, upstream_direction: bool):
        seen = 0
        while data := await src.receive_some(65536):
            if flip_at is not None and seen <= flip_at < seen + len(data):
                buf = bytearray(data)
                buf[flip_at - seen] ^= 0x01
                data = bytes(buf)
            if cut_at is not None and upstream_direction and seen + len(data) >= cut_at:
                await dst.send_all(data[: cut_at - seen])
                raise trio.BrokenResourceError("cut")
            seen += len(data)
            await dst.send_all(data)
        await dst.send_eof()

    async def handler(inbound):
        try:
            outbound = await trio.open_tcp_stream(*upstream)
        except OSError:
            await trio.aclose_forcefully(inbound)
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, inbound, outbound, True)
                nursery.start_soon(pump, outbound, inbound, False)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(inbound)
            await trio.aclose_forcefully(outbound)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        task_status.started(listeners[0].socket.getsockname()[:2])


async def test_workloads_produce_numbers_on_direct(nursery):
    with trio.fail_after(15):
        addr = await nursery.start(run_sink)
        target = Target("direct", addr, [os.getpid()])
        res = await run_suite(target, TINY)
        failed = {k: v for k, v in res.items() if isinstance(v, Failed)}
        assert not failed
        for key in NUMERIC:
            assert isinstance(res[key], float), key
            # memory growth over a few connections in this busy process is noise and may be negative
            assert math.isfinite(res[key]) and (key.endswith("per_conn") or res[key] >= 0), key
        assert res["bulk_up"] > 0 and res["seq_cps"] > 0 and res["rtt_p50"] > 0


async def test_delay_line_paces_one_stream(nursery):
    with trio.fail_after(15):
        sink = await nursery.start(run_sink)
        params = DelayParams(delay_s=0.01, rate_bps=80e6)  # 10 MB/s, 20 ms RTT
        dl = await nursery.start(delayline.run_delayline, params, ("127.0.0.1", 0), sink)
        target = Target("direct", dl, [os.getpid()])
        rtts = await rtt_idle(dl, 5, 5.0)
        assert min(rtts) >= 0.019  # two one-way delays
        res = await run_delay(target, TINY, params, lambda s: None)
        _, k_pct = delay_keys(params)
        assert isinstance(res[k_pct], float)
        assert 40 < res[k_pct] <= 105  # paced to the line rate, never above it


async def test_flipped_byte_is_detected(nursery):
    with trio.fail_after(15):
        sink = await nursery.start(run_sink)
        relay = await nursery.start(_corrupting_relay, sink)
        with pytest.raises(VerifyError, match="CRC mismatch"):
            await bulk_upload(relay, 1 * MiB)
        with pytest.raises(VerifyError, match="CRC mismatch"):
            await bulk_download(relay, 1 * MiB)
        res = await run_suite(Target("corrupting", relay, [os.getpid()]), replace_cfg(idle_conns=10))
        for key in ("bulk_up", "bulk_down", "par16", "cpu_per_gib"):
            assert isinstance(res[key], Failed), key
        assert "corrupted" in res["bulk_up"].error
        assert isinstance(res["rtt_p50"], Failed) and "altered" in res["rtt_p50"].error


async def test_short_transfer_is_detected(nursery):
    with trio.fail_after(15):
        sink = await nursery.start(run_sink)
        relay = await nursery.start(functools.partial(_corrupting_relay, sink, flip_at=None, cut_at=200_000))
        with pytest.raises((VerifyError, trio.BrokenResourceError)):
            await bulk_upload(relay, 1 * MiB)
        relay2 = await nursery.start(functools.partial(_corrupting_relay, sink, flip_at=None, cut_at=10))
        with pytest.raises(VerifyError, match="closed after"):
            await bulk_download(relay2, 1 * MiB)


def replace_cfg(**kw):
    import dataclasses

    return dataclasses.replace(TINY, **kw)


def test_command_line_quick_direct(tmp_path):
    out_json, out_md = tmp_path / "json", tmp_path / "md"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--systems",
            "direct",
            "--bulk-mib",
            "4",
            "--silent",
            "--rate-mbit",
            "100",
            "--json",
            str(out_json),
            "--md",
            str(out_md),
        ],
        capture_output=True,
        text=True,
        timeout=40,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out_json.read_text())
    assert doc["systems"][0] == {**doc["systems"][0], "name": "direct", "status": "ok"}
    cells = doc["results"]["direct"]
    assert [m["key"] for m in doc["metrics"]][-2:] == ["delay100_mib_s", "delay100_pct"]
    assert all(cells[m["key"]]["status"] == "ok" for m in doc["metrics"]), cells
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["trio"]
    assert "| 1-stream upload | MiB/s |" in out_md.read_text()
    assert "| 1-stream upload | MiB/s |" in proc.stdout
