"""stdout lifecycle lines: one line per event, flushed at once, so scripts and tests can follow a run.

Logs go to stderr; stdout carries only these lines (documented in README, "Lifecycle lines"):
``listening HOST:PORT``, ``connected HOST:PORT``, ``exposed NAME HOST:PORT``, ``forwarding NAME HOST:PORT``,
``disconnected REASON``, ``refused NAME REASON``, ``metrics HOST:PORT`` (the ``--metrics`` endpoint is bound),
and after a SIGHUP ``unexposed NAME``, ``unforwarded NAME``, ``reloaded``, ``reload-failed REASON``. Under systemd
each line is also the unit's ``STATUS=``.
"""

from __future__ import annotations

import sys

from . import notify

__all__ = ["announce", "format_hostport"]


def format_hostport(host: str, port: int) -> str:
    """``HOST:PORT``, with IPv6 literals in brackets (``[::1]:80``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def announce(line: str) -> None:
    """Print one lifecycle line to stdout and flush it."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    notify.status(line)
