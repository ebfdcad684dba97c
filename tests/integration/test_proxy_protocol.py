"""PROXY protocol end to end: a client writes a v1/v2 header with the external user's address to its local service
(IPv4 and IPv6, in process and through the CLI); a server reads one from a trusted load balancer and passes its
address through; an untrusted source's header is only data.

The local service here parses the header with its own few lines (:func:`read_header`), written from HAProxy's
spec, not with trio_tunnel.proto.proxyheader, so the two are checked against each other. A real nginx with
``listen ... proxy_protocol`` runs in ``test_nginx_sees_the_real_address`` when nginx is installed.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_tunnel.config import BindAllowlist, RemoteSpec, ServerConfig
from tunnel_helpers import (
    LOCALHOST,
    TOKEN_TEXT,
    Stdout,
    cli,
    client_config,
    hostport,
    logs,
    read_all,
    start_client,
    start_server,
    start_service,
    stdout,
)

__all__ = ["logs", "stdout"]  # fixtures, used by name

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


async def read_header(stream: trio.abc.ReceiveStream) -> tuple[dict[str, Any], bytes]:
    """A minimal PROXY header reader, as a service behind the tunnel would have: the header's fields, and the
    bytes that came after it."""
    data = bytearray()
    while len(data) < 16:
        block = await stream.receive_some(4096)
        assert block, f"EOF inside the header: {bytes(data)!r}"
        data += block
    if data.startswith(SIGNATURE):
        ver_cmd, fam, length = struct.unpack_from("!BBH", data, 12)
        while len(data) < 16 + length:
            data += await stream.receive_some(4096)
        body = bytes(data[16 : 16 + length])
        rest = bytes(data[16 + length :])
        if fam >> 4 == 1:
            src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        elif fam >> 4 == 2:
            src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        else:
            return {"version": 2, "command": ver_cmd & 0xF, "family": fam}, rest
        return {
            "version": 2,
            "command": ver_cmd & 0xF,
            "family": fam,
            "src": str(ipaddress.ip_address(src)),
            "dst": str(ipaddress.ip_address(dst)),
            "sport": sport,
            "dport": dport,
        }, rest
    while b"\r\n" not in data:
        block = await stream.receive_some(4096)
        assert block, f"EOF inside the v1 line: {bytes(data)!r}"
        data += block
    line, _, rest = bytes(data).partition(b"\r\n")
    parts = line.decode("ascii").split(" ")
    assert parts[0] == "PROXY", line
    if parts[1] == "UNKNOWN":
        return {"version": 1, "family": "UNKNOWN"}, rest
    return {
        "version": 1,
        "family": parts[1],
        "src": parts[2],
        "dst": parts[3],
        "sport": int(parts[4]),
        "dport": int(parts[5]),
    }, rest


async def header_service(stream: trio.SocketStream) -> None:
    """Answers each connection with the header it got and the data after it (until EOF), as JSON."""
    async with stream:
        header, rest = await read_header(stream)
        rest += await read_all(stream)
        await stream.send_all(json.dumps({"header": header, "data": rest.decode("latin-1")}).encode())


EXTERNAL = "127.0.0.9"
"""The external user's IPv4 address: another loopback address than the client's own 127.0.0.1, so a service that
sees it learned it from the header, not from its socket."""


async def connect_from(host: str, port: int) -> trio.SocketStream:
    """A connection to ``host:port`` from :data:`EXTERNAL` (IPv4) or ``::1`` (IPv6)."""
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    sock = trio.socket.socket(family)
    await sock.bind(("::1" if ":" in host else EXTERNAL, 0))
    await sock.connect((host, port))
    return trio.SocketStream(sock)


async def ask(host: str, port: int, payload: bytes) -> dict[str, Any]:
    """Connect (from :func:`connect_from`'s address), send ``payload`` and EOF, return the service's JSON answer and
    our own address."""
    stream = await connect_from(host, port)
    async with stream:
        me = stream.socket.getsockname()[:2]
        await stream.send_all(payload)
        await stream.send_eof()
        answer: dict[str, Any] = json.loads(await read_all(stream))
    answer["me"] = [str(me[0]), int(me[1])]
    return answer


@pytest.mark.parametrize(
    ("version", "bind", "family"),
    [("v1", LOCALHOST, "TCP4"), ("v2", LOCALHOST, 0x11), ("v1", "::1", "TCP6"), ("v2", "::1", 0x21)],
)
async def test_client_writes_the_external_address(stdout: Stdout, version: str, bind: str, family: object) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, header_service)
            server = await start_server(nursery, allow_bind=BindAllowlist.parse(bind))  # it listens on 127.0.0.1
            spec = RemoteSpec.parse(
                f"web={'[' + bind + ']' if ':' in bind else bind}:0:{LOCALHOST}:{service.port}",
                proxy_protocol=version,
            )
            config = client_config(server.value)
            client = await start_client(nursery, config.__class__(**{**_fields(config), "remotes": (spec,)}))
            public = client.value["web"].port
            for payload in (b"hello", b"PROXY TCP4 6.6.6.6 6.6.6.6 1 2\r\n"):  # a forged line is only data
                answer = await ask(bind, public, payload)
                assert answer["header"] == {
                    "version": int(version[1]),
                    "family": family,
                    **({"command": 1} if version == "v2" else {}),
                    "src": answer["me"][0],
                    "sport": answer["me"][1],
                    "dst": bind,
                    "dport": public,
                }
                assert answer["data"] == payload.decode()
            await client.stop()
            await server.stop()
            nursery.cancel_scope.cancel()


def _fields(config: Any) -> dict[str, Any]:
    import attrs

    return {field.name: getattr(config, field.name) for field in attrs.fields(type(config))}


async def test_cli_proxy_protocol_flag() -> None:
    """``--proxy-protocol v2`` on the command line applies to every -R of that command."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, header_service)
            token = {"TRIO_TUNNEL_TOKEN": TOKEN_TEXT}
            async with cli(nursery, "server", "--listen", f"{LOCALHOST}:0", env=token) as server:
                _, port = hostport(await server.expect(r"listening (\S+)"))
                args = ["client", "--server", f"{LOCALHOST}:{port}", "--name", "pp", "--proxy-protocol", "v2"]
                args += ["-R", f"a={LOCALHOST}:0:{LOCALHOST}:{service.port}"]
                args += ["-R", f"b={LOCALHOST}:0:{LOCALHOST}:{service.port}"]
                async with cli(nursery, *args, env=token) as client:
                    for name in ("a", "b"):
                        _, public = hostport(await client.expect(rf"exposed {name} (\S+)"))
                        answer = await ask(LOCALHOST, public, b"x")
                        assert answer["header"]["src"] == EXTERNAL and answer["header"]["dport"] == public
                        assert answer["header"]["version"] == 2 and answer["data"] == "x"
                    client.interrupt()
                    assert await client.wait() == 0
                server.interrupt()
                assert await server.wait() == 0
            nursery.cancel_scope.cancel()


async def _trusting_tunnel(nursery: trio.Nursery, service_port: int, trusted: list[str], **kw: Any) -> int:
    server = await start_server(
        nursery, accept_proxy_protocol=True, proxy_protocol_from=tuple(map(ipaddress.ip_network, trusted)), **kw
    )
    spec = RemoteSpec.parse(f"web={LOCALHOST}:0:{LOCALHOST}:{service_port}", proxy_protocol="v1")
    config = client_config(server.value)
    client = await start_client(nursery, config.__class__(**{**_fields(config), "remotes": (spec,)}))
    return int(client.value["web"].port)


async def test_server_passes_a_trusted_balancers_address_through(stdout: Stdout) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, header_service)
            public = await _trusting_tunnel(nursery, service.port, ["127.0.0.0/8"])
            # v1 from the balancer, with the first data in the same packet as the header
            answer = await ask(LOCALHOST, public, b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\nGET /")
            assert answer["header"]["src"] == "203.0.113.7" and answer["header"]["sport"] == 40000
            assert answer["header"]["dst"] == "198.51.100.1" and answer["header"]["dport"] == 443
            assert answer["data"] == "GET /"
            # v2 IPv6 from the balancer: the client writes v1 TCP6
            src, dst = ipaddress.IPv6Address("2001:db8::7"), ipaddress.IPv6Address("2001:db8::1")
            v2 = SIGNATURE + b"\x21\x21" + struct.pack("!H", 36) + src.packed + dst.packed + struct.pack("!HH", 5, 80)
            answer = await ask(LOCALHOST, public, v2 + b"data")
            assert answer["header"]["family"] == "TCP6" and answer["header"]["src"] == "2001:db8::7"
            assert answer["data"] == "data"
            # a health check (v2 LOCAL): the connection's own addresses
            answer = await ask(LOCALHOST, public, SIGNATURE + b"\x20\x00\x00\x00ok")
            assert answer["header"]["src"] == answer["me"][0] and answer["header"]["sport"] == answer["me"][1]
            assert answer["data"] == "ok"
            nursery.cancel_scope.cancel()


async def test_trusted_source_without_a_header_is_closed(stdout: Stdout, logs: Any) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, header_service)
            public = await _trusting_tunnel(nursery, service.port, ["127.0.0.0/8"], proxy_protocol_timeout=0.5)
            stream = await connect_from(LOCALHOST, public)
            async with stream:
                await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")  # no header: the spec says do not guess
                assert await read_all(stream) == b""
            await logs.wait_for("does not start with a PROXY protocol header", logger="trio_tunnel.server")
            silent = await connect_from(LOCALHOST, public)
            async with silent:
                assert await read_all(silent) == b""  # closed after proxy_protocol_timeout
            await logs.wait_for("no PROXY header within 0.5 s", logger="trio_tunnel.server")
            assert service.accepted == 0
            nursery.cancel_scope.cancel()


