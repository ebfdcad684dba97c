"""``trio-tunnel server --workers 2``: real processes on loopback (tunnel/workers.py).

Which worker accepts a link is the kernel's choice (SO_REUSEPORT hashes the connection's addresses), so a test that
needs a link on a given worker connects clients until one lands there: each attempt has a one-in-two chance, and
every test is bounded by its ``fail_after``. Which worker holds a client comes from the parent's ``/status``
(each session says its ``worker``)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_tunnel.client import run_client
from trio_tunnel.config import HostPort
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.status import fetch_status, parse_url
from trio_tunnel.workers import MAX_START_FAILURES
from tunnel_helpers import (
    LOCALHOST,
    TOKEN_TEXT,
    Cli,
    Running,
    Stdout,
    cli,
    client_config,
    exchange,
    free_port,
    is_listening,
    proxy_to,
    start_client,
    start_service,
    stdout,
)

__all__ = ["stdout"]  # (a fixture)


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


@asynccontextmanager
async def workers(
    nursery: trio.Nursery, tmp_path: Path, *extra: str, timeouts: str = ""
) -> AsyncIterator[tuple[Cli, HostPort, str]]:
    """A ``server --workers 2`` with a short takeover probe; its link address and its ``--metrics`` address."""
    config = tmp_path / "server.toml"
    config.write_text("[server]\n[server.timeouts]\ntakeover_probe = 0.5\ndrain = 2\n" + timeouts)
    args = ["server", "--listen", "127.0.0.1:0", "--token", TOKEN_TEXT, "--workers", "2", "--metrics", "0"]
    async with cli(nursery, *args, "--config", str(config), *extra) as server:
        await server.expect(r"fingerprint sha256:\S+")
        listening = await server.expect(r"listening 127\.0\.0\.1:(\d+)")
        metrics = await server.expect(r"metrics (127\.0\.0\.1:\d+)")
        yield server, HostPort(host=LOCALHOST, port=int(listening[1])), metrics[1]


async def status(metrics: str) -> dict[str, Any]:
    return await fetch_status(parse_url(metrics))


async def worker_of(metrics: str, name: str) -> int:
    sessions = [s for s in (await status(metrics))["sessions"] if s["client"] == name]
    assert len(sessions) == 1, sessions
    return int(sessions[0]["worker"])


async def spread(nursery: trio.Nursery, server: HostPort, metrics: str, port: int) -> dict[str, Running]:
    """Clients c0, c1, ... (each exposing ``port`` on a public port 0) until both workers hold at least two."""
    clients: dict[str, Running] = {}
    held = {0: 0, 1: 0}
    while min(held.values()) < 2:
        name = f"c{len(clients)}"
        clients[name] = await start_client(
            nursery, client_config(server, f"web=127.0.0.1:0:127.0.0.1:{port}", name=name)
        )
        held[await worker_of(metrics, name)] += 1
    return clients


async def test_links_on_both_workers_with_one_status_and_one_metrics(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, echo)
            async with workers(nursery, tmp_path) as (server, address, metrics):
                clients = await spread(nursery, address, metrics, service.port)
                for name, client in clients.items():
                    assert await exchange(client.value["web"].port, name.encode() * 1000) == name.encode() * 1000
                document = await status(metrics)
                assert sorted(s["client"] for s in document["sessions"]) == sorted(clients)
                assert {s["worker"] for s in document["sessions"]} == {0, 1}
                assert sorted(s["client"] for s in document["services"]) == sorted(clients)
                assert [w["ready"] for w in document["workers"]] == [True, True]
                host, _, port = metrics.rpartition(":")
                stream = await trio.open_tcp_stream(host, int(port))
                async with stream:
                    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    body = bytearray()
                    while data := await stream.receive_some():
                        body += data
                text = body.decode()
                assert 'trio_tunnel_info{role="server",version=' in text and text.count("trio_tunnel_info{") == 1
                assert re.search(r"trio_tunnel_info\{[^}]*\} 1\.0\n", text)  # not summed over the workers
                assert "trio_tunnel_workers 2.0" in text
                assert f"trio_tunnel_sessions_connected {float(len(clients))}" in text
                for name in clients:
                    assert f'trio_tunnel_session_connects_total{{client="{name}"}} 1.0' in text
                render = await trio.run_process(
                    [*server.argv[:3], "status", metrics], capture_stdout=True, capture_stderr=True
                )
                assert render.returncode == 0
                assert f"{len(clients)} sessions, {len(clients)} services" in render.stdout.decode()
                for client in clients.values():
                    await client.stop()
                server.process.send_signal(signal.SIGTERM)
                assert await server.wait() == 0
                assert "server stopped" in server.stderr
            service.scope.cancel()


async def test_a_live_holder_on_one_worker_keeps_its_name_against_a_newcomer_on_the_other(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, echo)
            async with workers(nursery, tmp_path) as (server, address, metrics):
                holder = await start_client(
                    nursery, client_config(address, f"web=127.0.0.1:0:127.0.0.1:{service.port}", name="dup")
                )
                owner = await worker_of(metrics, "dup")
                newcomer = Shutdown(drain_timeout=1)
                config = client_config(address, f"web=127.0.0.1:0:127.0.0.1:{service.port}", name="dup")
                nursery.start_soon(run_client, config, newcomer)
                # the newcomer retries with backoff; each retry is a new connection, so one lands on the other worker
                refused = await server.expect_stderr(
                    rf"server\[worker {1 - owner}\]: refused client 'dup' from \S+: the name 'dup' is in use by a "
                    r"live client connected from 127\.0\.0\.1:\d+"
                )
                assert refused
                assert await exchange(holder.value["web"].port, b"still mine") == b"still mine"
                assert await worker_of(metrics, "dup") == owner
                newcomer.request()
                await holder.stop()
                server.process.send_signal(signal.SIGTERM)
                assert await server.wait() == 0
            service.scope.cancel()


async def test_a_stale_holder_is_replaced_across_workers_and_the_newcomer_keeps_its_port(tmp_path: Path) -> None:
    """The holder's link goes through a proxy that is then frozen (a NAT that forgot it). The newcomer takes the
    name over; when it lands on the other worker (tried until it does), the owner probes, cancels its stale link
    and releases its port, and the newcomer gets the same public port (the parent remembers it)."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, echo)
            spec = f"web=127.0.0.1:0:127.0.0.1:{service.port}"
            async with workers(nursery, tmp_path) as (server, address, metrics), proxy_to(address.port) as proxy:
                crossed = False
                for round_ in range(20):
                    name = f"stale{round_}"
                    holder = await start_client(
                        nursery, client_config(HostPort(host=LOCALHOST, port=proxy.port), spec, name=name)
                    )
                    port = holder.value["web"].port
                    owner = await worker_of(metrics, name)
                    assert proxy.freeze() == 1
                    newcomer = await start_client(nursery, client_config(address, spec, name=name))
                    assert newcomer.value["web"].port == port
                    assert await exchange(port, b"the newcomer's") == b"the newcomer's"
                    crossed = await worker_of(metrics, name) != owner
                    await holder.kill()
                    await newcomer.stop()
                    if crossed:
                        break
                assert crossed
                moved = await server.expect_stderr(rf"client '{name}' moves from worker {owner} to worker {1 - owner}")
                assert moved
                server.process.send_signal(signal.SIGTERM)
                assert await server.wait() == 0
            service.scope.cancel()


