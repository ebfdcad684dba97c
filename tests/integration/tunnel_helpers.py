"""Helpers for the reverse-tunnel integration tests: stdout lifecycle lines, servers, clients, local services,
a TCP proxy that can freeze its connections, and subprocesses of the real CLI read line by line.

Import as a plain module (tests/ is not a package; pytest puts this directory on sys.path)::

    from tunnel_helpers import TOKEN, Stdout, stdout, start_server, start_client, ...

Everything binds 127.0.0.1 with port 0 unless a test picks a port itself (:func:`free_port`).
"""

from __future__ import annotations

import atexit
import codecs
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from functools import cache
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_tunnel.certs import fingerprint_of_pem_file, load_or_create_identity
from trio_tunnel.client import run_client
from trio_tunnel.config import ClientConfig, HostPort, PortSet, RemoteSpec, ServerConfig, Timeouts
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.server import run_server

LOCALHOST = "127.0.0.1"
TOKEN = b"reverse-test-token-0123456789abcdef"
TOKEN_TEXT = TOKEN.decode()

FAST = Timeouts(
    handshake=5,
    connect=5,
    keepalive_idle=15,
    keepalive_dead=45,
    drain=2,
    open=5,
    reconnect_initial=0.05,
    reconnect_max=0.25,
    reconnect_jitter=0.1,
)
"""Client timeouts for tests: quick reconnects, default keepalives (so a test never depends on them by accident)."""

Handler = Callable[[trio.SocketStream], Awaitable[None]]


# ------------------------------------------------------------------------------------------------- stdout lines


class Stdout(io.TextIOBase):
    """Records complete lines written to it and lets a test wait, without sleeping, for the next line matching a
    pattern (see :meth:`expect`). With ``passthrough``, everything is also written to the *current* ``sys.stdout``
    (pytest's capture, or the terminal with ``-s``)."""

    def __init__(self, *, passthrough: bool = False) -> None:
        super().__init__()
        self.passthrough = passthrough
        self.lines: list[str] = []
        self.cursor = 0
        self._partial = ""
        self._changed = trio.Event()

    def write(self, text: str) -> int:
        if self.passthrough:
            sys.stdout.write(text)
        self._partial += text
        *complete, self._partial = self._partial.split("\n")
        if complete:
            self.lines.extend(complete)
            self._changed.set()
            self._changed = trio.Event()
        return len(text)

    def flush(self) -> None:
        if self.passthrough:
            sys.stdout.flush()

    def matching(self, pattern: str) -> list[re.Match[str]]:
        """Every line so far that matches ``pattern`` (``re.fullmatch``)."""
        return [m for line in self.lines if (m := re.fullmatch(pattern, line))]

    async def expect(self, pattern: str) -> re.Match[str]:
        """The first line after the last one returned by ``expect`` that fully matches ``pattern`` (waits for it;
        the caller's ``fail_after`` bounds the wait)."""
        while True:
            while self.cursor < len(self.lines):
                line = self.lines[self.cursor]
                self.cursor += 1
                if m := re.fullmatch(pattern, line):
                    return m
            await self._changed.wait()


class _SysWithStdout:
    """``sys`` as ``trio_tunnel.console`` sees it in a test: the same module except that ``stdout`` is :class:`Stdout`.
    (Replacing ``sys.stdout`` itself does not last: pytest's capture puts its own back before the test runs.)"""

    def __init__(self, stdout: Stdout) -> None:
        self.stdout = stdout

    def __getattr__(self, name: str) -> Any:
        return getattr(sys, name)


@pytest.fixture
def stdout(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stdout]:
    """The lifecycle lines printed in-process: ``trio_tunnel.console.announce`` writes them to ``sys.stdout``."""
    import trio_tunnel.console

    watch = Stdout(passthrough=True)
    monkeypatch.setattr(trio_tunnel.console, "sys", _SysWithStdout(watch))
    yield watch


def hostport(match: re.Match[str], group: int = 1) -> tuple[str, int]:
    host, _, port = match[group].rpartition(":")
    return host, int(port)


# ------------------------------------------------------------------------------------------------- sockets


async def free_port() -> int:
    """A loopback port nobody listens on right now (bound to 0, read, closed)."""
    sock = trio.socket.socket()
    with sock:
        await sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
    return port


