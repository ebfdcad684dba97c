"""The server's TLS identity (a key and a self-signed certificate kept in a state directory), key fingerprints for
pinning, and the :class:`ssl.SSLContext` builders for the link. No Trio here.

Pins are on the key, not the certificate
----------------------------------------
:func:`fingerprint` hashes the certificate's SubjectPublicKeyInfo (the public key with its algorithm), as HPKP
and DANE's "SPKI" selector do: a certificate re-issued for the same key (the self-signed one renewed before it
expires, say) keeps its pin. The text form is ``sha256:`` and the standard base64 of the 32-byte hash **without**
``=`` padding (43 characters), as OpenSSH prints key fingerprints; :func:`parse_fingerprint` also accepts the
padding. To compute one for any certificate::

    openssl x509 -in cert.pem -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary \\
        | openssl base64 | tr -d '='

The self-signed certificate
---------------------------
ECDSA P-256 (small and fast handshakes), CN ``trio-tunnel``, valid for 10 years, and **no** subjectAltName: a
client trusts it by its pin only (chain and hostname checks are off with pins), so a name in it would never be
checked, and any fixed name would be wrong for almost every host and invite a configuration that "verifies" it.
A certificate less than :data:`RENEW_BEFORE` from expiry is re-issued for the same key (same pin).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import hashlib
import os
import secrets
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from trio_tunnel.errors import ConfigError

__all__ = [
    "CERT_FILE",
    "KEY_FILE",
    "PinMismatchError",
    "check_pin",
    "client_context",
    "default_state_dir",
    "fingerprint",
    "fingerprint_of_pem_file",
    "load_certificate_der",
    "load_or_create_identity",
    "parse_fingerprint",
    "server_context",
]

CERT_FILE: Final = "server-cert.pem"
KEY_FILE: Final = "server-key.pem"
COMMON_NAME: Final = "trio-tunnel"
VALIDITY: Final = datetime.timedelta(days=3652)
RENEW_BEFORE: Final = datetime.timedelta(days=30)
_PREFIX: Final = "sha256:"


class PinMismatchError(ssl.SSLCertVerificationError):
    """The server's key matches none of the pinned fingerprints. An ``ssl`` verification error (hence an
    ``OSError``, like other failures to connect); ``presented`` is the fingerprint the server showed."""

    def __init__(self, message: str, presented: str) -> None:
        super().__init__(message)
        self.presented = presented
        self.verify_message = message


# ------------------------------------------------------------------------------------------------ fingerprints


def fingerprint(cert_der: bytes) -> str:
    """``sha256:<base64, no padding>`` of the certificate's SubjectPublicKeyInfo."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise ValueError(f"not a DER certificate: {exc}") from None
    return _format(_spki_sha256(cert))


def _spki_sha256(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def _format(digest: bytes) -> str:
    return _PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


def parse_fingerprint(text: str) -> bytes:
    """The 32-byte hash in ``sha256:<base64>`` (padding optional, prefix case-insensitive)."""
    stripped = text.strip()
    if not stripped.lower().startswith(_PREFIX):
        raise ValueError(f"fingerprint {text!r} must start with {_PREFIX!r} (e.g. {_format(bytes(32))})")
    body = stripped[len(_PREFIX) :].rstrip("=")
    try:
        digest = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"fingerprint {text!r} is not valid base64 after {_PREFIX!r}") from None
    if len(digest) != 32:
        raise ValueError(f"fingerprint {text!r} has {len(digest)} bytes, a SHA-256 has 32 (43 base64 characters)")
    return digest


def load_certificate_der(path: str | os.PathLike[str]) -> bytes:
    """The first certificate of a PEM file, DER."""
    return _load_certificates(Path(path))[0].public_bytes(serialization.Encoding.DER)


def fingerprint_of_pem_file(path: str | os.PathLike[str]) -> str:
    """:func:`fingerprint` of the first certificate of a PEM file (the server's own, in a chain file)."""
    return _format(_spki_sha256(_load_certificates(Path(path))[0]))


