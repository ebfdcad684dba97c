"""tunnel/link.py: TLS or plaintext on the link, mismatches answered readably, pins, channel binding."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trustme
from tls_helpers import HOSTNAME, tcp_pair, write_leaf
from trio_tunnel.certs import PinMismatchError, fingerprint
from trio_tunnel.errors import HandshakeError
from trio_tunnel.link import (
    ClientTls,
    LinkMismatchError,
    ServerTls,
    channel_binding,
    presented_fingerprint,
    refuse_link,
    secure_client_link,
    secure_server_link,
)
from trio_tunnel.mux import Role, SessionConfig, open_session
from trio_tunnel.proto import ErrorCode
from trio_tunnel.tcp import TcpStream
from trio_tunnel.tls import TlsHandshakeError, TlsStream


@pytest.fixture
def identity(tmp_path: Path) -> ServerTls:
    return ServerTls.from_state_dir(tmp_path / "state")


async def _both(
    server_tls: ServerTls | None, client_tls: ClientTls | None, hostname: str = HOSTNAME
) -> tuple[tuple[trio.abc.Stream, bytes] | BaseException, tuple[trio.abc.Stream, bytes] | BaseException]:
    """Run both sides of secure_*_link over one loopback connection; each result or the exception it raised."""
    client_tcp, server_tcp = await tcp_pair()
    results: dict[str, tuple[trio.abc.Stream, bytes] | BaseException] = {}

    async def server() -> None:
        try:
            results["server"] = await secure_server_link(server_tcp, server_tls)
        except Exception as exc:
            results["server"] = exc
            await server_tcp.aclose()

    async def client() -> None:
        try:
            results["client"] = await secure_client_link(client_tcp, client_tls, hostname)
        except Exception as exc:
            results["client"] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        nursery.start_soon(client)
    return results["client"], results["server"]


async def test_pinned_tls_link_carries_bytes_and_both_sides_agree_on_the_binding(identity: ServerTls) -> None:
    with trio.fail_after(10):
        client, server = await _both(identity, ClientTls.create(pins=[identity.fingerprint]))
        assert isinstance(client, tuple) and isinstance(server, tuple)
        (c_stream, c_binding), (s_stream, s_binding) = client, server
        assert isinstance(c_stream, TlsStream) and isinstance(s_stream, TlsStream)
        assert c_binding == s_binding == channel_binding(identity.certificate) and len(c_binding) == 32
        await c_stream.send_all(b"hello")
        assert await s_stream.receive_some() == b"hello"
        await c_stream.aclose()
        await s_stream.aclose()


async def test_plaintext_on_both_sides_has_an_empty_binding() -> None:
    with trio.fail_after(10):
        client_tcp, server_tcp = await tcp_pair()
        c_stream, c_binding = await secure_client_link(client_tcp, None, HOSTNAME)
        await c_stream.send_all(b"x")  # the client speaks first (the preamble); the server only peeks at it
        s_stream, s_binding = await secure_server_link(server_tcp, None)
        assert c_binding == s_binding == b""
        assert c_stream is client_tcp and s_stream is server_tcp
        assert await s_stream.receive_some(1) == b"x"
        await c_stream.aclose()
        await s_stream.aclose()


async def test_a_wrong_pin_is_refused_showing_the_presented_fingerprint(tmp_path: Path, identity: ServerTls) -> None:
    other = ServerTls.from_state_dir(tmp_path / "other")
    with trio.fail_after(10):
        client, _ = await _both(identity, ClientTls.create(pins=[other.fingerprint]))
        assert isinstance(client, PinMismatchError)
        assert identity.fingerprint in str(client) and client.presented == identity.fingerprint


async def test_self_signed_without_pin_fails_verification_and_the_probe_reads_its_key(identity: ServerTls) -> None:
    with trio.fail_after(10):
        client, _ = await _both(identity, ClientTls.create())
        assert isinstance(client, TlsHandshakeError) and "certificate verify failed" in str(client)

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def serve_one() -> None:
            stream = TcpStream.adopt(await listeners[0].accept())
            try:
                secured, _ = await secure_server_link(stream, identity)
                await secured.aclose()
            except (TlsHandshakeError, trio.BrokenResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            assert await presented_fingerprint("127.0.0.1", port) == identity.fingerprint
        await listeners[0].aclose()


async def test_ca_verified_link_checks_the_host_name(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_leaf(tmp_path, ca.issue_cert(HOSTNAME))
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    server_tls = ServerTls.from_files(cert, key)
    client_tls = ClientTls.create(ca_file=tmp_path / "ca.pem")
    with trio.fail_after(10):
        client, server = await _both(server_tls, client_tls)
        assert isinstance(client, tuple) and isinstance(server, tuple)
        assert client[1] == server[1]
        await client[0].aclose()
        await server[0].aclose()
        client, _ = await _both(server_tls, client_tls, hostname="elsewhere.test")
        assert isinstance(client, TlsHandshakeError) and "certificate verify failed" in str(client)
        assert "elsewhere.test" in str(client)


async def test_plaintext_client_at_a_tls_server_gets_a_readable_refusal(identity: ServerTls) -> None:
    with trio.fail_after(10):
        client_tcp, server_tcp = await tcp_pair()
        async with trio.open_nursery() as nursery:

            async def server() -> None:
                with pytest.raises(LinkMismatchError) as info:
                    await secure_server_link(server_tcp, identity)
                assert not info.value.client_tls
                await refuse_link(server_tcp, str(info.value))

            nursery.start_soon(server)
            with pytest.raises(HandshakeError) as refused:
                async with open_session(
                    client_tcp, role=Role.CLIENT, config=SessionConfig(), name="c", token=b"t" * 16
                ):
                    pass  # pragma: no cover - the handshake is refused
        assert refused.value.code == ErrorCode.PROHIBITED
        assert "requires TLS; remove --insecure-plaintext from the client" in str(refused.value)


async def test_tls_client_at_a_plaintext_server_is_told_the_peer_does_not_speak_tls(identity: ServerTls) -> None:
    with trio.fail_after(10):
        client_tcp, server_tcp = await tcp_pair()
        async with trio.open_nursery() as nursery:

            async def server() -> None:
                with pytest.raises(LinkMismatchError) as info:
                    await secure_server_link(server_tcp, None)
                assert info.value.client_tls and "runs with --insecure-plaintext" in str(info.value)
                await refuse_link(server_tcp, str(info.value))

            nursery.start_soon(server)
            with pytest.raises(TlsHandshakeError, match="does not speak TLS"):
                await secure_client_link(client_tcp, ClientTls.create(pins=[identity.fingerprint]), HOSTNAME)


async def test_a_relay_with_its_own_certificate_changes_the_binding(tmp_path: Path, identity: ServerTls) -> None:
    """What the HMAC binding rests on: a TLS-terminating relay shows the client a certificate other than the
    server's, so the client's binding (from what it saw) differs from the server's (its own)."""
    relay = ServerTls.from_state_dir(tmp_path / "relay")
    with trio.fail_after(10):
        client, _ = await _both(relay, ClientTls.create(pins=[relay.fingerprint]))
        assert isinstance(client, tuple)
        assert client[1] == channel_binding(relay.certificate) != channel_binding(identity.certificate)
        assert fingerprint(relay.certificate) != identity.fingerprint
        await client[0].aclose()
