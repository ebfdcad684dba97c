"""TcpStream: a lean :class:`trio.abc.HalfCloseableStream` over a TCP socket, and :func:`serve_tcp`, its accept loop.

Why not :class:`trio.SocketStream`
----------------------------------
Every connection through the tunnel has, at each end, a task asleep in ``receive_some`` on a TCP socket, and
idle connections are what a tunnel holds most of. Asleep in ``trio.SocketStream.receive_some`` a task holds seven
coroutine frames and a generator context manager (the stream, its error-translating context manager, the Trio
socket's ``recv`` and its non-blocking helper, then Trio's wait on the fd), and the stream itself is three objects
with dicts plus two conflict detectors. :class:`TcpStream` does the same work in one frame of its own above Trio's
``wait_readable``, over the standard library socket, with slots and two flags; it saves about 2 KiB per socket,
measured with ``scripts/bench_memory.py``.

The semantics are trio.SocketStream's, and ``tests/tunnel/test_tcp.py`` checks them with
:func:`trio.testing.check_half_closeable_stream`: every call is a checkpoint; ``send_all`` and ``receive_some``
each allow one task at a time (:class:`trio.BusyResourceError`); an OS error becomes
:class:`trio.BrokenResourceError` chained to it (so a reset is recognisable as ``ConnectionResetError`` in
``__cause__``); use after :meth:`aclose` is :class:`trio.ClosedResourceError`, and closing wakes any task waiting on
the socket with the same.

Sockets come from Trio (:func:`trio.open_tcp_stream`'s happy eyeballs, :class:`trio.SocketListener`'s accept and
its handling of transient accept errors) and are taken over with :meth:`TcpStream.adopt`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, NoReturn, final

import trio

from .guard import AcceptTrouble

__all__ = ["DEFAULT_RECEIVE_SIZE", "TcpStream", "fit_send_buffer", "serve_tcp"]

logger = logging.getLogger(__name__)

DEFAULT_RECEIVE_SIZE: Final = 65536
"""``receive_some()`` without ``max_bytes`` reads up to this much (as trio.SocketStream does)."""

ACCEPT_RETRY: Final = 0.1
"""Seconds :func:`serve_tcp` waits after running out of file descriptors or memory before accepting again (as
:func:`trio.serve_listeners` does): no event announces that a descriptor was freed."""

_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# An accept that fails for reasons of that one connection (reset before we took it, firewall, network errors the
# kernel reports early): try the next one, as trio.SocketListener does.
_SKIP_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)

_INHERITS_OPTIONS: Final = sys.platform.startswith("linux")
"""Linux gives an accepted socket the listening socket's options (TCP_NODELAY, TCP_NOTSENT_LOWAT, keepalive):
set them once on the listener instead of four to six system calls per connection."""

KEEPALIVE_IDLE: Final = 60
KEEPALIVE_INTERVAL: Final = 10
KEEPALIVE_COUNT: Final = 6


def set_keepalive(sock: socket.socket | trio.socket.SocketType) -> None:
    """TCP keepalive with :data:`KEEPALIVE_IDLE` s of silence, then :data:`KEEPALIVE_COUNT` probes
    :data:`KEEPALIVE_INTERVAL` s apart (about two minutes in all). A socket already reset is left alone."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass


