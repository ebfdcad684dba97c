"""trio_tunnel.tcp.fit_send_buffer and the session that applies it: a short-RTT link gets a small kernel send
queue (the backlog stays in the multiplexer), a long one keeps the kernel's autotuning."""

from __future__ import annotations

import socket

import trio
import trio.testing
from mux_helpers import session_pair
from tls_helpers import tcp_pair
from trio_tunnel.mux import SessionConfig
from trio_tunnel.tcp import (
    REFIT_BELOW,
    SEND_BUFFER_MAX,
    SEND_BUFFER_MIN,
    SEND_BUFFER_RATE,
    SendBufferFit,
    fit_send_buffer,
)


def _sndbuf(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


async def test_size_follows_the_rtt_within_bounds() -> None:
    with trio.fail_after(10):
        client, server = await tcp_pair()
        async with client, server:
            assert fit_send_buffer(client, 0.001) == int(0.001 * SEND_BUFFER_RATE)
            assert _sndbuf(client.socket) >= int(0.001 * SEND_BUFFER_RATE)  # (Linux doubles it for overhead)
            assert fit_send_buffer(server, 0.000_01) == SEND_BUFFER_MIN


async def test_a_long_link_keeps_the_kernels_autotuning() -> None:
    with trio.fail_after(10):
        client, server = await tcp_pair()
        async with client, server:
            before = _sndbuf(client.socket)
            assert fit_send_buffer(client, SEND_BUFFER_MAX / SEND_BUFFER_RATE) is None
            assert _sndbuf(client.socket) == before


async def test_a_session_fits_its_link_after_the_first_rtt_sample() -> None:
    with trio.fail_after(20):
        client_tcp, server_tcp = await tcp_pair()
        fitted = SessionConfig(fit_send_buffer=True)
        for sock in (client_tcp.socket, server_tcp.socket):  # as big as autotuning makes a busy link's
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_MAX)
        before = _sndbuf(server_tcp.socket)
        async with session_pair(lambda: (server_tcp, client_tcp), config=SessionConfig(), client_config=fitted) as (
            _server,
            client,
        ):
            # The handshake's PING and its PONG are the only traffic: once every task has been idle a while, both
            # sides have handled them (over loopback nothing is left in flight).
            await trio.testing.wait_all_tasks_blocked(0.05)
            rtt = client.statistics().rtt
            assert rtt is not None
            cap = 2 * max(SEND_BUFFER_MIN, int(rtt * SEND_BUFFER_RATE))
            # The sample on loopback is far below SEND_BUFFER_MAX / RATE: the client's link is capped...
            assert _sndbuf(client_tcp.socket) <= cap
            # ... and a session without the option leaves its socket alone.
            assert _sndbuf(server_tcp.socket) == before


async def test_a_clearly_smaller_rtt_sample_fits_the_buffer_again() -> None:
    """An inflated first sample (a busy machine at the handshake) leaves autotuning on; the first keepalive's honest
    sample caps the queue, and later samples that are not clearly smaller change nothing."""
    with trio.fail_after(10):
        client, server = await tcp_pair()
        async with client, server:
            fit = SendBufferFit(client.socket)
            autotuned = _sndbuf(client.socket)
            assert fit.sample(SEND_BUFFER_MAX / SEND_BUFFER_RATE * 2)  # inflated: no cap
            assert _sndbuf(client.socket) == autotuned
            assert fit.sample(0.001)  # the path's real RTT
            capped = _sndbuf(client.socket)
            assert capped <= 2 * int(0.001 * SEND_BUFFER_RATE) < autotuned
            assert not fit.sample(0.002)  # larger: the minimum stays
            assert not fit.sample(0.001 * REFIT_BELOW * 1.01)  # not clearly smaller
            assert _sndbuf(client.socket) == capped
            assert fit.sample(0.000_5)
            assert _sndbuf(client.socket) <= 2 * max(SEND_BUFFER_MIN, int(0.000_5 * SEND_BUFFER_RATE))
