"""Child processes and /proc accounting: starting, watching and killing what the harness runs, and the CPU time
and memory of a system's processes.
"""

from __future__ import annotations

# Reading a few small /proc and log files inline in async code is intended; the wait helpers take a timeout
# argument because each caller bounds a different step.
# ruff: noqa: ASYNC109, ASYNC230
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import trio

from .wire import Addr, connect

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def process_tree(roots: Sequence[int]) -> list[int]:
    """roots and all their live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [p for p in roots if Path(f"/proc/{p}").exists()]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time of the processes: run time of their live threads from /proc/PID/task/*/schedstat (nanoseconds;
    utime+stime from /proc/PID/stat when schedstat is missing) plus the reaped children they account for
    (cutime+cstime, clock ticks)."""
    total = 0.0
    for p in pids:
        f = _stat_fields(p)
        if f is None:
            continue
        ns = 0
        try:
            for task in os.scandir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task.name}/schedstat") as fh:
                    ns += int(fh.read().split()[0])
            total += ns / 1e9
        except (OSError, ValueError, IndexError):
            total += (int(f[11]) + int(f[12])) / CLK_TCK
        total += (int(f[13]) + int(f[14])) / CLK_TCK
    return total


def memory_of(pids: Sequence[int]) -> tuple[int, int]:
    """(sum of VmRSS, sum of Pss) in KiB."""
    rss = pss = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss, pss


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.eof = False

    async def readline(self) -> str:
        """Next line without its newline; "" at EOF."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return line.decode(errors="replace").rstrip("\r")
            if self.eof:
                line = bytes(self.buf)
                self.buf.clear()
                return line.decode(errors="replace")
            data = await self.stream.receive_some(65536)
            if not data:
                self.eof = True
            self.buf += data


def _session_members(sids: Sequence[int]) -> list[int]:
    """Processes in the sessions we created (sid = the pid of a child we started with start_new_session),
    excluding a process that merely reuses such a number as its own pid."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f is not None and int(f[4]) in sids and int(entry.name) not in sids:
                out.append(int(entry.name))
    return out


async def kill_process(proc: trio.Process, grace: float = 2.0) -> None:
    """Stop a child we started (in its own session) and everything it started: by pid while it is not reaped
    (so the pid cannot belong to anyone else), and by session membership for what it left behind."""
    roots = [proc.pid] if proc.returncode is None else []
    await kill_tree(roots, grace, extra=_session_members([proc.pid]))
    with trio.move_on_after(grace):
        await proc.wait()


async def kill_tree(roots: Sequence[int], grace: float = 2.0, extra: Sequence[int] = ()) -> None:
    """SIGTERM the given live processes we started and their descendants (by pid), then SIGKILL what is left."""
    pids = process_tree(roots)
    pids += [p for p in process_tree(extra) if p not in pids]
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return
        await trio.sleep(0.05)
    for p in pids:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


class SystemUnavailable(Exception):
    """The system cannot be measured here (tool missing, failed to start): reported as skipped."""


class Child:
    """A process we started: stdout lines collected by a task, stderr to a log file."""

    def __init__(self, name: str, proc: trio.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.lines: list[str] = []
        self._changed = trio.Event()
        self.stdout_closed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _pump(self) -> None:
        assert self.proc.stdout is not None
        reader = LineReader(self.proc.stdout)
        try:
            while True:
                line = await reader.readline()
                if not line and reader.eof:
                    break
                self.lines.append(line)
                del self.lines[:-200]
                self._changed.set()
                self._changed = trio.Event()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self.stdout_closed = True
            self._changed.set()

    def log_tail(self, n: int = 3, limit: int = 400) -> str:
        """The last few log lines that look like errors (else the last few lines), shortened."""
        try:
            lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        rx = re.compile(r"error|warn|exception|traceback|fatal|refus|denied|fail", re.IGNORECASE)
        text = " | ".join(([ln for ln in lines if rx.search(ln)] or lines)[-n:])
        return text if len(text) <= limit else "..." + text[-limit:]

    def describe_exit(self) -> str:
        rc = self.proc.returncode
        tail = self.log_tail()
        return f"{self.name} exited with status {rc}" + (f": {tail}" if tail else "")

    async def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        rx = re.compile(pattern)
        seen = 0
        with trio.move_on_after(timeout):
            while True:
                for line in self.lines[seen:]:
                    m = rx.fullmatch(line.strip())
                    if m:
                        return m
                seen = len(self.lines)
                if self.stdout_closed:
                    with trio.move_on_after(1):
                        await self.proc.wait()
                    raise SystemUnavailable(
                        self.describe_exit()
                        if self.proc.returncode is not None
                        else f"{self.name} closed its stdout without printing '{pattern}'"
                    )
                await self._changed.wait()
        tail = self.log_tail()
        raise SystemUnavailable(
            f"{self.name} did not print a line matching '{pattern}' within {timeout:g} s"
            + (f" (stdout: {self.lines[-3:]}; stderr: {tail})" if self.lines or tail else "")
        )


class ProcessGroup:
    """Starts children; kills all of them (and their descendants) when the block ends."""

    def __init__(self, nursery: trio.Nursery, tmp: Path) -> None:
        self.nursery = nursery
        self.tmp = tmp
        self.children: list[Child] = []

    async def start(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> Child:
        log = self.tmp / f"{name}.{len(self.children)}.log"
        with open(log, "wb") as errf:
            try:
                proc = await trio.lowlevel.open_process(
                    list(cmd),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=errf,
                    start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                )
            except OSError as exc:
                raise SystemUnavailable(f"cannot run {cmd[0]}: {exc}") from exc
        child = Child(name, proc, log)
        self.children.append(child)
        self.nursery.start_soon(child._pump)
        return child

    async def stop_all(self) -> None:
        with trio.CancelScope(shield=True):
            for child in reversed(self.children):
                await kill_process(child.proc)
            self.children.clear()


@contextlib.asynccontextmanager
async def process_group(tmp: Path) -> AsyncIterator[ProcessGroup]:
    async with trio.open_nursery() as nursery:
        group = ProcessGroup(nursery, tmp)
        try:
            yield group
        finally:
            await group.stop_all()
            nursery.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_accepting(addr: Addr, timeout: float, alive: Callable[[], str | None]) -> None:
    """Poll until addr accepts a TCP connection (bounded); `alive` returns a reason when the owner died."""
    deadline = trio.current_time() + timeout
    last: Exception | None = None
    while trio.current_time() < deadline:
        reason = alive()
        if reason:
            raise SystemUnavailable(reason)
        try:
            with trio.fail_after(1):
                s = await connect(addr)
            await trio.aclose_forcefully(s)
            return
        except (OSError, trio.TooSlowError) as exc:
            last = exc
        await trio.sleep(0.05)
    raise SystemUnavailable(f"{addr[0]}:{addr[1]} did not accept within {timeout:g} s ({last})")


def exited_reason(child: Child) -> str | None:
    if child.proc.poll() is not None:
        return child.describe_exit()
    return None


def run_capture(cmd: Sequence[str], timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
    """subprocess.run in its own session; on timeout the whole group is killed (not just the direct child)."""
    proc = subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
