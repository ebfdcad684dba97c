"""Load-balancing groups end to end, in process: several clients expose a service in one group and share its public
port; connections are spread over the live members, move at once when a member dies, and a client with another
token cannot join."""

from __future__ import annotations

import signal
from typing import Any

import attrs
import trio
from trio_tunnel.config import RemoteSpec
from tunnel_helpers import (
    LOCALHOST,
    TOKEN,
    LogWatch,
    Running,
    Stdout,
    client_config,
    is_listening,
    logs,
    read_all,
    start_client,
    start_server,
    start_service,
    stdout,
)

__all__ = ["logs", "stdout"]  # fixtures, used by name

OTHER_TOKEN = b"another-token-for-a-stranger-0123456789"


def named_handler(name: bytes) -> Any:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(name)

    return handler


async def fetch(port: int) -> bytes:
    stream = await trio.open_tcp_stream(LOCALHOST, port)
    async with stream:
        return await read_all(stream)


async def member(
    nursery: trio.Nursery, server: Running, name: str, spec: str, *, token: bytes = TOKEN, **spec_fields: Any
) -> Running:
    config = client_config(server.value, name=name, token=token)
    remote = RemoteSpec.parse(spec, **spec_fields)
    return await start_client(nursery, attrs.evolve(config, remotes=(remote,)))


async def test_three_members_share_a_port_and_fail_over(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery)
            services = {}
            clients = {}
            public = 0
            for name in ("a", "b", "c"):
                services[name] = await start_service(nursery, named_handler(name.encode()))
                clients[name] = await member(
                    nursery, server, name, f"web@pool={LOCALHOST}:{public}:{LOCALHOST}:{services[name].port}"
                )
                port = clients[name].value["web"].port
                public = public or port
                assert port == public  # every member got the group's port (the first asked for 0)
            await logs.wait_for("group pool: c/web joined on .* \\(3 members: a/web, b/web, c/web\\)")

            answers = [await fetch(public) for _ in range(300)]
            counts = {name: answers.count(name.encode()) for name in services}
            assert all(80 <= count <= 120 for count in counts.values()), counts  # within +-20%
            assert sum(counts.values()) == 300

            await clients["b"].kill()  # its link dies; the next connections must all land on a and c
            before = services["b"].accepted
            answers = [await fetch(public) for _ in range(100)]
            assert set(answers) <= {b"a", b"c"} and len(answers) == 100, set(answers)
            assert services["b"].accepted == before
            assert 40 <= answers.count(b"a") <= 60

            await clients["a"].kill()
            assert {await fetch(public) for _ in range(10)} == {b"c"}  # the port stays bound while a member remains
            await clients["c"].stop()
            await logs.wait_for("group pool: c/web left, the last member; released")
            assert not await is_listening(public)
            nursery.cancel_scope.cancel()


async def test_a_client_with_another_token_cannot_join(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, tokens=(TOKEN, OTHER_TOKEN))
            service = await start_service(nursery, named_handler(b"owner"))
            owner = await member(nursery, server, "owner", f"web@pool={LOCALHOST}:0:{LOCALHOST}:{service.port}")
            public = owner.value["web"].port
            stranger_service = await start_service(nursery, named_handler(b"stranger"))
            stranger = await member(
                nursery,
                server,
                "stranger",
                f"web@pool={LOCALHOST}:{public}:{LOCALHOST}:{stranger_service.port}",
                token=OTHER_TOKEN,
            )
            assert stranger.value == {}  # nothing exposed
            refusal = await logs.wait_for("the server refused to expose web", logger="trio_tunnel.client")
            assert "group 'pool' belongs to clients with another token" in refusal and "GROUP_TOKEN" in refusal
            assert {await fetch(public) for _ in range(6)} == {b"owner"}

            # Same token, other settings: a readable GROUP_MISMATCH.
            third = await member(nursery, server, "third", f"web@pool={LOCALHOST}:0:{LOCALHOST}:{service.port}")
            assert third.value["web"].port == public  # port 0 joins the group's port
            fourth = await member(
                nursery,
                server,
                "fourth",
                f"web@pool={LOCALHOST}:0:{LOCALHOST}:{service.port}",
                balance="least-connections",
            )
            assert fourth.value == {}
            await logs.wait_for("group 'pool' balances round-robin, not least-connections", logger="trio_tunnel.client")
            nursery.cancel_scope.cancel()


