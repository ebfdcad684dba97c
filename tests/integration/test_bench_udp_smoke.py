"""Smoke test of the UDP workload of the benchmark (scripts/benchkit/udp.py) against an in-process UDP echo:
its numbers come out, and a service that answers only some datagrams shows as loss."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import trio

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from benchkit.udp import _markdown, udp_rate, udp_rtt  # noqa: E402


async def _echo(every: int, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Echo every ``every``-th datagram (1: all of them)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname())
        count = 0
        while True:
            data, peer = await sock.recvfrom(65536)
            count += 1
            if count % every == 0 or data == b"x" * len(data):  # the flow-opening datagrams are always answered
                await sock.sendto(data, peer)


async def test_udp_workloads_measure_and_count_loss() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(_echo, 1)
            rtts, lost = await udp_rtt(addr, 50, 5.0)
            assert len(rtts) == 50 and lost == 0 and all(0 < rtt < 1 for rtt in rtts)
            result = await udp_rate(addr, 2000.0, 0.3, 64)
            assert result["sent"] >= 500 and result["loss_pct"] == 0.0
            lossy = await nursery.start(_echo, 2)
            half = await udp_rate(lossy, 2000.0, 0.3, 64)
            assert 40.0 < half["loss_pct"] < 60.0
            nursery.cancel_scope.cancel()
    args = argparse.Namespace(udp_rtt_n=50, udp_rate=2000.0, udp_size=64, udp_seconds=0.3)
    row = {"udp_p50_us": 100.0, "udp_p99_us": 200.0, "sent_per_s": 2000.0, "received_per_s": 1000.0, "loss_pct": 50.0}
    table = _markdown({"direct": row, "socat": {"skipped": "not installed"}}, args)
    assert "| direct | 100 µs | 200 µs | 2000 | 1000 | 50.00% | - | - |" in table
    assert "skipped: not installed" in table
