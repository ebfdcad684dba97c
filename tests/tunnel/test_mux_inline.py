"""One scheduler pass per hop (mux.py's theory of operation): the mux over real sockets, where the task that
queued bytes writes them into the link itself and the reader writes a stream's bytes straight into a splice's
socket. Trio's conformance checks, ordering and integrity under full socket buffers, and the pass saved."""

from __future__ import annotations

import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
import trio.testing
import trustme
from tls_helpers import HOSTNAME, ca_contexts, handshake_pair
from trio_tunnel.mux import MuxStream, Role, Session, SessionConfig, open_session
from trio_tunnel.proto import Limits
from trio_tunnel.relay import Splice
from trio_tunnel.tcp import TcpStream

TOKEN = b"inline-token-0123456789abcdef"
SMALL = SessionConfig(limits=Limits(initial_window=4096, max_window=4096, max_frame_payload=1024, max_send_buffer=4096))


def socket_pair(buffer: int | None = None) -> tuple[TcpStream, TcpStream]:
    """Two connected TcpStreams (a Unix socket pair: a SOCK_STREAM socket as the link), optionally with tiny
    kernel buffers so that writes would block often."""
    a, b = socket.socketpair()
    if buffer is not None:
        for sock in (a, b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    return TcpStream(a), TcpStream(b)


@asynccontextmanager
async def sessions(
    make_transport: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]], config: SessionConfig = SMALL
) -> AsyncIterator[tuple[Session, Session]]:
    left, right = make_transport()
    async with trio.open_nursery() as nursery:
        holder: list[Session] = []
        ready = trio.Event()
        done = trio.Event()

        async def run_server() -> None:
            async with open_session(left, role=Role.SERVER, config=config, tokens=[TOKEN]) as server:
                holder.append(server)
                ready.set()
                await done.wait()

        nursery.start_soon(run_server)
        async with open_session(right, role=Role.CLIENT, config=config, name="t", token=TOKEN) as client:
            await ready.wait()
            try:
                yield holder[0], client
            finally:
                done.set()


async def stream_pair(server: Session, client: Session) -> tuple[MuxStream, MuxStream]:
    async with trio.open_nursery() as nursery:
        accepted: list[MuxStream] = []

        async def accept() -> None:
            accepted.append(await client.accept_stream())

        nursery.start_soon(accept)
        opened = await server.open_stream("t", wait_accepted=False)
    accepted[0].accept()
    await opened.wait_accepted()
    return opened, accepted[0]


@pytest.mark.parametrize("buffer", [None, 4096])
async def test_conformance_over_a_socket_link(buffer: int | None) -> None:
    with trio.fail_after(60):
        async with sessions(lambda: socket_pair(buffer)) as (server, client):

            async def stream_maker() -> tuple[MuxStream, MuxStream]:
                return await stream_pair(server, client)

            async def clogged_stream_maker() -> tuple[MuxStream, MuxStream]:
                a, b = await stream_maker()
                await a.send_all(b"x" * 4096)
                await b.send_all(b"y" * 4096)
                return a, b

            await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)


async def test_send_all_writes_into_an_idle_link_without_a_scheduler_pass() -> None:
    with trio.fail_after(10):
        async with sessions(socket_pair) as (server, client):
            a, b = await stream_pair(server, client)
            await trio.testing.wait_all_tasks_blocked()
            before = server.statistics().connection.bytes_sent
            # No checkpoint between the send and the look: only the sending task can have written the frame.
            await a.send_all(b"ping", checkpoint=False)
            assert server.statistics().connection.bytes_sent > before
            assert await b.receive_some() == b"ping"


