"""A reverse tunnel across a real NAT, in network namespaces this test creates (root only; skipped otherwise):

    inside (web service + trio-tunnel client) -- router (masquerade) -- public (trio-tunnel server) -- outside (user)

The public server cannot open a connection to the inside at all, yet the outside user gets the inside's page
through the server's public port, because the client dialled out through the NAT and carries the connections.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from tunnel_helpers import with_test_tls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (not a package)
import netns
from netns import Topology

nat_topo = netns.nat_topo  # the ready-made fixture: a fresh NAT topology per test

pytestmark = pytest.mark.netns

CLI = [sys.executable, "-m", "trio_tunnel.cli"]
TOKEN = "nat-test-token-0123456789abcdef"
PUBLIC_PORT = 8080
FETCH = (
    "import sys, urllib.request\n"
    "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
    "with opener.open(sys.argv[1], timeout=5) as r:\n"
    "    sys.stdout.buffer.write(r.read())\n"
)


async def test_user_reaches_a_service_behind_nat_through_the_server(nat_topo: Topology, tmp_path: Path) -> None:
    t = nat_topo
    page = f"hello from behind the NAT {tmp_path.name}\n"
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(page)
    env = {**os.environ, "TRIO_TUNNEL_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    server_log = tmp_path / "server.log"
    client_log = tmp_path / "client.log"
    public = t.addr("public", "router")  # 198.18.2.1: the server's address as the NATed client sees it
    public_outside = t.addr("public", "outside")  # 198.18.3.1: the same host, from the user's network
    with trio.fail_after(40), server_log.open("w") as server_err, client_log.open("w") as client_err:
        # The local service, inside, listening on all its addresses (so only the network keeps others out).
        async with t.serve(
            "inside",
            [sys.executable, "-u", "-m", "http.server", "--bind", "0.0.0.0", "--directory", str(site), "0"],
            ready=r"port (\d+)",
            stderr=subprocess.DEVNULL,
        ) as web:
            assert web.ready is not None
            web_port = int(web.ready[1])
            # Control: the service is up and reachable on the LAN (from the router)...
            assert await netns.can_connect_async(t, "router", t.addr("inside"), web_port)
            # ... but the public host cannot open a connection to it (no route into the private network).
            refused = await netns.probe_async(t, "public", t.addr("inside"), web_port)
            assert not refused.ok and "unreachable" in refused.reply.lower(), refused

            async with t.serve(
                "public",
                [*CLI, *with_test_tls(["server", "--listen", "0.0.0.0:0", "--allow-ports", "8000-8999"])],
                ready=r"^listening 0\.0\.0\.0:(\d+)$",
                env=env,
                stderr=server_err,
            ) as server:
                assert server.ready is not None
                link_port = int(server.ready[1])
                async with t.serve(
                    "inside",
                    [
                        *CLI,
                        *with_test_tls(
                            [
                                "client",
                                "--server",
                                f"{public}:{link_port}",
                                "--name",
                                "home",
                                "-R",
                                f"web=0.0.0.0:{PUBLIC_PORT}:127.0.0.1:{web_port}",
                            ]
                        ),
                    ],
                    ready=rf"^connected {re.escape(public)}:{link_port}$",
                    env=env,
                    stderr=client_err,
                ) as client:
                    await client.expect(rf"^exposed web 0\.0\.0\.0:{PUBLIC_PORT}$")

                    # The user, outside, fetches the inside's page from the server's public port.
                    for address in (public_outside, public):
                        done = await t.run_process(
                            "outside",
                            [sys.executable, "-c", FETCH, f"http://{address}:{PUBLIC_PORT}/index.html"],
                            capture_stdout=True,
                            capture_stderr=True,
                            check=False,
                        )
                        assert done.returncode == 0, done.stderr.decode(errors="replace")
                        assert done.stdout.decode() == page

                    client.process.send_signal(signal.SIGINT)
                    assert await client.process.wait() == 0
                    await client.expect(r"^disconnected shutting down$")
                server.process.send_signal(signal.SIGINT)
                assert await server.process.wait() == 0
            # Even with an explicit route into the private network through the router, the NAT drops connections
            # from the public side (no port forwarding): only the client's own outbound link gets through.
            t.route("public", "198.18.1.0/24", t.addr("router", "public"))
            dropped = await netns.probe_async(t, "public", t.addr("inside"), web_port, timeout=1.0)
            assert not dropped.ok and "timeout" in dropped.reply.lower(), dropped

    server_text, client_text = server_log.read_text(), client_log.read_text()
    router_wan = t.addr("router", "public")  # 198.18.2.2: where the NAT makes the client's link come from
    user = t.addr("outside")  # 198.18.3.2
    assert re.search(rf"client 'home' connected from {re.escape(router_wan)}:\d+", server_text), server_text
    assert re.search(rf"home/web: {re.escape(user)}:\d+ closed after", server_text), server_text
    # The stream's metadata carries the outside user's address to the client, across the NAT.
    assert re.search(rf"web: {re.escape(user)}:\d+ closed after", client_text), client_text
    assert "Traceback" not in server_text + client_text
