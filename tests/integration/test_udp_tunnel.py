"""UDP through the tunnel (``-R .../udp``, ``-L .../udp``, ``map --udp``), end to end on 127.0.0.1 and ::1.

Every public port comes from a stdout lifecycle line; every wait is on a socket, a line or a log record, bounded by
``trio.fail_after``. UDP may lose datagrams, so clients that need an answer retransmit after a while (as DNS
resolvers do); a retransmission is never counted as success unless its own answer comes back.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio
from trio_tunnel.config import BindAllowlist, LocalSpec, RemoteSpec, TargetAllowlist
from tunnel_helpers import (
    LOCALHOST,
    LogWatch,
    Stdout,
    cli,
    client_config,
    hostport,
    logs,
    read_exactly,
    sha256,
    start_client,
    start_server,
    start_service,
    stdout,
)

__all__ = ["logs", "stdout"]  # fixtures, used by name

UDP_PORTS = "1024-65535,1024-65535/udp"


# ------------------------------------------------------------------------------------------------ UDP helpers


@attrs.define(eq=False)
class UdpService:
    """A UDP service on loopback: answers each datagram with ``reply(datagram)``; remembers who sent."""

    sock: trio.socket.SocketType
    reply: Callable[[bytes], bytes | None]
    sources: set[tuple[str, int]] = attrs.field(factory=set)
    received: int = 0

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def serve(self) -> None:
        with self.sock:
            while True:
                data, address = await self.sock.recvfrom(65536)
                self.received += 1
                self.sources.add(address[:2])
                answer = self.reply(data)
                if answer is not None:
                    await self.sock.sendto(answer, address)


async def udp_service(
    nursery: trio.Nursery, reply: Callable[[bytes], bytes | None] = bytes, host: str = LOCALHOST
) -> UdpService:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    await sock.bind((host, 0))
    service = UdpService(sock, reply)
    nursery.start_soon(service.serve)
    return service


async def udp_client(host: str, port: int) -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    await sock.connect((host, port))
    return sock


async def ask(
    sock: trio.socket.SocketType, request: bytes, check: Callable[[bytes], bool], retry: float = 1.0
) -> bytes:
    """Send ``request`` until an answer that ``check`` accepts comes back (answers to earlier tries are skipped)."""
    while True:
        await sock.send(request)
        with trio.move_on_after(retry):
            while True:
                answer = await sock.recv(65536)
                if check(answer):
                    return answer


async def reverse_udp(
    nursery: trio.Nursery,
    out: Stdout,
    service_port: int,
    *,
    spec: str | None = None,
    idle: float | None = None,
    **server: Any,
) -> tuple[Any, Any, tuple[str, int]]:
    """A server and a client exposing the UDP service as ``dns``; returns both and the public address."""
    server.setdefault("allow_ports", UDP_PORTS)
    srv = await start_server(nursery, **server)
    remote = RemoteSpec.parse(spec or f"dns={LOCALHOST}:0:{LOCALHOST}:{service_port}/udp")
    if idle is not None:
        remote = attrs.evolve(remote, idle_timeout=idle)
    config = attrs.evolve(client_config(srv.value), remotes=(remote,))
    client = await start_client(nursery, config)
    match = await out.expect(r"exposed dns (\S+)/udp")
    return srv, client, hostport(match)


# ------------------------------------------------------------------------------------------------------ tests


async def test_udp_echo_twenty_sources_no_cross_talk(stdout: Stdout, logs: LogWatch) -> None:
    """1,000 datagrams of random sizes up to 1,400 bytes from 20 concurrent sources through ``-R .../udp``: every
    source gets back exactly its own payloads (each flow has its own socket to the service)."""
    rng = random.Random(1300)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service = await udp_service(nursery)
            srv, client, (host, port) = await reverse_udp(nursery, stdout, service.port)
            assert client.value["dns"].port == port
            answered: dict[int, int] = {}

            async def source(index: int) -> None:
                sock = await udp_client(host, port)
                with sock:
                    for seq in range(50):
                        size = rng.randint(8, 1400)
                        payload = struct.pack("!II", index, seq) + rng.randbytes(size - 8)
                        answer = await ask(sock, payload, lambda a, p=payload: a[:8] == p[:8])
                        assert answer == payload, f"source {index} got a foreign or damaged datagram"
                        answered[index] = answered.get(index, 0) + 1

            async with trio.open_nursery() as sources:
                for index in range(20):
                    sources.start_soon(source, index)
            assert sum(answered.values()) == 1000 and len(answered) == 20
            # One connected socket per flow on the client side: the service saw 20 distinct sources.
            assert len(service.sources) == 20
            await client.stop()
            await srv.stop()
            nursery.cancel_scope.cancel()


async def test_idle_flow_expires_and_a_new_one_opens(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            service = await udp_service(nursery)
            srv, client, (host, port) = await reverse_udp(nursery, stdout, service.port, idle=0.3)
            sock = await udp_client(host, port)
            assert await ask(sock, b"one", lambda a: a == b"one") == b"one"
            line = await logs.wait_for(r"^home/dns: udp \S+ closed after .* \(idle\): in 1 datagrams")
            assert "out 1 datagrams (3 bytes)" in line
            # The same source again: a new flow, hence a new socket (source port) towards the service.
            assert await ask(sock, b"two", lambda a: a == b"two") == b"two"
            assert len(service.sources) == 2
            await client.stop()
            await srv.stop()
            nursery.cancel_scope.cancel()


async def test_udp_flood_does_not_block_a_tcp_stream_beside_it(stdout: Stdout, logs: LogWatch) -> None:
    """A UDP flood as fast as the sources can send, over the same link as an 8 MiB TCP transfer: the TCP transfer
    completes intact (SHA-256) and UDP still answers afterwards; datagrams the link cannot take are dropped."""
    payload = random.Random(7).randbytes(8 * 1024 * 1024)

    async def sink(stream: trio.SocketStream) -> None:
        digest = hashlib.sha256()
        while data := await stream.receive_some(1 << 16):
            digest.update(data)
        await stream.send_all(digest.digest())
        await stream.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            tcp = await start_service(nursery, sink)
            udp = await udp_service(nursery)
            srv = await start_server(nursery, allow_ports=UDP_PORTS)
            remotes = (
                RemoteSpec.parse(f"dns={LOCALHOST}:0:{LOCALHOST}:{udp.port}/udp"),
                RemoteSpec.parse(f"bulk={LOCALHOST}:0:{LOCALHOST}:{tcp.port}"),
            )
            client = await start_client(nursery, attrs.evolve(client_config(srv.value), remotes=remotes))
            udp_public = client.value["dns"].port
            tcp_public = client.value["bulk"].port
            done = trio.Event()
            flooding = trio.Event()  # the flood is in full swing (the transfer may be over in well under a second)
            sent = 0

            async def flood(index: int) -> None:
                nonlocal sent
                sock = await udp_client(LOCALHOST, udp_public)
                with sock:
                    blob = bytes([index]) * 1400
                    while not done.is_set():
                        await sock.send(blob)  # a checkpoint each: the other tasks run between sends
                        sent += 1
                        if sent == 1000:
                            flooding.set()

            async with trio.open_nursery() as floods:
                for index in range(4):
                    floods.start_soon(flood, index)
                await flooding.wait()
                before = sent
                stream = await trio.open_tcp_stream(LOCALHOST, tcp_public)
                async with stream:
                    await stream.send_all(payload)
                    await stream.send_eof()
                    digest = await read_exactly(stream, 32)
                during = sent - before
                done.set()
            assert digest == sha256(payload)
            assert sent > 1000
            assert during > 0  # the flood went on for the whole transfer
            sock = await udp_client(LOCALHOST, udp_public)
            with sock:
                assert await ask(sock, b"after", lambda a: a == b"after") == b"after"
            await client.stop()
            await srv.stop()
            nursery.cancel_scope.cancel()


def dns_reply(query: bytes) -> bytes | None:
    """A tiny authoritative answer: the query's ID and question, one A record 192.0.2.53 (TTL 60)."""
    if len(query) < 17:
        return None
    ident = query[:2]
    question = query[12:]
    header = ident + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("192.0.2.53")
    return header + question + answer