async def is_listening(port: int, host: str = LOCALHOST) -> bool:
    """Whether a TCP connection to ``host:port`` is accepted (a refusal on loopback is immediate)."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def read_all(stream: trio.abc.ReceiveStream, chunk: int = 1 << 16) -> bytes:
    data = bytearray()
    while block := await stream.receive_some(chunk):
        data += block
    return bytes(data)


async def read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        block = await stream.receive_some(n - len(data))
        if not block:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += block
    return bytes(data)


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes:
    """One ``\\n``-terminated line (without it); ``buffer`` keeps what was read beyond it for the next call."""
    while (end := buffer.find(b"\n")) < 0:
        block = await stream.receive_some(4096)
        if not block:
            raise EOFError(f"EOF in the middle of a line: {bytes(buffer)!r}")
        buffer += block
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    return line


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# ------------------------------------------------------------------------------------------------- tasks


@attrs.define(eq=False)
class Running:
    """A task started by :func:`start_task`: ``shutdown.request()`` for a graceful stop, ``kill()`` to cancel it."""

    shutdown: Shutdown
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)
    value: Any = None
    error: BaseException | None = None

    async def stop(self) -> None:
        self.shutdown.request()
        await self.done.wait()

    async def kill(self) -> None:
        self.scope.cancel()
        await self.done.wait()


async def _run_task(
    fn: Callable[..., Awaitable[None]],
    config: Any,
    running: Running,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        with running.scope:
            await fn(config, running.shutdown, task_status=task_status)
    finally:
        running.done.set()


async def start_task(
    nursery: trio.Nursery, fn: Callable[..., Awaitable[None]], config: Any, *, drain: float = 2.0
) -> Running:
    running = Running(Shutdown(drain_timeout=drain))
    running.value = await nursery.start(_run_task, fn, config, running)
    return running


@cache
def test_identity() -> tuple[str, str]:
    """``(state_dir, fingerprint)`` of one server identity for the whole run: the suite runs over TLS, as users
    do, without making a key per test. Removed when the run ends."""
    state_dir = tempfile.mkdtemp(prefix="trio-tunnel-test-identity-")
    atexit.register(shutil.rmtree, state_dir, True)
    cert, _key = load_or_create_identity(Path(state_dir))
    return state_dir, fingerprint_of_pem_file(cert)


def tls_server() -> dict[str, Any]:
    """``ServerConfig(**tls_server(), ...)``: the run's test identity."""
    return {"state_dir": test_identity()[0]}


def tls_client() -> dict[str, Any]:
    """``ClientConfig(**tls_client(), ...)``: pinned to the run's test identity."""
    return {"server_fingerprint": (test_identity()[1],)}


def server_config(
    *, port: int = 0, tokens: Sequence[bytes] = (TOKEN,), allow_ports: str = "1024-65535", **kwargs: Any
) -> ServerConfig:
    if not kwargs.get("insecure_plaintext") and "tls_cert" not in kwargs:
        kwargs.setdefault("state_dir", test_identity()[0])
    return ServerConfig(
        listen=HostPort(host=LOCALHOST, port=port),
        tokens=tuple(tokens),
        allow_ports=PortSet.parse(allow_ports),
        **kwargs,
    )


def client_config(
    server: HostPort,
    *remotes: str,
    name: str = "home",
    token: bytes | None = TOKEN,
    timeouts: Timeouts = FAST,
    **kwargs: Any,
) -> ClientConfig:
    if not kwargs.get("insecure_plaintext") and "tls_ca" not in kwargs:
        kwargs.setdefault("server_fingerprint", (test_identity()[1],))
    return ClientConfig(
        server=server,
        token=token,
        name=name,
        remotes=tuple(RemoteSpec.parse(r) for r in remotes),
        timeouts=timeouts,
        **kwargs,
    )


async def start_server(nursery: trio.Nursery, **kwargs: Any) -> Running:
    """run_server on 127.0.0.1 (``.value`` is the bound HostPort)."""
    return await start_task(nursery, run_server, server_config(**kwargs))


async def start_client(nursery: trio.Nursery, config: ClientConfig) -> Running:
    """run_client; returns once its first link is up and its services are registered."""
    return await start_task(nursery, run_client, config)


@attrs.define(eq=False)
class Service:
    """A local TCP service on 127.0.0.1 run by :func:`start_service`; :meth:`stop` closes its listener."""

    port: int
    scope: trio.CancelScope
    done: trio.Event
    accepted: int = 0

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


async def start_service(nursery: trio.Nursery, handler: Handler, port: int = 0) -> Service:
    listeners = await trio.open_tcp_listeners(port, host=LOCALHOST)
    service = Service(listeners[0].socket.getsockname()[1], trio.CancelScope(), trio.Event())

    async def counted(stream: trio.SocketStream) -> None:
        service.accepted += 1
        await handler(stream)

    async def serve() -> None:
        try:
            with service.scope:
                await trio.serve_listeners(counted, listeners)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            service.done.set()

    nursery.start_soon(serve)
    return service


