"""The test suite's only host-name resolver: it never asks the machine's.

Tests talk to loopback and to network namespaces they make, nothing else, and that includes DNS: a query for a
name that does not exist still leaves the machine through the system resolver. :func:`install` replaces
``socket.getaddrinfo`` (which Trio's default resolver calls in a worker thread, and which the stdlib's
``create_connection`` uses) with one that answers numeric addresses as before, answers the names in a fixed table
(``localhost`` and whatever ``TRIO_TUNNEL_TEST_HOSTS`` adds, as JSON ``{"name": ["addr", ...]}``), and fails every
other name with ``EAI_NONAME`` at once, as a resolver would for a name that does not exist.

``tests/conftest.py`` installs it in the test process and puts this folder first on ``PYTHONPATH``, so that the
``sitecustomize`` beside this file installs it in every Python subprocess the tests start too.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

__all__ = ["HOSTS_ENV", "install"]

HOSTS_ENV = "TRIO_TUNNEL_TEST_HOSTS"
_BUILTIN = {"localhost": ["127.0.0.1", "::1"]}


def install() -> None:
    """Replace ``socket.getaddrinfo`` (idempotent)."""
    real = getattr(socket.getaddrinfo, "__wrapped__", socket.getaddrinfo)
    table = dict(_BUILTIN)
    table.update(json.loads(os.environ.get(HOSTS_ENV) or "{}"))

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        if host is None:
            return real(host, port, family, type, proto, flags)
        name = host.decode("ascii") if isinstance(host, bytes) else str(host)
        try:
            return real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            pass
        addresses = table.get(name.lower().rstrip("."))
        if addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, f"Name or service not known (the tests resolve no name: {name})")
        results = []
        for address in addresses:
            try:
                results += real(address, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            except socket.gaierror:
                continue  # e.g. ::1 asked for with family=AF_INET
        if not results:
            raise socket.gaierror(socket.EAI_NONAME, f"Name or service not known (no address of that family: {name})")
        return results

    getaddrinfo.__wrapped__ = real  # type: ignore[attr-defined]
    socket.getaddrinfo = getaddrinfo
