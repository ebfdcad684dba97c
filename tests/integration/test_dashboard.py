"""The dashboard at ``GET /`` in a real browser: headless Chromium loads it from a live server (in this process),
runs its script for a few seconds of virtual time (``--virtual-time-budget``: the page's one-second polls run without
waiting for them) and dumps the DOM it built from ``/status``. Skipped where Chromium is not installed
(``apt-get install chromium``)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import trio
from test_metrics import ANY, SERVER_TIMEOUTS, echo
from tunnel_helpers import (
    LOCALHOST,
    Stdout,
    client_config,
    hostport,
    read_all,
    start_client,
    start_server,
    start_service,
    stdout,
)

__all__ = ["stdout"]  # fixture, used by name

CHROMIUM = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)


async def dump_dom(url: str, profile: Path) -> str:
    argv = [
        CHROMIUM or "chromium",
        "--headless",
        "--no-sandbox",  # (tests run as root)
        "--disable-gpu",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
    ]
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout.decode()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_the_dashboard_shows_a_live_client_and_its_bytes(stdout: Stdout, tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, echo)
            server = await start_server(nursery, metrics=ANY, timeouts=SERVER_TIMEOUTS)
            _, port = hostport(await stdout.expect(r"metrics (\S+)"))
            config = client_config(server.value, f"web=0:{LOCALHOST}:{service.port}", name="dashboard-client")
            client = await start_client(nursery, config)
            conn = await trio.open_tcp_stream(LOCALHOST, client.value["web"].port)
            async with conn:
                await conn.send_all(b"x" * 5000)
                await conn.send_eof()
                assert len(await read_all(conn)) == 5000
            dom = await dump_dom(f"http://{LOCALHOST}:{port}/", tmp_path / "profile")
            sessions = dom[dom.index('<tbody id="sessions">') : dom.index("</tbody>", dom.index('id="sessions"'))]
            assert '<td class="client">dashboard-client</td>' in sessions, dom
            services = dom[dom.index('<tbody id="services">') :]
            assert '<td class="service">web</td>' in services, dom
            assert 'data-bytes="5000"' in services, dom  # the service's bytes in, as the page got them
            counts = [int(n) for n in re.findall(r'data-bytes="(\d+)"', sessions)]
            assert counts and max(counts) > 0, dom
            await client.stop()
            await server.stop()
            nursery.cancel_scope.cancel()
