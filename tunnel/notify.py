"""systemd's readiness protocol (``sd_notify``), written by hand: one datagram to ``$NOTIFY_SOCKET``.

With ``Type=notify`` systemd considers a unit started only when it says ``READY=1``: the server says it once it
listens, the client once every ``-R`` service is exposed, so units ordered ``After=`` it start when the tunnel
really carries traffic. Each stdout lifecycle line is also sent as ``STATUS=``, so ``systemctl status`` shows the
last one (``refused web address_in_use``, ``disconnected ...``).

The protocol is small enough not to need a dependency (libsystemd bindings would need a C library and a compiler
on every machine): the variables as ``KEY=VALUE`` lines in one datagram on an ``AF_UNIX``/``SOCK_DGRAM`` socket,
whose path starting with ``@`` means Linux's abstract namespace. Without ``$NOTIFY_SOCKET`` (not started by
systemd, or another ``Type=``) every call does nothing. A failed send is logged at debug level and otherwise
ignored: readiness is advice to a supervisor, never a reason to stop tunnelling.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Final

__all__ = ["NOTIFY_SOCKET", "notify", "ready", "status", "stopping"]

logger: Final = logging.getLogger(__name__)

NOTIFY_SOCKET: Final = "NOTIFY_SOCKET"

MAX_STATUS: Final = 1024
"""Longest STATUS= text sent (a lifecycle line is far shorter; this bounds the datagram)."""


def _address(value: str) -> str | bytes | None:
    """The socket address ``$NOTIFY_SOCKET`` names: a path, or ``@name`` for the abstract namespace."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # (systemd also knows vsock addresses; no trio-tunnel host needs them)


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to the service manager; True when a datagram went out.

    Never blocks (a full receive queue drops the message) and never raises.
    """
    value = (os.environ if environ is None else environ).get(NOTIFY_SOCKET, "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        logger.debug("ignoring %s=%r: not a path or @abstract name", NOTIFY_SOCKET, value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode(errors="replace"), address)
    except OSError as exc:
        logger.debug("cannot notify the service manager at %s: %s", value, exc)
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_STATUS]


def ready(status_line: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """``READY=1`` (with ``STATUS=`` when given): the service does what it was started for."""
    extra = "" if status_line is None else f"\nSTATUS={_one_line(status_line)}"
    return notify(f"READY=1{extra}", environ=environ)


def status(line: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """``STATUS=line``: what ``systemctl status`` shows."""
    return notify(f"STATUS={_one_line(line)}", environ=environ)


def stopping(*, environ: Mapping[str, str] | None = None) -> bool:
    """``STOPPING=1``: a graceful shutdown (drain) has begun."""
    return notify("STOPPING=1", environ=environ)