def check_pin(peer_cert_der: bytes | None, pins: Iterable[str | bytes]) -> None:
    """Raise :class:`PinMismatchError` unless the peer's key matches one of ``pins`` (text or parsed)."""
    wanted = {pin if isinstance(pin, bytes) else parse_fingerprint(pin) for pin in pins}
    if peer_cert_der is None:
        raise PinMismatchError("the server presented no certificate; expected a pinned key", presented="none")
    presented = fingerprint(peer_cert_der)
    if parse_fingerprint(presented) not in wanted:
        raise PinMismatchError(
            f"the server's key {presented} matches no pinned fingerprint ({', '.join(map(_format, sorted(wanted)))}); "
            "if the server's key really changed, pin the new one",
            presented=presented,
        )


# ---------------------------------------------------------------------------------------------- the identity


def default_state_dir() -> Path:
    """Where the server keeps its identity when ``--state-dir`` is not given, the first that applies:
    ``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``, first entry), ``$XDG_STATE_HOME/trio-tunnel``,
    ``/var/lib/trio-tunnel`` for root, ``~/.local/state/trio-tunnel``."""
    systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd and os.path.isabs(systemd):
        return Path(systemd)
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "trio-tunnel"
    if os.geteuid() == 0:
        return Path("/var/lib/trio-tunnel")
    return Path.home() / ".local" / "state" / "trio-tunnel"


def load_or_create_identity(state_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(cert_path, key_path)`` of the server identity in ``state_dir``, made on first use.

    The directory is created with mode 0700 if missing; both files are written atomically (a temporary file made
    with ``O_EXCL`` and mode 0600, then renamed), so a crash leaves either no file or a whole one. An existing key
    is never replaced: a missing or soon-expiring certificate is re-issued for it (the pin stays); only a missing
    key makes a new identity. A certificate that does not belong to the key is an error, not silently replaced
    (that would change the pin every client has).
    """
    directory = Path(state_dir)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the state directory {directory}: {exc.strerror}; check its parent") from exc
    if key_path.exists():
        key = _load_key(key_path)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_private(key_path, pem)
        with contextlib.suppress(FileNotFoundError):
            cert_path.unlink()  # an orphan certificate of a lost key
    now = datetime.datetime.now(datetime.UTC)
    if cert_path.exists():
        cert = _load_certificates(cert_path)[0]
        if cert.public_key() != key.public_key():
            raise ConfigError(
                f"{cert_path} does not belong to the key {key_path}; remove both to make a new identity "
                "(clients must then pin the new fingerprint)"
            )
        if cert.not_valid_after_utc - now > RENEW_BEFORE:
            return cert_path, key_path
    _write_private(cert_path, _self_signed(key, now).public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _self_signed(key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate a client clock a little behind
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only from the first byte."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"cannot write {path}: {exc.strerror}; check the directory's owner and mode") from exc


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}; check the path and its mode") from exc


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key ({exc}); remove it to make a new one") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an ECDSA key; remove it to make a new identity")
    return key


def _load_certificates(path: Path) -> list[x509.Certificate]:
    data = _read(path, "certificate file")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{path} holds no PEM certificate; give a file with -----BEGIN CERTIFICATE----- blocks")
    return certs


# ---------------------------------------------------------------------------------------------- SSL contexts


def server_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS 1.3-only server context with this certificate (a chain: the server's first, then intermediates)
    and key. No session tickets: the link is one long connection, resumption would only cost bytes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.num_tickets = 0
    _load_certificates(Path(cert_file))  # readable errors for the certificate file before OpenSSL's
    _read(Path(key_file), "private key")
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"cannot use the certificate {cert_file} with the key {key_file} ({exc.reason or exc}); "
            "check that the key belongs to the first certificate and is not encrypted"
        ) from exc
    return context


def client_context(*, ca_file: str | os.PathLike[str] | None = None, pins: Iterable[str] = ()) -> ssl.SSLContext:
    """A TLS 1.3-only client context.

    With ``pins`` the chain and hostname are not checked (the server's certificate is usually self-signed): the
    caller **must** call :func:`check_pin` with the peer's certificate after the handshake. Without pins the
    server's chain is verified against ``ca_file`` (or the system's store) and its name against the
    ``server_hostname`` given to the handshake.
    """
    pins = tuple(pins)
    for pin in pins:
        parse_fingerprint(pin)  # a malformed pin fails here, not at the first connection
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if pins:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if ca_file is None:
        context.load_default_certs()
        return context
    _load_certificates(Path(ca_file))
    try:
        context.load_verify_locations(cafile=os.fspath(ca_file))
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load the CA certificates in {ca_file} ({exc.reason or exc})") from exc
    return context
