"""The link's security layer: TLS 1.3 by default, plaintext only when both sides say ``--insecure-plaintext``.

What runs between TCP and the multiplexer on the client↔server link, on each side:

* **Server** (:func:`secure_server_link`): it peeks at the first byte the client sends. A TLS ClientHello starts
  with a handshake record (``0x16``); our plaintext preamble starts with the protocol's magic. A server with TLS
  that sees a plaintext client answers in plaintext with a REFUSE frame saying what to change (the client's own
  handshake code then shows it as one readable line); a plaintext server that sees a ClientHello logs why and
  answers with a REFUSE frame too, which the client's TLS layer reports as "the peer does not speak TLS".
  Nothing of the multiplexer runs for either.
* **Client** (:func:`secure_client_link`): a TLS 1.3 handshake, then the pin check when pins are given (the
  context does no chain or host-name check then, see :func:`trio_tunnel.certs.client_context`). Without pins the
  context verified the chain and host name against ``--tls-ca`` or the system's store. When that verification
  fails, :func:`presented_fingerprint` makes one more connection, without verification, only to read the key's
  fingerprint, so the refusal can show it with the exact flag to add after checking it out of band.

Both sides return the stream to run the session over and the **channel binding**: the SHA-256 of the server's
certificate (DER) as this side knows it (the server its own, the client the one it was shown), or empty for
plaintext. The HMAC handshake covers it (docs/PROTOCOL.md, 5.1), so a relay that terminates TLS with a
certificate of its own cannot pass a client's proof on to the real server: the two sides' bindings differ.

The handshake timeout bounds all of this: callers run these functions inside the same cancel scope as the
session handshake.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
import trio
from trio_tunnel.certs import (
    check_pin,
    client_context,
    fingerprint,
    load_certificate_der,
    load_or_create_identity,
    server_context,
)
from trio_tunnel.proto import ErrorCode
from trio_tunnel.proto import frames as F
from trio_tunnel.tcp import TcpStream, connect_tcp
from trio_tunnel.tls import TlsHandshakeError, TlsStream

__all__ = [
    "PLAINTEXT_REFUSED",
    "ClientTls",
    "LinkMismatchError",
    "ServerTls",
    "channel_binding",
    "presented_fingerprint",
    "refuse_link",
    "secure_client_link",
    "secure_server_link",
]

logger = logging.getLogger(__name__)

PLAINTEXT_REFUSED: Final = "this server requires TLS"
"""How the REFUSE to a plaintext client begins; the client recognises it (retrying cannot help)."""

TLS_HANDSHAKE_RECORD: Final = 0x16
"""The first byte of every TLS ClientHello (a handshake record)."""


@attrs.frozen
class ServerTls:
    """What the server needs for TLS: the context, its certificate (DER, the first of the chain) and its pin."""

    context: ssl.SSLContext
    certificate: bytes
    fingerprint: str

    @classmethod
    def from_files(cls, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> ServerTls:
        """An operator's certificate (PEM, chain allowed) and key. Raises ConfigError with a readable line."""
        context = server_context(cert_file, key_file)
        der = load_certificate_der(cert_file)
        return cls(context=context, certificate=der, fingerprint=fingerprint(der))

    @classmethod
    def from_state_dir(cls, state_dir: str | os.PathLike[str]) -> ServerTls:
        """The server's own key and self-signed certificate, made in ``state_dir`` on first use."""
        cert_file, key_file = load_or_create_identity(Path(state_dir))
        return cls.from_files(cert_file, key_file)


@attrs.frozen
class ClientTls:
    """What the client needs for TLS: the context and the pins (empty: verify the chain and host name)."""

    context: ssl.SSLContext
    pins: tuple[str, ...] = ()

    @classmethod
    def create(cls, *, pins: Sequence[str] = (), ca_file: str | os.PathLike[str] | None = None) -> ClientTls:
        return cls(context=client_context(ca_file=ca_file, pins=pins), pins=tuple(pins))


class LinkMismatchError(Exception):
    """The client speaks TLS and the server does not, or the other way round. ``client_tls`` says which."""

    def __init__(self, client_tls: bool) -> None:
        self.client_tls = client_tls
        if client_tls:
            message = (
                "the client speaks TLS and this server runs with --insecure-plaintext; remove --insecure-plaintext "
                "from the server, or add it to the client too"
            )
        else:
            message = PLAINTEXT_REFUSED + "; remove --insecure-plaintext from the client"
        super().__init__(message)


