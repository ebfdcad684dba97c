#!/usr/bin/env python3
"""Benchmark trio-tunnel beside direct TCP, socat and OpenSSH ``ssh -R``, on loopback, in one run.

Usage::

    .venv/bin/python scripts/bench.py                      # full run: 3 repeats, 256 MiB bulk, ~10 min
    .venv/bin/python scripts/bench.py --quick              # smoke run: 1 repeat, small sizes, ~1 min
    .venv/bin/python scripts/bench.py --systems direct,socat,ssh,trio-tunnel --json out.json --md out.md

Systems (each started and stopped by this script on 127.0.0.1 with free ports; every process it starts is killed
in a ``finally``):

* ``direct``      no relay: the load generator talks to the sink itself (the physical limit of this harness).
* ``socat``       ``socat TCP-LISTEN:P,bind=127.0.0.1,reuseaddr,fork,backlog=1024 TCP:127.0.0.1:Q`` (a C relay,
                  one forked process per connection).
* ``ssh``         ``ssh -R 127.0.0.1:P:127.0.0.1:Q`` against a throwaway sshd (own host key, client key and
                  sshd_config in a temp dir, on a loopback port); OpenSSH's default cipher unless --ssh-cipher.
* ``trio-tunnel`` ``trio-tunnel server --listen 127.0.0.1:0 --token T --allow-ports 1024-65535`` (its stdout line
                  ``listening HOST:PORT`` gives the link address) and ``trio-tunnel client --server HOST:PORT
                  --token T -R 127.0.0.1:0:127.0.0.1:Q`` (its stdout line ``exposed NAME HOST:PORT`` gives the
                  public port).

A system whose tool is missing, or that does not come up within a bounded time, is reported as skipped with the
reason. Install the peers with ``apt-get install socat openssh-server openssh-client``; trio-tunnel with
``pip install -e .`` in the repository (or point ``--trio-tunnel`` at the executable).

Workloads (every byte verified: the data is a deterministic pseudo-random pattern and the receiver's CRC-32 and
byte count must match the sender's; a corrupted, short or long transfer raises and the cell reads FAILED):

* 1-stream bulk upload and download (client -> service, service -> client), MiB/s.
* 16 parallel uploads, aggregate MiB/s.
* 64-byte ping-pong round-trip time, p50 and p99, on an idle system.
* The same RTT while a bulk upload runs on another connection through the same system (head-of-line blocking
  shows here), and the ratio of loaded to idle p99. The bulk upload runs in a helper process.
* Sequential short connections per second, and with 200 concurrent workers (connect, 64-byte request, reply,
  close).
* Memory per idle connection with 1,000 connections held open end to end: the growth of the summed VmRSS (and
  PSS, from smaps_rollup) of the system's processes, divided by 1,000.
* CPU seconds per GiB: CPU time of the system's processes from /proc (thread run time from schedstat, plus
  reaped children's cutime+cstime) during the three bulk workloads, divided by the GiB moved.
* Delay line (scripts/delayline.py: 25 ms each way, paced to the line rate, one-BDP queue) placed in the system's
  link (trio-tunnel client<->server, ssh<->sshd; socat->service and client->service for the relay-less ones):
  one upload's goodput as a fraction of the line rate, at 200 and at 1000 Mbit/s (--rate-mbit). At 200 Mbit/s
  the bandwidth-delay product (1.25 MB) fits in OpenSSH's fixed 2 MiB channel window; at 1000 Mbit/s (6.25 MB)
  it does not, which is where a multiplexer's window auto-tuning shows.

What is measured where: the load generator runs in this process (Trio), the sink/echo service in a separate helper
process (``--serve-sink``), the loaded-RTT bulk upload in another helper (``--bulk-helper``, at nice 10). Each
repeat starts a fresh system and sink and runs the memory workload first. The machine may have
only 2 cores: the load generator and the sink compete with the system under test for them, which is why ``direct``
is reported as the harness's own ceiling and every other system also as a ratio to it. "The system's processes"
are: direct -> the sink; socat -> the socat listener and its forked children; ssh -> sshd and its children plus the
ssh client; trio-tunnel -> server plus client. Cells show medians over the repeats (3 full, 1 with --quick).
Each system's values are also given as ratios to ``direct`` and to ``ssh``.

UDP (``--udp``, a run of its own; ``scripts/benchkit/udp.py`` describes it): 64-byte request/response p50/p99 and
rate/loss at a fixed offered load (``--udp-rate``, default 10,000 datagrams/s) for ``direct``, ``socat`` UDP and
trio-tunnel ``-R .../udp``, with trio-tunnel's TCP round trip beside it.

Exit status: 0 when every measured cell passed verification (skipped systems are fine), 1 when any cell FAILED.

The code is the package ``scripts/benchkit/``: ``systems.py`` (how each system is started; SYSTEM_LIST is the
rows), ``workloads.py`` (the measurements), ``suite.py`` (sizes, metrics, one system's run), ``report.py`` (the
table, JSON and Markdown), ``harness.py`` (command line and the run), ``wire.py`` (data pattern, protocol, sink),
``procs.py`` (child processes, /proc accounting). This file is the entry point; the helper processes (the sink,
the bulk uploader beside the ping-pong) are started through it too.
"""

from __future__ import annotations

import sys

from benchkit.harness import main

if __name__ == "__main__":
    sys.exit(main())
