"""One worker process of ``server --workers N``: ``python -m trio_tunnel.worker INDEX FDS``, started by the parent
(tunnel/workers.py), never by a user.

It runs :func:`~trio_tunnel.server.run_server` as one server would, with two differences: its link listeners are the
sockets the parent passed (``SO_REUSEPORT`` on the shared link port), and a :class:`WorkerCoordinator` asks the
parent about client names and remembered ports, and answers the parent's requests (probe or replace a client,
status, metrics, reload, drain). Its stdout is /dev/null: the parent prints the lifecycle lines; its logs go to the
parent's stderr, each line naming the worker.

Why its config comes pickled over the channel rather than from its own command line: the parent has already read
and validated it (token files, TLS files, the config file), and the worker must run exactly that config, not a
file that changed in between. The channel is a socketpair between two processes of the same program, so unpickling
what the parent sent trusts nothing the parent does not already control.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import struct
import sys
from functools import partial
from typing import Any, Final, NoReturn

import attrs
import trio
from prometheus_client import generate_latest
from trio_tunnel.proto import ErrorCode

from . import cli
from .config import HostPort, ServerConfig
from .coordinator import Claim
from .errors import TunnelError
from .ipc import MAX_FRAME, Channel, ChannelClosedError, Decoder, IpcError, Message, encode
from .lifecycle import Shutdown
from .logsetup import configure_logging
from .memtune import tune_malloc
from .registry import token_digest
from .server import run_server

__all__ = ["WorkerCoordinator", "main"]

logger: Final = logging.getLogger(__name__)


@attrs.define(eq=False)
class WorkerCoordinator:
    """The worker's side of :class:`~trio_tunnel.coordinator.Coordinator`, and the answers to the parent."""

    index: int
    shutdown: Shutdown
    channel: Channel | None = None
    server: Any = None

    def attach(self, server: Any) -> None:
        self.server = server

    async def claim(self, name: str, token: bytes | None, peer: str) -> Claim:
        assert self.channel is not None
        digest = token_digest(token)
        try:
            reply = await self.channel.request("claim", name=name, token=digest, peer=peer)
        except (ChannelClosedError, IpcError) as exc:
            logger.debug("claim of %r not answered: %s", name, exc)
            return Claim(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        if reply.get("reason"):
            return Claim(int(reply["code"]), str(reply["reason"]))
        ports = {str(k): int(v) for k, v in reply.get("ports", {}).items()}
        return Claim(ports=ports, local=bool(reply.get("local")))

    def _post(self, op: str, **fields: Any) -> None:
        if self.channel is None:
            return
        try:
            self.channel.post(op, **fields)
        except (ChannelClosedError, IpcError) as exc:
            logger.debug("could not tell the parent %s: %s", op, exc)

    def release(self, name: str) -> None:
        self._post("release", name=name)

    def remember(self, client: str, service: str, port: int) -> None:
        self._post("port", client=client, service=service, port=port)

    # ------------------------------------------------------------------------------------ parent's requests

    async def on_request(self, message: Message) -> Message:
        op = message["op"]
        server = self.server
        if server is None:
            raise IpcError(f"worker {self.index} is not serving yet")
        if op == "replace":
            live = await server.give_up(str(message["name"]), str(message["newcomer"]))
            return {"live": live}
        if op == "status":
            document = server.metrics.status()
            for row in (*document["sessions"], *document["services"]):
                row["worker"] = self.index
            return {"status": document}
        if op == "metrics":
            return {"text": generate_latest(server.metrics.registry).decode()}
        if op == "reload":
            new = pickle.loads(message["config"])  # from our parent (see the module docstring)
            assert isinstance(new, ServerConfig)
            await server.reload(new)  # raises ReloadError (a TunnelError: the parent hears its message)
            return {}
        raise IpcError(f"unknown request {op!r}")

    def on_post(self, message: Message) -> None:
        if message["op"] == "drain":
            self.shutdown.request()


async def _serve(
    index: int,
    ipc: socket.socket,
    listeners: list[trio.SocketListener],
    config: ServerConfig,
    shutdown: Shutdown,
    *,
    task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    coordinator = WorkerCoordinator(index, shutdown)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ipc))
    channel = coordinator.channel = Channel(stream, coordinator.on_request, coordinator.on_post, name="parent")

    async def orphaned() -> None:
        await channel.run()
        if not shutdown.requested.is_set():
            logger.warning("worker %d: the parent is gone; draining", index)
            shutdown.request()

    async def serve(nursery: trio.Nursery, *, task_status: trio.TaskStatus[HostPort]) -> None:
        await run_server(config, shutdown, listeners=listeners, coordinator=coordinator, task_status=task_status)
        nursery.cancel_scope.cancel(reason="drained")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(orphaned)
        address = await nursery.start(serve, nursery)
        logger.debug("worker %d (pid %d) serving on %s", index, os.getpid(), address)
        channel.post("ready", pid=os.getpid())
        task_status.started(address)


