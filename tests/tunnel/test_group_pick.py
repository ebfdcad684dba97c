"""tunnel/groups.py's choice of member, without sockets: round-robin turns, least-connections, and the members
that are skipped at once (link closed, leaving, full)."""

from __future__ import annotations

from typing import Any, cast

import attrs
import trio
from trio_tunnel.groups import Group, Member
from trio_tunnel.handlers import Traffic
from trio_tunnel.mux import Session


@attrs.define
class FakeSession:
    closed: bool = False


def make_group(balance: str, *names: str, limit: int = 10) -> Group:
    group = Group("g", "", "0.0.0.0", "0.0.0.0", 9000, "0.0.0.0:9000", balance, [])
    for name in names:
        session = cast(Session, FakeSession())
        group.members.append(Member(name, "web", session, Traffic(cast(Any, None)), trio.CapacityLimiter(limit)))
    return group


def picks(group: Group, count: int) -> list[str]:
    chosen = []
    for _ in range(count):
        member = group.pick([])
        chosen.append(member.client if member else "-")
    return chosen


async def test_round_robin_takes_turns_and_skips_the_dead_at_once() -> None:
    group = make_group("round-robin", "a", "b", "c")
    assert picks(group, 6) == ["a", "b", "c", "a", "b", "c"]
    cast(FakeSession, group.members[1].session).closed = True  # b's link died; its task has not left yet
    assert picks(group, 4) == ["a", "c", "a", "c"]
    group.members[0].scope.cancel()  # a is leaving (its link drains)
    assert picks(group, 2) == ["c", "c"]
    group.members[2].limiter = trio.CapacityLimiter(1)
    group.members[2].limiter.acquire_on_behalf_of_nowait("x")  # c is full
    assert group.pick([]) is None


async def test_a_visit_tries_each_member_once() -> None:
    group = make_group("round-robin", "a", "b")
    first = group.pick([])
    assert first is not None
    second = group.pick([first])
    assert second is not None and second is not first
    assert group.pick([first, second]) is None


async def test_least_connections_prefers_the_least_busy_then_takes_turns() -> None:
    group = make_group("least-connections", "a", "b", "c")
    for _ in range(3):
        group.members[0].limiter.acquire_on_behalf_of_nowait(object())  # a holds 3 connections
    group.members[2].limiter.acquire_on_behalf_of_nowait(object())  # c holds 1
    assert picks(group, 3) == ["b", "b", "b"]
    group.members[1].limiter.acquire_on_behalf_of_nowait(object())  # b now holds 1 too: b and c in turn
    assert picks(group, 4) == ["c", "b", "c", "b"]
