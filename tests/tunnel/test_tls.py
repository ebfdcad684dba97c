"""TlsStream: trio's stream conformance suite over real loopback TCP with TLS 1.3, bulk transfers, breaks, and
handshakes against peers that do not speak TLS."""

from __future__ import annotations

import contextlib
import random
import ssl

import pytest
import trio
import trio.testing
import trustme
from tls_helpers import HOSTNAME, ca_contexts, handshake_pair, tcp_pair
from trio_tunnel.tcp import TcpStream
from trio_tunnel.tls import TlsHandshakeError, TlsStream

pytestmark = pytest.mark.trio


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    return ca_contexts(tmp_path_factory.mktemp("tls"), ca, ca.issue_cert(HOSTNAME))


async def _fill(stream: TlsStream) -> None:
    """Send until the kernel's buffers are full: the next send_all blocks."""

    async def sender() -> None:
        while True:
            await stream.send_all(b"x" * 10000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_conformance(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    async def pair() -> tuple[TlsStream, TlsStream]:
        return await handshake_pair(*contexts)

    async def clogged() -> tuple[TlsStream, TlsStream]:
        left, right = await pair()
        await _fill(left)
        await _fill(right)
        return left, right

    with trio.fail_after(60):
        await trio.testing.check_two_way_stream(pair, clogged)


async def test_negotiates_tls13_and_exposes_certificates(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    with trio.fail_after(10):
        client, server = await handshake_pair(*contexts)
        async with client, server:
            assert client.version == server.version == "TLSv1.3"
            assert client.cipher is not None and client.cipher.startswith("TLS_AES_")
            der = client.peer_certificate_der()
            assert der is not None and der == client.getpeercert(binary_form=True)
            assert server.peer_certificate_der() is None  # no client certificates
            assert client.local_certificate_der() is None


async def test_large_transfer_both_ways(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    size = 8 * 1024 * 1024
    rng = random.Random(11)
    up, down = rng.randbytes(size), rng.randbytes(size)

    async def send(stream: TlsStream, data: bytes) -> None:
        view = memoryview(data)
        chunks = random.Random(len(data))
        while view:
            n = chunks.randint(1, 200_000)
            await stream.send_all(bytearray(view[:n]) if n % 2 else view[:n])
            view = view[n:]

    async def receive(stream: TlsStream, expected: bytes, into: list[bytes]) -> None:
        got = bytearray()
        while len(got) < len(expected):
            chunk = await stream.receive_some()
            assert chunk
            got += chunk
        into.append(bytes(got))

    with trio.fail_after(60):
        client, server = await handshake_pair(*contexts)
        async with client, server:
            got_up: list[bytes] = []
            got_down: list[bytes] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, client, up)
                nursery.start_soon(send, server, down)
                nursery.start_soon(receive, server, up, got_up)
                nursery.start_soon(receive, client, down, got_down)
            assert got_up == [up]
            assert got_down == [down]
            await client.aclose()
            assert await server.receive_some() == b""  # close_notify: a clean end of stream


async def test_peer_close_mid_transfer_breaks_the_sender(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    with trio.fail_after(20):
        client, server = await handshake_pair(*contexts)
        async with client, server:

            async def receive_a_little_then_close() -> None:
                received = 0
                while received < 1024 * 1024:
                    received += len(await server.receive_some())
                await trio.aclose_forcefully(server)

            async def send_until_broken() -> None:
                with pytest.raises(trio.BrokenResourceError) as info:
                    while True:
                        await client.send_all(b"z" * 65536)
                assert isinstance(info.value.__cause__, OSError)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_a_little_then_close)
                nursery.start_soon(send_until_broken)


async def test_close_without_close_notify_breaks_the_receiver(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    with trio.fail_after(10):
        client, server = await handshake_pair(*contexts)
        async with client, server:
            await client.send_all(b"partial")
            client.socket.close()  # TCP FIN, no close_notify: a truncation, not an end of stream
            assert await server.receive_some() == b"partial"
            with pytest.raises(trio.BrokenResourceError):
                await server.receive_some()


async def test_receive_returns_bytes_openssl_already_decrypted(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    with trio.fail_after(10):
        client, server = await handshake_pair(*contexts)
        async with client, server:
            await client.send_all(b"abcdef")
            assert await server.receive_some(2) == b"ab"
            assert server.ssl_object.pending() == 4  # nothing left on the socket: no wait_readable may happen now
            assert await server.receive_some(10) == b"cdef"


async def test_works_over_a_trio_socket_stream(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = contexts
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with listeners[0], trio.open_nursery() as nursery:
            socket_stream = await trio.open_tcp_stream("127.0.0.1", port)
            accepted = await listeners[0].accept()
            result: list[TlsStream] = []

            async def serve() -> None:
                result.append(await TlsStream.handshake(accepted, server_ctx, server_side=True))

            nursery.start_soon(serve)
            client = await TlsStream.handshake(socket_stream, client_ctx, server_side=False, server_hostname=HOSTNAME)
        async with client, result[0] as server:
            await client.send_all(b"ping")
            assert await server.receive_some() == b"ping"


async def test_cancelled_send_keeps_the_stream_valid(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A send_all cancelled with part of a TLS record on the wire: the next send_all completes it first."""
    with trio.fail_after(20):
        client, server = await handshake_pair(*contexts)
        async with client, server:
            with trio.move_on_after(0.2) as scope:
                await client.send_all(b"a" * (16 * 1024 * 1024))
            assert scope.cancelled_caught
            assert client.holds_unsent  # the case under test: encrypted records only partly on the wire
            received = 0

            async def drain() -> None:
                nonlocal received
                while True:
                    data = await server.receive_some()
                    if not data:
                        return
                    received += len(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await client.send_all(b"end")
                await client.aclose()
            assert received == 16 * 1024 * 1024 + 3


async def test_tls_server_facing_a_plaintext_client(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, _ = contexts
    with trio.fail_after(10):
        client_tcp, server_tcp = await tcp_pair()
        async with client_tcp:
            await client_tcp.send_all(b"TRIO-TUNNEL hello in plaintext\r\n" * 4)
            with pytest.raises(TlsHandshakeError, match="does not speak TLS") as info:
                await TlsStream.handshake(server_tcp, server_ctx, server_side=True)
        assert isinstance(info.value, ssl.SSLError)
        assert isinstance(info.value.__cause__, ssl.SSLError)
        assert "127.0.0.1" in str(info.value)


async def test_tls_client_facing_a_plaintext_server(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    _, client_ctx = contexts
    with trio.fail_after(10):
        client_tcp, server_tcp = await tcp_pair()

        async def plaintext_server(stream: TcpStream) -> None:
            async with stream:
                await stream.receive_some()
                await stream.send_all(b"HTTP/1.0 400 Bad Request\r\n\r\nnot TLS here\r\n")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(plaintext_server, server_tcp)
            with pytest.raises(TlsHandshakeError, match="failed"):
                await TlsStream.handshake(client_tcp, client_ctx, server_side=False, server_hostname=HOSTNAME)


async def test_handshake_with_a_silent_peer_is_bounded_by_the_callers_scope(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    _, client_ctx = contexts
    with trio.fail_after(10):
        client_tcp, server_tcp = await tcp_pair()
        async with server_tcp:
            with trio.move_on_after(0.2) as scope:
                await TlsStream.handshake(client_tcp, client_ctx, server_side=False, server_hostname=HOSTNAME)
            assert scope.cancelled_caught
            assert client_tcp.socket.fileno() == -1  # the socket went with the failed handshake
            assert await server_tcp.receive_some() != b""  # the ClientHello got there, then the close
            assert await _read_to_end(server_tcp) is None


async def _read_to_end(stream: TcpStream) -> None:
    while await stream.receive_some():
        pass


async def test_send_all_parts_joins_the_parts(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    with trio.fail_after(10):
        client, server = await handshake_pair(*contexts)
        async with client, server:
            await client.send_all_parts([b"head", bytearray(b"-"), memoryview(b"body")], checkpoint=False)
            await client.send_all_parts([b"!"])
            got = b""
            while len(got) < 10:
                got += await server.receive_some()
            assert got == b"head-body!"


async def test_tasks_needing_the_same_readiness_share_one_wait(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A write that wants to read while a receive waits for the socket (a TLS 1.3 KeyUpdate; Python cannot make a
    peer send one): Trio allows one waiter per socket and direction, so the second task parks until the first
    one's wait ends, also when that wait is cancelled."""
    with trio.fail_after(10):
        client, server = await handshake_pair(*contexts)
        async with client, server:
            woke: list[str] = []

            async def wait(name: str) -> None:
                await server._wait(1)  # _READ
                woke.append(name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait, "first")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(wait, "second")
                await trio.testing.wait_all_tasks_blocked()
                assert server._rwait and server._lot is not None and len(server._lot) == 1
                await client.send_all(b"x")
            assert sorted(woke) == ["first", "second"]

            assert await server.receive_some() == b"x"
            woke.clear()
            first_scope = trio.CancelScope()

            async def first_in_scope() -> None:
                with first_scope:
                    await wait("first")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first_in_scope)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(wait, "second")
                await trio.testing.wait_all_tasks_blocked()
                first_scope.cancel()  # the parked task must not be left waiting for a wait that is gone
            assert woke == ["second"]
            assert not server._rwait and len(server._lot) == 0


async def test_close_notify_is_end_of_stream_for_every_later_receive(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The peer's close_notify with its TCP side still open: b"" at once, every time (nothing more is awaited)."""
    with trio.fail_after(10):
        client, server = await handshake_pair(*contexts)
        async with client, server:
            await client.send_all(b"last words")
            with contextlib.suppress(ssl.SSLError):  # close_notify, sent by hand: the TCP connection stays open
                client.ssl_object.unwrap()
            client.socket.send(client._outgoing.read())
            assert await server.receive_some() == b"last words"
            assert await server.receive_some() == b""
            assert await server.receive_some() == b""


async def test_one_receive_takes_every_record_that_arrived(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """Records that arrived together are decrypted in one receive_some (one 16 KiB record per call was the old
    cost), up to max_bytes, and in order."""
    with trio.fail_after(10):
        client, server = await handshake_pair(*contexts)
        async with client, server:
            data = random.Random(5).randbytes(100_000)  # seven records
            await client.send_all(data)
            got = b""
            calls = 0
            while len(got) < len(data):
                got += await server.receive_some(1 << 20)
                calls += 1
            assert got == data
            # The records come in one recv unless the kernel split them; never one receive per record.
            assert calls < 7
            await client.send_all(b"abcdef")
            assert await server.receive_some(4) == b"abcd"
            assert await server.receive_some(4) == b"ef"