def _read_start(ipc: socket.socket) -> Message:
    """The parent's first message (blocking, before Trio runs): exactly one frame, nothing more."""
    head = ipc.recv(4, socket.MSG_WAITALL)
    if len(head) != 4:
        raise SystemExit(1)
    (size,) = struct.unpack(">I", head)
    if size > MAX_FRAME:
        raise SystemExit(1)
    body = ipc.recv(size, socket.MSG_WAITALL) if size else b""
    messages = Decoder().feed(head + body)
    if len(messages) != 1 or messages[0]["op"] != "start":
        raise SystemExit(1)
    return messages[0]


class _Named(logging.Filter):
    """Marks every record with the worker's index (text: in the logger name; JSON: a ``worker`` field)."""

    def __init__(self, index: int, as_json: bool) -> None:
        super().__init__()
        self.index, self.as_json = index, as_json

    def filter(self, record: logging.LogRecord) -> bool:
        if self.as_json:
            record.worker = self.index
        elif not record.name.endswith("]"):
            record.name = f"{record.name}[worker {self.index}]"
        return True


def main(argv: list[str]) -> NoReturn:
    """``INDEX FD,FD,...``: the channel's fd, then one listening socket per link address."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload comes from the parent, over the channel
    tune_malloc()  # as trio-tunnel's own entry point does (trio_tunnel.memtune)
    index = int(argv[0])
    fds = [int(fd) for fd in argv[1].split(",")]
    ipc = socket.socket(fileno=fds[0])
    ipc.setblocking(True)
    start = _read_start(ipc)
    as_json = bool(start.get("json"))
    configure_logging(0, "json" if as_json else "text")
    root = logging.getLogger()
    root.setLevel(int(start.get("level", logging.INFO)))
    for handler in root.handlers:
        handler.addFilter(_Named(index, as_json))
    config = pickle.loads(start["config"])  # from our parent (see the module docstring)
    assert isinstance(config, ServerConfig)
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd))) for fd in fds[1:]]
    run = partial(_serve, index, ipc, listeners, config)
    plan = cli._Plan("server", run, config.timeouts.drain, config)
    try:
        code = trio.run(cli._amain, run, config.timeouts.drain)
    except KeyboardInterrupt:
        sys.exit(cli.EXIT_INTERRUPTED)
    except BaseException as exc:
        leaf = cli._pick(exc)
        message, code = cli._describe_failure(leaf, plan)
        logger.error("worker %d failed: %s", index, message, exc_info=not isinstance(leaf, TunnelError | OSError))
        try:  # tell the parent why (it says so if the worker keeps failing to start)
            ipc.setblocking(True)
            ipc.sendall(encode({"op": "fatal", "reason": message}))
        except OSError:
            pass
    sys.exit(code)


if __name__ == "__main__":
    # ``python -m trio_tunnel.worker``: run the importable module, so loggers are named "trio_tunnel.worker".
    from trio_tunnel.worker import main as _main

    _main(sys.argv[1:])