async def test_many_streams_keep_order_and_bytes_through_full_buffers() -> None:
    """Tiny socket buffers: synchronous writes leave tails for the writer all the time; every stream's bytes
    still arrive whole and in order, both ways, and a slow reader stalls only its own stream."""
    rng = random.Random(16)
    payloads = [rng.randbytes(rng.randrange(1, 60_000)) for _ in range(12)]
    with trio.fail_after(60):
        async with sessions(lambda: socket_pair(4096)) as (server, client):
            pairs = [await stream_pair(server, client) for _ in payloads]
            received: dict[int, bytes] = {}

            async def send(stream: MuxStream, data: bytes) -> None:
                view = memoryview(data)
                for start in range(0, len(data), 3000):
                    await stream.send_all(view[start : start + 3000])
                await stream.send_eof()

            async def receive(index: int, stream: MuxStream, slow: bool) -> None:
                chunks = []
                while chunk := await stream.receive_some(777):
                    chunks.append(chunk)
                    if slow:
                        await trio.lowlevel.checkpoint()
                received[index] = b"".join(chunks)

            async with trio.open_nursery() as nursery:
                for i, ((a, b), data) in enumerate(zip(pairs, payloads, strict=True)):
                    nursery.start_soon(send, a, data)
                    nursery.start_soon(receive, i, b, i % 3 == 0)
            assert [received[i] for i in range(len(payloads))] == payloads


@pytest.mark.parametrize("buffer", [None, 4096])
async def test_reader_writes_into_the_splice_socket(buffer: int | None) -> None:
    """``far ==mux== near ==splice== TcpStream <-> local``: bytes the far end sends reach the local socket whole and
    in order, counted by the splice, and (with room in the socket) without the splice's task running."""
    with trio.fail_after(30):
        async with sessions(socket_pair) as (server, client):
            far, near = await stream_pair(server, client)
            ours, local = socket_pair(buffer)
            splice = Splice(near, ours)
            steps = 0

            class CountSpliceSteps(trio.abc.Instrument):
                def before_task_step(self, task: trio.lowlevel.Task) -> None:
                    nonlocal steps
                    if task is splice_task:
                        steps += 1

            async def run_splice(task_status: trio.TaskStatus[trio.lowlevel.Task]) -> None:
                task_status.started(trio.lowlevel.current_task())
                await splice.run()

            async with trio.open_nursery() as nursery:
                splice_task = await nursery.start(run_splice)
                await trio.testing.wait_all_tasks_blocked()
                instrument = CountSpliceSteps()
                trio.lowlevel.add_instrument(instrument)
                await far.send_all(b"hello")
                assert await local.receive_some(5) == b"hello"
                trio.lowlevel.remove_instrument(instrument)
                if buffer is None:
                    assert steps == 0  # the link's reader wrote it; the splice's task slept through
                assert splice.snapshot().bytes_a_to_b == 5

                data = random.Random(3).randbytes(300_000)

                async def send_and_end() -> None:
                    await far.send_all(data)
                    await far.send_eof()

                nursery.start_soon(send_and_end)
                got = bytearray()
                while len(got) < len(data):
                    got += await local.receive_some(5000)
                    await trio.lowlevel.checkpoint()
                assert bytes(got) == data
                assert await local.receive_some() == b""  # the FIN came after every byte
                await local.aclose()
                await far.aclose()
            assert splice.snapshot().bytes_a_to_b == 5 + len(data)


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    return ca_contexts(tmp_path_factory.mktemp("inline-tls"), ca, ca.issue_cert(HOSTNAME))


async def test_many_streams_over_a_tls_link(tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """TlsStream.send_nowait: a write OpenSSL must retry is finished by the writer before anything else."""
    with trio.fail_after(60):
        tls_client, tls_server = await handshake_pair(*tls_contexts)
        for stream in (tls_client, tls_server):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        config = SessionConfig()
        async with sessions(lambda: (tls_server, tls_client), config) as (server, client):
            rng = random.Random(7)
            payloads = [rng.randbytes(200_000) for _ in range(4)]
            pairs = [await stream_pair(server, client) for _ in payloads]
            received: list[bytes] = [b""] * len(payloads)

            async def send(stream: MuxStream, data: bytes) -> None:
                await stream.send_all(data)
                await stream.send_eof()

            async def receive(index: int, stream: MuxStream) -> None:
                chunks = []
                while chunk := await stream.receive_some(10_000):
                    chunks.append(chunk)
                    await trio.lowlevel.checkpoint()
                received[index] = b"".join(chunks)

            async with trio.open_nursery() as nursery:
                for i, ((a, b), data) in enumerate(zip(pairs, payloads, strict=True)):
                    nursery.start_soon(send, a, data)
                    nursery.start_soon(receive, i, b)
            assert received == payloads
