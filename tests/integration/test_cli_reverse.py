"""The real ``trio-tunnel server`` and ``trio-tunnel client -R`` as subprocesses (``python -m trio_tunnel``), driven
through their stdout lifecycle lines, signals and exit codes, on 127.0.0.1."""

from __future__ import annotations

import re
import subprocess

import pytest
import trio
from tunnel_helpers import (
    CLI,
    LOCALHOST,
    TOKEN_TEXT,
    cli,
    error_lines,
    free_port,
    http_get,
    http_handler,
    is_listening,
    start_service,
)

ENV = {"TRIO_TUNNEL_TOKEN": TOKEN_TEXT}
HOSTPORT = r"127\.0\.0\.1:(\d+)"


@pytest.mark.parametrize("first", ["client", "server"], ids=["client stops first", "server stops first"])
async def test_server_and_client_expose_a_service_then_stop_on_sigint(first: str) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, http_handler)
            async with cli(
                nursery, "server", "--listen", f"{LOCALHOST}:0", "--allow-ports", "1024-65535", env=ENV
            ) as server:
                server_port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
                async with cli(
                    nursery,
                    "client",
                    "--server",
                    f"{LOCALHOST}:{server_port}",
                    "--name",
                    "home",
                    "-R",
                    f"web={LOCALHOST}:0:{LOCALHOST}:{service.port}",
                    "-R",
                    f"{LOCALHOST}:0:{LOCALHOST}:{service.port}",
                    env=ENV,
                ) as client:
                    assert int((await client.expect(rf"connected {HOSTPORT}"))[1]) == server_port
                    web = int((await client.expect(rf"exposed web {HOSTPORT}"))[1])
                    # An unnamed -R is named after its target.
                    other = int((await client.expect(rf"exposed 127\.0\.0\.1:{service.port} {HOSTPORT}"))[1])
                    assert await http_get(web, "/cli") == ("HTTP/1.0 200 OK", b"hello from /cli\n")
                    assert await http_get(other, "/other") == ("HTTP/1.0 200 OK", b"hello from /other\n")

                    if first == "client":
                        client.interrupt()
                        assert (await client.expect(r"disconnected (.+)"))[1] == "shutting down"
                        assert await client.wait() == 0, client.stderr
                        assert not await is_listening(web), "the server must release the client's ports"
                    else:
                        server.interrupt()
                        assert await server.wait() == 0, server.stderr
                        # The client says why, and stays up (it reconnects until it is told to stop).
                        reason = (await client.expect(r"disconnected (.+)"))[1]
                        assert reason == "the server is shutting down"
                        assert client.process.returncode is None
                        client.interrupt()
                        assert await client.wait() == 0, client.stderr
                    assert client.out.lines == [
                        f"connected {LOCALHOST}:{server_port}",
                        f"exposed web {LOCALHOST}:{web}",
                        f"exposed {LOCALHOST}:{service.port} {LOCALHOST}:{other}",
                        f"disconnected {'shutting down' if first == 'client' else 'the server is shutting down'}",
                    ], "stdout carries lifecycle lines only"
                    assert "Traceback" not in client.stderr and not error_lines(client), client.stderr
                if first == "client":
                    server.interrupt()
                    assert await server.wait() == 0, server.stderr
                    assert re.search(
                        r"client 'home' from \S+ disconnected: the client is shutting down", server.stderr
                    ), server.stderr
                assert server.out.lines[1:] == [f"listening {LOCALHOST}:{server_port}"]
                assert server.out.lines[0].startswith("fingerprint sha256:")
                assert "Traceback" not in server.stderr and not error_lines(server), server.stderr
            assert not await is_listening(server_port)
            await service.stop()


@pytest.mark.parametrize("token", ["wrong-token-0123456789abcdef", None], ids=["wrong token", "no token"])
@pytest.mark.parametrize("quiet", [False, True], ids=["default", "-qq"])
async def test_refused_client_exits_1_with_one_readable_line(token: str | None, quiet: bool) -> None:
    with trio.fail_after(20):
        async with (
            trio.open_nursery() as nursery,
            cli(nursery, "server", "--listen", f"{LOCALHOST}:0", env=ENV) as server,
        ):
            server_port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
            public = await free_port()
            args = ["client", "--server", f"{LOCALHOST}:{server_port}", "-R", f"web={LOCALHOST}:{public}:{LOCALHOST}:9"]
            env = {"TRIO_TUNNEL_TOKEN": token} if token else {}
            async with cli(nursery, *args, *(["-qq"] if quiet else []), env=env) as client:
                assert await client.wait() == 1, client.stderr
            errors = error_lines(client)
            assert len(errors) == 1, client.stderr
            assert errors[0].startswith("trio-tunnel: error: the server refused the session: ")
            assert "token" in errors[0] and "TRIO_TUNNEL_TOKEN" in errors[0], errors[0]
            assert "Traceback" not in client.stderr
            if quiet:
                assert client.stderr.splitlines() == errors
            assert not client.out.lines, "no lifecycle line: nothing connected, nothing exposed"
            assert not await is_listening(public)
            server.interrupt()
            assert await server.wait() == 0
            assert re.search(r"WARNING trio_tunnel\.server: refused a client from 127\.0\.0\.1:\d+: ", server.stderr)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ((), ["examples:", "trio-tunnel client --server", "-R web=9000:127.0.0.1:80"]),
        (("server",), ["examples:", "--allow-ports 9000-9010", "--token-file"]),
        (("client",), ["examples:", "-R web=9000:127.0.0.1:80", "-R 0:localhost:8080", "exposed NAME HOST:PORT"]),
    ],
)
def test_help_has_examples(command: tuple[str, ...], expected: list[str]) -> None:
    done = subprocess.run(
        [*CLI, *command, "--help"], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stderr
    for text in expected:
        assert text in done.stdout, (text, done.stdout)
    assert done.stderr == ""
