"""The seed's situation in network namespaces: A reaches B, B reaches C, A cannot reach C.

C runs a service; the installed ``trio-tunnel`` gets A to it in both forms the issue asks for:

1. ``trio-tunnel map`` on B (the standalone relay, the seed's job);
2. ``trio-tunnel server`` on B (with ``--allow-target`` for C's service) and ``trio-tunnel client -L`` on A.

Each test checks, in the same topology, that A cannot reach C's service directly. Needs root and ``ip netns``;
skipped otherwise. The namespaces (and every process in them) are removed when the test ends.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from tunnel_helpers import with_test_tls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (not a package)
import netns
from netns import Topology

pytestmark = pytest.mark.netns

TRIO_TUNNEL = Path(sys.executable).with_name("trio-tunnel")
TOKEN = "abc-topology-token-0123456789abcdef"
DIRECT_TIMEOUT = 1.0  # B drops what it would have to forward: a direct attempt fails by timing out
PAYLOAD_SIZE = 4 * 1024 * 1024

# C's service: for each connection, read until EOF, answer "PEER_IP SHA256HEX" and close.
SERVICE_SRC = (
    "import hashlib,signal,socket,sys\n"
    "signal.alarm(120)\n"
    "s=socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(16)\n"
    "print('ready', s.getsockname()[1], flush=True)\n"
    "while True:\n"
    "    c, peer = s.accept()\n"
    "    c.settimeout(20); h = hashlib.sha256()\n"
    "    while data := c.recv(1 << 16):\n"
    "        h.update(data)\n"
    "    c.sendall(f'{peer[0]} {h.hexdigest()}'.encode()); c.close()\n"
)

# A's client: connect, send SIZE seeded random bytes, half-close, print "SENT_SHA REPLY".
CLIENT_SRC = (
    "import hashlib,random,socket,sys\n"
    "host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
    "data = random.Random(size).randbytes(size)\n"
    "s = socket.create_connection((host, port), timeout=10)\n"
    "s.sendall(data); s.shutdown(socket.SHUT_WR)\n"
    "reply = b''\n"
    "while chunk := s.recv(4096):\n"
    "    reply += chunk\n"
    "print(hashlib.sha256(data).hexdigest(), reply.decode())\n"
)


@pytest.fixture
def abc() -> Iterator[Topology]:
    with netns.abc_topology() as topo:
        yield topo


async def through(topo: Topology, host: str, port: int) -> tuple[str, str, str]:
    """From A, send PAYLOAD_SIZE bytes to ``host:port``; returns (sha sent, peer C saw, sha C got)."""
    cp = await topo.run_process(
        "A",
        [sys.executable, "-c", CLIENT_SRC, host, str(port), str(PAYLOAD_SIZE)],
        capture_stdout=True,
        capture_stderr=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert cp.returncode == 0, cp.stderr.decode()
    sent, peer, got = cp.stdout.decode().split()
    return sent, peer, got


async def assert_separated(topo: Topology, service_port: int) -> None:
    """A cannot reach C's service directly; B can (so the service is up and only the topology keeps A out)."""
    assert await netns.can_connect_async(topo, "B", topo.addr("C"), service_port)
    direct = await netns.probe_async(topo, "A", topo.addr("C"), service_port, timeout=DIRECT_TIMEOUT)
    assert not direct.ok, direct


