"""SIGHUP reloads of the real ``trio-tunnel client --config`` and ``trio-tunnel server --config`` (subprocesses on
127.0.0.1): services and forwards change on the live link while a transfer goes on, a broken config changes
nothing, a removed token drops exactly its client, and a port no longer allowed is released."""

from __future__ import annotations

import hashlib
import random
import signal
from pathlib import Path

import trio
from tunnel_helpers import (
    LOCALHOST,
    TOKEN_TEXT,
    Cli,
    Handler,
    cli,
    error_lines,
    free_port,
    http_get,
    http_handler,
    is_listening,
    read_all,
    start_service,
)

ENV = {"TRIO_TUNNEL_TOKEN": TOKEN_TEXT}
HOSTPORT = r"127\.0\.0\.1:(\d+)"
MIB = 1 << 20


def client_toml(server_port: int, services: dict[str, tuple[int, int]], forwards: dict[str, str] | None = None) -> str:
    """A ``[client]`` config: ``services`` maps NAME -> (local port, remote port); ``forwards`` NAME -> listen."""
    lines = ["[client]", f'server = "{LOCALHOST}:{server_port}"', 'name = "home"']
    for name, (local, remote) in services.items():
        lines += [f"[client.expose.{name}]", f'local = "{LOCALHOST}:{local}"', f"remote_port = {remote}"]
        lines.append(f'bind = "{LOCALHOST}"')
    for name, listen in (forwards or {}).items():
        lines += [f"[client.forward.{name}]", f'listen = "{listen}"', f'target = "{LOCALHOST}:9"']
    return "\n".join(lines) + "\n"


def server_toml(tokens: list[str], allow_ports: str, listen: str = f"{LOCALHOST}:0") -> str:
    quoted = ", ".join(f'"{token}"' for token in tokens)
    return f'[server]\nlisten = "{listen}"\ntokens = [{quoted}]\nallow_ports = "{allow_ports}"\n'


async def digest_handler(stream: trio.SocketStream) -> None:
    """Reads everything, then answers ``BYTES SHA256HEX``."""
    async with stream:
        digest, count = hashlib.sha256(), 0
        while data := await stream.receive_some(1 << 16):
            digest.update(data)
            count += len(data)
        await stream.send_all(f"{count} {digest.hexdigest()}\n".encode())


def tagged(tag: bytes) -> Handler:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(tag)

    return handler


async def fetch(port: int) -> bytes:
    stream = await trio.open_tcp_stream(LOCALHOST, port)
    async with stream:
        return await read_all(stream)


async def reload(proc: Cli) -> list[str]:
    """SIGHUP, then the stdout lines up to and including ``reloaded`` or ``reload-failed ...``."""
    start = proc.out.cursor
    proc.process.send_signal(signal.SIGHUP)
    await proc.expect(r"reloaded|reload-failed .+")
    return proc.out.lines[start : proc.out.cursor]


async def exposed(proc: Cli, count: int) -> dict[str, int]:
    ports = {}
    for _ in range(count):
        match = await proc.expect(rf"exposed (\S+) {HOSTPORT}")
        ports[match[1]] = int(match[2])
    return ports


async def test_services_change_on_sighup_while_a_50_mib_transfer_goes_on(tmp_path: Path) -> None:
    payload = random.Random(14).randbytes(50 * MIB)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            sink = await start_service(nursery, digest_handler)
            web = await start_service(nursery, http_handler)
            one = await start_service(nursery, tagged(b"one"))
            two = await start_service(nursery, tagged(b"two"))
            args = ["server", "--listen", f"{LOCALHOST}:0", "--allow-ports", "1024-65535"]
            async with cli(nursery, *args, env=ENV) as server:
                server_port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
                config = tmp_path / "client.toml"
                config.write_text(
                    client_toml(server_port, {"a": (sink.port, 0), "c": (web.port, 0), "d": (one.port, 0)})
                )
                async with cli(nursery, "client", "--config", str(config), env=ENV) as client:
                    ports = await exposed(client, 3)
                    assert await fetch(ports["d"]) == b"one"

                    stream = await trio.open_tcp_stream(LOCALHOST, ports["a"])
                    sent_10 = trio.Event()
                    reloaded = trio.Event()

                    async def upload() -> None:
                        for offset in range(0, len(payload), MIB):
                            if offset == 10 * MIB:
                                sent_10.set()
                            if offset == 25 * MIB:
                                await reloaded.wait()  # the transfer spans the reload, whatever the speeds
                            await stream.send_all(payload[offset : offset + MIB])
                        await stream.send_eof()

                    nursery.start_soon(upload)
                    await sent_10.wait()
                    d_port = await free_port()
                    config.write_text(
                        client_toml(server_port, {"a": (sink.port, 0), "b": (web.port, 0), "d": (two.port, d_port)})
                    )
                    lines = await reload(client)
                    reloaded.set()
                    assert lines[-1] == "reloaded", (lines, client.stderr)
                    b_port = int(lines[-2].rpartition(":")[2])
                    assert lines == [
                        "unexposed c",
                        "unexposed d",
                        f"exposed d {LOCALHOST}:{d_port}",
                        f"exposed b {LOCALHOST}:{b_port}",
                        "reloaded",
                    ]
                    assert not await is_listening(ports["c"]), "a removed service's port is released"
                    assert not await is_listening(ports["d"]), "a changed service's old port is released"
                    assert await fetch(d_port) == b"two"
                    assert await http_get(b_port, "/b") == ("HTTP/1.0 200 OK", b"hello from /b\n")

                    answer = (await read_all(stream)).decode()
                    await stream.aclose()
                    assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n"
                    assert not any(line.startswith("disconnected") for line in client.out.lines), client.out.lines
                    assert client.out.lines.count(f"connected {LOCALHOST}:{server_port}") == 1, "one link throughout"
                    client.interrupt()
                    assert await client.wait() == 0, client.stderr
                server.interrupt()
                assert await server.wait() == 0, server.stderr
            nursery.cancel_scope.cancel()


