"""The systems under test: how each one is started on loopback (and with the delay line in its link)."""

from __future__ import annotations

# Preparing a system's temp files (keys, sshd_config) inline in async code is intended.
# ruff: noqa: ASYNC240
import argparse
import functools
import getpass
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .common import BENCH_PATH, DELAYLINE_PATH, REPO
from .procs import (
    Child,
    ProcessGroup,
    SystemUnavailable,
    exited_reason,
    free_port,
    process_tree,
    run_capture,
    wait_accepting,
)
from .wire import Addr


@dataclass
class Target:
    """A running system: where clients connect and which processes are the system."""

    name: str
    addr: Addr
    roots: list[int]
    check: Callable[[], str | None] = lambda: None

    def pids(self) -> list[int]:
        return process_tree(self.roots)


async def start_sink(group: ProcessGroup) -> tuple[Child, Addr]:
    child = await group.start("sink", [sys.executable, str(BENCH_PATH), "--serve-sink"])
    m = await child.wait_line(r"listening (\S+):(\d+)", 20)
    return child, (m.group(1), int(m.group(2)))


async def start_delayline(group: ProcessGroup, upstream: Addr, params: Any) -> Addr:
    cmd = [
        sys.executable,
        str(DELAYLINE_PATH),
        "--listen",
        "127.0.0.1:0",
        "--connect",
        f"{upstream[0]}:{upstream[1]}",
        "--delay-ms",
        repr(params.delay_s * 1e3),
        "--rate-mbit",
        repr(params.rate_bps / 1e6),
    ]
    if params.buffer_bytes is not None:
        cmd += ["--buffer-kib", str(params.buffer_bytes // 1024)]
    child = await group.start("delayline", cmd)
    m = await child.wait_line(r"listening (\S+):(\d+)", 20)
    return m.group(1), int(m.group(2))


@dataclass(frozen=True)
class System:
    """How one system under test is started. An instance is one row of the benchmark (its `name` is the column
    in the table and the word for --systems); the instances are data, listed in SYSTEM_LIST, so a variant of a
    system (the same tool with other arguments) is one more entry there, not a new class."""

    name: str

    def unavailable(self, opts: argparse.Namespace) -> str | None:
        return None

    def version(self, opts: argparse.Namespace) -> str:
        return ""

    async def start(
        self, group: ProcessGroup, sink: Child, sink_addr: Addr, opts: argparse.Namespace, delay: Any | None
    ) -> Target:
        raise NotImplementedError


@dataclass(frozen=True)
class Direct(System):
    """No relay: the load generator talks to the sink itself (the harness's own ceiling)."""

    name: str = "direct"

    async def start(
        self, group: ProcessGroup, sink: Child, sink_addr: Addr, opts: argparse.Namespace, delay: Any | None
    ) -> Target:
        addr = sink_addr if delay is None else await start_delayline(group, sink_addr, delay)
        return Target(self.name, addr, [sink.pid], lambda: exited_reason(sink))


@dataclass(frozen=True)
class Socat(System):
    """A C relay, one forked process per connection."""

    name: str = "socat"

    def unavailable(self, opts: argparse.Namespace) -> str | None:
        if not shutil.which("socat"):
            return "socat not installed (apt-get install socat)"
        return None

    def version(self, opts: argparse.Namespace) -> str:
        return _first_line(["socat", "-V"], r"socat version (\S+)")

    async def start(
        self, group: ProcessGroup, sink: Child, sink_addr: Addr, opts: argparse.Namespace, delay: Any | None
    ) -> Target:
        upstream = sink_addr if delay is None else await start_delayline(group, sink_addr, delay)
        last = ""
        for _ in range(3):
            port = free_port()
            child = await group.start(
                "socat",
                [
                    "socat",
                    f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog={opts.socat_backlog}",
                    f"TCP:{upstream[0]}:{upstream[1]}",
                ],
            )
            try:
                await wait_accepting(("127.0.0.1", port), 10, lambda c=child: exited_reason(c))  # type: ignore[misc]
            except SystemUnavailable as exc:
                last = str(exc)
                continue
            return Target(self.name, ("127.0.0.1", port), [child.pid], lambda c=child: exited_reason(c))  # type: ignore[misc]
        raise SystemUnavailable(f"socat did not start: {last}")


@dataclass(frozen=True)
class Ssh(System):
    """OpenSSH's reverse tunnel against a throwaway sshd (own keys and config in a temp dir)."""

    name: str = "ssh"

    def unavailable(self, opts: argparse.Namespace) -> str | None:
        missing = [t for t in ("ssh", "ssh-keygen") if not shutil.which(t)]
        if missing:
            return f"{', '.join(missing)} not installed (apt-get install openssh-client)"
        if not self._sshd():
            return "sshd not installed (apt-get install openssh-server)"
        return None

    @staticmethod
    def _sshd() -> str | None:
        for cand in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
            if cand and os.access(cand, os.X_OK):
                return os.path.abspath(cand)  # sshd re-execs itself: it needs an absolute path
        return None

    def version(self, opts: argparse.Namespace) -> str:
        try:
            out = run_capture(["ssh", "-V"])
            v = (out.stderr or out.stdout).strip().split(",")[0]
        except (OSError, subprocess.SubprocessError):
            return ""
        cipher = opts.ssh_cipher or _ssh_default_cipher()
        return f"{v}, cipher {cipher}" if cipher else v

    async def start(
        self, group: ProcessGroup, sink: Child, sink_addr: Addr, opts: argparse.Namespace, delay: Any | None
    ) -> Target:
        d = Path(tempfile.mkdtemp(prefix="ssh-", dir=group.tmp))
        for key in ("host_key", "client_key"):
            try:
                r = run_capture(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(d / key)], timeout=30
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise SystemUnavailable(f"ssh-keygen failed: {exc}") from exc
            if r.returncode != 0:
                raise SystemUnavailable(f"ssh-keygen failed: {r.stderr.strip()}")
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            # sshd (as root) insists on its privilege-separation directory; Debian's service unit creates it.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        user = getpass.getuser()
        last = ""
        for _ in range(3):
            sshd_port = free_port()
            cfg = d / "sshd_config"
            cfg.write_text(
                "\n".join(
                    [
                        f"Port {sshd_port}",
                        "ListenAddress 127.0.0.1",
                        f"HostKey {d / 'host_key'}",
                        "PidFile none",
                        f"AuthorizedKeysFile {d / 'authorized_keys'}",
                        "PubkeyAuthentication yes",
                        "PasswordAuthentication no",
                        "KbdInteractiveAuthentication no",
                        "PermitRootLogin prohibit-password",
                        "StrictModes no",
                        "UsePAM no",
                        "AllowTcpForwarding yes",
                        "GatewayPorts no",
                        "X11Forwarding no",
                        "PrintMotd no",
                        "UseDNS no",
                        "LogLevel ERROR",
                        "",
                    ]
                )
            )
            sshd = await group.start("sshd", [self._sshd() or "sshd", "-D", "-e", "-f", str(cfg)])
            try:
                await wait_accepting(("127.0.0.1", sshd_port), 10, lambda c=sshd: exited_reason(c))  # type: ignore[misc]
            except SystemUnavailable as exc:
                last = str(exc)
                continue
            link = (
                ("127.0.0.1", sshd_port)
                if delay is None
                else await start_delayline(group, ("127.0.0.1", sshd_port), delay)
            )
            for _ in range(3):
                port = free_port()
                cmd = [
                    "ssh",
                    "-N",
                    "-F",
                    "/dev/null",
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "IdentitiesOnly=yes",
                    "-o",
                    "LogLevel=ERROR",
                    "-i",
                    str(d / "client_key"),
                    "-p",
                    str(link[1]),
                    "-R",
                    f"127.0.0.1:{port}:{sink_addr[0]}:{sink_addr[1]}",
                ]
                if opts.ssh_cipher:
                    cmd += ["-c", opts.ssh_cipher]
                cmd.append(f"{user}@{link[0]}")
                ssh = await group.start("ssh", cmd)

                def check(s: Child = ssh, sd: Child = sshd) -> str | None:
                    return exited_reason(s) or exited_reason(sd)

                try:
                    await wait_accepting(("127.0.0.1", port), 15, check)
                except SystemUnavailable as exc:
                    last = str(exc)
                    continue
                return Target(self.name, ("127.0.0.1", port), [sshd.pid, ssh.pid], check)
            break
        raise SystemUnavailable(f"ssh -R did not come up: {last}")


@functools.cache
def _ssh_default_cipher() -> str:
    try:
        out = run_capture(["ssh", "-F", "/dev/null", "-G", "localhost"]).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in out.splitlines():
        if line.startswith("ciphers "):
            return line.split()[1].split(",")[0]
    return ""


def _first_line(cmd: list[str], rx: str) -> str:
    try:
        out = run_capture(cmd)
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(rx, out.stdout + out.stderr)
    return m.group(1) if m else ""


@dataclass(frozen=True)
class TrioTunnel(System):
    """trio-tunnel server + client with one -R: the server's ``listening HOST:PORT`` line gives the link address,
    the client's ``exposed NAME HOST:PORT`` line the public port. `server_args` and `client_args` make a variant
    (e.g. another transport); --tt-server-arg/--tt-client-arg are added after them, for every variant."""

    name: str = "trio-tunnel"
    server_args: tuple[str, ...] = ()
    client_args: tuple[str, ...] = ()
    token: ClassVar[str] = "bench-token-0123456789abcdef"

    def _exe(self, opts: argparse.Namespace) -> str | None:
        if opts.trio_tunnel:
            return opts.trio_tunnel if shutil.which(opts.trio_tunnel) else None
        for cand in (Path(sys.executable).parent / "trio-tunnel", REPO / ".venv" / "bin" / "trio-tunnel"):
            if cand.exists() and os.access(cand, os.X_OK):
                return str(cand)
        return shutil.which("trio-tunnel")

    def unavailable(self, opts: argparse.Namespace) -> str | None:
        if not self._exe(opts):
            return "trio-tunnel not installed (pip install -e . in the repository, or --trio-tunnel PATH)"
        return None

    def version(self, opts: argparse.Namespace) -> str:
        exe = self._exe(opts)
        if not exe:
            return ""
        try:
            out = run_capture([exe, "--version"])
        except (OSError, subprocess.SubprocessError):
            return ""
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if out.returncode == 0 and text else ""

    async def start(
        self, group: ProcessGroup, sink: Child, sink_addr: Addr, opts: argparse.Namespace, delay: Any | None
    ) -> Target:
        exe = self._exe(opts)
        if not exe:
            raise SystemUnavailable(self.unavailable(opts) or "trio-tunnel not found")
        plaintext = "--insecure-plaintext" in self.server_args
        # Over TLS (the default) the server makes a throwaway key in a temporary state directory and the client pins
        # it from the server's 'fingerprint' line, as a first run does.
        tls_server = () if plaintext else ("--state-dir", tempfile.mkdtemp(prefix="bench-trio-tunnel-"))
        # Every bench connection comes from 127.0.0.1, and the server's default per-address cap (a quarter of
        # max_connections_per_service, against one host holding every slot) would refuse the 1,000 idle ones.
        limits: tuple[str, ...] = ()
        if not opts.tt_stock_limits:
            config = Path(tempfile.mkdtemp(prefix="bench-trio-tunnel-config-")) / "server.toml"
            config.write_text("[server]\nmax_connections_per_ip = 4096\n")
            limits = (f"--config={config}",)
        server = await group.start(
            f"{self.name}-server",
            [
                exe,
                "server",
                "--listen",
                "127.0.0.1:0",
                "--token",
                self.token,
                "--allow-ports",
                "1024-65535",
                *self.server_args,
                *tls_server,
                *limits,
                *opts.tt_server_arg,
            ],
        )
        tls_client: tuple[str, ...] = ()
        if not plaintext:
            pin = await server.wait_line(r"fingerprint (\S+)", opts.start_timeout)
            tls_client = ("--server-fingerprint", pin.group(1))
        m = await server.wait_line(r"listening (\S+):(\d+)", opts.start_timeout)
        link: Addr = (m.group(1).strip("[]"), int(m.group(2)))
        if delay is not None:
            link = await start_delayline(group, link, delay)
        client = await group.start(
            f"{self.name}-client",
            [
                exe,
                "client",
                "--server",
                f"{link[0]}:{link[1]}",
                "--token",
                self.token,
                "-R",
                f"127.0.0.1:0:{sink_addr[0]}:{sink_addr[1]}",
                *self.client_args,
                *tls_client,
                *opts.tt_client_arg,
            ],
        )
        m = await client.wait_line(r"exposed (\S+) (\S+):(\d+)", opts.start_timeout)
        public = (m.group(2).strip("[]"), int(m.group(3)))

        def check() -> str | None:
            return exited_reason(server) or exited_reason(client)

        await wait_accepting(public, opts.start_timeout, check)
        return Target(self.name, public, [server.pid, client.pid], check)


# The rows of the benchmark, in table order (also the default of --systems). A variant is one entry, e.g.
#     TrioTunnel("trio-tunnel-foo", server_args=("--foo",), client_args=("--foo",)),
SYSTEM_LIST: tuple[System, ...] = (
    Direct(),
    Socat(),
    Ssh(),
    TrioTunnel(),  # TLS, the default
    TrioTunnel("trio-tunnel-plain", server_args=("--insecure-plaintext",), client_args=("--insecure-plaintext",)),
)
SYSTEMS: dict[str, System] = {s.name: s for s in SYSTEM_LIST}
assert len(SYSTEMS) == len(SYSTEM_LIST), "system names must be unique"


def add_system_arguments(ap: argparse.ArgumentParser) -> None:
    """The options :meth:`System.start` reads (``opts``), for every script that starts the systems."""
    ap.add_argument("--ssh-cipher", help="cipher for ssh (default: OpenSSH's default)")
    ap.add_argument(
        "--socat-backlog",
        type=int,
        default=1024,
        help="listen backlog for socat (its own default is 5; default here 1024)",
    )
    ap.add_argument("--trio-tunnel", metavar="EXE", help="trio-tunnel executable (default: next to python)")
    ap.add_argument(
        "--tt-server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for 'trio-tunnel server' (repeatable), e.g. --tt-server-arg=--config=x.toml",
    )
    ap.add_argument(
        "--tt-stock-limits",
        action="store_true",
        help="run trio-tunnel's server without the bench's config (max_connections_per_ip = 4096): for builds "
        "older than that key, or to see the default per-address cap refuse the bench's 1,000 idle connections",
    )
    ap.add_argument(
        "--tt-client-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for 'trio-tunnel client' (repeatable)",
    )
    ap.add_argument(
        "--start-timeout",
        type=float,
        default=15.0,
        help="seconds a system may take to print its ready lines (default 15)",
    )
