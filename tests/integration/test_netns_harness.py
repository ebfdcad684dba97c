"""Self-tests of tests/netns.py: the namespace topologies are what they claim, and teardown leaves nothing."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (not a package)
import netns
from netns import Topology, can_connect, probe, seen_as

nat_topo = netns.nat_topo  # the ready-made fixtures, made visible to pytest in this module
abc_topo = netns.abc_topo

pytestmark = pytest.mark.netns

# Negative checks against a silently dropping firewall take the whole connect timeout; keep it short.
DROP_TIMEOUT = 1.0


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """After every test: no namespace of a Topology created during the test is left, none left open."""
    first = len(netns.created_ids)
    veths_before = netns.root_veths() if netns.skip_reason() is None else set()
    yield
    ids = netns.created_ids[first:]
    left = (
        [n for n in netns.NETNS_DIR.iterdir() for i in ids if n.name.startswith(i + "-")]
        if netns.NETNS_DIR.exists()
        else []
    )
    assert not left, f"namespaces left behind: {left}"
    if netns.skip_reason() is None:
        assert netns.root_veths() <= veths_before, "a veth appeared in the root namespace"


@pytest.fixture(params=["iptables", "nft"])
def nat(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """The NAT topology built with each firewall backend (a missing backend skips its variant)."""
    with netns.nat_topology(firewall=request.param) as t:
        yield t


# ---------------------------------------------------------------------------------------------------------------
# NAT topology


def test_nat_inside_reaches_public_masqueraded(nat: Topology) -> None:
    with nat.listener("public") as port:
        # The server sees the router's public address, not the inside one: the router masquerades.
        assert seen_as(nat, "inside", nat.addr("public"), port) == nat.addr("router", "public") == "198.18.2.2"
    assert nat.addr("inside") == "198.18.1.2"


def test_nat_public_cannot_reach_inside(nat: Topology) -> None:
    inside = nat.addr("inside")
    with nat.listener("inside") as port:
        assert can_connect(nat, "router", inside, port)  # control: the service is up and reachable on the LAN
        r = probe(nat, "public", inside, port)
        assert not r.ok and "unreachable" in r.reply.lower()  # no route
        # Even with a route to the LAN via the router, new inbound connections are dropped (FORWARD).
        nat.route("public", "198.18.1.0/24", nat.addr("router", "public"))
        r = probe(nat, "public", inside, port, timeout=DROP_TIMEOUT)
        assert not r.ok and "timeout" in r.reply.lower()
        # ... and the router itself does not accept new connections from the public side (INPUT).
        assert not can_connect(nat, "public", nat.addr("router", "public"), port, timeout=DROP_TIMEOUT)


def test_nat_outside_reaches_public_not_inside(nat: Topology) -> None:
    with nat.listener("public") as port:
        assert seen_as(nat, "outside", nat.addr("public", "outside"), port) == nat.addr("outside")
        assert can_connect(nat, "outside", nat.addr("public"), port)  # public's WAN address works too
    with nat.listener("inside") as port:
        r = probe(nat, "outside", nat.addr("inside"), port, timeout=DROP_TIMEOUT)  # public does not forward
        assert not r.ok and "timed out" in r.reply, r
        assert not can_connect(nat, "outside", nat.addr("router", "public"), port, timeout=DROP_TIMEOUT)


def test_nat_only_router_forwards(nat: Topology) -> None:
    forwarding = {h: nat.sysctl(h, "net.ipv4.ip_forward") for h in nat.hosts}
    assert forwarding == {"inside": "0", "router": "1", "public": "0", "outside": "0"}


# ---------------------------------------------------------------------------------------------------------------
# A-B-C topology


def test_abc_b_reaches_both_a_cannot_reach_c(abc_topo: Topology) -> None:
    t = abc_topo
    assert (t.addr("A"), t.addr("B", "A"), t.addr("B", "C"), t.addr("C")) == (
        "198.18.1.1",
        "198.18.1.2",
        "198.18.2.1",
        "198.18.2.2",
    )
    with t.listener("B") as port_b, t.listener("C") as port_c, t.listener("A") as port_a:
        assert seen_as(t, "A", t.addr("B", "A"), port_b) == t.addr("A")
        assert seen_as(t, "B", t.addr("C"), port_c) == t.addr("B", "C")
        assert can_connect(t, "B", t.addr("A"), port_a)
        # B drops what it would have to forward (ip_forward=0 drops silently): a connect timeout.
        r = probe(t, "A", t.addr("C"), port_c, timeout=DROP_TIMEOUT)
        assert not r.ok and "timed out" in r.reply, r
        assert not can_connect(t, "C", t.addr("A"), port_a, timeout=DROP_TIMEOUT)
    assert t.sysctl("B", "net.ipv4.ip_forward") == "0"


# ---------------------------------------------------------------------------------------------------------------
# Trio API: a server process in one namespace, a client in another


async def test_trio_serve_and_client(nat_topo: Topology) -> None:
    t = nat_topo
    with trio.fail_after(20):
        async with t.serve("public", netns.listener_argv(), ready=r"^ready (\d+)$") as server:
            assert server.ready is not None
            port = int(server.ready[1])
            client = [
                sys.executable,
                "-c",
                "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), 2);"
                "print(s.recv(100).decode().strip())",
                t.addr("public"),
                str(port),
            ]
            cp = await t.run_process("inside", client, capture_stdout=True)
            assert cp.stdout.decode().strip() == "198.18.2.2"
            assert await netns.can_connect_async(t, "outside", t.addr("public"), port)
            assert not await netns.can_connect_async(t, "public", t.addr("inside"), port)  # no route: fast
        assert server.process.returncode is not None  # stopped on exit
        # What the body raises comes out as itself (not wrapped in an ExceptionGroup by serve's nursery).
        with pytest.raises(KeyError, match="boom"):
            async with t.serve("outside", netns.listener_argv(), ready="^ready") as other:
                raise KeyError("boom")
        assert other.process.returncode is not None


async def test_trio_serve_reports_early_exit(abc_topo: Topology) -> None:
    with trio.fail_after(15):
        with pytest.raises(AssertionError, match="stdout closed"):
            async with abc_topo.serve("A", [sys.executable, "-c", "print('bye')"], ready="never"):
                pass  # pragma: no cover


# ---------------------------------------------------------------------------------------------------------------
# Teardown


def test_teardown_kills_processes_and_deletes_namespaces() -> None:
    netns.require_netns()
    veths = netns.root_veths()
    with Topology() as t:
        t.add_host("x")
        t.add_host("y")
        t.link("x", "y")
        names = t.namespaces()
        assert names == sorted([t.ns("x"), t.ns("y")]) and all(n.startswith(t.id + "-") for n in names)
        assert netns.root_veths() == veths  # both veth ends were created inside the namespaces
        tracked = t.popen("x", [sys.executable, "-c", "import time; time.sleep(60)"])
        # Not tracked by the Topology: found and killed through `ip netns pids`.
        untracked = subprocess.Popen(t.argv("y", ["sleep", "60"]))
    try:
        assert tracked.wait(timeout=5) < 0
        assert untracked.wait(timeout=5) < 0
    finally:
        untracked.kill()
    assert not set(names) & set(netns.list_namespaces())
    assert not t.namespaces()
    assert netns.root_veths() <= veths


def test_teardown_when_the_test_fails() -> None:
    netns.require_netns()
    with pytest.raises(ZeroDivisionError), netns.abc_topology() as t:
        assert len(t.namespaces()) == 3
        1 / 0  # noqa: B018
    assert not t.namespaces()


def test_half_built_topology_is_cleaned() -> None:
    netns.require_netns()
    with pytest.raises(ValueError), Topology() as t:
        t.add_host("x")
        t.add_host("x")
    assert not t.namespaces()


def test_stale_cleanup_only_removes_old_tt_namespaces() -> None:
    netns.require_netns()
    with Topology() as t:
        ns = t.add_host("old")
        assert ns not in netns.cleanup_stale()  # fresh: kept
        later = time.time() + 2 * netns.STALE_AGE  # pretend two hours passed (only for our own namespace)
        assert netns.cleanup_stale(prefix=t.id + "-", now=later) == [ns]
        assert ns not in netns.list_namespaces()


# ---------------------------------------------------------------------------------------------------------------
# Skipping (no root needed)


def test_skip_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "_skip_cache", {})
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "root" in (netns.skip_reason() or "")
    with pytest.raises(pytest.skip.Exception, match="root"):
        netns.require_netns()


def test_skip_when_namespace_creation_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    if netns.skip_reason() is not None:
        pytest.skip("needs a working ip netns to simulate its failure")
    real_run = netns._run

    def fake_run(argv, **kw):  # type: ignore[no-untyped-def]
        if list(argv[:3]) == ["ip", "netns", "add"]:
            return subprocess.CompletedProcess(argv, 1, "", "mount --make-shared /run/netns failed: EPERM")
        return real_run(argv, **kw)

    monkeypatch.setattr(netns, "_skip_cache", {})
    monkeypatch.setattr(netns, "_run", fake_run)
    assert "cannot create a network namespace" in (netns.skip_reason() or "")
    with pytest.raises(pytest.skip.Exception):
        netns.require_netns()
    # A namespace that cannot be created while building a topology also skips, leaving nothing behind.
    monkeypatch.setattr(netns, "_skip_cache", {(False, None): None})
    with pytest.raises(pytest.skip.Exception, match="ip netns add"), netns.abc_topology():
        pass  # pragma: no cover


def test_skip_without_firewall_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "_skip_cache", {})
    real_which = netns.shutil.which
    monkeypatch.setattr(
        netns.shutil,
        "which",
        lambda name: None if name in ("iptables", "iptables-restore", "nft") else real_which(name),
    )
    reason = netns.skip_reason(nat=True)
    if netns.skip_reason() is None:
        assert reason is not None and "iptables" in reason
    with pytest.raises(pytest.skip.Exception), netns.nat_topology():
        pass  # pragma: no cover