async def test_a_member_whose_service_is_down_passes_its_connections_on(stdout: Stdout, logs: LogWatch) -> None:
    """A member whose local service refuses (its client is up, its dial fails) is not the end of a connection:
    nothing of it was read yet, so the server opens it on the next member."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery)
            down = await start_service(nursery, named_handler(b"never"))
            await down.stop()  # its port now refuses
            up = await start_service(nursery, named_handler(b"up"))
            first = await member(nursery, server, "down", f"web@pool={LOCALHOST}:0:{LOCALHOST}:{down.port}")
            public = first.value["web"].port
            await member(nursery, server, "up", f"web@pool={LOCALHOST}:0:{LOCALHOST}:{up.port}")
            assert [await fetch(public) for _ in range(6)] == [b"up"] * 6
            await logs.wait_for("group pool: down/web could not take a connection .*connection refused")
            nursery.cancel_scope.cancel()


async def test_cli_group_survives_a_killed_client() -> None:
    """Through the real CLI: two clients share a port with ``-R web@pool=...``; one is killed (SIGKILL: no GOAWAY,
    the kernel just closes its socket) and every following connection lands on the other."""
    from tunnel_helpers import TOKEN_TEXT, cli, hostport

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            token = {"TRIO_TUNNEL_TOKEN": TOKEN_TEXT}
            service_a = await start_service(nursery, named_handler(b"a"))
            service_b = await start_service(nursery, named_handler(b"b"))
            async with cli(nursery, "server", "--listen", f"{LOCALHOST}:0", env=token) as server:
                _, port = hostport(await server.expect(r"listening (\S+)"))
                base = ["client", "--server", f"{LOCALHOST}:{port}"]
                spec = f"web@pool={LOCALHOST}:0:{LOCALHOST}:"
                async with (
                    cli(nursery, *base, "--name", "a", "-R", spec + str(service_a.port), env=token) as a,
                    cli(nursery, *base, "--name", "b", "-R", spec + str(service_b.port), env=token) as b,
                ):
                    _, public = hostport(await a.expect(r"exposed web (\S+)"))
                    assert hostport(await b.expect(r"exposed web (\S+)"))[1] == public
                    assert sorted([await fetch(public) for _ in range(10)]) == [b"a"] * 5 + [b"b"] * 5
                    b.process.kill()
                    await b.wait()
                    assert [await fetch(public) for _ in range(20)] == [b"a"] * 20
                    a.interrupt()
                    assert await a.wait() == 0
                server.interrupt()
                assert await server.wait() == 0
            nursery.cancel_scope.cancel()


async def test_a_reload_that_removes_a_group_member_leaves_the_group(tmp_path: Any) -> None:
    """A client whose SIGHUP removes its group service leaves the group (``unexposed web``, ``reloaded``): the port
    stays bound for the other member, which now gets every connection."""
    from tunnel_helpers import TOKEN_TEXT, cli, hostport

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            token = {"TRIO_TUNNEL_TOKEN": TOKEN_TEXT}
            service_a = await start_service(nursery, named_handler(b"a"))
            service_b = await start_service(nursery, named_handler(b"b"))
            async with cli(nursery, "server", "--listen", f"{LOCALHOST}:0", env=token) as server:
                _, port = hostport(await server.expect(r"listening (\S+)"))
                head = f'[client]\nserver = "{LOCALHOST}:{port}"\nname = "b"\n'
                head += f'[client.expose.solo]\nlocal = "{LOCALHOST}:{service_b.port}"\nremote_port = 0\n'
                service = (
                    f'[client.expose.web]\nlocal = "{LOCALHOST}:{service_b.port}"\nremote_port = 0\ngroup = "pool"\n'
                )
                config = tmp_path / "b.toml"
                config.write_text(head + service)
                base = ["client", "--server", f"{LOCALHOST}:{port}"]
                spec = f"web@pool=0:{LOCALHOST}:{service_a.port}"
                async with (
                    cli(nursery, *base, "--name", "a", "-R", spec, env=token) as a,
                    cli(nursery, "client", "--config", str(config), env=token) as b,
                ):
                    _, public = hostport(await a.expect(r"exposed web (\S+)"))
                    await b.expect(r"exposed solo \S+")  # (a client needs a service: this one stays)
                    assert hostport(await b.expect(r"exposed web (\S+)"))[1] == public
                    assert sorted([await fetch(public) for _ in range(4)]) == [b"a", b"a", b"b", b"b"]
                    config.write_text(head)
                    start = b.out.cursor
                    b.process.send_signal(signal.SIGHUP)
                    await b.expect(r"reloaded|reload-failed .+")
                    assert b.out.lines[start : b.out.cursor] == ["unexposed web", "reloaded"]
                    assert [await fetch(public) for _ in range(6)] == [b"a"] * 6
                    assert await is_listening(public)
                    for proc in (a, b):
                        proc.interrupt()
                        assert await proc.wait() == 0, proc.stderr
                server.interrupt()
                assert await server.wait() == 0
            nursery.cancel_scope.cancel()
