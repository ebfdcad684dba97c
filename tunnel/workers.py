"""``trio-tunnel server --workers N``: N server processes on one link port, and the parent that supervises them.

How it works
------------
The parent resolves the link address once (port 0 becomes a concrete port) and keeps it with one socket per
address that is bound with ``SO_REUSEPORT`` but never listens: no connection is ever queued on it, and no other
program can take the port while a worker restarts. Each worker gets its own listening socket, bound with
``SO_REUSEPORT`` to that port (made by the parent, passed at spawn, closed in the parent), so the kernel spreads new
links across the workers' accept queues by a hash of their addresses: no accept lock, no hand-off, no thundering
herd. A link stays in the worker that accepted it for its whole life, and so do its public ports and every
connection through them: the data path never crosses a process boundary.

What needs one answer for all workers stays in the parent (:mod:`trio_tunnel.registry`): which worker owns a
client name (takeover by name works as with one process: the owner probes its holder; live keeps, stale is
replaced, then the name moves), how many clients there are (``max_clients``), and the port a service had last
(port-0 services keep their port when the client reconnects to another worker). Public ports are bound without
``SO_REUSEPORT``, so the kernel refuses a port that another worker holds and the client hears ``address_in_use``
as before. Load-balancing groups are refused with several workers: their members would have to share an accept
loop across processes (see README, "Several workers").

The parent and each worker talk over an ``AF_UNIX`` socketpair (:mod:`trio_tunnel.ipc`). The parent prints every
stdout line (``fingerprint``, ``listening`` once all workers are ready, ``metrics``, ``reloaded``), serves
``--metrics`` by asking each worker and merging (:mod:`trio_tunnel.merge`), says READY to systemd once all
workers are ready, forwards SIGHUP (after checking the new config as one process would) and a drain on
SIGINT/SIGTERM. A worker that exits unexpectedly is restarted with a backoff; one that fails
:data:`MAX_START_FAILURES` times in a row before it is ready ends the parent with its reason (exit 1).

Why processes and ``SO_REUSEPORT`` rather than threads or an fd-passing acceptor: the server is CPU-bound in Python
(TLS, framing, the scheduler), which one interpreter runs on one core; a separate process per core is the only way
to use more, and ``SO_REUSEPORT`` lets the kernel do the balancing without a process in the path.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from typing import Any, Final

import attrs
import trio
from trio_tunnel.proto import ErrorCode

from . import notify
from .config import HostPort, ServerConfig
from .console import announce, format_hostport
from .errors import ConfigError, TunnelError
from .httpd import bind_metrics, serve_http
from .ipc import Channel, ChannelClosedError, IpcError, Message
from .lifecycle import Shutdown
from .logsetup import JsonFormatter
from .merge import merge_metrics, merge_status, worker_families
from .metrics import Metrics, Response
from .registry import Ask, Grant, Local, Refuse, Registry
from .reload import ReloadError, one_line, plan_server, reload_on_signals, sighup_receiver
from .takeover import live_holder

__all__ = ["WorkerError", "cores", "parse_workers", "run_workers", "worker_count"]

logger: Final = logging.getLogger(__name__)

MAX_START_FAILURES: Final = 3
"""Consecutive exits before "ready" after which the parent gives up (a worker that cannot start will not)."""
RESTART_INITIAL: Final = 0.1
RESTART_MAX: Final = 5.0
"""Seconds before restarting a worker: doubling from RESTART_INITIAL after each failed start, up to this."""
BACKLOG: Final = 4096
"""Each worker's accept queue (the kernel caps it at net.core.somaxconn)."""
ASK_TIMEOUT: Final = 5.0
"""Seconds a worker has to answer the parent's /metrics or /status request."""


class WorkerError(TunnelError):
    """The workers could not be kept running (the message says which and why)."""


def cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    with suppress(AttributeError, OSError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def parse_workers(text: str) -> int | str:
    """``--workers N`` or ``auto``. Raises ConfigError with the fix."""
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"expected an integer >= 1 or 'auto' (one per core), got {text!r}")
    return count


def worker_count(value: int | str) -> int:
    """The number of workers ``workers`` asks for (``auto``: :func:`cores`)."""
    return cores() if value == "auto" else int(value)


@attrs.define(eq=False)
class _Worker:
    index: int
    pid: int = 0
    channel: Channel | None = None
    ready: bool = False
    reason: str = ""


