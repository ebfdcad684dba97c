"""Suite-wide guards.

- **No name reaches the machine's resolver.** Every host name a test (or a process it starts) looks up is
  answered by ``tests/noresolve``'s table or fails at once with ``EAI_NONAME``; see that module.
- **The package is imported as ``trio_tunnel`` only.** The repository's folders are named ``tunnel/`` and ``proto/``
  and the repository root is on ``sys.path`` under ``python -m pytest``, so a stray ``import tunnel.x`` would load a
  second copy of a module (and a monkeypatch of it would silently miss). The session fails if either top-level name
  was imported.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_NORESOLVE = Path(__file__).parent / "noresolve"
sys.path.insert(0, str(_NORESOLVE))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_NORESOLVE), os.environ.get("PYTHONPATH")]))

import trio_tunnel_test_resolver  # noqa: E402

trio_tunnel_test_resolver.install()

# A server started without --state-dir keeps its key under $XDG_STATE_HOME (even as root): a folder of this run's,
# never the machine's /var/lib/trio-tunnel or the user's own.
_STATE_HOME = tempfile.mkdtemp(prefix="trio-tunnel-test-state-")
atexit.register(shutil.rmtree, _STATE_HOME, True)
os.environ["XDG_STATE_HOME"] = _STATE_HOME
os.environ.pop("STATE_DIRECTORY", None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stray = sorted(name for name in ("tunnel", "proto") if name in sys.modules)
    if stray:
        session.config.get_terminal_writer().line(
            f"error: {', '.join(stray)} imported as a top-level module; import trio_tunnel instead", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