def channel_binding(certificate: bytes | None) -> bytes:
    """SHA-256 of the server's certificate (DER), or ``b""`` for a plaintext link."""
    return hashlib.sha256(certificate).digest() if certificate else b""


async def _first_byte(stream: TcpStream) -> int | None:
    """The first byte the peer sent, left in the socket (MSG_PEEK); None if it closed without sending one."""
    sock = stream.socket
    while True:
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        return data[0] if data else None


async def secure_server_link(stream: TcpStream, tls: ServerTls | None) -> tuple[trio.abc.Stream, bytes]:
    """The stream to run the server's session over, and the channel binding. Raises
    :class:`LinkMismatchError` for a client of the other kind (answer it with :func:`refuse_link`),
    :class:`~trio_tunnel.tls.TlsHandshakeError` for a failed TLS handshake, ``trio.BrokenResourceError`` when the
    client closed before sending anything."""
    first = await _first_byte(stream)
    if first is None:
        raise trio.BrokenResourceError("the client closed the connection before sending anything")
    if tls is None:
        if first == TLS_HANDSHAKE_RECORD:
            raise LinkMismatchError(client_tls=True)
        return stream, b""
    if first != TLS_HANDSHAKE_RECORD:
        if first != F.MAGIC[0]:  # neither TLS nor a plaintext trio-tunnel client: a scanner, worth no answer
            raise TlsHandshakeError("neither TLS nor trio-tunnel (a scanner?)")
        raise LinkMismatchError(client_tls=False)
    secured = await TlsStream.handshake(stream, tls.context, server_side=True, local_certificate=tls.certificate)
    return secured, channel_binding(tls.certificate)


async def refuse_link(stream: TcpStream, message: str) -> None:
    """Answer a client of the other kind with one plaintext REFUSE frame, then close.

    What the client sent is read first (a little, bounded by the caller's cancel scope): closing a socket with
    unread data makes the kernel send a reset, and the client would then see "connection reset" instead of the
    refusal. A TLS client shows the frame as "the peer does not speak TLS"; a plaintext one as the message."""
    try:
        with trio.move_on_after(0.5):
            await stream.receive_some(4096)
        await stream.send_all(F.encode(F.Refuse(ErrorCode.PROHIBITED, message)))
        await stream.send_eof()
        with trio.move_on_after(0.5):
            while await stream.receive_some(4096):
                pass
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def secure_client_link(
    stream: TcpStream, tls: ClientTls | None, server_hostname: str
) -> tuple[trio.abc.Stream, bytes]:
    """The stream to run the client's session over, and the channel binding.

    Raises :class:`~trio_tunnel.tls.TlsHandshakeError` (an ``ssl.SSLError``) when the handshake fails, including
    a certificate the client cannot verify, and :class:`~trio_tunnel.certs.PinMismatchError` when the key is not
    one of the pins. ``server_hostname`` is checked against the certificate unless pins are given."""
    if tls is None:
        return stream, b""
    secured = await TlsStream.handshake(
        stream, tls.context, server_side=False, server_hostname=None if tls.pins else server_hostname
    )
    certificate = secured.peer_certificate_der()
    if tls.pins:
        try:
            check_pin(certificate, tls.pins)
        except BaseException:
            await trio.aclose_forcefully(secured)
            raise
    return secured, channel_binding(certificate)


async def presented_fingerprint(host: str, port: int) -> str | None:
    """The fingerprint of the key the server at ``host:port`` presents, read over a connection made only for
    that, without any verification (the caller bounds it with a cancel scope). None if it cannot be had."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only to read the key; nothing is sent over this connection
    try:
        stream = await connect_tcp(host, port)
        secured = await TlsStream.handshake(stream, context, server_side=False)
    except (OSError, TlsHandshakeError, trio.BrokenResourceError):
        return None
    try:
        certificate = secured.peer_certificate_der()
        return fingerprint(certificate) if certificate else None
    finally:
        await trio.aclose_forcefully(secured)
