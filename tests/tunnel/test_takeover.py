"""Who gets a client name (trio_tunnel.takeover): a live holder keeps it, a stale one loses it within the probe
deadline, another token never gets it. Sessions over memory streams, on a mock clock."""

from __future__ import annotations

from typing import cast

import attrs
import trio
import trio.testing
from mux_helpers import TOKEN, ControlledStream, session_pair
from trio_tunnel.mux import Session
from trio_tunnel.takeover import holder_answers, judge

PROBE = 3.0


@attrs.frozen
class _Newcomer:
    peer_token: bytes | None


def controlled_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    left, right = trio.testing.memory_stream_pair()
    controlled = ControlledStream(right)
    pairs.append(controlled)
    return left, controlled


pairs: list[ControlledStream] = []


async def test_a_live_holder_keeps_its_name(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(30):
        async with session_pair() as (server, _client):
            verdict = await judge("home", server, "192.0.2.1:5000", cast(Session, _Newcomer(TOKEN)), PROBE)
            assert not verdict.take
            assert "in use by a live client connected from 192.0.2.1:5000" in verdict.reason
            assert trio.current_time() < PROBE  # answered, not timed out


async def test_a_silent_holder_is_stale_and_taken_over_after_the_probe_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pairs.clear()
    with trio.fail_after(30):
        async with session_pair(controlled_pair) as (server, _client):
            await trio.testing.wait_all_tasks_blocked()  # the handshake's PING/PONG are through
            pairs[0].blackhole = True  # the client's bytes no longer arrive: a dead NAT mapping, a SIGSTOP
            start = trio.current_time()
            verdict = await judge("home", server, "192.0.2.1:5000", cast(Session, _Newcomer(TOKEN)), PROBE)
            assert verdict.take
            assert trio.current_time() - start == PROBE
            pairs[0].blackhole = False


async def test_another_token_never_takes_a_name_even_from_a_stale_holder(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pairs.clear()
    with trio.fail_after(30):
        async with session_pair(controlled_pair) as (server, _client):
            pairs[0].blackhole = True
            verdict = await judge("home", server, "192.0.2.1:5000", cast(Session, _Newcomer(b"x" * 32)), PROBE)
            assert not verdict.take and "another token" in verdict.reason
            assert trio.current_time() == 0  # no probe needed
            pairs[0].blackhole = False


async def test_a_holder_that_is_going_away_or_closed_is_not_alive(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(30):
        async with session_pair() as (server, client):
            client.go_away()
            while not server.going_away:
                await trio.testing.wait_all_tasks_blocked()
            assert not await holder_answers(server, PROBE)
    assert not await holder_answers(server, PROBE)