async def test_a_public_port_held_on_one_worker_is_refused_on_the_other(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, echo)
            async with workers(nursery, tmp_path) as (server, address, metrics):
                port = await free_port()
                spec = f"web=127.0.0.1:{port}:127.0.0.1:{service.port}"
                owner = await start_client(nursery, client_config(address, spec, name="owner"))
                holder_worker = await worker_of(metrics, "owner")
                for attempt in range(20):
                    name = f"other{attempt}"
                    async with cli(
                        nursery, "client", "--server", str(address), "--token", TOKEN_TEXT, "--name", name, "-R", spec
                    ) as other:
                        await other.expect(r"refused web address_in_use")
                        elsewhere = await worker_of(metrics, name) != holder_worker
                        other.interrupt()
                        await other.wait()
                    if elsewhere:
                        break
                assert elsewhere
                assert await exchange(port, b"owner's") == b"owner's"
                await owner.stop()
                server.process.send_signal(signal.SIGTERM)
                assert await server.wait() == 0
            service.scope.cancel()


async def crash(server: Any, metrics: Any, stdout: Stdout, victim: int, seen: set[str]) -> int:
    """SIGKILL worker ``victim``; return once it is back (a pid not in ``seen``, which gets it) and the clients it
    held have exposed their services again (on whichever worker). Returns the killed pid."""
    document = await status(metrics)
    hit = [s["client"] for s in document["sessions"] if s["worker"] == victim]
    pid = int(document["workers"][victim]["pid"])
    exposed = len(stdout.matching(r"exposed web \S+"))
    os.kill(pid, signal.SIGKILL)
    await server.expect_stderr(rf"worker {victim} \(pid {pid}\) exited unexpectedly \(signal 9\)")
    seen.add(str(pid))
    fresh = await server.expect_stderr(rf"worker {victim} \(pid (?!(?:{'|'.join(seen)})\))(\d+)\) ready")
    seen.add(fresh[1])
    while len(stdout.matching(r"exposed web \S+")) < exposed + len(hit):  # they reconnected
        await stdout._changed.wait()
    return pid


