"""Network-namespace topologies for integration tests (Linux, root only; tests skip otherwise).

Everything happens inside namespaces this module creates: veth pairs are created directly between two test
namespaces (no interface ever appears in the root namespace), addresses come from 198.18.0.0/15 (RFC 2544
benchmark range), and routes, sysctls and firewall/NAT rules are only ever set with ``ip -n NS`` or
``ip netns exec NS``. Namespace names are ``tt-<6 hex>-<host>``, unique per Topology, and are deleted (after
killing whatever still runs in them) when the Topology closes, even when the test failed.

Import from a test module (tests/ is not a package)::

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the tests/ directory
    import netns
    nat_topo = netns.nat_topo   # expose the ready-made fixtures to pytest in that module
    abc_topo = netns.abc_topo   # (or: with netns.nat_topology() as topo: ... inside a test)

Address plan of the ready-made topologies (a link ``link(x, y, subnet)`` gives x the .1 and y the .2):

    nat_topology():  inside 198.18.1.2 --lan-- 198.18.1.1 router 198.18.2.2 --wan-- 198.18.2.1 public
                     public 198.18.3.1 -- 198.18.3.2 outside
        inside: default via router; router: default via public, forwards, MASQUERADE out of its wan iface,
        FORWARD policy DROP except lan->wan and ESTABLISHED,RELATED, INPUT from wan only ESTABLISHED,RELATED;
        outside: default via public; public: no forwarding, no route to 198.18.1.0/24.
        topo.addr("public") == "198.18.2.1" (reachable from inside and from outside).
    abc_topology():  A 198.18.1.1 -- 198.18.1.2 B 198.18.2.1 -- 198.18.2.2 C
        A routes 198.18.2.0/24 via B and C routes 198.18.1.0/24 via B, but B has ip_forward=0, so A cannot
        reach C (B answers with ICMP host unreachable) while B reaches both.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

PREFIX = "tt-"
NETNS_DIR = Path("/run/netns")
STALE_AGE = 3600.0  # seconds: leftover tt-* namespaces older than this are deleted at session start
ADDRESS_POOL = ipaddress.IPv4Network("198.18.0.0/15")
_HOST_RE = re.compile(r"^[A-Za-z0-9]{1,11}$")  # "to-" + name must fit IFNAMSIZ (15)
CMD_TIMEOUT = 15.0  # seconds, for each ip/iptables/sysctl command


class NetnsError(RuntimeError):
    """A namespace command failed (a bug or a broken environment, not a reason to skip)."""


class NetnsUnavailable(NetnsError):
    """The environment cannot do this at all (no root, no ip netns, no CAP_SYS_ADMIN, no NAT...)."""


def _run(
    argv: Sequence[str], *, input: str | None = None, timeout: float = CMD_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as e:
        raise NetnsUnavailable(f"{argv[0]} not found") from e
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{' '.join(argv)} timed out after {timeout}s") from e
    if check and cp.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed (exit {cp.returncode}): {cp.stderr.strip()}")
    return cp


# --------------------------------------------------------------------------------------------------------------
# Environment checks, skipping, stale cleanup


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    cp = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def tt_namespaces() -> list[str]:
    """Named namespaces created by this module (any run)."""
    return [n for n in list_namespaces() if n.startswith(PREFIX)]


def root_veths() -> set[str]:
    """veth interfaces in the root namespace (this module never creates any)."""
    cp = _run(["ip", "-o", "link", "show", "type", "veth"], check=False)
    return {line.split(":")[1].strip().split("@")[0] for line in cp.stdout.splitlines() if ":" in line}


def cleanup_stale(max_age: float = STALE_AGE, *, prefix: str = PREFIX, now: float | None = None) -> list[str]:
    """Delete ``tt-*`` namespaces (``prefix``) older than ``max_age`` seconds (left over by killed runs).

    Age is the mtime of /run/netns/NAME (set when the namespace was added). Processes still inside a stale
    namespace are not ours to kill; the namespace then lives on anonymously until they exit.
    """
    if not prefix.startswith(PREFIX):
        raise ValueError(f"only {PREFIX}* namespaces are ours to clean")
    removed = []
    now = time.time() if now is None else now
    with suppress(OSError):
        for entry in sorted(NETNS_DIR.iterdir()):
            if not entry.name.startswith(prefix):
                continue
            try:
                age = now - entry.stat().st_mtime
            except OSError:
                continue
            if age > max_age and _run(["ip", "netns", "del", entry.name], check=False).returncode == 0:
                removed.append(entry.name)
    return removed


def firewall_backend(preferred: str | None = None) -> str | None:
    """'iptables' or 'nft' (whichever exists; ``preferred`` or env TT_NETNS_FIREWALL to force), else None."""
    preferred = preferred or os.environ.get("TT_NETNS_FIREWALL") or None
    candidates = [preferred] if preferred else ["iptables", "nft"]
    for c in candidates:
        if c == "iptables" and shutil.which("iptables") and shutil.which("iptables-restore"):
            return "iptables"
        if c == "nft" and shutil.which("nft"):
            return "nft"
    return None


_skip_cache: dict[tuple[bool, str | None], str | None] = {}
_stale_cleaned = False


def skip_reason(*, nat: bool = False, firewall: str | None = None) -> str | None:
    """Why namespace tests cannot run here (None if they can). Probes once per process and setting.

    The first call also deletes stale ``tt-*`` namespaces (older than an hour).
    """
    global _stale_cleaned
    key = (nat, firewall)
    if key in _skip_cache:
        return _skip_cache[key]
    reason: str | None = None
    if not sys.platform.startswith("linux"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "network namespace tests need root"
    elif shutil.which("ip") is None:
        reason = "iproute2 'ip' not found"
    else:
        cp = _run(["ip", "netns", "list"], check=False)
        if cp.returncode != 0:
            reason = f"'ip netns' unavailable: {cp.stderr.strip()}"
    if reason is None and not _stale_cleaned:
        _stale_cleaned = True
        cleanup_stale()
    if reason is None:
        reason = _probe(nat=nat, firewall=firewall)
    _skip_cache[key] = reason
    return reason


def _probe(*, nat: bool, firewall: str | None) -> str | None:
    backend = firewall_backend(firewall)
    if nat and backend is None:
        want = firewall or "iptables (or nft)"
        package = "nftables" if firewall == "nft" else "iptables"
        return f"NAT topology needs {want}; install it (apt-get install {package})"
    name = f"{PREFIX}{secrets.token_hex(3)}-probe"
    cp = _run(["ip", "netns", "add", name], check=False)
    if cp.returncode != 0:
        return f"cannot create a network namespace: {cp.stderr.strip()}"
    try:
        cp = _run(["ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], check=False)
        if cp.returncode != 0:
            return f"cannot create veth pairs in a namespace: {cp.stderr.strip()}"
        if nat:
            assert backend is not None
            try:
                _apply_nat(name, backend, "p0")
            except NetnsError as e:
                return f"NAT ({backend}) does not work in a namespace here: {e}"
        return None
    finally:
        _run(["ip", "netns", "del", name], check=False)


def require_netns(*, nat: bool = False, firewall: str | None = None) -> None:
    """pytest.skip(reason) unless namespace (and, with nat=True, NAT) tests can run here."""
    reason = skip_reason(nat=nat, firewall=firewall)
    if reason is not None:
        pytest.skip(reason)


# --------------------------------------------------------------------------------------------------------------
# Firewall / NAT rules (always applied inside a namespace)


def _iptables_rules(out_iface: str) -> str:
    return "\n".join(
        [
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":FORWARD DROP [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"-A FORWARD ! -i {out_iface} -o {out_iface} -j ACCEPT",
            f"-A INPUT -i {out_iface} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"-A INPUT -i {out_iface} -j DROP",
            "COMMIT",
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":INPUT ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            ":POSTROUTING ACCEPT [0:0]",
            f"-A POSTROUTING -o {out_iface} -j MASQUERADE",
            "COMMIT",
            "",
        ]
    )


def _nft_rules(out_iface: str) -> str:
    return f"""
