"""TlsStream: TLS 1.3 over a TCP socket as a :class:`trio.abc.Stream`, OpenSSL working on memory buffers that this
class fills and drains with large socket calls.

Why memory buffers, and why not :class:`trio.SSLStream`
-------------------------------------------------------
OpenSSL doing the socket I/O itself (a non-blocking :class:`ssl.SSLSocket`, this class's first design) makes two
``read`` calls per TLS record (the 5-byte header, then the body) and one ``write`` per record: for a 64-byte round
trip three reads per hop (the third one ``EAGAIN``), for a bulk transfer about 200 system calls per MiB. With an
:class:`ssl.SSLObject` on two :class:`ssl.MemoryBIO` the socket is ours: one ``recv`` of up to 256 KiB feeds every
record it holds to OpenSSL, whose ``SSL_read`` then runs without system calls; one ``SSL_write`` encrypts a whole
multiplexer batch (many records) into the outgoing buffer and one ``send`` puts it on the wire. The price is one
more copy of each byte each way (into and out of the memory buffers), far cheaper than the calls it saves
(``scripts/bench_tls.py``, ``scripts/bench_syscalls.py``). ``trio.SSLStream`` does the same with memory buffers,
but through several coroutine frames, locks and a checkpoint per call; here each call is a few synchronous steps.

The style is :class:`~trio_tunnel.tcp.TcpStream`'s: slots, one frame per call above Trio's wait, "would block"
caught in small helper functions (no exception ever passes through a long-lived coroutine frame), every call a
checkpoint, :class:`trio.BusyResourceError` for a second concurrent sender or receiver, OS and TLS errors become
:class:`trio.BrokenResourceError` (chained, so ``__cause__`` says what happened), use after :meth:`TlsStream.aclose`
is :class:`trio.ClosedResourceError`.

No ``send_eof``
---------------
TLS 1.3 allows a half-close (RFC 8446 §6.1: close_notify closes only the sender's direction), but the tunnel's
multiplexer does its own half-close per stream inside the link and only ever closes the link as a whole, so this is
a plain :class:`trio.abc.Stream`. :meth:`TlsStream.aclose` sends close_notify (best effort) before closing.

Encrypted bytes the socket did not take (a full send buffer, a cancelled ``send_all``) stay in order in this
stream's outgoing queue, and the next send puts them on the wire before anything newer; with memory buffers there is
no OpenSSL "retry the same write" rule to honour. Bytes OpenSSL produces while reading (a TLS 1.3 KeyUpdate answer)
join the same queue, behind whatever was encrypted before them. As for any Trio stream, what a cancelled
``send_all`` sent is unspecified (here: all of it, eventually, if the stream is used again).

Channel binding: Python 3.11's :mod:`ssl` has no RFC 9266 ``tls-exporter`` (no ``export_keying_material``), and
``tls-unique`` is undefined for TLS 1.3, so authentication can bind to the certificates instead:
:meth:`TlsStream.peer_certificate_der` and :meth:`TlsStream.local_certificate_der`.
"""

from __future__ import annotations

import contextlib
import errno
import operator
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


_RECV_SIZE: Final = 256 * 1024
"""Bytes asked of the socket per ``recv``: up to sixteen full records, decrypted in one receive."""

_SHORT_READ: Final = 4096
"""A ``recv`` shorter than this (as :mod:`trio_tunnel.tcp`'s): the socket is most likely empty now, so once its
records are decrypted the next receive waits for it first instead of trying a ``recv`` that would fail."""


# The helpers below catch "would block" outside the coroutines (see tcp.py on why).


def _recv_nowait(sock: socket.socket, size: int) -> bytes | None:
    """``sock.recv``, or None when nothing can be read yet."""
    try:
        return sock.recv(size)
    except BlockingIOError:
        return None