async def test_a_killed_worker_is_restarted_and_its_clients_come_back_on_their_ports(
    tmp_path: Path, stdout: Stdout
) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, echo)
            async with workers(nursery, tmp_path) as (server, address, metrics):
                clients = await spread(nursery, address, metrics, service.port)
                document = await status(metrics)
                victim = document["sessions"][0]["worker"]
                seen = {str(w["pid"]) for w in document["workers"]}
                killed = await crash(server, metrics, stdout, victim, seen)
                for name, client in clients.items():
                    assert await exchange(client.value["web"].port, name.encode()) == name.encode()
                document = await status(metrics)
                assert document["workers"][victim]["pid"] != killed
                assert sorted(s["client"] for s in document["sessions"]) == sorted(clients)
                for _ in range(MAX_START_FAILURES):  # crashes after it was ready are not failures to start
                    await crash(server, metrics, stdout, victim, seen)
                for name, client in clients.items():
                    assert await exchange(client.value["web"].port, name.encode()) == name.encode()
                for client in clients.values():
                    await client.stop()
                server.process.send_signal(signal.SIGTERM)
                assert await server.wait() == 0
            service.scope.cancel()


async def test_sighup_reloads_every_worker_and_a_bad_reload_changes_nothing(tmp_path: Path, stdout: Stdout) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, echo)
            async with workers(nursery, tmp_path) as (server, address, metrics):
                clients = await spread(nursery, address, metrics, service.port)
                config = tmp_path / "server.toml"
                config.write_text("[server]\nmax_clients = 0\n")
                server.process.send_signal(signal.SIGHUP)
                failed = await server.expect(r"reload-failed (.*)")
                assert "max_clients" in failed[1]
                for client in clients.values():  # nothing changed
                    assert await exchange(client.value["web"].port, b"x") == b"x"
                config.write_text('[server]\nallow_ports = "20000-20010"\n')  # every public port of theirs is out
                server.process.send_signal(signal.SIGHUP)
                await server.expect("reloaded")
                for client in clients.values():  # released by the worker that holds it, whichever it is
                    assert not await is_listening(client.value["web"].port)
                for client in clients.values():
                    await client.kill()
                server.process.send_signal(signal.SIGTERM)
                assert await server.wait() == 0
            service.scope.cancel()


async def test_groups_are_refused_with_several_workers(tmp_path: Path, stdout: Stdout) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, echo)
            async with workers(nursery, tmp_path) as (server, address, _metrics):
                shutdown = Shutdown(drain_timeout=1)
                spec = f"web@pool=127.0.0.1:0:127.0.0.1:{service.port}"
                nursery.start_soon(run_client, client_config(address, spec, name="grouped"), shutdown)
                await stdout.expect(r"refused web prohibited")
                shutdown.request()
                server.process.send_signal(signal.SIGTERM)
                assert await server.wait() == 0
            service.scope.cancel()