async def test_a_reload_that_fails_changes_nothing(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            web = await start_service(nursery, http_handler)
            args = ["server", "--listen", f"{LOCALHOST}:0", "--allow-ports", "1024-65535"]
            async with cli(nursery, *args, env=ENV) as server:
                server_port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
                config = tmp_path / "client.toml"
                good = client_toml(server_port, {"a": (web.port, 0)}, {"f": f"{LOCALHOST}:0"})
                config.write_text(good)
                async with cli(nursery, "client", "--config", str(config), env=ENV) as client:
                    forward = int((await client.expect(rf"forwarding f {HOSTPORT}"))[1])
                    a_port = (await exposed(client, 1))["a"]

                    assert await reload(client) == ["reloaded"], "an unchanged file reloads to no change"

                    config.write_text(good + "[client.expose.b\n")
                    (line,) = await reload(client)
                    assert line.startswith(f"reload-failed {config}:"), line

                    config.write_text(good.replace("remote_port", "remote_prot"))
                    assert await reload(client) == [
                        f"reload-failed {config}: client.expose.a.remote_prot: unknown key; did you mean 'remote_port'?"
                    ]

                    # A port taken here: the new forward g cannot listen, and service b is not exposed either.
                    config.write_text(
                        client_toml(
                            server_port,
                            {"a": (web.port, 0), "b": (web.port, 0)},
                            {"f": f"{LOCALHOST}:0", "g": f"{LOCALHOST}:{forward}"},
                        )
                    )
                    (line,) = await reload(client)
                    assert line.startswith(f"reload-failed forward g: cannot listen on {LOCALHOST}:{forward}"), line

                    # A port the server does not allow: b, exposed first, is released again.
                    config.write_text(
                        client_toml(server_port, {"a": (web.port, 0), "b": (web.port, 0), "z": (web.port, 80)})
                    )
                    lines = await reload(client)
                    b_port = int(lines[0].rpartition(":")[2])
                    assert lines[:2] == [f"exposed b {LOCALHOST}:{b_port}", "unexposed b"], lines
                    assert lines[2].startswith("reload-failed the server refused to expose z: "), lines
                    assert "port 80 is not allowed by the server" in lines[2], lines
                    assert len(lines) == 3
                    assert not await is_listening(b_port)

                    # Everything still runs on the first link, with the first config.
                    assert await http_get(a_port, "/a") == ("HTTP/1.0 200 OK", b"hello from /a\n")
                    assert await is_listening(forward)
                    assert client.out.lines.count(f"connected {LOCALHOST}:{server_port}") == 1
                    assert not any(line.startswith("disconnected") for line in client.out.lines)
                    assert client.process.returncode is None and not error_lines(client), client.stderr
                    assert "Traceback" not in client.stderr
                    client.interrupt()
                    assert await client.wait() == 0, client.stderr
                server.interrupt()
                assert await server.wait() == 0, server.stderr
            nursery.cancel_scope.cancel()


OTHER_TOKEN = "second-client-token-0123456789abcdef"


async def test_server_reload_drops_exactly_the_client_whose_token_was_removed(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            web = await start_service(nursery, http_handler)
            config = tmp_path / "server.toml"
            config.write_text(server_toml([TOKEN_TEXT, OTHER_TOKEN], "1024-65535"))
            async with cli(nursery, "server", "--config", str(config)) as server:
                server_port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
                flags = ["--server", f"{LOCALHOST}:{server_port}", "-R", f"web={LOCALHOST}:0:{LOCALHOST}:{web.port}"]
                async with (
                    cli(nursery, "client", *flags, "--name", "kept", env=ENV) as kept,
                    cli(
                        nursery, "client", *flags, "--name", "dropped", env={"TRIO_TUNNEL_TOKEN": OTHER_TOKEN}
                    ) as dropped,
                ):
                    kept_port = (await exposed(kept, 1))["web"]
                    dropped_port = (await exposed(dropped, 1))["web"]
                    # Without --config, SIGHUP reads the same command line again: nothing changes.
                    assert await reload(kept) == ["reloaded"]

                    config.write_text(server_toml([TOKEN_TEXT], "1024-65535"))
                    assert await reload(server) == ["reloaded"]
                    reason = (await dropped.expect(r"disconnected (.+)"))[1]
                    assert "no longer accepts this client's token" in reason, reason
                    assert await dropped.wait() == 1, "reconnecting with the removed token is refused: it stops"
                    (line,) = error_lines(dropped)
                    assert "token" in line, line
                    assert not await is_listening(dropped_port)

                    assert await http_get(kept_port, "/kept") == ("HTTP/1.0 200 OK", b"hello from /kept\n")
                    assert not any(line.startswith("disconnected") for line in kept.out.lines), kept.out.lines
                    kept.interrupt()
                    assert await kept.wait() == 0, kept.stderr
                server.interrupt()
                assert await server.wait() == 0, server.stderr
            nursery.cancel_scope.cancel()


async def test_server_reload_releases_a_port_no_longer_allowed_and_refuses_what_needs_a_restart(
    tmp_path: Path,
) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            web = await start_service(nursery, http_handler)
            config = tmp_path / "server.toml"
            config.write_text(server_toml([TOKEN_TEXT], "1024-65535"))
            async with cli(nursery, "server", "--config", str(config)) as server:
                server_port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
                x_port, y_port = await free_port(), await free_port()
                flags = ["--server", f"{LOCALHOST}:{server_port}", "--name", "home"]
                for name, port in (("x", x_port), ("y", y_port)):
                    flags += ["-R", f"{name}={LOCALHOST}:{port}:{LOCALHOST}:{web.port}"]
                async with cli(nursery, "client", *flags, env=ENV) as client:
                    assert await exposed(client, 2) == {"x": x_port, "y": y_port}

                    config.write_text(server_toml([TOKEN_TEXT], "1024-65535") + "[server.bogus]\n")
                    (line,) = await reload(server)
                    assert line.startswith(f"reload-failed {config}: server.bogus"), line
                    config.write_text(server_toml([TOKEN_TEXT], "1024-65535", listen=f"{LOCALHOST}:{server_port}"))
                    (line,) = await reload(server)
                    assert line.startswith("reload-failed listen cannot change on a reload"), line
                    assert await is_listening(x_port) and await is_listening(y_port)

                    config.write_text(server_toml([TOKEN_TEXT], str(y_port)))
                    assert await reload(server) == ["reloaded"]
                    await server.expect_stderr(f"released x on port {x_port}: the port is no longer allowed")
                    assert not await is_listening(x_port)
                    await client.expect("unexposed x")  # the server tells the client
                    await client.expect_stderr(f"the server released x: port {x_port} is no longer allowed")
                    assert await http_get(y_port, "/y") == ("HTTP/1.0 200 OK", b"hello from /y\n")
                    assert not any(line.startswith("disconnected") for line in client.out.lines)
                    client.interrupt()
                    assert await client.wait() == 0, client.stderr
                server.interrupt()
                assert await server.wait() == 0, server.stderr
            nursery.cancel_scope.cancel()


async def test_forwards_change_on_sighup_and_a_new_name_makes_a_new_link(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            web = await start_service(nursery, http_handler)
            args = ["server", "--listen", f"{LOCALHOST}:0", "--allow-target", f"{LOCALHOST}:{web.port}"]
            async with cli(nursery, *args, env=ENV) as server:
                server_port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
                config = tmp_path / "client.toml"
                forwards = {"f": f"{LOCALHOST}:0", "g": f"{LOCALHOST}:0"}
                config.write_text(client_toml(server_port, {}, forwards).replace(":9", f":{web.port}"))
                async with cli(nursery, "client", "--config", str(config), env=ENV) as client:
                    ports = {}
                    for _ in range(2):
                        match = await client.expect(rf"forwarding (\S+) {HOSTPORT}")
                        ports[match[1]] = int(match[2])
                    await client.expect(rf"connected {LOCALHOST}:{server_port}")
                    assert await http_get(ports["g"], "/g") == ("HTTP/1.0 200 OK", b"hello from /g\n")

                    forwards = {"f": f"{LOCALHOST}:{ports['f']}", "h": f"{LOCALHOST}:0"}
                    config.write_text(client_toml(server_port, {}, forwards).replace(":9", f":{web.port}"))
                    lines = await reload(client)
                    assert len(lines) == 3, (lines, client.stderr)
                    h_port = int(lines[1].rpartition(":")[2])
                    assert lines == ["unforwarded g", f"forwarding h {LOCALHOST}:{h_port}", "reloaded"]
                    assert not await is_listening(ports["g"])
                    assert await http_get(h_port, "/h") == ("HTTP/1.0 200 OK", b"hello from /h\n")
                    assert await http_get(ports["f"], "/f") == ("HTTP/1.0 200 OK", b"hello from /f\n")
                    assert not any(line.startswith("disconnected") for line in client.out.lines)

                    # The client's name defines the link: a new one reconnects (the forwards keep their ports).
                    config.write_text(config.read_text().replace('name = "home"', 'name = "renamed"'))
                    client.process.send_signal(signal.SIGHUP)
                    await client.expect("reloaded")
                    await client.expect("disconnected reconnecting with a new configuration")
                    await client.expect(rf"connected {LOCALHOST}:{server_port}")
                    await server.expect_stderr("client 'renamed' connected")
                    assert await http_get(h_port, "/renamed") == ("HTTP/1.0 200 OK", b"hello from /renamed\n")
                    client.interrupt()
                    assert await client.wait() == 0, client.stderr
                server.interrupt()
                assert await server.wait() == 0, server.stderr
            nursery.cancel_scope.cancel()


async def test_a_new_server_address_is_dialled_at_once_even_during_a_long_backoff(tmp_path: Path) -> None:
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            web = await start_service(nursery, http_handler)
            args = ["server", "--listen", f"{LOCALHOST}:0", "--allow-ports", "1024-65535"]
            async with cli(nursery, *args, env=ENV) as server:
                server_port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
                config = tmp_path / "client.toml"
                # Nobody listens at the first address; a minute between attempts.
                slow = "[client.timeouts]\nreconnect_initial = 60\nreconnect_max = 60\n"
                text = client_toml(await free_port(), {"a": (web.port, 0)}).replace(
                    "\n[client.expose", f"\n{slow}[client.expose", 1
                )
                config.write_text(text)
                async with cli(nursery, "client", "--config", str(config), env=ENV) as client:
                    await client.expect_stderr("reconnecting to .* in")
                    config.write_text(
                        client_toml(server_port, {"a": (web.port, 0)}).replace(
                            "\n[client.expose", f"\n{slow}[client.expose", 1
                        )
                    )
                    assert await reload(client) == ["reloaded"]
                    await client.expect(rf"connected {LOCALHOST}:{server_port}")
                    a_port = (await exposed(client, 1))["a"]
                    assert await http_get(a_port, "/a") == ("HTTP/1.0 200 OK", b"hello from /a\n")
                    client.interrupt()
                    assert await client.wait() == 0, client.stderr
                server.interrupt()
                assert await server.wait() == 0, server.stderr
            nursery.cancel_scope.cancel()


async def test_server_reload_applies_new_handshake_caps(tmp_path: Path) -> None:
    """max_handshakes_per_ip read again on SIGHUP: a third stranger from one address is closed at once under a cap of
    2, and kept (in the handshake, until its timeout) once the reloaded cap is 4."""
    from test_handshake_caps import closed_by_server, idle_connection, still_open

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            config = tmp_path / "server.toml"
            caps = "max_handshakes = 64\nmax_handshakes_per_ip = {}\n"
            config.write_text(server_toml([TOKEN_TEXT], "1024-65535") + caps.format(2))
            async with cli(nursery, "server", "--config", str(config)) as server:
                port = int((await server.expect(rf"listening {HOSTPORT}"))[1])
                held = [await idle_connection(port, "127.0.0.2") for _ in range(2)]
                surplus = await idle_connection(port, "127.0.0.2")
                with trio.fail_after(5):  # the handshake timeout is 10 s: only the cap closes it this soon
                    assert await closed_by_server(surplus)
                config.write_text(server_toml([TOKEN_TEXT], "1024-65535") + caps.format(4))
                assert await reload(server) == ["reloaded"]
                third = await idle_connection(port, "127.0.0.2")
                with trio.move_on_after(1):  # under the old cap it would be closed within milliseconds
                    await closed_by_server(third)
                assert await still_open(third)
                for sock in (*held, surplus, third):
                    sock.close()
                server.interrupt()
                assert await server.wait() == 0, server.stderr
            nursery.cancel_scope.cancel()