async def test_untrusted_sources_header_is_data(stdout: Stdout) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery, header_service)
            public = await _trusting_tunnel(nursery, service.port, ["10.0.0.0/8", "fd00::/8"])
            forged = b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\n"
            answer = await ask(LOCALHOST, public, forged + b"rest")
            assert answer["header"]["src"] == answer["me"][0]  # the real address, not the forged one
            assert answer["data"] == (forged + b"rest").decode()
            nursery.cancel_scope.cancel()


def test_accept_proxy_protocol_needs_an_allow_list(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[server]\ntoken = "0123456789abcdef0123"\naccept_proxy_protocol = true\n')
    with pytest.raises(Exception, match="accept_proxy_protocol needs proxy_protocol_from"):
        ServerConfig.from_toml(config)
    config.write_text(
        '[server]\ntoken = "0123456789abcdef0123"\naccept_proxy_protocol = true\n'
        'proxy_protocol_from = ["10.0.0.0/8", "[fd00::]/8"]\nproxy_protocol_timeout = 2\n'
    )
    loaded = ServerConfig.from_toml(config)
    assert [str(n) for n in loaded.proxy_protocol_from] == ["10.0.0.0/8", "fd00::/8"]
    config.write_text('[server]\ntoken = "0123456789abcdef0123"\nproxy_protocol_from = ["10.0.0.300/8"]\n')
    with pytest.raises(Exception, match=r"proxy_protocol_from: '10\.0\.0\.300/8' is not an IP network"):
        ServerConfig.from_toml(config)


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {host}:{port} proxy_protocol;
        location / {{ return 200 "addr=$proxy_protocol_addr port=$proxy_protocol_port\\n"; }}
    }}
}}
"""


def _nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def _nginx_listener(tmp: str) -> socket.socket:
    """The listening socket nginx inherits (its ``NGINX=fd;`` upgrade mechanism): bound and listening before
    nginx starts, so connections wait in its backlog and nothing waits for nginx to be ready."""
    sock = socket.socket()
    sock.bind((LOCALHOST, 0))
    sock.listen(16)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    Path(tmp, "nginx.conf").write_text(NGINX_CONF.format(dir=tmp, host=LOCALHOST, port=port))
    return sock


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_nginx_sees_the_real_address(stdout: Stdout, version: str) -> None:
    """A real nginx with ``listen ... proxy_protocol`` logs ``$proxy_protocol_addr``: here it answers with it. Its
    socket peer is the client's 127.0.0.1; the visitor connects from 127.0.0.9, which only the header can tell it.
    (Loopback addresses instead of network namespaces: they show the same thing without a topology.)"""
    nginx = _nginx()
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light); the header parser tests cover the format")
    with trio.fail_after(20), tempfile.TemporaryDirectory(prefix="tt-nginx-") as tmp:
        listener = _nginx_listener(tmp)
        port = listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                [nginx, "-p", tmp, "-c", f"{tmp}/nginx.conf"],
                env={"NGINX": f"{listener.fileno()};"},
                pass_fds=(listener.fileno(),),
            )
            listener.close()
            try:
                server = await start_server(nursery)
                spec = RemoteSpec.parse(f"web={LOCALHOST}:0:{LOCALHOST}:{port}", proxy_protocol=version)
                config = client_config(server.value)
                client = await start_client(nursery, config.__class__(**{**_fields(config), "remotes": (spec,)}))
                public = client.value["web"].port
                stream = await connect_from(LOCALHOST, public)
                async with stream:
                    me = stream.socket.getsockname()[1]
                    await stream.send_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                    response = await read_all(stream)
                assert response.startswith(b"HTTP/1.1 200 OK"), response
                assert response.endswith(f"addr={EXTERNAL} port={me}\n".encode()), response
            finally:
                process.terminate()
                await process.wait()
            nursery.cancel_scope.cancel()