@pytest.mark.parametrize(
    ("args", "config", "expected"),
    [
        (["--workers", "0"], None, "--workers: expected an integer >= 1 or 'auto' (one per core), got '0'"),
        (["--workers", "many"], None, "--workers: expected an integer >= 1 or 'auto' (one per core), got 'many'"),
        ([], 'workers = "x"\n', "workers: expected an integer count >= 1 or \"auto\" (one per core), got 'x'"),
        ([], "workers = 0\n", "workers: expected an integer count >= 1"),
    ],
)
async def test_a_bad_worker_count_is_one_readable_line(
    tmp_path: Path, args: list[str], config: str | None, expected: str
) -> None:
    extra = []
    if config is not None:
        path = tmp_path / "server.toml"
        path.write_text("[server]\n" + config)
        extra = ["--config", str(path)]
    with trio.fail_after(30):
        async with (
            trio.open_nursery() as nursery,
            cli(nursery, "server", "--token", TOKEN_TEXT, *args, *extra) as server,
        ):
            assert await server.wait() == 2
            errors = [line for line in server.stderr.splitlines() if line.startswith("trio-tunnel: error:")]
            assert len(errors) == 1 and expected in errors[0], server.stderr
            assert "Traceback" not in server.stderr


async def test_a_worker_that_never_starts_ends_the_parent_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, stdout: Stdout
) -> None:
    """A worker that exits before it is ready, MAX_START_FAILURES times in a row, ends the server (exit 1 through
    the CLI) instead of being restarted forever. (/bin/false stands for a worker that cannot start.)"""
    from trio_tunnel import workers as workers_module
    from tunnel_helpers import server_config

    monkeypatch.setattr(workers_module.sys, "executable", "/bin/false")
    config = server_config(workers=2)
    with trio.fail_after(30):
        with pytest.raises(workers_module.WorkerError, match=r"failed to start 3 times in a row \(exit status 1\)"):
            await workers_module.run_workers(config, Shutdown())
    assert stdout.matching(r"fingerprint sha256:\S+") and not stdout.matching(r"listening .*")


async def test_sigterm_before_the_workers_are_ready_still_exits_0(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            args = ["server", "--listen", "127.0.0.1:0", "--token", TOKEN_TEXT, "--workers", "2"]
            async with cli(nursery, *args) as server:
                await server.expect(r"fingerprint sha256:\S+")  # printed before the workers are started
                server.process.send_signal(signal.SIGTERM)
                assert await server.wait() == 0, server.stderr
                assert "server stopped" in server.stderr


async def test_a_hung_owner_keeps_the_name_and_the_newcomer_is_refused_within_the_probe_and_handshake_timeouts(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, echo)
            async with workers(nursery, tmp_path, timeouts="handshake = 3\n") as (server, address, metrics):
                spec = f"web=127.0.0.1:0:127.0.0.1:{service.port}"
                holder = await start_client(nursery, client_config(address, spec, name="dup"))
                document = await status(metrics)
                owner = await worker_of(metrics, "dup")
                pid = document["workers"][owner]["pid"]
                os.kill(pid, signal.SIGSTOP)
                try:
                    newcomer = Shutdown(drain_timeout=1)
                    nursery.start_soon(run_client, client_config(address, spec, name="dup"), newcomer)
                    await server.expect_stderr(rf"worker {owner} did not answer whether 'dup' is stale")
                    await server.expect_stderr(
                        rf"server\[worker {1 - owner}\]: refused client 'dup' .*its server worker does not answer"
                    )
                finally:
                    os.kill(pid, signal.SIGCONT)
                newcomer.request()
                assert await exchange(holder.value["web"].port, b"thawed") == b"thawed"
                await holder.stop()
                server.process.send_signal(signal.SIGTERM)
                assert await server.wait() == 0
            service.scope.cancel()