@attrs.define(eq=False)
class _Parent:
    config: ServerConfig
    shutdown: Shutdown
    count: int
    addresses: list[tuple[int, Any]]
    """(family, sockaddr with the concrete port) of each link address."""
    registry: Registry
    workers: list[_Worker] = attrs.field(init=False)
    first_ready: list[trio.Event] = attrs.field(init=False)
    locks: dict[str, trio.Lock] = attrs.field(factory=dict)
    restarts: int = 0
    metrics: Metrics = attrs.field(factory=lambda: Metrics("server"))

    def __attrs_post_init__(self) -> None:
        self.workers = [_Worker(index) for index in range(self.count)]
        self.first_ready = [trio.Event() for _ in range(self.count)]

    # ------------------------------------------------------------------------------------------ supervision

    async def keep(self, index: int) -> None:
        """Run worker ``index`` until shutdown, restarting it when it exits unexpectedly."""
        failures, delay = 0, RESTART_INITIAL
        while True:
            worker = self.workers[index] = _Worker(index)
            code = await self._run(worker)
            was_ready, worker.ready = worker.ready, False  # (not ready in /status while it is down)
            gone = self.registry.forget_worker(index)
            if self.shutdown.requested.is_set():
                return
            why = f"exit status {code}" if code >= 0 else f"signal {-code}"
            if was_ready:  # it ran: a crash, not a failure to start
                failures, delay = 0, RESTART_INITIAL
            else:
                failures += 1
                if failures >= MAX_START_FAILURES:
                    raise WorkerError(
                        f"worker {index} failed to start {failures} times in a row ({why}): "
                        + (worker.reason or "see its log lines above")
                    )
            self.restarts += 1
            logger.error(
                "worker %d (pid %d) exited unexpectedly (%s)%s; restarting it in %g s",
                index,
                worker.pid,
                why,
                f", dropping {len(gone)} client(s): they reconnect" if gone else "",
                delay,
            )
            with trio.move_on_after(delay):
                await self.shutdown.requested.wait()
            if self.shutdown.requested.is_set():
                return
            delay = min(delay * 2, RESTART_MAX)

    def _listener(self, family: int, address: Any) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            _share(sock, family)
            sock.bind(address)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _run(self, worker: _Worker) -> int:
        """Spawn ``worker``, serve its channel until it exits; its exit code (negative: the signal)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        passed: list[socket.socket] = [theirs]
        try:
            passed += [self._listener(family, address) for family, address in self.addresses]
            fds = [sock.fileno() for sock in passed]
            argv = [sys.executable, "-m", "trio_tunnel.worker", str(worker.index), ",".join(map(str, fds))]
            env = {key: value for key, value in os.environ.items() if key != notify.NOTIFY_SOCKET}
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=fds, env=env
            )
        except BaseException:
            ours.close()
            raise
        finally:
            for sock in passed:
                sock.close()
        worker.pid = process.pid
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        channel = worker.channel = Channel(
            stream, partial(self._on_request, worker), partial(self._on_post, worker), name=f"worker {worker.index}"
        )
        channel.post("start", config=pickle.dumps(_for_workers(self.config)), **_logging())
        if self.shutdown.requested.is_set():
            channel.post("drain")
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(channel.run)
                code = await process.wait()
                with trio.move_on_after(1):  # its last words (a "fatal" post) are still in the socket
                    await channel.closed.wait()
                nursery.cancel_scope.cancel(reason="worker exited")
        finally:
            if process.returncode is None:  # cancelled (a second SIGINT, the drain deadline): stop it now
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
        return code

    def _on_post(self, worker: _Worker, message: Message) -> None:
        op = message["op"]
        if op == "ready":
            worker.ready = True
            self.first_ready[worker.index].set()
            logger.info("worker %d (pid %d) ready", worker.index, worker.pid)
        elif op == "release":
            self.registry.release(str(message["name"]), worker.index)
        elif op == "port":
            self.registry.remember(str(message["client"]), str(message["service"]), int(message["port"]))
        elif op == "fatal":
            worker.reason = str(message.get("reason", ""))

    async def _on_request(self, worker: _Worker, message: Message) -> Message:
        if message["op"] != "claim":
            raise IpcError(f"unknown request {message['op']!r}")
        name, token, peer = str(message["name"]), message.get("token"), str(message["peer"])
        lock = self.locks.setdefault(name, trio.Lock())
        try:
            async with lock:  # one claim of a name at a time, across workers
                return await self._claim(worker.index, name, token, peer)
        finally:
            if self.locks.get(name) is lock and not lock.locked() and not lock.statistics().tasks_waiting:
                del self.locks[name]

    async def _claim(self, index: int, name: str, token: bytes | None, peer: str) -> Message:
        decision = self.registry.decide(name, index, token)
        if isinstance(decision, Ask):
            owner = self.workers[decision.owner]
            live: str | None = None
            if owner.channel is not None:
                timeouts = self.config.timeouts  # a probe, then the stale link's teardown
                try:
                    with trio.fail_after(timeouts.takeover_probe + timeouts.handshake):
                        reply = await owner.channel.request("replace", name=name, newcomer=peer)
                    live = reply.get("live")
                except (ChannelClosedError, IpcError) as exc:  # the owner died meanwhile: its names are free
                    logger.debug("worker %d did not judge %r: %s", decision.owner, name, exc)
                except trio.TooSlowError:  # a hung worker: keep the name where it is; the newcomer retries
                    logger.warning(
                        "worker %d did not answer whether %r is stale; refusing the newcomer", owner.index, name
                    )
                    live = "(unknown: its server worker does not answer)"
            if live:
                decision = Refuse(ErrorCode.NAME_IN_USE, live_holder(name, live))
            elif self.registry.hand_over(name, decision.owner, index, token):
                logger.info("client %r moves from worker %d to worker %d", name, decision.owner, index)
                decision = Grant()
            else:
                decision = Refuse(ErrorCode.ENHANCE_YOUR_CALM, "the server has too many clients")
        if isinstance(decision, Refuse):
            return {"code": int(decision.code), "reason": decision.reason}
        return {"ports": self.registry.ports_of(name), "local": isinstance(decision, Local)}

    async def started(self) -> bool:
        """Wait until every worker has been ready once (True), or shutdown is requested first (False)."""
        async with trio.open_nursery() as nursery:

            async def ready() -> None:
                for event in self.first_ready:
                    await event.wait()
                nursery.cancel_scope.cancel(reason="every worker is ready")

            async def stopping() -> None:
                await self.shutdown.requested.wait()
                nursery.cancel_scope.cancel(reason="shutting down before every worker was ready")

            nursery.start_soon(ready)
            nursery.start_soon(stopping)
        return all(event.is_set() for event in self.first_ready)

    # ---------------------------------------------------------------------------------------- fan-out

    def live(self) -> list[Channel]:
        return [w.channel for w in self.workers if w.ready and w.channel is not None and not w.channel.closed.is_set()]

    async def ask_all(self, op: str, **fields: Any) -> tuple[list[Message], list[str]]:
        """``op`` to every ready worker at once: the replies, and the errors (one line each)."""
        replies: list[Message] = []
        errors: list[str] = []

        async def ask(channel: Channel) -> None:
            try:
                with trio.fail_after(ASK_TIMEOUT):
                    replies.append(await channel.request(op, **fields))
            except (ChannelClosedError, IpcError, trio.TooSlowError) as exc:
                errors.append(f"{channel.name}: {str(exc) or 'no answer'}")

        async with trio.open_nursery() as nursery:
            for channel in self.live():
                nursery.start_soon(ask, channel)
        return replies, errors

    async def reload(self, new: ServerConfig) -> None:
        """SIGHUP: check ``new`` as one server would, then have every worker apply it."""
        plan = plan_server(self.config, new)
        if plan.tls_files:
            from .server import server_tls

            try:
                server_tls(new)
            except (ConfigError, OSError) as exc:
                raise ReloadError(one_line(exc)) from None
        self.config = new
        self.registry.max_clients = new.max_clients
        _replies, errors = await self.ask_all("reload", config=pickle.dumps(_for_workers(new)))
        if errors:
            raise ReloadError("; ".join(errors))
        logger.info("SIGHUP: every worker reloaded the configuration (%s)", plan.summary())

    async def respond(self, method: str, path: str) -> Response:
        """The ``--metrics`` endpoint: the workers' answers, merged (tunnel/merge.py)."""
        if method in ("GET", "HEAD") and path == "/metrics":
            replies, _ = await self.ask_all("metrics")
            running = len(self.live())
            text = merge_metrics([str(r["text"]) for r in replies]) + worker_families(
                running, self.count, self.restarts
            )
            return Response("200 OK", "text/plain; version=0.0.4; charset=utf-8", text.encode())
        if method in ("GET", "HEAD") and path == "/status":
            replies, _ = await self.ask_all("status")
            workers = [{"index": w.index, "pid": w.pid, "ready": w.ready} for w in self.workers]
            document = merge_status([r["status"] for r in replies], self.metrics.started, workers)
            return Response("200 OK", "application/json", _json(document))
        return self.metrics.respond(method, path)


