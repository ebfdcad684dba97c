"""TLS test fixtures: a trustme CA, contexts made with trio_tunnel.certs, and TlsStream pairs over loopback TCP."""

from __future__ import annotations

import ssl
from pathlib import Path

import trio
import trustme
from trio_tunnel.certs import client_context, server_context
from trio_tunnel.tcp import TcpStream
from trio_tunnel.tls import TlsStream

HOSTNAME = "tunnel.test"


def write_leaf(directory: Path, leaf: trustme.LeafCert, name: str = "server") -> tuple[Path, Path]:
    """The leaf's chain and key as PEM files: ``(cert_path, key_path)``."""
    cert_path, key_path = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_path.write_bytes(leaf.private_key_pem.bytes())
    return cert_path, key_path


def ca_contexts(directory: Path, ca: trustme.CA, leaf: trustme.LeafCert) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """``(server_context, client_context)`` with CA verification."""
    cert_path, key_path = write_leaf(directory, leaf)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.cert_pem.bytes())
    return server_context(cert_path, key_path), client_context(ca_file=ca_path)


async def tcp_pair() -> tuple[TcpStream, TcpStream]:
    """``(client, server)`` over 127.0.0.1."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        client = TcpStream.adopt(await trio.open_tcp_stream("127.0.0.1", port))
        server = TcpStream.adopt(await listeners[0].accept())
    finally:
        await listeners[0].aclose()
    return client, server


async def handshake_pair(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    hostname: str | None = HOSTNAME,
) -> tuple[TlsStream, TlsStream]:
    """``(client, server)`` TlsStreams after both handshakes."""
    client_tcp, server_tcp = await tcp_pair()
    result: dict[str, TlsStream] = {}

    async def server() -> None:
        result["server"] = await TlsStream.handshake(server_tcp, server_ctx, server_side=True)

    async def client() -> None:
        result["client"] = await TlsStream.handshake(
            client_tcp, client_ctx, server_side=False, server_hostname=hostname
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        nursery.start_soon(client)
    return result["client"], result["server"]
