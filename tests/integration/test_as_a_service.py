"""The real ``trio-tunnel server`` and ``client`` as systemd runs them (contrib/systemd): readiness and status on
the socket $NOTIFY_SOCKET names (here an abstract ``@`` name the test binds), the key in $STATE_DIRECTORY, and
SIGHUP (the units' ExecReload) that reloads and never ends the server."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import trio
from trio_tunnel.certs import CERT_FILE, fingerprint_of_pem_file
from tunnel_helpers import LOCALHOST, TOKEN_TEXT, cli, http_get, http_handler, start_service


async def _collect(sock: trio.socket.SocketType, into: list[str], changed: list[trio.Event]) -> None:
    while True:
        into.append((await sock.recv(4096)).decode())
        changed[0].set()
        changed[0] = trio.Event()


async def _wait_for(datagrams: list[str], changed: list[trio.Event], text: str) -> int:
    while text not in datagrams:
        await changed[0].wait()
    return datagrams.index(text)


async def test_server_and_client_under_a_service_manager(tmp_path: Path) -> None:
    name = f"trio-tunnel-test-{os.getpid()}-{id(tmp_path)}"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            await sock.bind(b"\0" + name.encode())
            datagrams: list[str] = []
            changed = [trio.Event()]
            nursery.start_soon(_collect, sock, datagrams, changed)
            service = await start_service(nursery, http_handler)
            env = {"TRIO_TUNNEL_TOKEN": TOKEN_TEXT, "NOTIFY_SOCKET": f"@{name}", "STATE_DIRECTORY": str(state)}
            server_args = ["server", "--listen", f"{LOCALHOST}:0"]
            async with cli(nursery, *server_args, env=env, test_tls=False) as server:
                pin = (await server.expect(r"fingerprint (\S+)"))[1]
                assert pin == fingerprint_of_pem_file(state / CERT_FILE)  # the key is in $STATE_DIRECTORY
                port = int((await server.expect(r"listening 127\.0\.0\.1:(\d+)"))[1])
                ready = await _wait_for(datagrams, changed, "READY=1")
                assert datagrams[:ready] == [f"STATUS=fingerprint {pin}", f"STATUS=listening {LOCALHOST}:{port}"]

                server.process.send_signal(signal.SIGHUP)  # systemctl reload
                await server.expect(r"reloaded")  # the same files again: nothing changes, nothing ends

                del datagrams[:]
                client_args = ["client", "--server", f"{LOCALHOST}:{port}", "--server-fingerprint", pin]
                spec = f"web=0:{LOCALHOST}:{service.port}"
                async with cli(nursery, *client_args, "-R", spec, env=env, test_tls=False) as client:
                    public = int((await client.expect(r"exposed web 0\.0\.0\.0:(\d+)"))[1])
                    ready = await _wait_for(datagrams, changed, "READY=1")
                    assert datagrams[ready - 1] == f"STATUS=exposed web 0.0.0.0:{public}"
                    assert await http_get(public, "/") == ("HTTP/1.0 200 OK", b"hello from /\n")
                    client.interrupt()
                    await _wait_for(datagrams, changed, "STOPPING=1")  # the drain has begun
                    assert await client.wait() == 0
                assert server.process.returncode is None  # the SIGHUP did not end it
                server.interrupt()
                assert await server.wait() == 0, server.stderr
            nursery.cancel_scope.cancel()
        sock.close()