def dns_query(ident: int, name: str) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)


async def forward_udp(
    nursery: trio.Nursery, out: Stdout, target_port: int, allow: str, host: str = LOCALHOST
) -> tuple[Any, Any, tuple[str, int]]:
    srv = await start_server(nursery, allow_targets=TargetAllowlist.parse(allow))
    bracket = f"[{host}]" if ":" in host else host
    local = LocalSpec.parse(f"resolver={bracket}:0:{bracket}:{target_port}/udp")
    client = await start_client(nursery, attrs.evolve(client_config(srv.value), locals=(local,)))
    return srv, client, hostport(await out.expect(r"forwarding resolver (\S+)/udp"))


async def test_dns_request_response_through_local_forward(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            dns = await udp_service(nursery, dns_reply)
            srv, client, (host, port) = await forward_udp(nursery, stdout, dns.port, f"{LOCALHOST}:{dns.port}/udp")
            sock = await udp_client(host, port)
            for ident in (0x1234, 0xBEEF):
                query = dns_query(ident, "service.example")
                answer = await ask(sock, query, lambda a, i=ident: a[:2] == struct.pack("!H", i))
                assert answer[12 : len(query)] == query[12:]  # the question, echoed
                assert answer.endswith(socket.inet_aton("192.0.2.53"))
                assert struct.unpack("!H", answer[6:8]) == (1,)  # one answer record
            await client.stop()
            await srv.stop()
            nursery.cancel_scope.cancel()


async def test_bare_allow_target_does_not_allow_udp(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            dns = await udp_service(nursery, dns_reply)
            srv, client, (host, port) = await forward_udp(nursery, stdout, dns.port, f"{LOCALHOST}:{dns.port}")
            sock = await udp_client(host, port)
            await sock.send(dns_query(1, "a.example"))
            await logs.wait_for(rf"refused forward to {LOCALHOST}:{dns.port}/udp .*not in --allow-target")
            await logs.wait_for(r"^resolver: udp \S+ closed after .*target \S+/udp is not allowed")
            assert dns.received == 0
            await client.stop()
            await srv.stop()
            nursery.cancel_scope.cancel()


async def test_udp_port_must_be_allowed_as_udp(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, allow_ports="1024-65535")
            remote = RemoteSpec.parse(f"dns={LOCALHOST}:0:{LOCALHOST}:53/udp")
            client = await start_client(nursery, attrs.evolve(client_config(srv.value), remotes=(remote,)))
            assert client.value == {}
            await logs.wait_for(r"refused to expose dns: PROHIBITED: port 0/udp is not allowed by the server")
            await client.stop()
            await srv.stop()


async def test_ipv6_udp_reverse(stdout: Stdout, logs: LogWatch) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            try:
                service = await udp_service(nursery, host="::1")
            except OSError as exc:
                pytest.skip(f"no ::1: {exc}")
            _srv, _client, (host, port) = await reverse_udp(
                nursery,
                stdout,
                service.port,
                spec=f"dns=[::1]:0:[::1]:{service.port}/udp",
                allow_bind=BindAllowlist.parse("::1"),  # the server listens on 127.0.0.1
            )
            assert host.strip("[]") == "::1"
            sock = await udp_client("::1", port)
            assert await ask(sock, b"v6", lambda a: a == b"v6") == b"v6"
            assert next(iter(service.sources))[0] == "::1"
            nursery.cancel_scope.cancel()


async def test_flows_beyond_the_cap_are_dropped_with_one_line(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            service = await udp_service(nursery)
            _srv, _client, (host, port) = await reverse_udp(nursery, stdout, service.port, max_flows_per_service=2)
            held = [await udp_client(host, port) for _ in range(2)]
            for sock in held:
                assert await ask(sock, b"hold", lambda a: a == b"hold") == b"hold"
            extra = [await udp_client(host, port) for _ in range(5)]
            for sock in extra:
                for _ in range(3):
                    await sock.send(b"more")
            await logs.wait_for(r"dropping datagrams from new UDP sources: 2 flows already open")
            # A burst of 15 refused datagrams: one line (further ones wait for a quiet period).
            probe = await udp_client(host, port)
            await probe.send(b"more")
            assert await ask(held[0], b"still", lambda a: a == b"still") == b"still"
            assert len(logs.matching(r"dropping datagrams from new UDP sources")) == 1
            assert service.sources and len(service.sources) == 2
            nursery.cancel_scope.cancel()


async def test_map_udp_cli(stdout: Stdout) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            dns = await udp_service(nursery, dns_reply)
            async with cli(nursery, "map", "--udp", f"{LOCALHOST}:0", f"{LOCALHOST}:{dns.port}") as proc:
                host, port = hostport(await proc.expect(r"listening (\S+)/udp"))
                sock = await udp_client(host, port)
                answer = await ask(sock, dns_query(7, "x.example"), lambda a: a[:2] == b"\x00\x07")
                assert answer.endswith(socket.inet_aton("192.0.2.53"))
                proc.interrupt()
                assert await proc.wait() == 0
            # The /udp suffix on the target means the same.
            async with cli(nursery, "map", f"{LOCALHOST}:0", f"{LOCALHOST}:{dns.port}/udp") as proc:
                host, port = hostport(await proc.expect(r"listening (\S+)/udp"))
                sock = await udp_client(host, port)
                assert (await ask(sock, dns_query(8, "y.example"), lambda a: a[:2] == b"\x00\x08"))[:2] == b"\x00\x08"
                proc.interrupt()
                assert await proc.wait() == 0
            nursery.cancel_scope.cancel()


async def test_a_udp_port_in_use_is_refused_not_shared(stdout: Stdout, logs: LogWatch) -> None:
    """A second service on a bound UDP port is refused (no SO_REUSEADDR: the kernel would split the datagrams)."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            service = await udp_service(nursery)
            probe = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await probe.bind((LOCALHOST, 0))
            port = probe.getsockname()[1]
            probe.close()
            spec = f"dns={LOCALHOST}:{port}:{LOCALHOST}:{service.port}/udp"
            srv, _first, (_host, public) = await reverse_udp(nursery, stdout, service.port, spec=spec)
            assert public == port
            other = attrs.evolve(client_config(srv.value, name="other"), remotes=(RemoteSpec.parse(spec),))
            second = await start_client(nursery, other)
            assert second.value == {}
            await logs.wait_for(
                rf"refused to expose dns: .*cannot listen on {LOCALHOST}:{port}: address already in use"
            )
            sock = await udp_client(LOCALHOST, port)
            assert await ask(sock, b"mine", lambda a: a == b"mine") == b"mine"
            nursery.cancel_scope.cancel()


async def test_dns_through_local_forward_over_ipv6(stdout: Stdout, logs: LogWatch) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            try:
                dns = await udp_service(nursery, dns_reply, host="::1")
            except OSError as exc:
                pytest.skip(f"no ::1: {exc}")
            _srv, _client, (host, port) = await forward_udp(nursery, stdout, dns.port, f"[::1]:{dns.port}/udp", "::1")
            assert host.strip("[]") == "::1"
            sock = await udp_client("::1", port)
            answer = await ask(sock, dns_query(0x66, "v6.example"), lambda a: a[:2] == b"\x00\x66")
            assert answer.endswith(socket.inet_aton("192.0.2.53"))
            assert next(iter(dns.sources))[0] == "::1"
            nursery.cancel_scope.cancel()


async def test_a_server_without_udp_refuses_instead_of_binding_tcp(
    stdout: Stdout, logs: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older server does not know the request kind ``expose-udp``: it refuses (it never binds a TCP port for a
    UDP service), and the client says why."""
    import trio_tunnel.server

    monkeypatch.setattr(trio_tunnel.server, "EXPOSE_UDP", "a-kind-this-server-does-not-know")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, allow_ports=UDP_PORTS)
            remote = RemoteSpec.parse(f"dns={LOCALHOST}:0:{LOCALHOST}:53/udp")
            client = await start_client(nursery, attrs.evolve(client_config(srv.value), remotes=(remote,)))
            assert client.value == {}
            await logs.wait_for(r"the server is older and carries no UDP: upgrade it to expose dns")
            await logs.wait_for(r"refused to expose dns: .*unknown request 'expose-udp'")
            nursery.cancel_scope.cancel()