def _send_nowait(sock: socket.socket, data: bytes | memoryview) -> int:
    """``sock.send``; 0 when nothing can be sent yet."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def _decrypt_nowait(obj: ssl.SSLObject, max_bytes: int) -> bytes | None:
    """Decrypted bytes (``b""``: close_notify), or None when OpenSSL needs more of a record."""
    try:
        return obj.read(max_bytes)
    except ssl.SSLWantReadError:
        return None


def _handshake_nowait(obj: ssl.SSLObject) -> bool:
    """True when the handshake is done; False when OpenSSL needs bytes from the peer."""
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def _shutdown_nowait(obj: ssl.SSLObject) -> None:
    """Put close_notify into the outgoing buffer. Not waiting for the peer's: ``unwrap`` then wants to read (or
    fails on data still arriving); both are fine."""
    with contextlib.suppress(OSError, ValueError):
        obj.unwrap()


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
        socket: the TCP socket (non-blocking); for ``getpeername``, ``setsockopt`` and the like, never for I/O.
        ssl_object: the :class:`ssl.SSLObject` (OpenSSL's state); for inspection, never for I/O.
    """

    __slots__ = (
        "_closed",
        "_deferred_error",
        "_drained",
        "_eof",
        "_incoming",
        "_local_der",
        "_lot",
        "_out",
        "_outgoing",
        "_partial",
        "_peer_done",
        "_receiving",
        "_rwait",
        "_sending",
        "_wwait",
        "socket",
        "ssl_object",
    )

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        local_certificate: bytes | None = None,
    ) -> None:
        """Wrap a connected TCP socket, handshake still to do (:meth:`do_handshake`). Prefer :meth:`handshake`."""
        sock.setblocking(False)
        self.socket = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._local_der = local_certificate
        self._receiving = False
        self._sending = False
        self._closed = False
        self._rwait = False  # a task of ours is in wait_readable on the socket
        self._wwait = False  # ... in wait_writable
        self._lot: trio.lowlevel.ParkingLot | None = None  # tasks waiting for the waiting task (rare: made lazily)
        self._out: bytes | memoryview | None = None  # encrypted bytes not on the wire yet, in order
        self._drained = False  # the last recv was short: the next one waits for the socket first
        self._eof = False  # the peer closed its side of the TCP connection (fed to OpenSSL)
        self._peer_done = False  # the peer's close_notify was read: every receive returns b"" from now on
        # The last receive filled max_bytes: OpenSSL may hold the rest of a record (pending()). A shorter one took
        # all a record had, so only the incoming buffer needs a look (one pending() call fewer per receive).
        self._partial = False
        self._deferred_error: BaseException | None = None  # met after some data was read: the next receive raises it

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
            stream = cls(
                raw,
                context,
                server_side=server_side,
                server_hostname=server_hostname,
                local_certificate=local_certificate,
            )
        except BaseException:
            raw.close()
            raise
        try:
            await stream.do_handshake(peer)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def do_handshake(self, peer: str = "the peer") -> None:
        """Run the handshake (:meth:`handshake` does); errors as there, naming ``peer``."""
        await trio.lowlevel.checkpoint_if_cancelled()
        obj = self.ssl_object
        while True:
            try:
                done = _handshake_nowait(obj)
                self._queue_output()
                await self._flush()
                if done:
                    break
                await self._fill()
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                raise _handshake_error(cause if isinstance(cause, OSError) else OSError(str(exc)), peer) from exc
            except OSError as exc:
                raise _handshake_error(exc, peer) from exc
        await trio.lowlevel.cancel_shielded_checkpoint()

    def __repr__(self) -> str:
        return f"<TlsStream fd={self.socket.fileno()}>"

    # --------------------------------------------------------------------------------------------- identity

    def getpeercert(self, binary_form: bool = True) -> bytes | None:
        """The peer's certificate, DER (as :meth:`ssl.SSLSocket.getpeercert` with ``binary_form=True``)."""
        if not binary_form:
            raise ValueError("only binary_form=True: a dict needs a verified certificate (CERT_REQUIRED)")
        return self.ssl_object.getpeercert(binary_form=True)

    def peer_certificate_der(self) -> bytes | None:
        """The certificate the peer presented (DER), verified or not (with pins the caller checks it)."""
        return self.ssl_object.getpeercert(binary_form=True)

    def local_certificate_der(self) -> bytes | None:
        """Our certificate as given to :meth:`handshake` (None if not given)."""
        return self._local_der

    @property
    def version(self) -> str | None:
        """The negotiated protocol, e.g. ``"TLSv1.3"``."""
        return self.ssl_object.version()

    @property
    def cipher(self) -> str | None:
        """The negotiated cipher suite, e.g. ``"TLS_AES_256_GCM_SHA384"``."""
        info = self.ssl_object.cipher()
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

    def _raise_error(self, exc: BaseException) -> NoReturn:
        if self._closed or (isinstance(exc, OSError) and exc.errno == errno.EBADF):
            raise trio.ClosedResourceError("this stream was closed") from None
        raise trio.BrokenResourceError(f"TLS connection broken: {exc}") from exc

    async def _fill(self) -> bool:
        """Move bytes from the socket into OpenSSL's incoming buffer (waiting for them if there are none yet); at
        the peer's TCP close, tell OpenSSL (a close without close_notify then reads as an error, a truncation).
        True if it waited."""
        if self._eof:
            raise trio.BrokenResourceError("TLS connection broken: the peer closed the connection")
        sock = self.socket
        waited = False
        while True:
            if self._drained:
                await self._wait(_READ)
                self._drained = False
                waited = True
            try:
                data = _recv_nowait(sock, _RECV_SIZE)
            except OSError as exc:
                self._raise_error(exc)
            if data is None:
                self._drained = True
                continue
            if data:
                self._incoming.write(data)
                self._drained = len(data) < _SHORT_READ
            else:
                self._incoming.write_eof()
                self._eof = True
            return waited

    def _queue_output(self) -> None:
        """Put what OpenSSL wrote into the outgoing buffer behind the bytes already waiting to go out."""
        outgoing = self._outgoing
        if outgoing.pending:
            more = outgoing.read()
            out = self._out
            self._out = more if out is None else b"".join((out, more))

    async def _flush(self) -> bool:
        """Put every waiting encrypted byte on the wire; True if it had to wait. Cancelled, the rest stays queued
        (in order) for the next send."""
        sock = self.socket
        waited = False
        while (out := self._out) is not None:
            try:
                sent = _send_nowait(sock, out)
            except OSError as exc:
                self._raise_error(exc)
            if sent >= len(out):
                self._out = None
                break
            if sent:
                self._out = memoryview(out)[sent:]
            await self._wait(_WRITE)
            waited = True
        return waited

    # ---------------------------------------------------------------------------------------------- receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` of data; ``b""`` once the peer sent close_notify. A close without close_notify is
        :class:`trio.BrokenResourceError`.

        One ``recv`` brings up to 256 KiB of records and they are decrypted together, up to ``max_bytes``: a bulk
        transfer takes one call (one pass of the multiplexer's reader, one write into a splice's socket) per
        256 KiB. Bytes OpenSSL already holds are returned without touching the socket.
        """
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif operator.index(max_bytes) < 1:  # (TypeError for a float, as a socket's recv would raise)
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
            if self._peer_done:
                await trio.lowlevel.checkpoint()
                return b""
            obj = self.ssl_object
            incoming = self._incoming
            waited = False
            while True:
                if incoming.pending or self._partial or self._eof:
                    try:
                        data = _decrypt_nowait(obj, max_bytes)
                    except (OSError, ValueError) as exc:
                        self._raise_error(exc)
                    if data is not None:
                        break
                    self._partial = False
                if await self._fill():
                    waited = True
            if not data:
                self._peer_done = True
            elif len(data) < max_bytes and incoming.pending:
                data = self._decrypt_more(data, max_bytes)
            self._partial = len(data) >= max_bytes
            if self._outgoing.pending:  # OpenSSL answered something while reading (a KeyUpdate)
                self._queue_output()
                if not self._sending:
                    self._send_queued()
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    def _decrypt_more(self, first: bytes, max_bytes: int) -> bytes:
        """``first`` and the records after it that OpenSSL already has, up to ``max_bytes`` in all."""
        obj = self.ssl_object
        incoming = self._incoming
        chunks = [first]
        size = len(first)
        while size < max_bytes and incoming.pending:  # (a read shorter than asked leaves nothing pending())
            try:
                more = _decrypt_nowait(obj, max_bytes - size)
            except (OSError, ValueError) as exc:
                self._deferred_error = exc  # the data decrypted so far is good: the next call reports the error
                break
            if more is None:  # a partial record
                break
            if not more:  # close_notify: the next receive returns b""
                self._peer_done = True
                break
            chunks.append(more)
            size += len(more)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _send_queued(self) -> None:
        """Put what the socket takes now of the queued encrypted bytes on the wire (errors: the next send's)."""
        out = self._out
        if out is None:
            return
        try:
            sent = _send_nowait(self.socket, out)
        except OSError:
            return
        self._out = None if sent >= len(out) else memoryview(out)[sent:]

    # ------------------------------------------------------------------------------------------------ sending

    def _encrypt(self, data: bytes | memoryview) -> None:
        """Encrypt ``data`` into records behind the queued bytes (OpenSSL takes all of it: memory never blocks)."""
        try:
            self.ssl_object.write(data)
        except (OSError, ValueError) as exc:
            self._raise_error(exc)
        self._queue_output()

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
            if len(view):
                self._encrypt(view)
            waited = await self._flush()
            if checkpoint and not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_all_parts(self, parts: Sequence[bytes | bytearray | memoryview], *, checkpoint: bool = True) -> None:
        """``send_all(b"".join(parts))``, as :meth:`TcpStream.send_all_parts
        <trio_tunnel.tcp.TcpStream.send_all_parts>` takes it. The parts are joined: one ``SSL_write`` packs a
        multiplexer's small frames into shared TLS records, where a write per part would cost a record (22 bytes
        of overhead and an AEAD pass) each."""
        await self.send_all(parts[0] if len(parts) == 1 else b"".join(parts), checkpoint=checkpoint)

    def send_nowait(self, parts: Sequence[bytes | memoryview]) -> int:
        """:class:`~trio_tunnel.sink.Sink`: encrypt the joined parts and ``send`` without waiting. Encrypted bytes
        the socket does not take are kept (in order) and :attr:`holds_unsent` tells the owner of the waiting to
        call ``send_all``, which puts them on the wire first; so every byte counts as taken. 0 while a send is under
        way, something is still unsent, the stream is closed, or on a TLS error."""
        if self._sending or self._closed or self._out is not None:
            return 0
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        size = len(data)
        if not size:
            return 0
        try:
            self.ssl_object.write(data)
        except (OSError, ValueError):
            return 0
        out = self._outgoing.read()  # (inline: nothing was queued, see above; this is every hop's path)
        try:
            sent = _send_nowait(self.socket, out)
        except OSError:
            sent = 0  # the owner's next send_all reports it
        if sent < len(out):
            self._out = memoryview(out)[sent:] if sent else out
        return size

    @property
    def holds_unsent(self) -> bool:
        """:class:`~trio_tunnel.sink.Sink`: encrypted bytes are waiting to go out (see :meth:`send_nowait`)."""
        return self._out is not None

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
        """Send close_notify (behind any bytes still queued) if the socket takes it within
        :data:`CLOSE_NOTIFY_TIMEOUT` (not at all when cancelled), then close the socket; waiting tasks get
        :class:`trio.ClosedResourceError`. Closing twice is fine. Never waits for the peer."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        sock = self.socket
        try:
            if sock.fileno() != -1 and not self._sending and not self._eof:
                _shutdown_nowait(self.ssl_object)
                self._queue_output()
                self._send_queued()
                if self._out is not None:
                    with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
                        await self._flush()
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
