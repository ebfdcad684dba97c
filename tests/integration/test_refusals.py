"""What an operator meets first: a refused -R service is a ``refused NAME REASON`` line (retried when its port is
in use, fatal with exit_on_refusal), the server's --allow-bind, and sd_notify readiness of server and client.

In process (run_server, run_client) on 127.0.0.1, plus the real CLI for the exit status and the flags.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import trio
import trio.testing
from trio_tunnel.client import run_client
from trio_tunnel.config import BindAllowlist
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.refusal import ServiceRefusedError
from tunnel_helpers import (
    LOCALHOST,
    TOKEN_TEXT,
    LogWatch,
    Stdout,
    cli,
    client_config,
    error_lines,
    http_get,
    http_handler,
    logs,
    start_client,
    start_server,
    start_service,
    stdout,
)

__all__ = ["logs", "stdout"]  # fixtures

OTHER_LOOPBACK = "127.0.0.2"
"""A loopback address the test servers do not listen on (Linux routes all of 127/8 to lo)."""


async def test_a_port_in_use_is_refused_then_asked_again_until_it_binds(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, http_handler)
            server = await start_server(nursery)
            (squatter,) = await trio.open_tcp_listeners(0, host=LOCALHOST)
            port = squatter.socket.getsockname()[1]
            client = await start_client(
                nursery, client_config(server.value, f"web={LOCALHOST}:{port}:{LOCALHOST}:{service.port}")
            )
            assert client.value == {}  # started: the link is up, the service is not (yet)
            await stdout.expect("connected .*")
            await stdout.expect("refused web address_in_use")
            await logs.wait_for("the server still refuses to expose web: ADDRESS_IN_USE: cannot listen on")
            await squatter.aclose()
            await stdout.expect(rf"exposed web 127\.0\.0\.1:{port}")
            assert await http_get(port, "/healed") == ("HTTP/1.0 200 OK", b"hello from /healed\n")
            assert len(stdout.matching("refused .*")) == 1  # one line per refusal, not one per retry
            nursery.cancel_scope.cancel()


async def test_a_policy_refusal_is_not_asked_again(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, allow_ports="2000-2001")
            config = client_config(server.value, "web=3000:127.0.0.1:9", "ok=2000:127.0.0.1:9")
            client = await start_client(nursery, config)
            assert set(client.value) == {"ok"}
            assert stdout.matching("refused web prohibited")
            error = logs.matching("the server refused to expose web", logging.ERROR)
            assert error and "port 3000 is not allowed by the server (--allow-ports 2000-2001)" in error[0]
            await trio.testing.wait_all_tasks_blocked()
            assert not logs.matching("asking the server again")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("squat", [False, True], ids=["prohibited", "address in use"])
async def test_exit_on_refusal_ends_the_run(stdout: Stdout, squat: bool) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, allow_ports="1024-65535" if squat else "2000-2001")
            (squatter,) = await trio.open_tcp_listeners(0, host=LOCALHOST)
            port = squatter.socket.getsockname()[1] if squat else 3000
            config = client_config(server.value, f"web={LOCALHOST}:{port}:127.0.0.1:9", exit_on_refusal=True)
            with pytest.raises(ServiceRefusedError) as info:
                await run_client(config, Shutdown())
            reason = "address_in_use" if squat else "prohibited"
            assert info.value.name == "web"
            assert str(info.value).startswith(f"the server refused the service web ({reason}: ")
            assert stdout.matching(f"refused web {reason}")
            await squatter.aclose()
            nursery.cancel_scope.cancel()


async def test_default_bind_addresses_and_allow_bind(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, http_handler)
            server = await start_server(nursery)
            specs = (
                f"any=0:{LOCALHOST}:{service.port}",  # 0.0.0.0: the wildcard is allowed by default
                f"own={LOCALHOST}:0:{LOCALHOST}:{service.port}",  # the server's --listen address too
                f"other={OTHER_LOOPBACK}:0:{LOCALHOST}:{service.port}",
                f"web:0:{LOCALHOST}:{service.port}",  # ':' where '=' was meant
            )
            client = await start_client(nursery, client_config(server.value, *specs, name="one"))
            assert set(client.value) == {"any", "own"}
            assert stdout.matching("refused other prohibited")
            assert stdout.matching(f"refused {LOCALHOST}:{service.port} prohibited")
            (refusal,) = logs.matching("the server refused to expose other", logging.ERROR)
            assert f"bind address '{OTHER_LOOPBACK}' is not allowed by the server" in refusal
            assert "--allow-bind" in refusal
            (warning,) = logs.matching("looks like a service name", logging.WARNING)
            assert warning.endswith(f"write -R web=0:{LOCALHOST}:{service.port}")
            # The server never resolved 'web': it refused it before binding.
            assert logs.matching("refused to expose .* on 'web': not in --allow-bind", logging.WARNING)

            allowing = await start_server(nursery, allow_bind=BindAllowlist.parse(OTHER_LOOPBACK))
            config = client_config(allowing.value, specs[2], specs[0], name="two")
            client = await start_client(nursery, config)
            assert set(client.value) == {"other"}  # an explicit list replaces the default: 0.0.0.0 is refused now
            public = client.value["other"]
            assert public.host == OTHER_LOOPBACK
            assert await http_get(public.port, "/other", host=OTHER_LOOPBACK) == (
                "HTTP/1.0 200 OK",
                b"hello from /other\n",
            )
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------------------------------
# sd_notify


async def _datagrams(sock: trio.socket.SocketType, into: list[str], changed: list[trio.Event]) -> None:
    while True:
        data = await sock.recv(4096)
        into.append(data.decode())
        changed[0].set()
        changed[0] = trio.Event()


async def _wait_for(datagrams: list[str], changed: list[trio.Event], text: str) -> int:
    """The index of the first datagram equal to ``text``."""
    while text not in datagrams:
        await changed[0].wait()
    return datagrams.index(text)


async def test_server_and_client_notify_readiness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(20):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await sock.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        datagrams: list[str] = []
        changed = [trio.Event()]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_datagrams, sock, datagrams, changed)
            service = await start_service(nursery, http_handler)
            server = await start_server(nursery)
            address = f"{LOCALHOST}:{server.value.port}"
            ready = await _wait_for(datagrams, changed, "READY=1")
            assert datagrams[ready - 1] == f"STATUS=listening {address}"  # READY once it listens, not before

            (squatter,) = await trio.open_tcp_listeners(0, host=LOCALHOST)
            port = squatter.socket.getsockname()[1]
            del datagrams[:]
            specs = (f"a=0:{LOCALHOST}:{service.port}", f"b={LOCALHOST}:{port}:{LOCALHOST}:{service.port}")
            await start_client(nursery, client_config(server.value, *specs))
            await _wait_for(datagrams, changed, "STATUS=refused b address_in_use")
            await trio.testing.wait_all_tasks_blocked()
            assert "READY=1" not in datagrams  # 'a' is exposed, 'b' is not: not ready yet
            assert datagrams[0] == f"STATUS=connected {address}"
            await squatter.aclose()
            ready = await _wait_for(datagrams, changed, "READY=1")
            assert datagrams[ready - 1] == f"STATUS=exposed b {LOCALHOST}:{port}"
            nursery.cancel_scope.cancel()
        sock.close()


# --------------------------------------------------------------------------------------------------------------------
# the CLI


async def test_cli_refused_line_exit_on_refusal_and_allow_bind() -> None:
    env = {"TRIO_TUNNEL_TOKEN": TOKEN_TEXT}
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, http_handler)
            server_args = ["server", "--listen", f"{LOCALHOST}:0", "--allow-bind", OTHER_LOOPBACK]
            async with cli(nursery, *server_args, env=env) as server:
                server_port = (await server.expect(r"listening 127\.0\.0\.1:(\d+)"))[1]
                to = ["--server", f"{LOCALHOST}:{server_port}"]
                spec = f"web={LOCALHOST}:0:{LOCALHOST}:{service.port}"
                async with cli(nursery, "client", *to, "-R", spec, "--exit-on-refusal", env=env) as refused:
                    await refused.expect("refused web prohibited")
                    assert await refused.wait() == 1
                    (line,) = error_lines(refused)
                    assert line.startswith("trio-tunnel: error: the server refused the service web (prohibited: ")
                    assert "--allow-bind" in line
                    assert "Traceback" not in refused.stderr
                spec = f"web={OTHER_LOOPBACK}:0:{LOCALHOST}:{service.port}"
                async with cli(nursery, "client", *to, "-R", spec, "--exit-on-refusal", env=env) as client:
                    port = int((await client.expect(r"exposed web 127\.0\.0\.2:(\d+)"))[1])
                    assert await http_get(port, "/", host=OTHER_LOOPBACK) == ("HTTP/1.0 200 OK", b"hello from /\n")
                    client.interrupt()
                    assert await client.wait() == 0
                server.interrupt()
                assert await server.wait() == 0
            nursery.cancel_scope.cancel()
