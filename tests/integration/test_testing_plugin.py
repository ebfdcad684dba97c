"""The pytest plugin of trio_tunnel.testing: registered through the ``pytest11`` entry point, its fixtures work under
pytest-trio's trio_mode (the README's example is run as it is written), and it is inert and cheap otherwise.

Each check runs pytest or Python in a subprocess: plugins are loaded once per process, so only a fresh one shows
what a user's run sees.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio
from trio_tunnel.testing import TunnelServer
from tunnel_helpers import cli, hostport, read_all

ROOT = Path(__file__).resolve().parent.parent.parent
SECTION = "## Testing with trio-tunnel"
HEAVY = ("trio", "pytest", "pytest_trio", "ssl", "cryptography", "msgpack", "trio_tunnel.server", "trio_tunnel.mux")
"""What the plugin must not import when pytest-trio is absent (it is then loaded for nothing)."""


def readme_blocks() -> dict[str, str]:
    """The README section's code blocks by language (one ``toml``, one ``python``)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(r"```(\w+)\n(.*?)```", text[start : end if end >= 0 else None], re.S)
    languages = [language for language, _ in blocks]
    assert sorted(languages) == ["python", "toml"], languages
    return dict(blocks)


def python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False)


def test_the_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    entry_points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    assert entry_points.get("trio_tunnel") == "trio_tunnel.testing.plugin", entry_points


def test_the_readme_example_runs(tmp_path: Path) -> None:
    blocks = readme_blocks()
    (tmp_path / "pyproject.toml").write_text(blocks["toml"])
    (tmp_path / "test_echo.py").write_text(blocks["python"])
    tests = re.findall(r"^async def (test_\w+)", blocks["python"], re.M)
    assert len(tests) == 4, tests
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_echo.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for test in tests:
        assert re.search(rf"test_echo\.py::{test} PASSED", run.stdout), run.stdout


def test_the_fixtures_are_there_and_import_little_until_used() -> None:
    code = (
        "import sys, trio_tunnel.testing.plugin as p;"
        "print(sorted(n for n in ('trio_tunnel', 'tunnel_server') if hasattr(p, n)));"
        "print(sorted(m for m in ('trio_tunnel.server', 'trio_tunnel.client', 'trio_tunnel.testing.harness',"
        " 'cryptography', 'msgpack') if m in sys.modules))"
    )
    run = python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["['trio_tunnel', 'tunnel_server']", "[]"], run.stdout


def test_without_pytest_trio_the_plugin_adds_nothing() -> None:
    # pytest-trio is installed here, so the plugin is shown a world without it: find_spec says it is not there.
    code = (
        "import sys, importlib.util;"
        "real = importlib.util.find_spec;"
        "importlib.util.find_spec = lambda name, package=None: None if name == 'pytest_trio' else real(name, package);"
        "import trio_tunnel.testing.plugin as p;"
        "print([n for n in ('trio_tunnel', 'tunnel_server', 'pytest') if hasattr(p, n)]);"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in HEAVY or m in HEAVY))"
    ).replace("HEAVY", repr(HEAVY))
    run = python(code)
    assert run.returncode == 0, run.stderr
    fixtures, modules = run.stdout.splitlines()
    assert fixtures == "[]"
    assert modules == "[]", modules


FAILING = """
import logging

import pytest
import trio


async def serve_nothing(stream):
    await stream.aclose()


@pytest.mark.trio
async def test_an_error_is_logged_while_the_tunnel_runs(trio_tunnel, nursery):
    listeners = await nursery.start(trio.serve_tcp, serve_nothing, 0)
    await trio_tunnel(listeners[0].socket.getsockname()[1])
    logging.getLogger("trio_tunnel.server").error("a swallowed error")


@pytest.mark.trio
async def test_the_server_fixture_checks_too(tunnel_server):
    logging.getLogger("trio_tunnel.server").error("another one")
"""


def test_a_failed_check_fails_the_test_through_the_fixture(tmp_path: Path) -> None:
    """Without trio_mode (the ``trio`` marker instead): a swallowed error fails the test. (pytest-trio runs a Trio
    fixture's teardown inside the test's own Trio run, so it is reported as the test's failure, not an error.)"""
    (tmp_path / "test_failing.py").write_text(FAILING)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "trio_mode=false", "test_failing.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 failed" in run.stdout, run.stdout
    assert "TunnelCheckError: leaving the tunnel: error logged: trio_tunnel.server: a swallowed error" in run.stdout
    assert "TunnelCheckError: leaving the tunnel: error logged: trio_tunnel.server: another one" in run.stdout


async def test_the_cli_joins_the_tunnel_server(tunnel_server: TunnelServer, nursery: trio.Nursery) -> None:
    """``client_args()`` is what ``trio-tunnel client`` needs to join (address, token, pin)."""

    async def hello(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello from the service")

    with trio.fail_after(30):
        listeners = await nursery.start(partial(trio.serve_tcp, hello, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with cli(
            nursery, "client", *tunnel_server.client_args(), "-R", f"svc=127.0.0.1:0:127.0.0.1:{port}", test_tls=False
        ) as proc:
            public = hostport(await proc.expect(r"exposed svc (\S+)"))
            assert await read_all(await trio.open_tcp_stream(*public)) == b"hello from the service"
            proc.interrupt()
            assert await proc.wait() == 0, proc.stderr


def test_client_args_survive_a_token_that_begins_with_a_dash() -> None:
    """secrets.token_urlsafe may begin with ``-``: as a separate word argparse took it for an option (a flaky exit 2
    seen in CI-like runs); ``--token=VALUE`` keeps it a value."""
    from trio_tunnel.config import HostPort, ServerConfig
    from trio_tunnel.lifecycle import Shutdown
    from trio_tunnel.usage import build_parser

    token = b"-GGt6SV6fOliPGs8ciMx0F_5-R1GjBne"
    config = ServerConfig(listen=HostPort(host="127.0.0.1", port=0), tokens=(token,), insecure_plaintext=True)
    server = TunnelServer(config, ("127.0.0.1", 7835), token, None, Shutdown())
    args = build_parser().parse_args(["client", *server.client_args(), "-R", "svc=0:127.0.0.1:80"])
    assert args.token == [token.decode()]
