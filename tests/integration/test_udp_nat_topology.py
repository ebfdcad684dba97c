"""A UDP service behind a real NAT, reached from outside through ``-R .../udp``, in network namespaces this test
creates (root only; skipped otherwise), as in test_nat_topology.py:

    inside (UDP echo + trio-tunnel client) -- router (masquerade) -- public (trio-tunnel server) -- outside (user)
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
import trio
from tunnel_helpers import with_test_tls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (not a package)
import netns
from netns import Topology

nat_topo = netns.nat_topo  # a fresh NAT topology per test

pytestmark = pytest.mark.netns

CLI = [sys.executable, "-m", "trio_tunnel.cli"]
TOKEN = "nat-udp-test-token-0123456789abcdef"
PUBLIC_PORT = 5353
ECHO = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('0.0.0.0', 0))\n"
    "print('port', s.getsockname()[1], flush=True)\n"
    "while True:\n"
    "    data, peer = s.recvfrom(65536)\n"
    "    s.sendto(b'echo:' + data, peer)\n"
)
ASK = (  # send a datagram until an answer comes (at most 5 tries, 1 s apart); print the answer
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.settimeout(1.0)\n"
    "for _ in range(int(sys.argv[4])):\n"
    "    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))\n"
    "    try:\n"
    "        print(s.recvfrom(65536)[0].decode()); sys.exit(0)\n"
    "    except socket.timeout:\n"
    "        pass\n"
    "sys.exit(1)\n"
)


async def ask(t: Topology, host: str, address: str, port: int, text: str, tries: int = 5) -> tuple[int, str]:
    done = await t.run_process(
        host, [sys.executable, "-c", ASK, address, str(port), text, str(tries)], capture_stdout=True, check=False
    )
    return done.returncode, done.stdout.decode().strip()


async def test_udp_service_behind_nat_reached_from_outside(nat_topo: Topology, tmp_path: Path) -> None:
    t = nat_topo
    env = {**os.environ, "TRIO_TUNNEL_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    server_log, client_log = tmp_path / "server.log", tmp_path / "client.log"
    public = t.addr("public", "router")
    public_outside = t.addr("public", "outside")
    with trio.fail_after(60), server_log.open("w") as server_err, client_log.open("w") as client_err:
        async with t.serve("inside", [sys.executable, "-u", "-c", ECHO], ready=r"port (\d+)") as echo:
            assert echo.ready is not None
            echo_port = int(echo.ready[1])
            # Control: the echo answers on the LAN, but the outside cannot reach it (one try: no answer).
            assert await ask(t, "router", t.addr("inside"), echo_port, "lan") == (0, "echo:lan")
            assert (await ask(t, "outside", t.addr("inside"), echo_port, "direct", tries=1))[0] == 1

            server_argv = ["server", "--listen", "0.0.0.0:0", "--allow-ports", f"8000-8999,{PUBLIC_PORT}/udp"]
            async with t.serve(
                "public",
                [*CLI, *with_test_tls(server_argv)],
                ready=r"^listening 0\.0\.0\.0:(\d+)$",
                env=env,
                stderr=server_err,
            ) as server:
                assert server.ready is not None
                link_port = int(server.ready[1])
                client_argv = ["client", "--server", f"{public}:{link_port}", "--name", "home"]
                client_argv += ["-R", f"echo=0.0.0.0:{PUBLIC_PORT}:127.0.0.1:{echo_port}/udp"]
                async with t.serve(
                    "inside",
                    [*CLI, *with_test_tls(client_argv)],
                    ready=rf"^connected {re.escape(public)}:{link_port}$",
                    env=env,
                    stderr=client_err,
                ) as client:
                    await client.expect(rf"^exposed echo 0\.0\.0\.0:{PUBLIC_PORT}/udp$")
                    for address in (public_outside, public):
                        assert await ask(t, "outside", address, PUBLIC_PORT, f"hi {address}") == (
                            0,
                            f"echo:hi {address}",
                        )
                    client.process.send_signal(signal.SIGINT)
                    assert await client.process.wait() == 0
                server.process.send_signal(signal.SIGINT)
                assert await server.process.wait() == 0

    server_text, client_text = server_log.read_text(), client_log.read_text()
    user = t.addr("outside")
    # Each outside source is one flow; the server names it (its address crossed nothing but the server).
    assert re.search(rf"home/echo: udp {re.escape(user)}:\d+ closed after .* in 1 datagrams", server_text), server_text
    # The flow's metadata carries the outside user's address to the client, across the NAT.
    assert re.search(rf"echo: udp {re.escape(user)}:\d+ closed after", client_text), client_text
    assert "Traceback" not in server_text + client_text