async def test_a_reaches_c_through_map_on_b(abc: Topology, tmp_path: Path) -> None:
    t = abc
    with (tmp_path / "map.stderr").open("wb") as map_stderr, trio.fail_after(60):
        async with t.serve("C", [sys.executable, "-c", SERVICE_SRC], ready=r"^ready (\d+)$") as service:
            assert service.ready is not None
            c_port = int(service.ready[1])
            await assert_separated(t, c_port)

            # on B: listen on its A-side address, relay to C's service
            argv = [str(TRIO_TUNNEL), "map", f"{t.addr('B', 'A')}:0", f"{t.addr('C')}:{c_port}"]
            async with t.serve("B", argv, ready=r"^listening (\S+):(\d+)$", stderr=map_stderr) as mapper:
                assert mapper.ready is not None
                assert mapper.ready[1] == t.addr("B", "A")
                b_port = int(mapper.ready[2])

                sent, peer, got = await through(t, t.addr("B", "A"), b_port)
                assert got == sent  # C received exactly what A sent (SHA-256)
                assert peer == t.addr("B", "C")  # ... from B: the relay dialled it

                mapper.process.send_signal(signal.SIGINT)
                assert await mapper.process.wait() == 0
            # the relay did not open a way to C: still no direct path
            await assert_separated(t, c_port)
    log = (tmp_path / "map.stderr").read_text()
    assert f"-> {t.addr('C')}:{c_port}: closed after" in log, log
    assert f"up {PAYLOAD_SIZE} bytes (eof)" in log, log


async def test_a_reaches_c_through_server_on_b_and_client_on_a(abc: Topology, tmp_path: Path) -> None:
    t = abc
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    with (
        (tmp_path / "server.stderr").open("wb") as server_stderr,
        (tmp_path / "client.stderr").open("wb") as client_stderr,
        trio.fail_after(60),
    ):
        async with t.serve("C", [sys.executable, "-c", SERVICE_SRC], ready=r"^ready (\d+)$") as service:
            assert service.ready is not None
            c_port = int(service.ready[1])
            await assert_separated(t, c_port)

            server_argv = ["server", "--listen", f"{t.addr('B', 'A')}:0", "--token-file", str(token)]
            server_argv = [str(TRIO_TUNNEL), *with_test_tls(server_argv), "--allow-target", f"{t.addr('C')}:{c_port}"]
            async with t.serve("B", server_argv, ready=r"^listening (\S+):(\d+)$", stderr=server_stderr) as server:
                assert server.ready is not None
                link = f"{server.ready[1]}:{server.ready[2]}"
                assert server.ready[1] == t.addr("B", "A")

                client_argv = [
                    str(TRIO_TUNNEL),
                    *with_test_tls(["client", "--server", link, "--token-file", str(token)]),
                ]
                client_argv += ["--name", "A", "-L", f"c=127.0.0.1:0:{t.addr('C')}:{c_port}"]
                # not allowed by the server: B itself (reachable from B, but not in --allow-target)
                client_argv += ["-L", f"b=127.0.0.1:0:{t.addr('B', 'C')}:{c_port}"]
                ready = r"^forwarding c 127\.0\.0\.1:(\d+)$"
                async with t.serve("A", client_argv, ready=ready, stderr=client_stderr) as client:
                    assert client.ready is not None
                    local_port = int(client.ready[1])
                    b_port = int((await client.expect(r"^forwarding b 127\.0\.0\.1:(\d+)$"))[1])
                    await client.expect(rf"^connected {link}$")

                    sent, peer, got = await through(t, "127.0.0.1", local_port)  # A's own loopback
                    assert got == sent
                    assert peer == t.addr("B", "C")  # the server on B dialled C

                    refused = await netns.probe_async(t, "A", "127.0.0.1", b_port, read=True)
                    assert refused.ok and refused.reply == "", refused  # accepted locally, then closed: no data

                    client.process.send_signal(signal.SIGINT)
                    assert await client.process.wait() == 0
                server.process.send_signal(signal.SIGINT)
                assert await server.process.wait() == 0
            await assert_separated(t, c_port)
    client_log = (tmp_path / "client.stderr").read_text()
    server_log = (tmp_path / "server.stderr").read_text()
    assert "is not allowed by the server" in client_log, client_log
    assert f"refused forward to {t.addr('B', 'C')}:{c_port}" in server_log, server_log
    assert f"-> {t.addr('C')}:{c_port} closed after" in server_log, server_log
    reply = len(f"{t.addr('B', 'C')} ") + 64  # "PEER_IP SHA256HEX"
    assert f"out {PAYLOAD_SIZE} bytes, back {reply} bytes" in server_log, server_log
