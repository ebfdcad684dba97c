"""The channel between ``server --workers N``'s parent and each worker: msgpack maps, each prefixed with its length.

Why this shape: the two ends are the same program on the same machine, joined by an ``AF_UNIX`` socketpair the
parent made for that worker alone (passed at spawn, never reachable by anyone else), so the codec needs no
authentication, versioning or compression; it needs to be small, bounded and testable without sockets. A frame is a
4-byte big-endian length and a msgpack map; :class:`Decoder` is sans-I/O (bytes in, messages out) and refuses a
frame over :data:`MAX_FRAME` (a ``/metrics`` text of a thousand clients is a few hundred KiB).

Messages are maps with an ``op``. Three kinds, told apart by their keys:

* a request: ``{"op": ..., "id": N, ...}``; the other side answers with ``{"op": "reply", "re": N, ...}``;
* a reply: ``{"op": "reply", "re": N, ...}`` (``error`` set when the request failed);
* a post: ``{"op": ..., ...}`` without ``id``: news that needs no answer (a worker is ready, a name was released).

:class:`Channel` runs one socket: one task reads, one writes; everything sent goes through one queue, so a post and
a reply leave in the order they were made (a worker that released a name and then replies "released" is heard in
that order). The queue is bounded (:data:`MAX_QUEUED`): every post stands for a link or a service that changed,
which the server's own caps bound, and a peer that stops reading is a broken peer (the channel fails).
"""

from __future__ import annotations

import itertools
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import msgpack
import trio

from .errors import TunnelError

__all__ = ["MAX_FRAME", "Channel", "ChannelClosedError", "Decoder", "IpcError", "encode"]

logger: Final = logging.getLogger(__name__)

MAX_FRAME: Final = 16 * 1024 * 1024
"""Bytes of one message at most."""
MAX_QUEUED: Final = 65536
"""Messages waiting to be written at most (see the module docstring)."""
_LENGTH: Final = struct.Struct(">I")

Message = dict[str, Any]


class IpcError(TunnelError):
    """The other end sent something that is not a frame of this codec."""


class ChannelClosedError(TunnelError):
    """The channel is closed (the other process is gone): no reply will come."""


def encode(message: Message) -> bytes:
    """One frame: length, then the msgpack map."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise IpcError(f"a message of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return _LENGTH.pack(len(body)) + body


@attrs.define
class Decoder:
    """Frames from a byte stream: :meth:`feed` bytes as they come, get the complete messages."""

    buffer: bytearray = attrs.field(factory=bytearray)

    def feed(self, data: bytes | bytearray) -> list[Message]:
        self.buffer += data
        out: list[Message] = []
        while len(self.buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self.buffer)
            if size > MAX_FRAME:
                raise IpcError(f"a frame of {size} bytes is over the {MAX_FRAME}-byte limit")
            end = _LENGTH.size + size
            if len(self.buffer) < end:
                break
            try:
                message = msgpack.unpackb(bytes(self.buffer[_LENGTH.size : end]), raw=False, strict_map_key=False)
            except (ValueError, msgpack.ExtraData) as exc:
                raise IpcError(f"a frame that is not msgpack: {exc}") from None
            del self.buffer[:end]
            if not isinstance(message, dict) or not isinstance(message.get("op"), str):
                raise IpcError("a frame that is not a message (a map with an op)")
            out.append(message)
        return out


Handler = Callable[[Message], Awaitable[Message]]
"""Answers a request (the reply's fields; raising :class:`~trio_tunnel.errors.TunnelError` sends ``error``)."""
Listener = Callable[[Message], None]
"""Takes a post (must not block)."""


@attrs.define(eq=False)
class Channel:
    """Requests, replies and posts over one stream (see the module docstring). :meth:`run` until the stream ends."""

    stream: trio.abc.Stream
    on_request: Handler
    on_post: Listener
    name: str = "ipc"
    _queue: deque[bytes] = attrs.field(factory=deque)
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _waiting: dict[int, tuple[trio.Event, list[Message]]] = attrs.field(factory=dict)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    closed: trio.Event = attrs.field(factory=trio.Event)

    def _enqueue(self, message: Message) -> None:
        if self.closed.is_set():
            raise ChannelClosedError(f"{self.name}: the channel is closed")
        if len(self._queue) >= MAX_QUEUED:
            raise IpcError(f"{self.name}: {MAX_QUEUED} messages unsent: the other end does not read")
        self._queue.append(encode(message))
        self._wake.set()

    def post(self, op: str, **fields: Any) -> None:
        """Send news that needs no answer (does not block; raises ChannelClosedError once closed)."""
        self._enqueue({"op": op, **fields})

    async def request(self, op: str, **fields: Any) -> Message:
        """Send a request and wait for its reply.

        Raises:
            ChannelClosedError: the channel closed before the reply came.
            IpcError: the other end answered with an error (its message).
        """
        ident = next(self._ids)
        done, box = trio.Event(), list[Message]()
        self._waiting[ident] = (done, box)
        try:
            self._enqueue({"op": op, "id": ident, **fields})
            await done.wait()
        finally:
            self._waiting.pop(ident, None)
        if not box:
            raise ChannelClosedError(f"{self.name}: closed before the reply to {op!r}")
        reply: Message = box[0]
        if reply.get("error"):
            raise IpcError(str(reply["error"]))
        return reply

    async def run(self) -> None:
        """Read and write until the stream ends (or breaks); then every waiting request fails."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, nursery.cancel_scope)
                await self._read(nursery)
                nursery.cancel_scope.cancel(reason=f"{self.name}: the other end closed the channel")
        finally:
            self.closed.set()
            for done, _box in self._waiting.values():
                done.set()

    async def _write(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                while self._queue:
                    await self.stream.send_all(self._queue.popleft())
                self._wake = trio.Event()
                await self._wake.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel(reason=f"{self.name}: the channel broke")

    async def _read(self, nursery: trio.Nursery) -> None:
        decoder = Decoder()
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            for message in decoder.feed(data):
                if message["op"] == "reply":
                    waiter = self._waiting.get(message.get("re", -1))
                    if waiter is not None:
                        waiter[1].append(message)
                        waiter[0].set()
                elif "id" in message:
                    nursery.start_soon(self._answer, message)
                else:
                    self.on_post(message)

    async def _answer(self, message: Message) -> None:
        try:
            reply = await self.on_request(message)
        except TunnelError as exc:
            reply = {"error": str(exc) or type(exc).__name__}
        if not self.closed.is_set():
            self._enqueue({**reply, "op": "reply", "re": message["id"]})