table ip tt_nat {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname != "{out_iface}" oifname "{out_iface}" accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{out_iface}" ct state established,related accept
        iifname "{out_iface}" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{out_iface}" masquerade
    }}
}}
"""


def _apply_nat(ns: str, backend: str, out_iface: str) -> None:
    # Never without "ip netns exec": the root namespace's firewall is not ours.
    if backend == "iptables":
        _run(["ip", "netns", "exec", ns, "iptables-restore", "-w", "5"], input=_iptables_rules(out_iface))
    elif backend == "nft":
        _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=_nft_rules(out_iface))
    else:
        raise NetnsUnavailable(f"unknown firewall backend {backend!r}")


# --------------------------------------------------------------------------------------------------------------
# Topology


@dataclass
class Link:
    a: str
    b: str
    network: ipaddress.IPv4Network
    a_addr: str
    b_addr: str
    a_iface: str  # interface in a's namespace (named "to-<b>")
    b_iface: str  # interface in b's namespace (named "to-<a>")


@dataclass
class _Host:
    name: str
    ns: str
    addrs: list[tuple[str, str]] = field(default_factory=list)  # (peer, address) in link order


_open_topologies: weakref.WeakSet[Topology] = weakref.WeakSet()
created_ids: list[str] = []  # ids of every Topology made in this process (for leak checks)


@atexit.register
def _close_leftovers() -> None:
    for topo in list(_open_topologies):
        with suppress(Exception):
            topo.close()


class Topology:
    """A set of network namespaces joined by veth links. Use as a context manager (or call close()).

    All methods are synchronous except run_process/open_process/serve (Trio).
    """

    def __init__(self, *, firewall: str | None = None) -> None:
        self.id = f"{PREFIX}{secrets.token_hex(3)}"
        created_ids.append(self.id)
        self.firewall = firewall
        self.hosts: dict[str, _Host] = {}
        self.links: list[Link] = []
        self._next_subnet = 1
        self._procs: list[Any] = []  # subprocess.Popen | trio.Process
        self._closed = False
        _open_topologies.add(self)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def namespaces(self) -> list[str]:
        """Names of this topology's namespaces that currently exist (including half-created ones)."""
        with suppress(OSError):
            return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(self.id + "-"))
        return []

    def close(self) -> None:
        """Kill every process in our namespaces, delete the namespaces (and with them the veths). Idempotent."""
        if self._closed:
            return
        self._closed = True
        _open_topologies.discard(self)
        for p in self._procs:
            with suppress(Exception):
                if p.poll() is None:
                    p.kill()
        for p in self._procs:
            if isinstance(p, subprocess.Popen):
                with suppress(Exception):
                    p.wait(timeout=5)
        errors = []
        names = set(self.namespaces()) | {h.ns for h in self.hosts.values()}
        for ns in sorted(names):
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            cp = _run(["ip", "netns", "del", ns], check=False)
            if cp.returncode != 0 and (NETNS_DIR / ns).exists():
                errors.append(f"{ns}: {cp.stderr.strip()}")
        if errors:
            raise NetnsError("could not delete namespaces: " + "; ".join(errors))

    # -- building ----------------------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        """The namespace name of ``host`` (``tt-xxxxxx-host``)."""
        return self._host(host).ns

    def _host(self, host: str) -> _Host:
        try:
            return self.hosts[host]
        except KeyError:
            raise KeyError(f"no host {host!r} in this topology (hosts: {sorted(self.hosts)})") from None

    def add_host(self, host: str) -> str:
        """Create a namespace for ``host`` with loopback up and forwarding off; returns its name."""
        if self._closed:
            raise NetnsError("topology is closed")
        if not _HOST_RE.match(host):
            raise ValueError(f"host name {host!r}: use 1-11 letters or digits")
        if host in self.hosts:
            raise ValueError(f"host {host!r} exists")
        ns = f"{self.id}-{host}"
        cp = _run(["ip", "netns", "add", ns], check=False)
        if cp.returncode != 0:
            raise NetnsUnavailable(f"ip netns add {ns} failed: {cp.stderr.strip()}")
        self.hosts[host] = _Host(host, ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self._sysctl(host, "net/ipv4/ip_forward", "0")
        return ns

    def _sysctl(self, host: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        # /proc/sys/net is per network namespace: the write must happen from inside the namespace.
        _run(["ip", "netns", "exec", self.ns(host), "sh", "-c", 'echo "$1" > "$2"', "sh", value, path])

    def sysctl(self, host: str, key: str) -> str:
        path = "/proc/sys/" + key.replace(".", "/")
        return _run(["ip", "netns", "exec", self.ns(host), "cat", path]).stdout.strip()

    def link(self, a: str, b: str, subnet: str | None = None) -> Link:
        """Join ``a`` and ``b`` with a veth pair; a gets the subnet's first address, b the second.

        Interfaces are named ``to-<peer>``. Without ``subnet`` the next free 198.18.N.0/24 is used (N = 1, 2...).
        """
        ha, hb = self._host(a), self._host(b)
        if a == b or any({lk.a, lk.b} == {a, b} for lk in self.links):
            raise ValueError(f"link {a}-{b}: hosts must differ and be linked at most once")
        if subnet is None:
            net = list(ADDRESS_POOL.subnets(new_prefix=24))[self._next_subnet]
            self._next_subnet += 1
        else:
            net = ipaddress.IPv4Network(subnet)
            if not net.subnet_of(ADDRESS_POOL):
                raise ValueError(f"{subnet} is outside {ADDRESS_POOL} (the range reserved for these tests)")
        hosts_iter = net.hosts()
        a_addr, b_addr = str(next(hosts_iter)), str(next(hosts_iter))
        a_if, b_if = f"to-{b}", f"to-{a}"
        # Created in a's namespace with the peer put straight into b's: never in the root namespace.
        _run(["ip", "-n", ha.ns, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", hb.ns])
        for h, ifname, addr in ((ha, a_if, a_addr), (hb, b_if, b_addr)):
            _run(["ip", "-n", h.ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", ifname])
            _run(["ip", "-n", h.ns, "link", "set", ifname, "up"])
        ha.addrs.append((b, a_addr))
        hb.addrs.append((a, b_addr))
        lk = Link(a, b, net, a_addr, b_addr, a_if, b_if)
        self.links.append(lk)
        return lk

    def addr(self, host: str, peer: str | None = None) -> str:
        """``host``'s address on its link to ``peer`` (default: on its first link)."""
        h = self._host(host)
        for p, address in h.addrs:
            if peer is None or p == peer:
                return address
        raise KeyError(f"{host} has no link" + (f" to {peer}" if peer else ""))

    def iface(self, host: str, peer: str) -> str:
        """Name of ``host``'s interface towards ``peer``."""
        for lk in self.links:
            if (lk.a, lk.b) == (host, peer):
                return lk.a_iface
            if (lk.b, lk.a) == (host, peer):
                return lk.b_iface
        raise KeyError(f"no link {host}-{peer}")

    def route(self, host: str, dest: str, via: str) -> None:
        """Add a route inside ``host``'s namespace (``dest`` a CIDR or 'default')."""
        _run(["ip", "-n", self.ns(host), "route", "add", dest, "via", via])

    def default_route(self, host: str, via: str) -> None:
        self.route(host, "default", via)

    def enable_forwarding(self, host: str, on: bool = True) -> None:
        """net.ipv4.ip_forward inside ``host`` (all its interfaces)."""
        self._sysctl(host, "net/ipv4/ip_forward", "1" if on else "0")

    def masquerade(self, host: str, out_iface: str) -> str:
        """Make ``host`` a NAT gateway towards ``out_iface`` (inside its namespace only).

        MASQUERADE out of ``out_iface``; FORWARD policy DROP, allowing new connections only from other
        interfaces out through ``out_iface`` and ESTABLISHED,RELATED back; INPUT from ``out_iface`` only
        ESTABLISHED,RELATED. Uses iptables (iptables-restore) or nft; returns the backend used.
        """
        backend = firewall_backend(self.firewall)
        if backend is None:
            raise NetnsUnavailable("neither iptables nor nft is installed")
        _apply_nat(self.ns(host), backend, out_iface)
        return backend

    # -- running things ----------------------------------------------------------------------------------------

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``host``'s namespace (``ip netns exec NS ...``, which execs argv)."""
        return ["ip", "netns", "exec", self.ns(host), *[os.fspath(a) for a in argv]]

    def run(
        self, host: str, argv: Sequence[str], *, timeout: float = 30.0, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside ``host`` (bounded: ``timeout`` is mandatory, default 30 s)."""
        return subprocess.run(self.argv(host, argv), timeout=timeout, **kw)

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen inside ``host``; killed at close() if still running."""
        p = subprocess.Popen(self.argv(host, argv), **kw)
        self._procs.append(p)
        return p

    async def run_process(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        """trio.run_process inside ``host`` (wrap it in trio.fail_after: run_process itself has no timeout)."""
        return await trio.run_process(self.argv(host, argv), **kw)

    async def open_process(self, host: str, argv: Sequence[str], **kw: Any) -> trio.Process:
        """trio.lowlevel.open_process inside ``host``; killed at close() if still running."""
        p = await trio.lowlevel.open_process(self.argv(host, argv), **kw)
        self._procs.append(p)
        return p

    @asynccontextmanager
    async def serve(
        self,
        host: str,
        argv: Sequence[str],
        *,
        ready: str | re.Pattern[str] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109
        **kw: Any,
    ) -> AsyncIterator[Served]:
        """Run a long-lived process inside ``host`` with its stdout read line by line.

        Waits (at most ``timeout`` s) for a stdout line matching ``ready`` (``served.ready`` holds the match).
        On exit the process gets SIGTERM, then SIGKILL after 5 s. stderr is inherited unless given in ``kw``.
        """
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = await self.open_process(host, argv, stdout=subprocess.PIPE, **kw)
        served = Served(proc, " ".join(os.fspath(a) for a in argv))
        unwrapped: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(served._pump)
                try:
                    if ready is not None:
                        served.ready = await served.expect(ready, timeout=timeout)
                    yield served
                finally:
                    await served.stop()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as eg:
            # The nursery wraps what the with-body raised; give the caller its own exception back.
            if len(eg.exceptions) != 1:
                raise
            unwrapped = eg.exceptions[0]
        finally:
            if proc.returncode is None:
                proc.kill()
        if unwrapped is not None:
            raise unwrapped

    def listener(
        self, host: str, bind: str = "0.0.0.0", port: int = 0, lifetime: int = 300
    ) -> AbstractContextManager[int]:
        """Sync context manager: a TCP accept loop in ``host`` that answers each connection with the peer
        address it sees (one line) and closes. Yields the bound port. Exits by itself after ``lifetime`` s."""
        return _listener(self, host, bind, port, lifetime)


class Served:
    """A process started by Topology.serve: ``lines`` (stdout so far), ``expect()``, ``stop()``."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.lines: list[str] = []
        self.ready: re.Match[str] | None = None
        self.eof = False
        self._cursor = 0
        self._changed = trio.Event()

    async def _pump(self) -> None:
        buf = b""
        assert self.process.stdout is not None
        try:
            while True:
                data = await self.process.stdout.receive_some(65536)
                if not data:
                    break
                buf += data
                *complete, buf = buf.split(b"\n")
                self.lines.extend(c.decode(errors="replace").rstrip("\r") for c in complete)
                if complete:
                    self._changed.set()
                    self._changed = trio.Event()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            if buf:
                self.lines.append(buf.decode(errors="replace"))
            self.eof = True
            self._changed.set()

    async def expect(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:  # noqa: ASYNC109 (a default bound)
        """Wait for the next stdout line (after those already matched) that matches ``pattern``."""
        rx = re.compile(pattern)
        with trio.move_on_after(timeout):
            while True:
                while self._cursor < len(self.lines):
                    line = self.lines[self._cursor]
                    self._cursor += 1
                    if m := rx.search(line):
                        return m
                if self.eof:
                    await self._wait_exit(1.0)
                    raise AssertionError(
                        f"{self.name}: stdout closed (exit {self.process.returncode}) "
                        f"before a line matching {rx.pattern!r}; stdout: {self.lines!r}"
                    )
                await self._changed.wait()
        raise TimeoutError(
            f"{self.name}: no stdout line matching {rx.pattern!r} within {timeout}s; stdout: {self.lines!r}"
        )

    async def _wait_exit(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self.process.wait()

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` s, then SIGKILL. Returns the exit code (negative = signal)."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                with suppress(ProcessLookupError):
                    self.process.terminate()
                await self._wait_exit(grace)
            if self.process.returncode is None:
                with suppress(ProcessLookupError):
                    self.process.kill()
                await self._wait_exit(5.0)
        return self.process.returncode


# --------------------------------------------------------------------------------------------------------------
# Reachability helpers (tiny Python programs run inside namespaces; everything bounded)

# Accept loop: answers each connection with the peer address it sees. Bounded by SIGALRM after argv[3] s.
LISTENER_SRC = (
    "import signal,socket,sys\n"
    "signal.alarm(int(sys.argv[3]))\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(128)\n"
    "print('ready', s.getsockname()[1], flush=True)\n"
    "while True:\n"
    "    c, peer = s.accept()\n"
    "    try:\n"
    "        c.settimeout(2); c.sendall((peer[0] + '\\n').encode())\n"
    "    except OSError:\n"
    "        pass\n"
    "    c.close()\n"
)

# Connect (with timeout); with argv[4] == '1' also read one reply line. Prints OK/ERR; exit 0 iff connected.
PROBE_SRC = (
    "import socket,sys\n"
    "host, port, t, read = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == '1'\n"
    "try:\n"
    "    s = socket.create_connection((host, port), timeout=t)\n"
    "except OSError as e:\n"
    "    print('ERR', type(e).__name__, e); sys.exit(1)\n"
    "reply = b''\n"
    "if read:\n"
    "    try:\n"
    "        reply = s.recv(256)\n"
    "    except OSError:\n"
    "        pass\n"
    "s.close(); print('OK', reply.decode(errors='replace').strip())\n"
)


def listener_argv(bind: str = "0.0.0.0", port: int = 0, lifetime: int = 300) -> list[str]:
    """argv of the peer-echo accept loop (prints ``ready PORT``); for Topology.serve/popen."""
    return [sys.executable, "-c", LISTENER_SRC, bind, str(port), str(lifetime)]


def probe_argv(addr: str, port: int, timeout: float = 2.0, read: bool = False) -> list[str]:
    return [sys.executable, "-c", PROBE_SRC, addr, str(port), str(timeout), "1" if read else "0"]


@contextmanager
def _listener(topo: Topology, host: str, bind: str, port: int, lifetime: int) -> Iterator[int]:
    p = topo.popen(
        host, listener_argv(bind, port, lifetime), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], 10.0)
        line = p.stdout.readline() if ready else ""
        if not line.startswith("ready "):
            raise NetnsError(f"listener in {host} did not start (exit {p.poll()}, output {line!r})")
        yield int(line.split()[1])
    finally:
        p.kill()
        p.wait(timeout=5)


@dataclass
class ProbeResult:
    ok: bool
    reply: str  # the first reply line (the peer address, against a Topology.listener), or the error


def _parse_probe(returncode: int | None, out: str) -> ProbeResult:
    out = out.strip()
    if returncode == 0 and out.startswith("OK"):
        return ProbeResult(True, out[2:].strip())
    return ProbeResult(False, out or f"exit {returncode}")


def probe(
    topo: Topology, from_host: str, to_addr: str, port: int, timeout: float = 2.0, read: bool = False
) -> ProbeResult:
    """Try a TCP connection from inside ``from_host``; with read=True also read one reply line."""
    try:
        cp = topo.run(
            from_host,
            probe_argv(to_addr, port, timeout, read),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=2 * timeout + 10,
        )
    except subprocess.TimeoutExpired:
        return ProbeResult(False, "probe process timed out")
    return _parse_probe(cp.returncode, cp.stdout)


def can_connect(topo: Topology, from_host: str, to_addr: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection from ``from_host`` to ``to_addr:port`` succeeds within ``timeout`` s."""
    return probe(topo, from_host, to_addr, port, timeout).ok


def seen_as(topo: Topology, from_host: str, to_addr: str, port: int, timeout: float = 2.0) -> str | None:
    """Connect to a Topology.listener and return the source address it saw (None if no connection)."""
    r = probe(topo, from_host, to_addr, port, timeout, read=True)
    return r.reply if r.ok else None


async def probe_async(
    topo: Topology,
    from_host: str,
    to_addr: str,
    port: int,
    timeout: float = 2.0,  # noqa: ASYNC109 (the child's connect timeout)
    read: bool = False,
) -> ProbeResult:
    """Trio version of probe()."""
    with trio.move_on_after(2 * timeout + 10):
        cp = await topo.run_process(
            from_host,
            probe_argv(to_addr, port, timeout, read),
            capture_stdout=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        return _parse_probe(cp.returncode, cp.stdout.decode(errors="replace"))
    return ProbeResult(False, "probe process timed out")


async def can_connect_async(topo: Topology, from_host: str, to_addr: str, port: int, timeout: float = 2.0) -> bool:  # noqa: ASYNC109 (the child's connect timeout)
    return (await probe_async(topo, from_host, to_addr, port, timeout)).ok


# --------------------------------------------------------------------------------------------------------------
# Ready-made topologies


@contextmanager
def _built(topo: Topology, build: Any, what: str) -> Iterator[Topology]:
    try:
        try:
            build(topo)
        except NetnsUnavailable as e:
            pytest.skip(f"{what}: {e}")
        yield topo
    finally:
        topo.close()


def _build_nat(t: Topology) -> None:
    for h in ("inside", "router", "public", "outside"):
        t.add_host(h)
    t.link("router", "inside", "198.18.1.0/24")  # router .1, inside .2 (the LAN)
    t.link("public", "router", "198.18.2.0/24")  # public .1, router .2 (the WAN)
    t.link("public", "outside", "198.18.3.0/24")  # public .1, outside .2
    t.default_route("inside", t.addr("router", "inside"))
    t.default_route("router", t.addr("public", "router"))
    t.default_route("outside", t.addr("public", "outside"))
    t.enable_forwarding("router")
    t.masquerade("router", t.iface("router", "public"))


def _build_abc(t: Topology) -> None:
    for h in ("A", "B", "C"):
        t.add_host(h)
    t.link("A", "B", "198.18.1.0/24")  # A .1, B .2
    t.link("B", "C", "198.18.2.0/24")  # B .1, C .2
    # Routes exist, so only B's refusal to forward keeps A and C apart (the seed's situation).
    t.route("A", "198.18.2.0/24", t.addr("B", "A"))
    t.route("C", "198.18.1.0/24", t.addr("B", "C"))
    t.enable_forwarding("B", False)


@contextmanager
def nat_topology(*, firewall: str | None = None) -> Iterator[Topology]:
    """inside -- router (NAT) -- public -- outside; skips the test when namespaces or NAT are unavailable."""
    require_netns(nat=True, firewall=firewall)
    with _built(Topology(firewall=firewall), _build_nat, "NAT topology") as t:
        yield t


@contextmanager
def abc_topology() -> Iterator[Topology]:
    """A -- B -- C, B not forwarding; skips the test when namespaces are unavailable."""
    require_netns()
    with _built(Topology(), _build_abc, "A-B-C topology") as t:
        yield t


@pytest.fixture
def nat_topo() -> Iterator[Topology]:
    """Function-scoped nat_topology() (a fresh set of namespaces per test)."""
    with nat_topology() as t:
        yield t


@pytest.fixture
def abc_topo() -> Iterator[Topology]:
    """Function-scoped abc_topology()."""
    with abc_topology() as t:
        yield t