def _leaf(group: BaseExceptionGroup[WorkerError]) -> WorkerError:
    first = group.exceptions[0]
    return _leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _json(document: dict[str, Any]) -> bytes:
    import json

    return json.dumps(document, separators=(",", ":")).encode()


def _share(sock: socket.socket, family: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def _for_workers(config: ServerConfig) -> ServerConfig:
    """A worker's config: the parent serves ``--metrics``, and each worker is one process."""
    return attrs.evolve(config, metrics=None, workers=1)


def _logging() -> dict[str, Any]:
    root = logging.getLogger()
    return {"level": root.level, "json": any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)}


async def _hold_port(config: ServerConfig) -> tuple[list[socket.socket], list[tuple[int, Any]]]:
    """Bound, never listening ``SO_REUSEPORT`` sockets on every link address (port 0: the port the first got).

    A plain bind comes first, so a port another program (or another trio-tunnel with workers) already holds is
    refused as with one process instead of being silently shared."""
    infos = await trio.socket.getaddrinfo(
        config.listen.host, config.listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    held: list[socket.socket] = []
    addresses: list[tuple[int, Any]] = []
    port = config.listen.port
    seen = set()
    try:
        for family, _type, _proto, _name, sockaddr in infos:
            if (family, sockaddr[0]) in seen:
                continue
            seen.add((family, sockaddr[0]))
            address = (sockaddr[0], port, *sockaddr[2:])
            if port:
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    if family == socket.AF_INET6:
                        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(address)
            sock = socket.socket(family, socket.SOCK_STREAM)
            held.append(sock)
            _share(sock, family)
            sock.bind(address)
            bound = sock.getsockname()
            port = int(bound[1])
            addresses.append((family, bound))
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held, addresses


async def run_workers(
    config: ServerConfig,
    shutdown: Shutdown,
    *,
    reload: Callable[[], ServerConfig] | None = None,
    task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """:func:`~trio_tunnel.server.run_server` on :func:`worker_count` processes (see the module docstring).

    Raises:
        OSError: the link port cannot be bound.
        WorkerError: a worker kept failing to start.
    """
    from .server import (  # (the worker imports the server; the parent needs these)
        announce_link_security,
        server_tls,
        warn_if_open,
    )

    with sighup_receiver(reload is not None or config.tls_cert is not None) as hups:
        count = worker_count(config.workers)
        tls = server_tls(config)  # made once here, so the workers only read the key in state_dir
        announce_link_security(tls)
        held, addresses = await _hold_port(config)
        parent = _Parent(config, shutdown, count, addresses, Registry(config.max_clients))
        try:
            async with trio.open_nursery() as services:  # the endpoint and SIGHUP: they outlive the drain
                async with trio.open_nursery() as keepers:
                    for index in range(count):
                        keepers.start_soon(parent.keep, index)
                    hostports = [HostPort(host=str(bound[0]), port=int(bound[1])) for _family, bound in addresses]
                    if await parent.started():  # (else a SIGINT/SIGTERM came first: straight to the drain)
                        for hostport in hostports:
                            announce(f"listening {format_hostport(hostport.host, hostport.port)}")
                        if config.metrics is not None:
                            listeners = await bind_metrics(config.metrics)
                            services.start_soon(serve_http, parent.respond, listeners, config.timeouts.handshake)
                        warn_if_open(config, hostports[0])
                        logger.info("server listening on %s with %d workers", ", ".join(map(str, hostports)), count)
                        if hups is not None:
                            load = reload or (lambda: parent.config)
                            services.start_soon(reload_on_signals, hups, load, parent.reload)
                        notify.ready()
                    task_status.started(hostports[0])
                    await shutdown.requested.wait()
                    logger.info("shutting down: draining %d worker(s) for up to %g s", count, shutdown.drain_timeout)
                    for channel in [w.channel for w in parent.workers if w.channel is not None]:
                        with suppress(ChannelClosedError, IpcError):
                            channel.post("drain")
                    # the keep() tasks return once their workers have drained and exited
                services.cancel_scope.cancel(reason="every worker has stopped")
        except BaseExceptionGroup as group:  # a worker that cannot start: its one line, not a group
            failed, _rest = group.split(WorkerError)
            if failed is None:
                raise
            raise _leaf(failed) from None
        finally:
            for sock in held:
                sock.close()
    logger.info("server stopped")
