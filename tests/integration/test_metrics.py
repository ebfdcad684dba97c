"""``--metrics`` end to end, in process: a server and a client with the endpoint on, a local echo service, real sockets
on 127.0.0.1. Every scrape is parsed with ``prometheus_client.parser`` (the library checks the format); the numbers
are compared with what the test itself moved.

The endpoint's ports come from the ``metrics HOST:PORT`` stdout lines (the server's first: it is started first).
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import attrs
import pytest
import trio
import tunnel_helpers
from prometheus_client.parser import text_string_to_metric_families
from trio_tunnel import __version__
from trio_tunnel.client import run_client
from trio_tunnel.config import HostPort, LocalSpec, TargetAllowlist, Timeouts
from trio_tunnel.errors import HandshakeError
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.status import Endpoint, fetch_status, render
from tunnel_helpers import (
    CLI,
    LOCALHOST,
    TOKEN_TEXT,
    LogWatch,
    Running,
    Stdout,
    cli,
    client_config,
    hostport,
    http_get,
    logs,
    read_all,
    read_exactly,
    start_client,
    start_server,
    start_service,
    stdout,
)

__all__ = ["logs", "stdout"]  # fixtures, used by name

KiB = 1024
ANY = HostPort(host=LOCALHOST, port=0)
SERVER_TIMEOUTS = Timeouts(handshake=3, connect=5, drain=2)
"""The server's handshake timeout is also the endpoint's time limit per request: short, for the slow-request test."""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(64 * KiB):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


async def scrape(port: int) -> Samples:
    status, body = await http_get(port, "/metrics")
    assert status == "HTTP/1.1 200 OK"
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@attrs.define(eq=False)
class Observed:
    server: Running
    client: Running
    server_metrics: int
    client_metrics: int
    public: int
    echo_port: int


@asynccontextmanager
async def observed(stdout: Stdout, nursery: trio.Nursery, *locals: LocalSpec) -> AsyncIterator[Observed]:
    """A server and a client ("home", service "web" -> echo), both with ``--metrics 127.0.0.1:0``."""
    service = await start_service(nursery, echo)
    targets = TargetAllowlist.parse([f"{LOCALHOST}:{service.port}"])
    server = await start_server(nursery, metrics=ANY, timeouts=SERVER_TIMEOUTS, allow_targets=targets)
    _, server_metrics = hostport(await stdout.expect(r"metrics (\S+)"))
    config = attrs.evolve(client_config(server.value, f"web=0:{LOCALHOST}:{service.port}"), metrics=ANY, locals=locals)
    client = await start_client(nursery, config)
    _, client_metrics = hostport(await stdout.expect(r"metrics (\S+)"))
    yield Observed(server, client, server_metrics, client_metrics, client.value["web"].port, service.port)
    await client.stop()
    await server.stop()
    nursery.cancel_scope.cancel()  # the echo service


async def test_byte_and_stream_counters_are_exact_during_and_after_a_transfer(stdout: Stdout) -> None:
    size = 512 * KiB
    payload = bytes(range(256)) * (size // 256)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, observed(stdout, nursery) as tunnel:
            conn = await trio.open_tcp_stream(LOCALHOST, tunnel.public)
            async with conn:
                await conn.send_all(payload[: size // 2])
                assert await read_exactly(conn, size // 2) == payload[: size // 2]
                for port in (tunnel.server_metrics, tunnel.client_metrics):  # during the transfer
                    during = await scrape(port)
                    web = {"client": "home", "service": "web"}
                    assert value(during, "trio_tunnel_connections_open", **web) == 1
                    assert value(during, "trio_tunnel_bytes_in_total", **web) == size // 2
                    assert value(during, "trio_tunnel_bytes_out_total", **web) == size // 2
                    assert value(during, "trio_tunnel_streams_opened_total", result="ok", **web) == 1
                    assert value(during, "trio_tunnel_sessions_connected") == 1
                await conn.send_all(payload[size // 2 :])
                await conn.send_eof()
                assert await read_all(conn) == payload[size // 2 :]
            for _ in range(2):  # two more, short ones
                conn = await trio.open_tcp_stream(LOCALHOST, tunnel.public)
                async with conn:
                    await conn.send_all(b"ping")
                    await conn.send_eof()
                    assert await read_all(conn) == b"ping"
            for port in (tunnel.server_metrics, tunnel.client_metrics):
                after = await scrape(port)
                assert value(after, "trio_tunnel_bytes_in_total", **web) == size + 8
                assert value(after, "trio_tunnel_bytes_out_total", **web) == size + 8
                assert value(after, "trio_tunnel_streams_opened_total", result="ok", **web) == 3
                assert value(after, "trio_tunnel_session_connects_total", client="home") == 1
                # The link carried it all (framed: a little more than the payload, each way).
                assert value(after, "trio_tunnel_link_bytes_sent_total", client="home") > size
                assert value(after, "trio_tunnel_frames_received_total", client="home") > 0
                assert value(after, "trio_tunnel_link_rtt_seconds", client="home") > 0
                role = "server" if port == tunnel.server_metrics else "client"
                assert value(after, "trio_tunnel_info", role=role, version=__version__) == 1
            client_side = await scrape(tunnel.client_metrics)
            assert ("trio_tunnel_reconnects_total", ()) in client_side


async def test_forwards_and_refusals(stdout: Stdout) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            echo_service = await start_service(nursery, echo)
            targets = TargetAllowlist.parse([f"{LOCALHOST}:{echo_service.port}"])
            server = await start_server(nursery, metrics=ANY, timeouts=SERVER_TIMEOUTS, allow_targets=targets)
            _, server_metrics = hostport(await stdout.expect(r"metrics (\S+)"))
            locals_ = (
                LocalSpec.parse(f"db=0:{LOCALHOST}:{echo_service.port}"),
                LocalSpec.parse(f"denied=0:{LOCALHOST}:1"),
            )
            # "down": exposed, but nothing listens on its local port (port 1 on loopback refuses at once).
            config = attrs.evolve(client_config(server.value, f"down=0:{LOCALHOST}:1"), metrics=ANY, locals=locals_)
            client = await start_client(nursery, config)
            _, client_metrics = hostport(await stdout.expect(r"metrics (\S+)"))
            lines = {m[1]: hostport(m, 2)[1] for m in stdout.matching(r"forwarding (\S+) (\S+)")}
            for port, expected in ((lines["db"], b"hello"), (lines["denied"], b""), (client.value["down"].port, b"")):
                conn = await trio.open_tcp_stream(LOCALHOST, port)
                async with conn:
                    try:
                        await conn.send_all(b"hello")
                        await conn.send_eof()
                        assert await read_all(conn) == expected
                    except trio.BrokenResourceError:
                        assert not expected
            on_server = await scrape(server_metrics)
            on_client = await scrape(client_metrics)
            forward = {"client": "home", "service": "forward"}
            assert value(on_server, "trio_tunnel_streams_opened_total", result="ok", **forward) == 1
            assert value(on_server, "trio_tunnel_streams_opened_total", result="refused", **forward) == 1
            assert value(on_server, "trio_tunnel_bytes_in_total", **forward) == 5
            assert value(on_client, "trio_tunnel_streams_opened_total", result="ok", client="home", service="db") == 1
            assert value(on_client, "trio_tunnel_bytes_out_total", client="home", service="db") == 5
            denied = {"client": "home", "service": "denied", "result": "refused"}
            assert value(on_client, "trio_tunnel_streams_opened_total", **denied) == 1
            down = {"client": "home", "service": "down", "result": "local-connect-failed"}
            assert value(on_server, "trio_tunnel_streams_opened_total", **down) == 1
            assert value(on_client, "trio_tunnel_streams_opened_total", **down) == 1
            status = await fetch_status(Endpoint(LOCALHOST, client_metrics, "test"))
            by_name = {s["name"]: s for s in status["services"]}
            assert "connect" in by_name["down"]["last_error"] and by_name["down"]["target"] == f"{LOCALHOST}:1"
            assert by_name["db"]["kind"] == "forward" and by_name["db"]["public"].endswith(f":{lines['db']}")
            await client.stop()
            await server.stop()
            nursery.cancel_scope.cancel()


async def test_a_wrong_token_moves_the_auth_failure_counter(stdout: Stdout) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, metrics=ANY, timeouts=SERVER_TIMEOUTS)
            _, port = hostport(await stdout.expect(r"metrics (\S+)"))
            before = await scrape(port)
            assert value(before, "trio_tunnel_auth_failures_total", reason="bad-token") == 0
            bad = client_config(server.value, "web=0:127.0.0.1:1", token=b"not-the-token-0123456789")
            with pytest.raises(HandshakeError):
                await run_client(bad, Shutdown())
            after = await scrape(port)
            assert value(after, "trio_tunnel_auth_failures_total", reason="bad-token") == 1
            assert value(after, "trio_tunnel_sessions_connected") == 0
            assert value(after, "trio_tunnel_session_connects_total", client="home") == 0
            await server.stop()


async def test_status_lists_the_live_session_and_its_services_and_renders(stdout: Stdout) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, observed(stdout, nursery) as tunnel:
            status, body = await http_get(tunnel.server_metrics, "/status")
            assert status == "HTTP/1.1 200 OK"
            document = json.loads(body)
            assert document["role"] == "server" and document["trio_tunnel"]
            (session,) = document["sessions"]
            assert session["client"] == "home" and session["address"].startswith(f"{LOCALHOST}:")
            assert session["streams"] == 0 and session["since"] <= document["now"]
            (web,) = document["services"]
            assert (web["client"], web["name"], web["kind"]) == ("home", "web", "expose")
            assert web["public"].endswith(f":{tunnel.public}") and web["open"] == 0
            on_client = await fetch_status(Endpoint(LOCALHOST, tunnel.client_metrics, "test"))
            assert on_client["role"] == "client" and on_client["name"] == "home"
            (web,) = on_client["services"]
            assert web["target"] == f"{LOCALHOST}:{tunnel.echo_port}"
            table = render(document)
            assert "home" in table and "web" in table and f":{tunnel.public}" in table
            # The real command, in a subprocess, against the endpoint of this process.
            url = f"http://{LOCALHOST}:{tunnel.server_metrics}"
            shown = await trio.run_process([*CLI, "status", url], capture_stdout=True, capture_stderr=True)
            out = shown.stdout.decode()
            assert shown.returncode == 0 and "CLIENT" in out and "home" in out and f":{tunnel.public}" in out, out
            raw = await trio.run_process([*CLI, "status", url, "--json"], capture_stdout=True)
            assert json.loads(raw.stdout)["sessions"][0]["client"] == "home"


async def test_unknown_paths_get_404_and_the_dashboard_is_served(stdout: Stdout) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await start_server(nursery, metrics=ANY, timeouts=SERVER_TIMEOUTS)
            _, port = hostport(await stdout.expect(r"metrics (\S+)"))
            for path in ("/nope", "/metrics/x", "/status.json", "/../etc/passwd"):
                status, _ = await http_get(port, path)
                assert status == "HTTP/1.1 404 Not Found", path
            status, body = await http_get(port, "/")
            assert status == "HTTP/1.1 200 OK" and b"<title>trio-tunnel</title>" in body
            assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")  # no external asset
            nursery.cancel_scope.cancel()


async def _dropped(stream: trio.SocketStream) -> bool:
    """True once the endpoint closed ``stream`` without an answer (EOF or a reset)."""
    try:
        return await stream.receive_some(4096) == b""
    except trio.BrokenResourceError:
        return True


async def test_a_slow_or_oversized_request_is_dropped_without_hurting_the_tunnel(stdout: Stdout) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, observed(stdout, nursery) as tunnel:
            slow = await trio.open_tcp_stream(LOCALHOST, tunnel.server_metrics)
            await slow.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # ... and nothing more
            big = await trio.open_tcp_stream(LOCALHOST, tunnel.server_metrics)
            with trio.move_on_after(5):  # the endpoint stops reading after 4 KiB: our send may block, then fail
                with suppress(trio.BrokenResourceError):
                    await big.send_all(b"GET /metrics HTTP/1.1\r\n" + b"X-Padding: " + b"a" * 64 * KiB)
            assert await _dropped(big)
            # While the slow one is held, the tunnel carries data and the endpoint answers others.
            conn = await trio.open_tcp_stream(LOCALHOST, tunnel.public)
            async with conn:
                await conn.send_all(b"still here")
                await conn.send_eof()
                assert await read_all(conn) == b"still here"
            samples = await scrape(tunnel.server_metrics)
            assert value(samples, "trio_tunnel_bytes_in_total", client="home", service="web") == 10
            started = trio.current_time()
            assert await _dropped(slow)  # after the handshake timeout (3 s), not before
            assert trio.current_time() - started < SERVER_TIMEOUTS.handshake + 2
            await slow.aclose()
            await big.aclose()


async def test_a_busy_metrics_port_is_one_readable_line() -> None:
    with trio.fail_after(60):
        taken = trio.socket.socket()
        with taken:
            await taken.bind((LOCALHOST, 0))
            taken.listen()
            port = taken.getsockname()[1]
            argv = [*CLI, "server", "--insecure-no-auth", "--state-dir", tunnel_helpers.test_identity()[0]]
            argv += ["--listen", f"{LOCALHOST}:0", "--metrics", f"{LOCALHOST}:{port}"]
            result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        err = result.stderr.decode()
        assert result.returncode == 1, err
        assert f"cannot listen on {LOCALHOST}:{port} for --metrics: " in err and "Traceback" not in err


async def test_status_watch_redraws_with_rates_until_ctrl_c(stdout: Stdout) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, observed(stdout, nursery) as tunnel:
            url = f"http://{LOCALHOST}:{tunnel.server_metrics}"
            async with cli(nursery, "status", url, "--watch") as watch:
                await watch.expect(r"home +127\.0\.0\.1:\d+ .* - *")  # the first frame: no rate yet
                await watch.expect(r"home +127\.0\.0\.1:\d+ .* B/s")  # the next: a rate from two documents
                watch.interrupt()
                assert await watch.wait() == 0, watch.stderr
                assert "Traceback" not in watch.stderr
            nursery.cancel_scope.cancel()


async def test_status_of_nothing_is_one_readable_line() -> None:
    with trio.fail_after(60):
        sock = trio.socket.socket()
        with sock:
            await sock.bind((LOCALHOST, 0))
            port = sock.getsockname()[1]
        result = await trio.run_process(
            [*CLI, "status", f"http://{LOCALHOST}:{port}"], capture_stdout=True, capture_stderr=True, check=False
        )
        err = result.stderr.decode().splitlines()
        assert result.returncode == 1
        assert len(err) == 1 and err[0].startswith(f"trio-tunnel: error: nothing answers at http://{LOCALHOST}:{port}")


async def test_disconnects_are_counted_by_reason(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            timeouts = attrs.evolve(SERVER_TIMEOUTS, takeover_probe=0.5)
            server = await start_server(nursery, metrics=ANY, timeouts=timeouts)
            _, port = hostport(await stdout.expect(r"metrics (\S+)"))
            first = await start_client(nursery, client_config(server.value, f"web=0:{LOCALHOST}:1"))
            await first.stop()  # a graceful goodbye: GOAWAY(SHUTTING_DOWN)
            await logs.wait_for(r"client 'home' from \S+ disconnected", logger="trio_tunnel.server")
            # A second client of that name is frozen (SIGSTOP: its link goes stale), so a third takes the name over
            # after the server's probe goes unanswered: the older link is "replaced". (A live one keeps its name.)
            args = ["client", "--server", f"{LOCALHOST}:{server.value.port}", "--token", TOKEN_TEXT, "--name", "home"]
            async with cli(nursery, *args, "-R", f"web=0:{LOCALHOST}:1") as second:
                await second.expect(r"exposed web \S+")
                second.process.send_signal(signal.SIGSTOP)
                try:
                    third = await start_client(nursery, client_config(server.value, f"web=0:{LOCALHOST}:1"))
                    await logs.wait_for(r"disconnected: replaced by a new link", logger="trio_tunnel.server")
                    samples = await scrape(port)
                finally:
                    second.process.send_signal(signal.SIGCONT)
                assert (
                    value(samples, "trio_tunnel_session_disconnects_total", client="home", reason="shutting_down") == 1
                )
                assert value(samples, "trio_tunnel_session_disconnects_total", client="home", reason="replaced") == 1
                assert value(samples, "trio_tunnel_session_connects_total", client="home") == 3
                assert value(samples, "trio_tunnel_sessions_connected") == 1
                second.process.kill()
                await second.wait()
            await third.stop()
            await server.stop()
