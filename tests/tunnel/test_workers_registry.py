"""The parent's registry of ``server --workers N`` (tunnel/registry.py), sans I/O: who owns a name, when to ask the
owner, max_clients across workers, remembered ports; and the worker count (``--workers``)."""

from __future__ import annotations

import os

import pytest
from trio_tunnel.errors import ConfigError
from trio_tunnel.proto import ErrorCode
from trio_tunnel.registry import MAX_REMEMBERED_PORTS, Ask, Grant, LastPorts, Local, Refuse, Registry, token_digest
from trio_tunnel.workers import parse_workers, worker_count

A, B = token_digest(b"token-a"), token_digest(b"token-b")


def test_a_free_name_is_granted_to_the_asking_worker_and_then_local_to_it() -> None:
    registry = Registry(max_clients=10)
    assert registry.decide("home", 0, A) == Grant()
    assert registry.decide("home", 0, A) == Local()  # the worker judges its own takeover, as one process does
    assert registry.held_by(0) == 1 and registry.held_by(1) == 0


def test_a_name_held_elsewhere_is_asked_for_with_the_same_token_and_refused_with_another() -> None:
    registry = Registry(max_clients=10)
    registry.decide("home", 0, A)
    assert registry.decide("home", 1, A) == Ask(owner=0)
    refused = registry.decide("home", 1, B)
    assert isinstance(refused, Refuse) and refused.code == ErrorCode.NAME_IN_USE
    assert "another token" in refused.reason


def test_no_token_matches_only_no_token() -> None:
    registry = Registry(max_clients=10)
    registry.decide("open", 0, None)
    assert registry.decide("open", 1, None) == Ask(owner=0)
    assert isinstance(registry.decide("open", 1, A), Refuse)
    assert token_digest(b"x") == token_digest(b"x") != token_digest(b"y")
    assert token_digest(None) is None


def test_hand_over_moves_the_name_and_a_late_release_by_the_old_owner_changes_nothing() -> None:
    registry = Registry(max_clients=10)
    registry.decide("home", 0, A)
    assert registry.hand_over("home", 0, 1, A)
    assert registry.decide("home", 1, A) == Local()
    assert not registry.release("home", 0)  # worker 0's link ended after the hand-over: not its name any more
    assert registry.decide("home", 1, A) == Local()
    assert registry.release("home", 1)
    assert registry.decide("home", 0, A) == Grant()


def test_hand_over_of_a_name_released_meanwhile_counts_against_max_clients() -> None:
    registry = Registry(max_clients=2)
    registry.decide("home", 0, A)
    registry.release("home", 0)  # (the stale link ended while its owner was asked)
    registry.decide("other", 0, A)
    assert registry.hand_over("home", 0, 1, A)
    registry.release("home", 1)
    registry.decide("third", 1, A)
    assert not registry.hand_over("home", 0, 1, A)  # two names held: no room


def test_max_clients_counts_every_worker() -> None:
    registry = Registry(max_clients=2)
    assert registry.decide("a", 0, A) == Grant()
    assert registry.decide("b", 1, A) == Grant()
    refused = registry.decide("c", 0, A)
    assert isinstance(refused, Refuse) and refused.code == ErrorCode.ENHANCE_YOUR_CALM
    assert registry.decide("a", 1, A) == Ask(owner=0)  # a held name is never "too many"


def test_a_dead_worker_frees_its_names_but_not_the_others() -> None:
    registry = Registry(max_clients=10)
    registry.decide("a", 0, A)
    registry.decide("b", 1, A)
    registry.decide("c", 0, A)
    assert sorted(registry.forget_worker(0)) == ["a", "c"]
    assert registry.decide("a", 1, A) == Grant()
    assert registry.decide("b", 0, A) == Ask(owner=1)


def test_remembered_ports_follow_the_client_and_are_bounded() -> None:
    registry = Registry(max_clients=10)
    registry.remember("home", "web", 40000)
    registry.remember("home", "ssh", 40001)
    registry.remember("other", "web", 40002)
    registry.remember("home", "web", 40003)  # exposed again on another port: the latest counts
    assert registry.ports_of("home") == {"web": 40003, "ssh": 40001}
    for n in range(MAX_REMEMBERED_PORTS):
        registry.remember(f"c{n}", "web", 1024 + n % 60000)
    assert len(registry.last_ports) == MAX_REMEMBERED_PORTS
    assert registry.ports_of("home") == {}  # the oldest were forgotten first


def test_worker_count() -> None:
    assert parse_workers("3") == 3 and parse_workers(" AUTO ") == "auto"
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(ConfigError, match="expected an integer >= 1 or 'auto'"):
            parse_workers(bad)
    assert worker_count(4) == 4
    assert worker_count("auto") == len(os.sched_getaffinity(0))


def test_the_worker_count_cannot_change_on_a_reload() -> None:
    import attrs
    from trio_tunnel.config import HostPort, ServerConfig
    from trio_tunnel.reload import ReloadError, plan_server

    old = ServerConfig(listen=HostPort(host="127.0.0.1", port=0), tokens=(b"t" * 16,), workers=2)
    plan_server(old, attrs.evolve(old, max_clients=5))
    with pytest.raises(ReloadError, match=r"workers cannot change on a reload \(running with 2, the file says auto\)"):
        plan_server(old, attrs.evolve(old, workers="auto"))
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        attrs.evolve(old, workers=0)


def test_last_ports_learn_keeps_its_own_and_stays_bounded() -> None:
    ports = LastPorts()
    ports.remember("home", "web", 40000)
    ports.learn("home", "web", 41000)  # the parent's older news does not override this worker's own
    ports.learn("home", "ssh", 41001)
    assert ports.get("home", "web") == 40000 and ports.get("home", "ssh") == 41001
    for n in range(MAX_REMEMBERED_PORTS + 10):
        ports.learn(f"c{n}", "web", 1024 + n)
    assert len(ports) == MAX_REMEMBERED_PORTS
    assert ports.get("home", "web") is None  # the oldest went first