# ------------------------------------------------------------------------------------------------- HTTP/1.0


def http_response(body: bytes, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def http_handler(stream: trio.SocketStream) -> None:
    """A tiny HTTP/1.0 server: answers ``GET /PATH`` with ``hello from PATH``; ``GET /hang`` sends the head and the
    first bytes of the body, then nothing more."""
    async with stream:
        request = bytearray()
        while b"\r\n\r\n" not in request:
            block = await stream.receive_some(4096)
            if not block:
                return
            request += block
        method, path, _version = request.split(b"\r\n", 1)[0].decode().split(" ")
        if method != "GET":
            await stream.send_all(http_response(b"method not allowed\n", "405 Method Not Allowed"))
            return
        if path == "/hang":  # a download that never ends: the connection stays in flight
            await stream.send_all(http_response(b"partial" + b"." * 1000)[:-1000])
            await trio.sleep_forever()
        await stream.send_all(http_response(f"hello from {path}\n".encode()))


async def http_get(port: int, path: str = "/", host: str = LOCALHOST) -> tuple[str, bytes]:
    """A raw HTTP/1.0 GET; returns the status line and the body (checked against Content-Length)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        response = await read_all(stream)
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = [int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")]
    assert length == [len(body)], response
    return lines[0], body


# ------------------------------------------------------------------------------------------------- a freezable proxy


@attrs.define(eq=False)
class _Pipe:
    a: trio.SocketStream
    b: trio.SocketStream
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)


@attrs.define(eq=False)
class Proxy:
    """A TCP proxy on 127.0.0.1 to ``target``. :meth:`freeze` turns every connection it carries *now* into a black
    hole (nothing forwarded either way, no FIN, no RST: both ends still see an open, silent connection), as when a
    NAT router drops its state; new connections are proxied normally."""

    target: int
    port: int = 0
    pipes: list[_Pipe] = attrs.field(factory=list)
    frozen: list[_Pipe] = attrs.field(factory=list)
    connections: int = 0

    def freeze(self) -> int:
        for pipe in self.pipes:
            pipe.scope.cancel()
        self.frozen.extend(self.pipes)
        count = len(self.pipes)
        self.pipes.clear()
        return count

    async def _handle(self, outer: trio.SocketStream) -> None:
        try:
            inner = await trio.open_tcp_stream(LOCALHOST, self.target)
        except OSError:
            return  # serve_listeners closes ``outer``
        self.connections += 1
        pipe = _Pipe(outer, inner)
        self.pipes.append(pipe)
        try:
            with pipe.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, outer, inner, nursery)
                    nursery.start_soon(self._pump, inner, outer, nursery)
            if pipe in self.frozen:
                await trio.sleep_forever()  # both sockets open and silent until the proxy stops
        finally:
            if pipe in self.pipes:
                self.pipes.remove(pipe)
            await trio.aclose_forcefully(inner)  # serve_listeners closes ``outer``

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream, nursery: trio.Nursery) -> None:
        try:
            while data := await src.receive_some(1 << 16):
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def proxy_to(target: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(target)
    listeners = await trio.open_tcp_listeners(0, host=LOCALHOST)
    proxy.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, proxy._handle, listeners)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------------- the real CLI


CLI = [sys.executable, "-m", "trio_tunnel.cli"]


class Cli:
    """A ``trio-tunnel`` subprocess with stdout read line by line (:meth:`expect`) and stderr collected."""

    def __init__(self, process: trio.Process, argv: Sequence[str]) -> None:
        self.process = process
        self.argv = list(argv)
        self.out = Stdout()
        self.err = bytearray()
        self.eof = trio.Event()
        self._err_changed = trio.Event()

    async def _pump_stdout(self) -> None:
        assert self.process.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            while data := await self.process.stdout.receive_some(65536):
                self.out.write(decoder.decode(data))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self.eof.set()
            self.out._changed.set()

    async def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            while data := await self.process.stderr.receive_some(65536):
                self.err += data
                self._err_changed.set()
                self._err_changed = trio.Event()

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    async def expect_stderr(self, pattern: str) -> re.Match[str]:
        """The first stderr line (so far or to come) in which ``pattern`` is found."""
        while True:
            for line in self.stderr.splitlines():
                if m := re.search(pattern, line):
                    return m
            await self._err_changed.wait()

    async def expect(self, pattern: str) -> re.Match[str]:
        """The next stdout line that fully matches ``pattern``; fails if stdout ends first."""
        while True:
            while self.out.cursor < len(self.out.lines):
                line = self.out.lines[self.out.cursor]
                self.out.cursor += 1
                if m := re.fullmatch(pattern, line):
                    return m
            if self.eof.is_set():
                await self.process.wait()
                raise AssertionError(
                    f"{self.argv}: stdout ended (exit {self.process.returncode}) before a line "
                    f"matching {pattern!r}; stdout {self.out.lines!r}; stderr:\n{self.stderr}"
                )
            changed = self.out._changed
            await changed.wait()

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    async def wait(self) -> int:
        code = await self.process.wait()
        await self.eof.wait()
        return code


def error_lines(proc: Cli) -> list[str]:
    """The CLI's error lines (``trio-tunnel: error: ...``) on a process's stderr."""
    return [line for line in proc.stderr.splitlines() if line.startswith("trio-tunnel: error:")]


def with_test_tls(args: Sequence[str]) -> list[str]:
    """A ``server`` or ``client`` command line with the run's test identity added (``--state-dir`` for the
    server, ``--server-fingerprint`` for the client), unless it chooses its own TLS settings or plaintext. A
    ``--config`` file is still given the flag: flags and files combine."""
    own = {
        "--insecure-plaintext",
        "--state-dir",
        "--tls-cert",
        "--server-fingerprint",
        "--tls-ca",
        "--print-fingerprint",
    }
    if not args or args[0] not in ("server", "client") or own & set(args):
        return list(args)
    state_dir, pin = test_identity()
    return [*args, *(["--state-dir", state_dir] if args[0] == "server" else ["--server-fingerprint", pin])]


@asynccontextmanager
async def cli(
    nursery: trio.Nursery, *args: str, env: dict[str, str] | None = None, test_tls: bool = True
) -> AsyncIterator[Cli]:
    """Run ``python -m trio_tunnel ARGS``; killed on exit if still running. Over TLS with the run's test identity
    unless the arguments choose their own TLS settings (or plaintext)."""
    argv = [*CLI, *(with_test_tls(args) if test_tls else args)]
    full_env = {key: value for key, value in os.environ.items() if key != "TRIO_TUNNEL_TOKEN"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env
    )
    proc = Cli(process, argv)
    nursery.start_soon(proc._pump_stdout)
    nursery.start_soon(proc._pump_stderr)
    try:
        yield proc
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


# ------------------------------------------------------------------------------------------------- logs


class LogWatch(logging.Handler):
    """Collects the ``trio_tunnel`` loggers' records and lets a test wait (without sleeping) for a matching one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    def matching(self, pattern: str, level: int = logging.DEBUG, logger: str = "trio_tunnel") -> list[str]:
        """Messages (at ``level`` or above, from ``logger`` or below it) in which ``pattern`` is found."""
        return [
            message
            for r in self.records
            if r.levelno >= level
            and (r.name == logger or r.name.startswith(logger + "."))
            and re.search(pattern, message := r.getMessage())
        ]

    async def wait_for(self, pattern: str, level: int = logging.DEBUG, logger: str = "trio_tunnel") -> str:
        while not (found := self.matching(pattern, level, logger)):
            await self._changed.wait()
        return found[0]


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    watch = LogWatch()
    log = logging.getLogger("trio_tunnel")
    level = log.level
    log.addHandler(watch)
    log.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        log.removeHandler(watch)
        log.setLevel(level)


class RecordWatch(logging.Handler):
    """Collects log records; a test can wait (without sleeping) until ``count`` records contain ``text``.

    ``logger`` limits a query to one logger and its children ("" = every logger the handler is attached to).
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    def matching(self, text: str, level: int = logging.DEBUG, *, logger: str = "") -> list[logging.LogRecord]:
        return [
            r
            for r in self.records
            if r.levelno >= level
            and (not logger or r.name == logger or r.name.startswith(logger + "."))
            and text in r.getMessage()
        ]

    async def wait_for(self, text: str, *, logger: str = "", count: int = 1) -> list[logging.LogRecord]:
        while len(found := self.matching(text, logger=logger)) < count:
            await self._changed.wait()
        return found


async def exchange(port: int, payload: bytes, host: str = LOCALHOST) -> bytes:
    """Connect, send ``payload`` then EOF while reading everything back until EOF."""
    stream = await trio.open_tcp_stream(host, port)
    received = bytearray()
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(send)
        while data := await stream.receive_some(1 << 18):
            received += data
    return bytes(received)