def _set_stream_options(sock: socket.socket | trio.socket.SocketType) -> None:
    """What trio.SocketStream sets on every socket: no Nagle, and a small unsent-data mark where there is one."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 16 * 1024)


SEND_BUFFER_RATE: Final = 256 * 1024 * 1024
"""Bytes per second a link's fitted send buffer must carry at the link's round-trip time (see
:func:`fit_send_buffer`): about what this process moves over TLS at best."""

SEND_BUFFER_MIN: Final = 128 * 1024
SEND_BUFFER_MAX: Final = 4 * 1024 * 1024
"""A fit at least this large is not made: the kernel's autotuning (up to ``tcp_wmem``'s maximum) stays."""


def fit_send_buffer(stream: TcpStream | trio.SocketStream | socket.socket, rtt: float) -> int | None:
    """Cap a link socket's send buffer at what ``rtt`` needs at :data:`SEND_BUFFER_RATE` (at least
    :data:`SEND_BUFFER_MIN`); returns the size set, or None when the link's RTT calls for more than
    :data:`SEND_BUFFER_MAX` (a long fat link keeps the kernel's autotuning) or the option failed.

    The kernel grows a busy socket's send buffer to megabytes; on a link with a short RTT those megabytes are a
    FIFO queue that one bulk stream fills, and a small frame of another stream written after them waits for all of
    it (about 10 ms at 200 MiB/s). Capped, the backlog stays in the multiplexer's per-stream queues, where the
    scheduler puts the small frame ahead of it. An RTT sample is never shorter than the real RTT, so the cap never
    starves a slow link: a larger RTT gives a larger buffer, and beyond :data:`SEND_BUFFER_MAX` none is set.
    """
    size = max(SEND_BUFFER_MIN, int(rtt * SEND_BUFFER_RATE))
    if size >= SEND_BUFFER_MAX:
        return None
    sock = stream if isinstance(stream, socket.socket) else stream.socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:
        return None
    return size


REFIT_BELOW: Final = 0.75
"""A new RTT sample fits the send buffer again when it is below this fraction of the smallest sample so far."""


class SendBufferFit:
    """Fits a link's send buffer to the smallest RTT sample seen (:func:`fit_send_buffer`). A sample is never shorter
    than the real RTT, but it can be far longer (the handshake's PING on a busy machine, a queue on the path), and
    one inflated first sample would leave megabytes of kernel queue ahead of every small frame, or autotuning on, for
    the link's life. So each clearly smaller sample (:data:`REFIT_BELOW`) fits the buffer again; a larger one never
    does (the minimum is the best estimate of the path's RTT)."""

    __slots__ = ("best", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.best: float | None = None
        """The smallest sample so far, once one has been applied."""

    def sample(self, rtt: float) -> bool:
        """Apply ``rtt`` if it is the first sample or clearly below the best so far; True if it was applied."""
        if self.best is not None and rtt >= self.best * REFIT_BELOW:
            return False
        self.best = rtt
        fit_send_buffer(self.sock, rtt)
        return True


# "Would block" is caught in these small functions, not in the coroutines that call them: an exception that passes
# through a coroutine frame makes Python create a frame object for it (for the traceback), and that object lives as
# long as the coroutine, i.e. as long as the connection (about 200 bytes per socket). Waiting inside an except
# clause would be worse: the exception and its traceback would stay alive for the whole wait.


def _recv_nowait(sock: socket.socket, max_bytes: int) -> bytes | None:
    """``sock.recv``, or None when nothing can be read yet."""
    try:
        return sock.recv(max_bytes)
    except BlockingIOError:
        return None


def _sendmsg_nowait(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> int:
    """``sock.sendmsg(parts)``; 0 when nothing can be sent yet."""
    try:
        return sock.sendmsg(parts)
    except BlockingIOError:
        return 0


_SHORT_READ: Final = 4096
"""A read shorter than this (and than asked for) was a message, not part of a stream of bytes: the next read most
likely finds the socket empty, so it waits first (see TcpStream.receive_some). A bulk read is longer, and the next
one usually finds more bytes already there."""

_IOV_MAX: Final = 1024
"""Buffers per sendmsg call at most (Linux's IOV_MAX; more would fail with EMSGSIZE)."""


def _raise_stream_error(exc: OSError) -> NoReturn:
    """Raise the stream error for a socket's OS error: EBADF means we closed it, anything else that it broke."""
    if exc.errno == errno.EBADF:
        raise trio.ClosedResourceError("this socket was already closed") from None
    raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


@final
class TcpStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket as a Trio stream. Make one with :meth:`adopt`.

    Attributes:
        socket: the standard library socket (non-blocking); use it for ``getpeername``, ``getsockopt`` and the
            like, never for I/O.
    """

    __slots__ = ("_drained", "_eof_sent", "_receiving", "_sending", "socket")

    def __init__(self, sock: socket.socket) -> None:
        """Wrap a connected stream socket (it is made non-blocking). Prefer :meth:`adopt`."""
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("TcpStream needs a SOCK_STREAM socket")
        if sock.gettimeout() != 0.0:  # a system call: not for a socket made non-blocking already
            sock.setblocking(False)
        self.socket = sock
        self._receiving = False
        self._sending = False
        self._eof_sent = False
        self._drained = False  # the last read was short (a message, not a stream): the socket is most likely empty

    @classmethod
    def adopt(cls, stream: trio.SocketStream) -> TcpStream:
        """Take over the socket of ``stream`` (which is left detached: closing it does nothing). The socket keeps
        the options Trio set: ``TCP_NODELAY``, and ``TCP_NOTSENT_LOWAT`` where the system has it."""
        tsock = stream.socket
        family, type_, proto = tsock.family, tsock.type, tsock.proto
        return cls(socket.socket(family, type_, proto, fileno=tsock.detach()))

    def __repr__(self) -> str:
        return f"<TcpStream fd={self.socket.fileno()}>"

    # ------------------------------------------------------------------------------------------------ receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            sock = self.socket
            waited = False
            if self._drained:
                # After a short read the socket is most likely empty: wait first and save the recv that would
                # fail with EAGAIN (one system call per message on latency-bound traffic). If bytes did come
                # meanwhile, the wait returns in the next pass, which the call's checkpoint would cost anyway.
                if sock.fileno() == -1:
                    raise trio.ClosedResourceError("this socket was already closed")
                await trio.lowlevel.wait_readable(sock)
                waited = True
            while True:
                try:
                    data = _recv_nowait(sock, max_bytes)
                except OSError as exc:
                    _raise_stream_error(exc)
                if data is not None:
                    self._drained = len(data) < _SHORT_READ and len(data) < max_bytes
                    if not waited:  # a call is a schedule point; a wait already was one (no extra scheduler pass)
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                await trio.lowlevel.wait_readable(sock)
                waited = True
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int) -> bytes:
        """What has already arrived, at most ``max_bytes``, without waiting and without a schedule point; ``b""``
        when nothing has (or at EOF, or on an error, or while another task receives: the next ``receive_some``
        finds those). Lets a relay send a connection's first bytes along with what it sends first itself."""
        if self._receiving or max_bytes < 1:
            return b""
        try:
            data = _recv_nowait(self.socket, max_bytes)
        except OSError:
            return b""
        if not data:
            return b""
        self._drained = len(data) < _SHORT_READ and len(data) < max_bytes
        return data

    # -------------------------------------------------------------------------------------------------- sending

    async def send_all(self, data: bytes | bytearray | memoryview, *, checkpoint: bool = True) -> None:
        """:meth:`trio.abc.SendStream.send_all`. With ``checkpoint=False`` the call still raises Cancelled if
        cancelled, but yields to the scheduler only if it had to wait: for a caller whose next call is a checkpoint
        anyway (a copy loop's ``receive_some``), one scheduler pass fewer per message."""
        await self.send_all_parts((data,), checkpoint=checkpoint)

    async def send_all_parts(self, parts: Sequence[bytes | bytearray | memoryview], *, checkpoint: bool = True) -> None:
        """``send_all(b"".join(parts))`` without the join: the parts go out with ``sendmsg`` (scatter/gather), so
        a multiplexer's frames (headers and views of stream data) are not copied once more before the kernel's
        copy. Same semantics as :meth:`send_all` (which is this with one part); the parts must not change until it
        returns."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._eof_sent:
                raise trio.ClosedResourceError("cannot send after send_eof")
            sock = self.socket
            if sock.fileno() == -1:
                raise trio.ClosedResourceError("this socket was already closed")
            # Byte views throughout: a memoryview's len() counts items, and sendmsg reports bytes.
            pending = [part if type(part) is bytes else memoryview(part).cast("B") for part in parts if len(part)]
            waited = False
            while pending:
                try:
                    sent = _sendmsg_nowait(sock, pending[:_IOV_MAX] if len(pending) > _IOV_MAX else pending)
                except OSError as exc:
                    _raise_stream_error(exc)
                if not sent:
                    await trio.lowlevel.wait_writable(sock)
                    waited = True
                    continue
                done = 0
                while done < len(pending) and sent >= len(pending[done]):
                    sent -= len(pending[done])
                    done += 1
                if done:
                    del pending[:done]
                if sent:
                    pending[0] = memoryview(pending[0])[sent:]
            if checkpoint and not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def send_nowait(self, parts: Sequence[bytes | memoryview]) -> int:
        """:class:`~trio_tunnel.sink.Sink`: as much of ``parts`` as the socket takes now (one ``sendmsg``); 0 when it
        would block, while a ``send_all`` is under way, after ``send_eof``, or on any socket error (the next
        ``send_all`` reports it). Lets a task that read bytes write them on without waking the sender's task."""
        if self._sending or self._eof_sent:
            return 0
        try:
            return _sendmsg_nowait(self.socket, parts if len(parts) <= _IOV_MAX else parts[:_IOV_MAX])
        except OSError:
            return 0

    @property
    def holds_unsent(self) -> bool:
        """:class:`~trio_tunnel.sink.Sink`: never (what the kernel did not take was not taken)."""
        return False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if self.socket.fileno() == -1:
                raise trio.ClosedResourceError("this socket was already closed")
            await trio.lowlevel.wait_writable(self.socket)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            if self._eof_sent:
                return
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError as exc:
                _raise_stream_error(exc)
            self._eof_sent = True
        finally:
            self._sending = False

    # -------------------------------------------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Close the socket (before the checkpoint: done even when cancelled); waiting tasks get
        :class:`trio.ClosedResourceError`. Closing twice is fine."""
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """:meth:`aclose` without its checkpoint, for synchronous code (a callback of the session's reader)."""
        sock = self.socket
        if sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    # ------------------------------------------------------------------------------------------------- options

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        """:meth:`socket.socket.setsockopt` on the socket."""
        self.socket.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int) -> int:
        """:meth:`socket.socket.getsockopt` on the socket."""
        return self.socket.getsockopt(level, option)


async def connect_tcp(host: str, port: int) -> TcpStream:
    """A TCP connection to ``host:port``, with :class:`TcpStream`'s usual options (no Nagle, 16 KiB unsent mark).

    A numeric address (``127.0.0.1``, ``::1``: what a tunnel's local services usually are) is dialled directly:
    one socket and one connect, without :func:`trio.open_tcp_stream`'s resolver call and happy-eyeballs nursery
    and task, which cost more than the connect itself for a local service. A name goes through
    ``open_tcp_stream``. Failures raise ``OSError`` as ``open_tcp_stream``'s do (the errno says why).
    """
    family = _numeric_family(host)
    if family is None:
        return TcpStream.adopt(await trio.open_tcp_stream(host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        _set_stream_options(sock)
        if _connect_nowait(sock, (host, port)):
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, f"Error connecting to {format_address(host, port)}: {os.strerror(error)}")
        else:
            await trio.lowlevel.checkpoint()
    except BaseException:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    stream = TcpStream(sock)
    # Nothing can have arrived on a connection that was just made (a service that speaks first does so after its
    # accept): the first receive waits before it reads, saving the recv that would fail with EAGAIN.
    stream._drained = True
    return stream


@functools.lru_cache(maxsize=256)
def _numeric_family(host: str) -> socket.AddressFamily | None:
    """AF_INET or AF_INET6 for an IP address literal without a scope; None for anything to resolve. Cached: a
    tunnel dials the same few targets over and over."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return None if address.scope_id else socket.AF_INET6
    return socket.AF_INET


def _connect_nowait(sock: socket.socket, address: tuple[str, int]) -> bool:
    """Start a non-blocking connect; True while it is still in progress (see _recv_nowait on why a helper)."""
    try:
        sock.connect(address)
    except BlockingIOError:
        return True
    return False


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_tcp(
    handler: Callable[[TcpStream], Awaitable[object]],
    listeners: Sequence[trio.abc.Listener[trio.SocketStream]],
    *,
    handler_nursery: trio.Nursery | None = None,
    keepalive: bool = True,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``listeners`` forever, starting ``handler(stream)`` for each in ``handler_nursery``
    (default: a nursery of this call). Like :func:`trio.serve_listeners`, with two differences:

    * the handler gets a :class:`TcpStream`, and it **owns** it: it must close it (``async with stream:``); there
      is no wrapper task frame to do it, one frame fewer per open connection;
    * the listeners are closed when this returns or is cancelled;
    * each connection has ``TCP_NODELAY``, a 16 KiB ``TCP_NOTSENT_LOWAT`` and, with ``keepalive``,
      :func:`set_keepalive`'s TCP keepalive: on Linux set once on the listening socket (accepted sockets inherit
      them), elsewhere on each connection.

    Running out of descriptors or memory (``EMFILE``, ``ENFILE``, ``ENOMEM``, ``ENOBUFS``) is logged once per burst
    and accepting resumes after a growing pause (:class:`~trio_tunnel.guard.AcceptTrouble`); other accept errors
    propagate.
    """
    try:
        async with trio.open_nursery() as nursery:
            handlers = nursery if handler_nursery is None else handler_nursery
            for listener in listeners:
                nursery.start_soon(_accept_loop, handler, listener, handlers, keepalive)
            task_status.started()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def _accept_loop(
    handler: Callable[[TcpStream], Awaitable[object]],
    listener: trio.abc.Listener[trio.SocketStream],
    handlers: trio.Nursery,
    keepalive: bool,
) -> None:
    inherit = _INHERITS_OPTIONS and isinstance(listener, trio.SocketListener)
    if inherit:
        assert isinstance(listener, trio.SocketListener)
        _set_stream_options(listener.socket)
        if keepalive:
            set_keepalive(listener.socket)
    # The listening socket as a standard library object sharing Trio's descriptor (never closed through it:
    # detached below), so that an accept makes one socket object, not Trio's and then ours.
    view = _socket_view(listener.socket) if inherit else None  # type: ignore[attr-defined]
    try:
        await _accept_forever(handler, listener, handlers, keepalive, view)
    finally:
        if view is not None:
            view.detach()


def _socket_view(tsock: trio.socket.SocketType) -> socket.socket:
    return socket.socket(tsock.family, tsock.type, tsock.proto, fileno=tsock.fileno())


async def _accept_forever(
    handler: Callable[[TcpStream], Awaitable[object]],
    listener: trio.abc.Listener[trio.SocketStream],
    handlers: trio.Nursery,
    keepalive: bool,
    view: socket.socket | None,
) -> None:
    trouble = AcceptTrouble(_name(listener), logger)
    task_name = _task_name(handler)  # named once: Trio would format the same name for every connection's task
    while True:
        try:
            if view is not None:
                stream = await _accept_inheriting(view)
            else:
                stream = TcpStream.adopt(await listener.accept())
                if keepalive:
                    set_keepalive(stream.socket)
        except OSError as exc:
            if exc.errno not in _CAPACITY_ERRNOS:
                raise
            await trio.sleep(trouble.failed(exc))  # no event announces a freed descriptor: a timed retry
            continue
        trouble.accepted()
        try:
            handlers.start_soon(handler, stream, name=task_name)
        except BaseException:
            stream.socket.close()
            raise


async def _accept_inheriting(listening: socket.socket) -> TcpStream:
    """The next connection on a listening socket whose options the connection inherits (no SocketStream made and
    thrown away, no per-connection setsockopt; one socket object: ``accept4``, ``getsockname`` and ``FIONBIO``
    are all the system calls). A checkpoint, as Trio's accept is."""
    await trio.lowlevel.checkpoint_if_cancelled()
    waited = False
    while True:
        try:
            fd = _accept_nowait(listening)
        except OSError as exc:
            if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                raise trio.ClosedResourceError("the listener was closed") from None
            if exc.errno in _SKIP_ERRNOS:
                continue
            raise
        if fd is None:
            await trio.lowlevel.wait_readable(listening)
            waited = True
            continue
        stream = TcpStream(socket.socket(listening.family, listening.type, listening.proto, fileno=fd))
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return stream


def _accept_nowait(listening: socket.socket) -> int | None:
    """A new connection's descriptor, or None when none is waiting (see _recv_nowait on why a helper)."""
    try:
        fd, _ = listening._accept()  # type: ignore[attr-defined]  # socket.accept without its socket object
    except BlockingIOError:
        return None
    return int(fd)


def _task_name(fn: object) -> str:
    """The name Trio gives a task running ``fn`` (``module.qualname``, a partial's function's), made once: a task
    name Trio makes itself is a new string per task, held as long as the connection."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    try:
        return f"{fn.__module__}.{fn.__qualname__}"  # type: ignore[attr-defined]
    except AttributeError:
        return repr(fn)


def _name(listener: trio.abc.Listener[trio.SocketStream]) -> str:
    try:
        host, port = listener.socket.getsockname()[:2]  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return repr(listener)
    return f"{host}:{port}"
