"""The pytest plugin of trio-tunnel, registered through the ``pytest11`` entry point (``trio_tunnel``).

With pytest-trio installed it adds two fixtures (:mod:`._fixtures`): ``trio_tunnel``, a factory of tunnels
(``tunnel = await trio_tunnel(local_port)``), and ``tunnel_server``, a server a test's own clients join. Without
pytest-trio it adds nothing: the fixtures are async and only pytest-trio can run them, and pytest loads this module
in every run of every project that has trio-tunnel installed, so the cost there is one look-up on ``sys.path``.
Even with pytest-trio, nothing of trio-tunnel beyond this package's lazy ``__init__`` is imported until a test
uses a fixture.
"""

from __future__ import annotations

from importlib.util import find_spec

if find_spec("pytest_trio") is not None:  # looked up, not imported: pytest loads it as its own plugin
    from ._fixtures import trio_tunnel, tunnel_server

    __all__ = ["trio_tunnel", "tunnel_server"]
