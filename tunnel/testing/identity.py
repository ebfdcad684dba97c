"""The throwaway TLS identity of the tunnels a test opens: one key per process, not per tunnel.

A tunnel in a test runs over TLS as users run it (the default link), so a test exercises the handshake, the pin and
the channel binding too. Making an ECDSA key and a certificate costs a few milliseconds, and a suite may open
hundreds of tunnels: the identity is made once, on first use, in a temporary directory removed when the process
exits, and every tunnel's server uses it while its client pins its fingerprint. Nothing here is ever written to
the machine's own state directory.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

import attrs
from trio_tunnel.certs import fingerprint_of_pem_file, load_or_create_identity

__all__ = ["Identity", "throwaway_identity"]


@attrs.frozen
class Identity:
    """A server identity: the state directory holding its key and certificate, and the pin clients need."""

    state_dir: str
    fingerprint: str


@cache
def throwaway_identity() -> Identity:
    """The process's test identity, made on the first call (the later ones return the same)."""
    state_dir = tempfile.mkdtemp(prefix="trio-tunnel-testing-")
    atexit.register(shutil.rmtree, state_dir, True)
    cert, _key = load_or_create_identity(Path(state_dir))
    return Identity(state_dir, fingerprint_of_pem_file(cert))
