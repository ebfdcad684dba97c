"""TlsStream: TLS 1.3 over a TCP socket as a :class:`trio.abc.Stream`, with OpenSSL doing the socket I/O itself.

Why not :class:`trio.SSLStream`
-------------------------------
``trio.SSLStream`` runs OpenSSL on memory buffers (:class:`ssl.SSLObject` with two :class:`ssl.MemoryBIO`): each
byte is copied from the kernel into a Python ``bytes``, from there into the incoming BIO, decrypted, and the other
way round on sending, with several coroutine frames and locks per call. Here OpenSSL owns the socket (a
non-blocking :class:`ssl.SSLSocket`): ``SSL_read`` and ``SSL_write`` make the system calls in C, and Trio is only
asked to wait (:func:`trio.lowlevel.wait_readable` / :func:`~trio.lowlevel.wait_writable`) when OpenSSL says it
would block. ``scripts/bench_tls.py`` measures the CPU per GiB of both against plain :class:`~trio_tunnel.tcp.
TcpStream`.

The style is :class:`~trio_tunnel.tcp.TcpStream`'s: slots, one frame per call above Trio's wait, "would block"
caught in small helper functions (no exception ever passes through a long-lived coroutine frame), every call a
checkpoint, :class:`trio.BusyResourceError` for a second concurrent sender or receiver, OS and TLS errors become
:class:`trio.BrokenResourceError` (chained, so ``__cause__`` says what happened), use after :meth:`TlsStream.aclose`
is :class:`trio.ClosedResourceError`.

No ``send_eof``
---------------
TLS 1.3 allows a half-close (RFC 8446 §6.1: close_notify closes only the sender's direction), but the standard
library can only send close_notify through ``SSLSocket.unwrap()``/``shutdown``, which on a non-blocking socket
immediately calls ``SSL_shutdown`` a second time to read the peer's close_notify, and that call reads (and throws
away, with an "application data after close notify" error) whatever data the peer is still sending. So this is a
plain :class:`trio.abc.Stream`: the tunnel's multiplexer does its own half-close per stream inside the link and
only ever closes the link as a whole. :meth:`TlsStream.aclose` sends close_notify (best effort) before closing.

Both directions can want both kinds of readiness: a read can need to write (answering a TLS 1.3 KeyUpdate) and a
write can need to read. Trio lets only one task wait per socket and direction, so a second task that needs the
same readiness parks until the first one's wait ends (:meth:`TlsStream._wait`) and then tries again.

A cancelled ``send_all`` may leave part of a TLS record on the wire; OpenSSL then requires the *same* write to be
retried, or the stream is corrupt. The unsent remainder is kept (copied) and the next ``send_all`` finishes it
before its own data, so the stream stays valid; as for any Trio stream, what a cancelled ``send_all`` sent is
unspecified (here: all of it, eventually, if the stream is used again).

Channel binding: Python 3.11's :mod:`ssl` has no RFC 9266 ``tls-exporter`` (no ``export_keying_material``), and
``tls-unique`` is undefined for TLS 1.3, so authentication can bind to the certificates instead:
:meth:`TlsStream.peer_certificate_der` and :meth:`TlsStream.local_certificate_der`.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Sequence
from typing import Final, NoReturn, final

import trio
from trio_tunnel.tcp import DEFAULT_RECEIVE_SIZE, TcpStream

__all__ = ["CLOSE_NOTIFY_TIMEOUT", "TlsHandshakeError", "TlsStream"]

CLOSE_NOTIFY_TIMEOUT: Final = 1.0
"""Seconds :meth:`TlsStream.aclose` waits at most for room in the socket buffer to send close_notify (the peer may
have stopped reading); then it closes without."""

_READ: Final = 1
_WRITE: Final = 2

# TLS reasons OpenSSL gives when the first bytes from the peer are not a TLS record: a plaintext peer.
_PLAINTEXT_REASONS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}
)


class TlsHandshakeError(ssl.SSLError):
    """The TLS handshake failed. An :class:`ssl.SSLError` (so an ``OSError``, as connection failures are) with a
    one-line message saying why; ``__cause__`` is the original error. ``plaintext_peer`` is True when what came
    back was not TLS at all (a peer that speaks plaintext)."""

    plaintext_peer: bool = False


# The helpers below catch "would block" outside the coroutines (see tcp.py on why): they return the data or the
# number of bytes written, or _READ / _WRITE for what OpenSSL is waiting for.


def _read_nowait(sock: ssl.SSLSocket, max_bytes: int) -> bytes | int:
    try:
        return sock.read(max_bytes)
    except ssl.SSLWantReadError:
        return _READ
    except ssl.SSLWantWriteError:
        return _WRITE


def _write_nowait(sock: ssl.SSLSocket, data: bytes | memoryview) -> int:
    """0 when written (OpenSSL writes all or nothing: no partial writes), else _READ / _WRITE."""
    try:
        sock.write(data)
    except ssl.SSLWantReadError:
        return _READ
    except ssl.SSLWantWriteError:
        return _WRITE
    return 0


def _handshake_nowait(sock: ssl.SSLSocket) -> int:
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return _READ
    except ssl.SSLWantWriteError:
        return _WRITE
    return 0


def _shutdown_nowait(sock: ssl.SSLSocket) -> int:
    """Send close_notify; _WRITE if the socket buffer is full. Not waiting for the peer's close_notify: the
    second ``SSL_shutdown`` inside ``unwrap`` wants to read, or fails on data still arriving; both are fine."""
    try:
        sock.unwrap()
    except ssl.SSLWantWriteError:
        return _WRITE
    except (OSError, ValueError):
        pass
    return 0


def _handshake_error(exc: OSError, peer: str) -> TlsHandshakeError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = f"certificate verify failed: {exc.verify_message}"
    elif isinstance(exc, ssl.SSLEOFError) or (not isinstance(exc, ssl.SSLError) and exc.errno is not None):
        why = f"the peer closed the connection ({exc.strerror or exc}); is it a TLS server with this protocol?"
    elif isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        why = reason.lower().replace("_", " ") if reason else str(exc)
        if reason in _PLAINTEXT_REASONS:
            why += " (the peer does not speak TLS: plaintext on one side?)"
        elif reason == "TLSV1_ALERT_PROTOCOL_VERSION" or "PROTOCOL" in reason:
            why += " (both sides need TLS 1.3)"
    else:
        why = str(exc)
    error = TlsHandshakeError(f"TLS handshake with {peer} failed: {why}")
    error.plaintext_peer = isinstance(exc, ssl.SSLError) and (exc.reason or "") in _PLAINTEXT_REASONS
    return error


def _take_socket(transport: TcpStream | trio.SocketStream | socket.socket) -> socket.socket:
    """The standard library socket of ``transport``; a TcpStream or SocketStream is left detached (inert)."""
    if isinstance(transport, TcpStream):
        sock = transport.socket
        return socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    if isinstance(transport, trio.SocketStream):
        tsock = transport.socket
        return socket.socket(tsock.family, tsock.type, tsock.proto, fileno=tsock.detach())
    return transport


def _peer_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "the peer"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@final
class TlsStream(trio.abc.Stream):
    """A TLS connection as a Trio stream. Make one with :meth:`handshake`.

    Attributes:
        socket: the :class:`ssl.SSLSocket` (non-blocking); for ``getpeername``, ``cipher()`` and the like, never
            for I/O.
    """

    __slots__ = (
        "_closed",
        "_deferred_error",
        "_drained",
        "_local_der",
        "_lot",
        "_receiving",
        "_rwait",
        "_sending",
        "_unsent",
        "_wwait",
        "socket",
    )

    def __init__(self, sock: ssl.SSLSocket, *, local_certificate: bytes | None = None) -> None:
        """Wrap a non-blocking SSLSocket (handshake done or to be done with :meth:`do_handshake`). Prefer
        :meth:`handshake`."""
        sock.setblocking(False)
        self.socket = sock
        self._local_der = local_certificate
        self._receiving = False
        self._sending = False
        self._closed = False
        self._rwait = False  # a task of ours is in wait_readable on the socket
        self._wwait = False  # ... in wait_writable
        self._lot: trio.lowlevel.ParkingLot | None = None  # tasks waiting for the waiting task (rare: made lazily)
        self._unsent: bytes | None = None  # the retry a cancelled send_all left (OpenSSL needs the same buffer)
        # What the last read ended on (see receive_some): 0, or _READ / _WRITE when OpenSSL would have blocked, so
        # the next receive waits first; and an error met after some data was read, raised by the next receive.
        self._drained = 0
        self._deferred_error: OSError | None = None

    @classmethod
    async def handshake(
        cls,
        transport: TcpStream | trio.SocketStream | socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        local_certificate: bytes | None = None,
    ) -> TlsStream:
        """Run the TLS handshake over a connected ``transport`` (taken over: do not use or close it afterwards)
        and return the stream. The caller bounds it with a cancel scope (the handshake timeout); on failure or
        cancellation the socket is closed. Raises :class:`TlsHandshakeError`.

        ``local_certificate``: our certificate (DER), only kept for :meth:`local_certificate_der` (the standard
        library cannot read it back from the connection).
        """
        raw = _take_socket(transport)
        peer = _peer_name(raw)
        try:
            raw.setblocking(False)
            sock = context.wrap_socket(
                raw,
                server_side=server_side,
                server_hostname=server_hostname,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=False,  # a TCP close without close_notify is an error (truncation), not EOF
            )
        except BaseException:
            raw.close()
            raise
        stream = cls(sock, local_certificate=local_certificate)
        try:
            await stream.do_handshake(peer)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def do_handshake(self, peer: str = "the peer") -> None:
        """Run the handshake (:meth:`handshake` does); errors as there, naming ``peer``."""
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self.socket
        while True:
            try:
                want = _handshake_nowait(sock)
            except OSError as exc:
                raise _handshake_error(exc, peer) from exc
            if not want:
                break
            await self._wait(want)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def __repr__(self) -> str:
        return f"<TlsStream fd={self.socket.fileno()}>"

    # --------------------------------------------------------------------------------------------- identity

    def getpeercert(self, binary_form: bool = True) -> bytes | None:
        """The peer's certificate, DER (as :meth:`ssl.SSLSocket.getpeercert` with ``binary_form=True``)."""
        if not binary_form:
            raise ValueError("only binary_form=True: a dict needs a verified certificate (CERT_REQUIRED)")
        return self.socket.getpeercert(binary_form=True)

    def peer_certificate_der(self) -> bytes | None:
        """The certificate the peer presented (DER), verified or not (with pins the caller checks it)."""
        return self.socket.getpeercert(binary_form=True)

    def local_certificate_der(self) -> bytes | None:
        """Our certificate as given to :meth:`handshake` (None if not given)."""
        return self._local_der

    @property
    def version(self) -> str | None:
        """The negotiated protocol, e.g. ``"TLSv1.3"``."""
        return self.socket.version()

    @property
    def cipher(self) -> str | None:
        """The negotiated cipher suite, e.g. ``"TLS_AES_256_GCM_SHA384"``."""
        info = self.socket.cipher()
        return info[0] if info else None

    # ------------------------------------------------------------------------------------------------ waiting

    async def _wait(self, want: int) -> None:
        """Wait until the socket is readable (``want == _READ``) or writable. If another task of this stream is
        already waiting for that, park until its wait ends instead (Trio allows one waiter per socket and
        direction), then let the caller try again."""
        sock = self.socket
        if want == _READ:
            if self._rwait:
                await self._park()
            else:
                self._rwait = True
                try:
                    await trio.lowlevel.wait_readable(sock)
                finally:
                    self._rwait = False
                    if self._lot is not None:
                        self._lot.unpark_all()
        elif self._wwait:
            await self._park()
        else:
            self._wwait = True
            try:
                await trio.lowlevel.wait_writable(sock)
            finally:
                self._wwait = False
                if self._lot is not None:
                    self._lot.unpark_all()
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")

    async def _park(self) -> None:
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()

    def _raise_error(self, exc: OSError) -> NoReturn:
        if self._closed or exc.errno == errno.EBADF:
            raise trio.ClosedResourceError("this stream was closed") from None
        raise trio.BrokenResourceError(f"TLS connection broken: {exc}") from exc

    # ---------------------------------------------------------------------------------------------- receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` of data; ``b""`` once the peer sent close_notify. A close without close_notify is
        :class:`trio.BrokenResourceError`.

        One ``SSL_read`` returns at most one TLS record (16 KiB), so this reads records until ``max_bytes`` or until
        OpenSSL would block: a bulk transfer takes one call (one pass of the multiplexer's reader, one write into a
        splice's socket) per 256 KiB, not per 16 KiB. Having seen "would block", the next call waits for the
        socket first instead of asking OpenSSL again (same system calls, the ``EAGAIN`` read is just made earlier).
        """
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            if self._deferred_error is not None:
                exc, self._deferred_error = self._deferred_error, None
                self._raise_error(exc)
            sock = self.socket
            waited = False
            if self._drained:
                await self._wait(self._drained)
                self._drained = 0
                waited = True
            while True:
                try:
                    data = _read_nowait(sock, max_bytes)
                except OSError as exc:
                    self._raise_error(exc)
                if isinstance(data, bytes):
                    break
                await self._wait(data)
                waited = True
            if data and len(data) < max_bytes:
                data = self._read_more(sock, data, max_bytes)
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    def _read_more(self, sock: ssl.SSLSocket, first: bytes, max_bytes: int) -> bytes:
        """``first`` and the records after it that can be read now, up to ``max_bytes`` in all (see
        :meth:`receive_some`)."""
        chunks = [first]
        size = len(first)
        while size < max_bytes:
            try:
                more = _read_nowait(sock, max_bytes - size)
            except OSError as exc:
                self._deferred_error = exc  # the data read so far is good: the next call reports the error
                break
            if isinstance(more, int):
                self._drained = more
                break
            if not more:  # close_notify: the next call reads it again
                break
            chunks.append(more)
            size += len(more)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # ------------------------------------------------------------------------------------------------ sending

    async def send_all(self, data: bytes | bytearray | memoryview, *, checkpoint: bool = True) -> None:
        """:meth:`trio.abc.SendStream.send_all`; ``checkpoint=False`` as :meth:`TcpStream.send_all
        <trio_tunnel.tcp.TcpStream.send_all>`."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            view: bytes | memoryview = data if type(data) is bytes else memoryview(data).cast("B")
            waited = False
            if self._unsent is not None:
                unsent, self._unsent = self._unsent, None
                waited = await self._write(unsent)
            if len(view):
                waited = await self._write(view) or waited
            if checkpoint and not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_all_parts(self, parts: Sequence[bytes | bytearray | memoryview], *, checkpoint: bool = True) -> None:
        """``send_all(b"".join(parts))``, as :meth:`TcpStream.send_all_parts
        <trio_tunnel.tcp.TcpStream.send_all_parts>` takes it. The parts are joined: one ``SSL_write`` packs a
        multiplexer's small frames into shared TLS records, where a write per part would cost a record (22 bytes
        of overhead and an AEAD pass) and a system call each."""
        await self.send_all(parts[0] if len(parts) == 1 else b"".join(parts), checkpoint=checkpoint)

    async def _write(self, view: bytes | memoryview) -> bool:
        """Write all of ``view``; True if it had to wait. Cancelled while OpenSSL holds part of it, it keeps the
        buffer (a copy unless ``bytes``: the caller may reuse its buffer) in ``_unsent`` for the next send_all."""
        sock = self.socket
        waited = False
        while True:
            try:
                want = _write_nowait(sock, view)
            except OSError as exc:
                self._raise_error(exc)
            if not want:
                return waited
            try:
                await self._wait(want)
            except trio.Cancelled:
                self._unsent = view if type(view) is bytes else bytes(view)
                raise
            waited = True

    def send_nowait(self, parts: Sequence[bytes | memoryview]) -> int:
        """:class:`~trio_tunnel.sink.Sink`: one ``SSL_write`` of the joined parts, without waiting. OpenSSL writes
        all or nothing, but when the socket fills midway it has committed the records it made and needs the same
        bytes again: then they are kept (as a cancelled ``send_all`` keeps them), all count as taken, and
        :attr:`holds_unsent` tells the owner of the waiting to call ``send_all`` (which finishes them first).
        0 while a send is under way, something is still unsent, the stream is closed, or on any error."""
        if self._sending or self._closed or self._unsent is not None:
            return 0
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        size = len(data)
        if not size:
            return 0
        try:
            want = _write_nowait(self.socket, data)
        except OSError:
            return 0
        if want:
            self._unsent = data if type(data) is bytes else bytes(data)
        return size

    @property
    def holds_unsent(self) -> bool:
        """:class:`~trio_tunnel.sink.Sink`: a write OpenSSL must retry is pending (see :meth:`send_nowait`)."""
        return self._unsent is not None

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            await self._wait(_WRITE)
        finally:
            self._sending = False

    # ------------------------------------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Send close_notify if the socket buffer has room within :data:`CLOSE_NOTIFY_TIMEOUT` (not at all when
        cancelled), then close the socket; waiting tasks get :class:`trio.ClosedResourceError`. Closing twice is
        fine. Never waits for the peer."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        sock = self.socket
        try:
            if sock.fileno() != -1 and self._unsent is None and _shutdown_nowait(sock):
                with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
                    await self._wait(_WRITE)
                    _shutdown_nowait(sock)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass
        finally:
            self._closed = True
            if sock.fileno() != -1:
                trio.lowlevel.notify_closing(sock)
                sock.close()
            if self._lot is not None:
                self._lot.unpark_all()
        await trio.lowlevel.checkpoint()
