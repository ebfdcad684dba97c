"""Suite-wide guard: the package is imported as ``trio_tunnel`` only.

The repository's folders are named ``tunnel/`` and ``proto/`` and the repository root is on ``sys.path`` under
``python -m pytest``, so a stray ``import tunnel.x`` would load a second copy of a module (and a monkeypatch of it
would silently miss). The session fails if either top-level name was imported.
"""

from __future__ import annotations

import sys

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stray = sorted(name for name in ("tunnel", "proto") if name in sys.modules)
    if stray:
        session.config.get_terminal_writer().line(
            f"error: {', '.join(stray)} imported as a top-level module; import trio_tunnel instead", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
