"""Installed in every Python subprocess the tests start (tests/conftest.py puts this folder on PYTHONPATH)."""

import trio_tunnel_test_resolver

trio_tunnel_test_resolver.install()
